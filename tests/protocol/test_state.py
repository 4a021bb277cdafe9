"""State table, outstanding-request tracking and the send-side rules (LocalProtocolError)."""

from __future__ import annotations

import errno as E

import pytest
from proto_helpers import deliver, header, one, pack, pair, ready_client, ready_server

from vfiod.protocol import (
    BadMessage,
    Connection,
    DeviceGetInfo,
    DeviceGetRegionInfo,
    DeviceInfoReply,
    DeviceReset,
    DeviceResetReply,
    DeviceSetIrqs,
    DmaMap,
    DmaMapReply,
    DmaRead,
    DmaReadReply,
    ErrorReply,
    LocalProtocolError,
    RegionInfoReply,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteReply,
    Role,
    SetIrqsFlag,
    State,
    Version,
    VersionReply,
    truncate_region_info,
)

L = "little"


def test_negotiation_states_both_roles() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    assert client.state is server.state is State.START
    with pytest.raises(LocalProtocolError):
        client.send(DeviceGetInfo())
    ver = deliver(client, server, Version(caps={"capabilities": {}}))
    assert client.state is server.state is State.NEGOTIATING
    with pytest.raises(LocalProtocolError):
        client.send(DeviceGetInfo())
    with pytest.raises(LocalProtocolError):
        client.send(Version())
    deliver(server, client, ErrorReply(ver.msg_id, None, E.EINVAL))  # type: ignore[attr-defined]
    assert client.state is server.state is State.START
    ver = deliver(client, server, Version())
    deliver(server, client, VersionReply(msg_id=ver.msg_id))  # type: ignore[attr-defined]
    assert client.state is server.state is State.READY
    with pytest.raises(LocalProtocolError):
        client.send(Version())


def test_client_assigns_ids_and_skips_pending() -> None:
    client = ready_client()
    first = client.send(DeviceReset())
    client._next_id = first.msg_id  # force a wrap onto the pending id
    second = client.send(DeviceReset())
    assert second.msg_id != first.msg_id
    assert set(client.pending_requests) == {first.msg_id, second.msg_id}
    with pytest.raises(LocalProtocolError):
        client.send(DeviceReset(msg_id=first.msg_id))
    posted = client.send(RegionWrite(0, 0, b"x", no_reply=True))
    assert posted.msg_id not in client.pending_requests


def test_replies_must_follow_request_order() -> None:
    client, server = pair()
    a = deliver(client, server, DeviceReset())
    b = deliver(client, server, DeviceGetInfo())
    assert server.outstanding_requests == (a.msg_id, b.msg_id)  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):
        server.send(DeviceInfoReply(2, 9, 5, msg_id=b.msg_id))  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):  # wrong reply type for the head request
        server.send(DeviceInfoReply(2, 9, 5, msg_id=a.msg_id))  # type: ignore[attr-defined]
    server.send(DeviceResetReply(msg_id=a.msg_id))  # type: ignore[attr-defined]
    server.send(DeviceInfoReply(2, 9, 5, msg_id=b.msg_id))  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):  # nothing outstanding any more
        server.send(DeviceResetReply(msg_id=a.msg_id))  # type: ignore[attr-defined]


def test_no_reply_requests_cannot_be_answered() -> None:
    client, server = pair()
    ev = deliver(client, server, RegionWrite(0, 0, b"abcd", no_reply=True))
    assert ev.no_reply  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):
        server.send(RegionWriteReply(msg_id=ev.msg_id))  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):
        server.send(ErrorReply(ev.msg_id, None, E.EIO))  # type: ignore[attr-defined]


def test_bad_message_only_takes_an_error_reply() -> None:
    server = ready_server()
    server.receive_data(header(L, 3, 13, 16), [9])
    bad = one(server)
    assert isinstance(bad, BadMessage)
    with pytest.raises(LocalProtocolError):
        server.send(DeviceResetReply(msg_id=3))
    with pytest.raises(LocalProtocolError):
        server.send(ErrorReply(3, None, 0))
    with pytest.raises(LocalProtocolError):
        server.send(ErrorReply(3, 4, E.EINVAL))  # command mismatch
    with pytest.raises(LocalProtocolError):
        server.send(bad)
    server.send(ErrorReply(3, None, E.EINVAL))


def test_region_read_reply_count_must_match() -> None:
    client, server = pair()
    req = deliver(client, server, RegionRead(0, 7, 4))
    with pytest.raises(LocalProtocolError):
        server.send(RegionReadReply(0, 7, b"ab", msg_id=req.msg_id))  # type: ignore[attr-defined]
    assert deliver(server, client, RegionReadReply(0, 7, b"abcd", msg_id=req.msg_id)) == (  # type: ignore[attr-defined]
        RegionReadReply(0, 7, b"abcd", msg_id=req.msg_id)  # type: ignore[attr-defined]
    )


