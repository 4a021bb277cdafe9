"""Property tests: every event round-trips; hostile bytes never crash and never lose an fd."""

from __future__ import annotations

import dataclasses
import errno as E
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from proto_helpers import ORDERS, Order, header, pack, pair

from vfiod.protocol import (
    CLOSED,
    NEED_DATA,
    BadMessage,
    Connection,
    DeviceFeature,
    DeviceFeatureReply,
    DeviceGetInfo,
    DeviceGetIrqInfo,
    DeviceGetRegionInfo,
    DeviceInfoReply,
    DeviceReset,
    DeviceResetReply,
    DeviceSetIrqs,
    DmaMap,
    DmaMapReply,
    DmaRead,
    DmaReadReply,
    DmaUnmap,
    DmaUnmapReply,
    DmaWrite,
    DmaWriteReply,
    ErrorReply,
    Event,
    IrqInfoReply,
    RegionFlag,
    RegionInfoReply,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    SetIrqsFlag,
    SetIrqsReply,
    Version,
    VersionReply,
    WriteMultiEntry,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
fd = st.integers(0, 10_000)
blob = st.binary(max_size=64)
count = st.integers(0, 1 << 20)
orders = st.sampled_from(ORDERS)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
json_object = st.dictionaries(text, json_value, max_size=4)


@st.composite
def set_irqs(draw: st.DrawFn) -> DeviceSetIrqs:
    fds = tuple(draw(st.lists(fd, max_size=16)))
    flags = draw(u32)
    if fds:
        flags |= SetIrqsFlag.DATA_EVENTFD
    cnt = draw(st.integers(len(fds), 0xFFFFFFFF))
    return DeviceSetIrqs(flags, draw(u32), draw(u32), cnt, fds=fds, no_reply=draw(st.booleans()))


def _req(cls: type, *args: Any, **kw: Any) -> st.SearchStrategy[Any]:
    return st.builds(cls, *args, no_reply=st.booleans(), **kw)


CLIENT_REQUESTS = st.one_of(
    _req(DmaMap, u32, u64, u64, u64, fd=st.none() | fd),
    _req(DmaUnmap, u32, u64, u64),
    _req(DeviceGetInfo),
    _req(DeviceGetRegionInfo, u32, argsz=st.integers(32, 1 << 20)),
    _req(DeviceGetIrqInfo, u32),
    set_irqs(),
    _req(RegionRead, u64, u32, count),
    _req(RegionWrite, u64, u32, blob),
    _req(RegionWriteMulti, st.lists(
        st.builds(WriteMultiEntry, u64, u32, st.binary(max_size=8)), max_size=200).map(tuple)),
    _req(DeviceReset),
    _req(DeviceFeature, u32, blob),
)
SERVER_REQUESTS = st.one_of(_req(DmaRead, u64, count), _req(DmaWrite, u64, blob))


@given(CLIENT_REQUESTS | SERVER_REQUESTS, orders)
def test_request_round_trip(req: Request, order: Order) -> None:
    client, server = pair(order)
    src, dst = (server, client) if isinstance(req, DmaRead | DmaWrite) else (client, server)
    out = src.send(req)
    dst.receive_data(out.data, out.fds)
    assert dst.next_event() == dataclasses.replace(req, msg_id=out.msg_id)
    assert dst.next_event() is NEED_DATA
    assert (out.msg_id in src.pending_requests) != req.no_reply


@given(st.integers(0, 0xFFFF), json_object, orders)
def test_version_request_round_trip(minor: int, caps: dict[str, Any], order: Order) -> None:
    client, server = Connection(Role.CLIENT, byteorder=order), Connection(Role.SERVER,
                                                                          byteorder=order)
    req = Version(0, minor, caps)
    out = client.send(req)
    server.receive_data(out.data)
    assert server.next_event() == dataclasses.replace(req, msg_id=out.msg_id)


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[Request, Reply]:
    """A request and a valid reply to it (msg_id filled in later)."""
    kind = draw(st.sampled_from([
        "dma_map", "dma_unmap", "info", "region_info", "irq_info", "set_irqs", "read",
        "write", "multi", "reset", "feature", "dma_read", "dma_write", "error",
    ]))
    if kind == "dma_map":
        return DmaMap(3, 0, 0, 4096), DmaMapReply(msg_id=0)
    if kind == "dma_unmap":
        return DmaUnmap(0, 0, 4096), DmaUnmapReply(msg_id=0)
    if kind == "info":
        return DeviceGetInfo(), DeviceInfoReply(draw(u32), draw(u32), draw(u32), msg_id=0)
    if kind == "region_info":
        caps = draw(st.binary(max_size=96))
        flags = draw(u32)
        if caps:
            flags |= RegionFlag.CAPS
            cap_offset = draw(st.integers(32, 32 + len(caps) - 1))
        else:
            cap_offset = draw(u32)
        total = 32 + len(caps)
        argsz = draw(st.integers(total, total + 64))
        reply = RegionInfoReply(flags, draw(u32), cap_offset, draw(u64), draw(u64), caps,
                                argsz=total, fd=draw(st.none() | fd), msg_id=0)
        return DeviceGetRegionInfo(draw(u32), argsz=argsz), reply
    if kind == "irq_info":
        return DeviceGetIrqInfo(2), IrqInfoReply(draw(u32), draw(u32), draw(u32), msg_id=0)
    if kind == "set_irqs":
        return DeviceSetIrqs(1, 2, 0, 0), SetIrqsReply(msg_id=0)
    if kind == "read":
        data = draw(blob)
        off, region = draw(u64), draw(u32)
        return RegionRead(off, region, len(data)), RegionReadReply(off, region, data, msg_id=0)
    if kind == "write":
        return RegionWrite(0, 0, b"x"), RegionWriteReply(msg_id=0)
    if kind == "multi":
        return RegionWriteMulti(()), RegionWriteMultiReply(msg_id=0)
    if kind == "reset":
        return DeviceReset(), DeviceResetReply(msg_id=0)
    if kind == "feature":
        data = draw(blob)
        req = DeviceFeature(0, data + draw(blob))  # the reply may not outgrow the request
        return req, DeviceFeatureReply(draw(u32), data, msg_id=0)
    if kind == "dma_read":
        data, addr = draw(blob), draw(u64)
        return DmaRead(addr, len(data)), DmaReadReply(addr, data, msg_id=0)
    if kind == "dma_write":
        return DmaWrite(0, b"abc"), DmaWriteReply(msg_id=0)
    return DeviceReset(), ErrorReply(0, None, draw(st.integers(1, 0xFFFFFFFF)))  # type: ignore[return-value]


@given(exchanges(), orders)
def test_reply_round_trip(exchange: tuple[Request, Reply | ErrorReply], order: Order) -> None:
    req, reply = exchange
    client, server = pair(order)
    asker, answerer = (server, client) if isinstance(req, DmaRead | DmaWrite) else (client, server)
    out = asker.send(req)
    answerer.receive_data(out.data, out.fds)
    got = answerer.next_event()
    assert isinstance(got, Request) and got.msg_id == out.msg_id
    reply = dataclasses.replace(reply, msg_id=out.msg_id)
    sent = answerer.send(reply)
    asker.receive_data(sent.data, sent.fds)
    decoded = asker.next_event()
    if isinstance(reply, ErrorReply):
        reply = dataclasses.replace(reply, command=req.command)
    assert decoded == reply
    assert asker.pending_requests == () and answerer.outstanding_requests == ()


@given(json_object, st.integers(0, 5), orders)
def test_version_reply_round_trip(caps: dict[str, Any], minor: int, order: Order) -> None:
    client, server = Connection(Role.CLIENT, byteorder=order), Connection(Role.SERVER,
                                                                          byteorder=order)
    pad = "x" * (len(json.dumps(caps, ensure_ascii=False).encode()) + 8)
    out = client.send(Version(0, 5, {"pad": pad}))
    server.receive_data(out.data)
    server.next_event()
    reply = VersionReply(0, minor, caps, msg_id=out.msg_id)
    sent = server.send(reply)
    client.receive_data(sent.data)
    assert client.next_event() == reply


# --- hostile input -------------------------------------------------------------------------------

FLAGS = st.sampled_from([0, 1, 0x10, 0x11, 0x20, 0x21, 2, 0xF0])


@st.composite
def plausible_message(draw: st.DrawFn, order: Order) -> bytes:
    """A header that frames correctly around a random body, to reach the decoders."""
    body = draw(st.binary(max_size=56))
    cmd = draw(st.integers(0, 20))
    if draw(st.booleans()) and cmd in (2, 3, 4, 5, 7, 8):
        body = pack(order, "I", len(body) + 4) + body  # plausible argsz
    size = 16 + len(body)
    if draw(st.integers(0, 20)) == 0:
        size = draw(u32)
    return header(order, draw(st.integers(0, 6)), cmd, size, draw(FLAGS), draw(u32)) + body


@st.composite
def hostile_stream(draw: st.DrawFn) -> tuple[Order, Role, list[tuple[bytes, tuple[int, ...]]]]:
    order = draw(orders)
    role = draw(st.sampled_from(list(Role)))
    pieces = draw(st.lists(st.binary(min_size=1, max_size=40) | plausible_message(order),
                           max_size=12))
    stream = b"".join(pieces)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=8)))
    bounds = [0, *[c for c in cuts if c < len(stream)], len(stream)]
    chunks, next_fd = [], 1000
    for a, b in zip(bounds, bounds[1:], strict=False):
        if a == b:
            continue
        n = draw(st.integers(0, 3))
        chunks.append((stream[a:b], tuple(range(next_fd, next_fd + n))))
        next_fd += n
    return order, role, chunks


