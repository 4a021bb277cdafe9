"""Framing: arbitrary chunking gives the same events, and fds go to the right message."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proto_helpers import ORDERS, Order, drain, header, pack, ready_server

from vfiod.protocol import (
    CLOSED,
    NEED_DATA,
    BadMessage,
    Connection,
    DmaMap,
    DmaUnmap,
    Event,
    RemoteProtocolError,
    Role,
    Sentinel,
    SetIrqsFlag,
    Version,
    VersionReply,
)

EVENTFD = SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER


def _stream(order: Order) -> tuple[bytes, dict[int, tuple[int, ...]]]:
    """A client's stream (VERSION .. posted write) and {message start: fds sent with it}."""
    js = b'{"capabilities":{}}\0'
    msgs: list[tuple[bytes, tuple[int, ...]]] = [
        (header(order, 0, 1, 20 + len(js)) + pack(order, "HH", 0, 0) + js, ()),
        (header(order, 1, 2, 48) + pack(order, "IIQQQ", 32, 3, 0, 0x1000, 0x1000), (100,)),
        (header(order, 2, 2, 48) + pack(order, "IIQQQ", 32, 1, 0, 0x9000, 0x1000), ()),
        (header(order, 3, 8, 36) + pack(order, "IIIII", 20, EVENTFD, 2, 0, 2), (101, 102)),
        (header(order, 4, 99, 20) + b"junk", ()),  # unknown command: skipped, BadMessage
        (header(order, 5, 10, 36, 0x10) + pack(order, "QII", 0, 0, 4) + b"\1\2\3\4", ()),
        (header(order, 6, 9, 32) + pack(order, "QII", 0, 7, 256), ()),
    ]
    data, marks, pos = b"", {}, 0
    for raw, fds in msgs:
        if fds:
            marks[pos] = fds
        data += raw
        pos += len(raw)
    return data, marks


def _feed(conn: Connection, data: bytes, marks: dict[int, tuple[int, ...]],
          cuts: set[int]) -> list[Event | Sentinel]:
    """Deliver data cut at `cuts`, the way Linux does with fds: a read stops right after the
    send that carried fds, and the fds come with the read that returns that send's first byte."""
    ends = {a + int.from_bytes(data[a + 4 : a + 8], conn.byteorder): fds
            for a, fds in marks.items()}
    bounds = sorted({0, len(data)} | {c for c in cuts if 0 < c < len(data)} | set(ends))
    starts = sorted(marks)
    events: list[Event | Sentinel] = []

    def pull() -> None:
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(ev)
            if isinstance(ev, Version):  # answer at once, as a server session would
                conn.send(VersionReply(msg_id=ev.msg_id or 0))
            if ev is CLOSED:
                return

    for a, b in zip(bounds, bounds[1:], strict=False):
        fds = next((marks[m] for m in starts if a <= m < b), ())
        conn.receive_data(data[a:b], fds)
        pull()
    conn.receive_data(b"")
    pull()
    return events


def _reference(order: Order) -> list[Event | Sentinel]:
    data, marks = _stream(order)
    return _feed(Connection(Role.SERVER, byteorder=order), data, marks, set())


@pytest.mark.parametrize("order", ORDERS)
def test_reference_events(order: Order) -> None:
    events = _reference(order)
    assert [type(e).__name__ for e in events] == [
        "Version", "DmaMap", "DmaMap", "DeviceSetIrqs", "BadMessage", "RegionWrite",
        "RegionRead", "Sentinel",
    ]
    assert events[1] == DmaMap(3, 0, 0x1000, 0x1000, fd=100, msg_id=1)
    assert events[3].fds == (101, 102)  # type: ignore[union-attr]
    assert events[-1] is CLOSED


@pytest.mark.parametrize("order", ORDERS)
def test_every_single_split_point(order: Order) -> None:
    data, marks = _stream(order)
    ref = _reference(order)
    for cut in range(1, len(data)):
        conn = Connection(Role.SERVER, byteorder=order)
        assert _feed(conn, data, marks, {cut}) == ref, cut


def test_byte_by_byte() -> None:
    data, marks = _stream("little")
    conn = Connection(Role.SERVER, byteorder="little")
    assert _feed(conn, data, marks, set(range(len(data)))) == _reference("little")


@given(st.sets(st.integers(1, 400), max_size=30), st.sampled_from(ORDERS))
def test_random_multi_split(cuts: set[int], order: Order) -> None:
    data, marks = _stream(order)
    conn = Connection(Role.SERVER, byteorder=order)
    assert _feed(conn, data, marks, cuts) == _reference(order)


def test_fds_belong_to_message_holding_last_byte_of_chunk() -> None:
    """QEMU pipelines a DMA_UNMAP and the next DMA_MAP; Linux returns both in one chunk with
    the map's fd (a read stops right after the send that carried fds): the fd is the map's."""
    server = ready_server()
    unmap = header("little", 1, 3, 40) + pack("little", "IIQQ", 24, 0, 0, 0x1000)
    dmamap = header("little", 2, 2, 48) + pack("little", "IIQQQ", 32, 3, 0, 0x1000, 0x1000)
    server.receive_data(unmap[:10])
    server.receive_data(unmap[10:] + dmamap, [55])
    evs = drain(server)
    assert evs[0] == DmaUnmap(0, 0, 0x1000, msg_id=1)
    assert evs[1] == DmaMap(3, 0, 0x1000, 0x1000, fd=55, msg_id=2)


def test_fds_of_a_message_read_in_parts_come_with_its_first_part() -> None:
    server = ready_server()
    dmamap = header("little", 2, 2, 48) + pack("little", "IIQQQ", 32, 3, 0, 0x1000, 0x1000)
    server.receive_data(dmamap[:20], [56])
    server.receive_data(dmamap[20:])
    assert drain(server)[0] == DmaMap(3, 0, 0x1000, 0x1000, fd=56, msg_id=2)


def test_two_fd_batches_in_one_message_are_merged_and_checked() -> None:
    server = ready_server()
    msg = header("little", 1, 2, 48) + pack("little", "IIQQQ", 32, 3, 0, 0, 0x1000)
    server.receive_data(msg[:8], [1])
    server.receive_data(msg[8:], [2])
    ev = drain(server)[0]
    assert isinstance(ev, BadMessage) and ev.fds == (1, 2)


def test_fatal_error_returns_all_buffered_fds() -> None:
    server = ready_server()
    server.receive_data(header("little", 1, 2, 8), [7])
    server.receive_data(b"more", [8])
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.fds == (7, 8)


def test_version_then_data_in_one_chunk() -> None:
    data, marks = _stream("little")
    conn = Connection(Role.SERVER, byteorder="little")
    conn.receive_data(data[:40])
    ev = conn.next_event()
    assert isinstance(ev, Version)
    assert conn.next_event() is NEED_DATA
    assert isinstance(NEED_DATA, Sentinel)