def test_version_reply_must_fit_the_request() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    ver = deliver(client, server, Version(caps={}))
    big = {"capabilities": {"padding": "x" * 100}}
    with pytest.raises(LocalProtocolError):
        server.send(VersionReply(caps=big, msg_id=ver.msg_id))  # type: ignore[attr-defined]
    assert server.state is State.NEGOTIATING
    server.send(VersionReply(caps={}, msg_id=ver.msg_id))  # type: ignore[attr-defined]
    assert server.state is State.READY


def test_two_step_region_info_query() -> None:
    client, server = pair()
    caps = b"\x03\x00\x01\x00\x00\x00\x00\x00"
    full = RegionInfoReply(0xF, 2, 32, 0x1000, 0, caps, fd=5, msg_id=0)
    req = deliver(client, server, DeviceGetRegionInfo(2))
    first = deliver(server, client, truncate_region_info(  # explicit helper, also applied by send
        RegionInfoReply(0xF, 2, 32, 0x1000, 0, caps, fd=5, msg_id=req.msg_id), 32))  # type: ignore[attr-defined]
    assert isinstance(first, RegionInfoReply)
    assert (first.argsz, first.caps, first.fd, first.cap_offset) == (40, b"", None, 32)
    req = deliver(client, server, DeviceGetRegionInfo(2, argsz=first.argsz))
    second = deliver(server, client, RegionInfoReply(
        full.flags, 2, 32, 0x1000, 0, caps, fd=5, msg_id=req.msg_id))  # type: ignore[attr-defined]
    assert isinstance(second, RegionInfoReply)
    assert (second.argsz, second.caps, second.fd) == (40, caps, 5)


def test_region_info_reply_rules() -> None:
    client, server = pair()
    req = deliver(client, server, DeviceGetRegionInfo(0, argsz=64))
    with pytest.raises(LocalProtocolError):  # caps without CAPS flag
        server.send(RegionInfoReply(7, 0, 32, 0, 0, bytes(8), msg_id=req.msg_id))  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):  # cap_offset outside the caps
        server.send(RegionInfoReply(15, 0, 8, 0, 0, bytes(8), msg_id=req.msg_id))  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):  # argsz smaller than what is sent
        server.send(RegionInfoReply(15, 0, 32, 0, 0, bytes(8), argsz=33, msg_id=req.msg_id))  # type: ignore[attr-defined]


def test_send_side_validation() -> None:
    client, server = pair(max_msg_fds=4)
    with pytest.raises(LocalProtocolError):
        client.send(DmaRead(0, 4))  # a client does not send DMA_READ
    with pytest.raises(LocalProtocolError):
        server.send(DeviceReset())  # a server does not send DEVICE_RESET
    with pytest.raises(LocalProtocolError):
        client.send(DmaMap(1 << 32, 0, 0, 0))  # u32 overflow
    with pytest.raises(LocalProtocolError):
        client.send(RegionRead(0, 0, (1 << 20) + 1))  # E2BIG
    eventfd = SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER
    with pytest.raises(LocalProtocolError):
        client.send(DeviceSetIrqs(eventfd, 2, 0, 5, fds=(1, 2, 3, 4, 5)))  # > max_msg_fds
    with pytest.raises(LocalProtocolError):
        client.send(DeviceSetIrqs(eventfd, 2, 0, 1, fds=(1, 2)))  # > count
    with pytest.raises(LocalProtocolError):
        client.send(DeviceSetIrqs(SetIrqsFlag.DATA_NONE, 2, 0, 1, fds=(1,)))
    with pytest.raises(LocalProtocolError):
        client.send(Version(caps={"x": object()}))
    assert client.pending_requests == ()  # failed sends leave no trace


def test_server_dma_requests_match_replies_by_id() -> None:
    client, server = pair()
    a = server.send(DmaRead(0x1000, 2))
    b = server.send(DmaRead(0x2000, 2))
    assert a.msg_id != b.msg_id
    client.receive_data(a.data + b.data)
    ra, rb = client.next_event(), client.next_event()
    # the client must answer in order; the server matches by id either way
    da = client.send(DmaReadReply(0x1000, b"aa", msg_id=ra.msg_id))  # type: ignore[attr-defined]
    db = client.send(DmaReadReply(0x2000, b"bb", msg_id=rb.msg_id))  # type: ignore[attr-defined]
    server.receive_data(db.data + da.data)
    assert server.next_event() == DmaReadReply(0x2000, b"bb", msg_id=b.msg_id)
    assert server.next_event() == DmaReadReply(0x1000, b"aa", msg_id=a.msg_id)
    # a server may also have client requests outstanding meanwhile
    req = deliver(client, server, DmaMap(3, 0, 0, 0x1000))
    server.send(DmaMapReply(msg_id=req.msg_id))  # type: ignore[attr-defined]


def test_tolerates_echoed_reply_heads() -> None:
    client = ready_client()
    out = client.send(DmaMap(3, 0, 0, 0x1000))
    client.receive_data(header(L, out.msg_id, 2, 48, 1) + pack(L, "IIQQQ", 32, 3, 0, 0, 0x1000))
    assert one(client) == DmaMapReply(msg_id=out.msg_id)