def _prime(conn: Connection) -> None:
    """Give a client pending requests of several layouts, so random replies hit decoders."""
    if conn.role is Role.CLIENT:
        for req in (DmaMap(3, 0, 0, 4096), RegionRead(0, 7, 4), DeviceGetRegionInfo(0, argsz=64),
                    DeviceGetInfo(), DeviceGetIrqInfo(2), DeviceFeature(0, bytes(16))):
            conn.send(req)


@settings(max_examples=300)
@given(hostile_stream(), st.booleans())
def test_hostile_bytes_never_crash_or_leak(
    stream: tuple[Order, Role, list[tuple[bytes, tuple[int, ...]]]], negotiated: bool
) -> None:
    order, role, chunks = stream
    if negotiated:
        client, server = pair(order)
        conn = client if role is Role.CLIENT else server
    else:
        conn = Connection(role, byteorder=order)
    if negotiated:
        _prime(conn)
    sent: list[int] = []  # fds handed to the connection (unfed chunks stay ours)
    got: list[int] = []

    def pull() -> bool:
        while True:
            try:
                ev = conn.next_event()
            except RemoteProtocolError as exc:
                got.extend(exc.fds)
                return False
            if ev is NEED_DATA or ev is CLOSED:
                return True
            assert isinstance(ev, Event)
            got.extend(_fds_of(ev))
            owes = isinstance(ev, BadMessage | Request) and not ev.no_reply
            if owes:  # answering must always be possible: outstanding tracking is consistent
                conn.send(ErrorReply(ev.msg_id, None, E.EIO))  # type: ignore[union-attr]

    alive = True
    for data, fds in chunks:
        conn.receive_data(data, fds)
        sent.extend(fds)
        if not (alive := pull()):
            break
    if alive:
        conn.receive_data(b"")
        pull()
    assert sorted(got) == sorted(sent)


def _fds_of(ev: Event) -> tuple[int, ...]:
    fd_ = getattr(ev, "fd", None)
    return ((fd_,) if fd_ is not None else ()) + tuple(getattr(ev, "fds", ()))


@settings(max_examples=300)
@given(hostile_stream(), st.booleans(), st.integers(0, 12))
def test_a_reader_that_stops_early_gets_every_fd_back_once(
    stream: tuple[Order, Role, list[tuple[bytes, tuple[int, ...]]]], negotiated: bool, stop: int
) -> None:
    """A session that ends after `stop` events (a fatal message, a hang-up, a shutdown) owns the
    fds of the events it took; discard_buffered() hands back all the others, none twice."""
    order, role, chunks = stream
    conn = pair(order)[0 if role is Role.CLIENT else 1] if negotiated else Connection(
        role, byteorder=order)
    if negotiated:
        _prime(conn)
    sent: list[int] = []
    got: list[int] = []
    taken = 0
    for data, fds in chunks:
        conn.receive_data(data, fds)
        sent.extend(fds)
        while taken < stop:
            try:
                ev = conn.next_event()
            except RemoteProtocolError as exc:
                got.extend(exc.fds)
                taken = stop
                break
            if ev is NEED_DATA or ev is CLOSED:
                break
            assert isinstance(ev, Event)
            taken += 1
            got.extend(_fds_of(ev))
        if taken >= stop:
            break
    got.extend(conn.discard_buffered())
    assert sorted(got) == sorted(sent)
    assert conn.discard_buffered() == ()
