"""Every recoverable error (BadMessage, stream stays in sync) and every fatal one."""

from __future__ import annotations

import errno as E

import pytest
from proto_helpers import ORDERS, Order, drain, header, one, pack, ready_client, ready_server

from vfiod.protocol import (
    NEED_DATA,
    BadMessage,
    Command,
    Connection,
    DeviceGetRegionInfo,
    DeviceReset,
    DmaRead,
    ErrorReply,
    LocalProtocolError,
    ProtocolError,
    RegionRead,
    RemoteProtocolError,
    Role,
    SetIrqsFlag,
    State,
    Version,
)

EVENTFD = SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER
# These tests encode little-endian bytes by hand, so their connections say so explicitly (the
# default is the host's order: vfio-user is host-endian, and the suite also runs on s390x).
L: Order = "little"


def _dma_map(order: Order, msg_id: int = 1, argsz: int = 32) -> bytes:
    return header(order, msg_id, 2, 48) + pack(order, "IIQQQ", argsz, 3, 0, 0, 0x1000)


def _set_irqs(order: Order, flags: int, count: int) -> bytes:
    return header(order, 1, 8, 36) + pack(order, "IIIII", 20, flags, 2, 0, count)


def _reset(order: Order, msg_id: int) -> bytes:
    return header(order, msg_id, 13, 16)


def _version(order: Order, msg_id: int = 0, major: int = 0, js: bytes = b"{}\0") -> bytes:
    return header(order, msg_id, 1, 20 + len(js)) + pack(order, "HH", major, 0) + js


# (name, raw message, fds, expected errno, connection factory kwargs)
RECOVERABLE = [
    ("unknown command", lambda o: header(o, 1, 99, 24) + bytes(8), (), E.ENOSYS),
    ("command 0", lambda o: header(o, 1, 0, 16), (), E.ENOSYS),
    ("unsupported command", lambda o: header(o, 1, 6, 16), (), E.EOPNOTSUPP),
    ("migration command", lambda o: header(o, 1, 17, 16), (), E.EOPNOTSUPP),
    ("body too short", lambda o: header(o, 1, 2, 44) + bytes(28), (), E.EINVAL),
    ("body too long", lambda o: header(o, 1, 13, 20) + bytes(4), (), E.EINVAL),
    ("bad argsz", lambda o: _dma_map(o, argsz=31), (), E.EINVAL),
    ("region-info argsz < 32",
     lambda o: header(o, 1, 5, 48) + pack(o, "IIIIQQ", 16, 0, 0, 0, 0, 0), (), E.EINVAL),
    ("region-info argsz > max",
     lambda o: header(o, 1, 5, 48) + pack(o, "IIIIQQ", 1 << 24, 0, 0, 0, 0, 0), (), E.EINVAL),
    ("read count over max",
     lambda o: header(o, 1, 9, 32) + pack(o, "QII", 0, 0, (1 << 20) + 1), (), E.E2BIG),
    ("write count over max",
     lambda o: header(o, 1, 10, 32 + 4500) + pack(o, "QII", 0, 0, 4500) + bytes(4500), (),
     E.E2BIG),
    ("write count != data",
     lambda o: header(o, 1, 10, 36) + pack(o, "QII", 0, 0, 8) + bytes(4), (), E.EINVAL),
    ("fds on a command without fds", lambda o: _reset(o, 1), (9,), E.EINVAL),
    ("two fds on DMA_MAP", _dma_map, (9, 10), E.EINVAL),
    ("set_irqs fds > count", lambda o: _set_irqs(o, EVENTFD, 1), (9, 10), E.EINVAL),
    ("set_irqs fds > max_msg_fds", lambda o: _set_irqs(o, EVENTFD, 20), tuple(range(17)),
     E.EINVAL),
    ("set_irqs fds without DATA_EVENTFD",
     lambda o: _set_irqs(o, SetIrqsFlag.DATA_NONE | SetIrqsFlag.ACTION_TRIGGER, 1), (9,),
     E.EINVAL),
    ("write multi count > 8",
     lambda o: header(o, 1, 15, 48) + pack(o, "QQII", 1, 0, 0, 9) + bytes(8), (), E.EINVAL),
    ("write multi wr_cnt disagrees",
     lambda o: header(o, 1, 15, 48) + pack(o, "QQII", 2, 0, 0, 1) + bytes(8), (), E.EINVAL),
    ("server-only request to a server",
     lambda o: header(o, 1, 11, 32) + pack(o, "QI", 0, 4) + bytes(4), (), E.EINVAL),
    ("VERSION twice", lambda o: _version(o), (), E.EINVAL),
    ("ERROR flag on a request", lambda o: header(o, 1, 13, 16, 0x20, 5), (), E.EINVAL),
    ("unknown message type", lambda o: header(o, 1, 13, 16, 2), (), E.EINVAL),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("name", "make", "fds", "errno"), RECOVERABLE,
                         ids=[r[0] for r in RECOVERABLE])
def test_recoverable(order: Order, name: str, make, fds, errno: int) -> None:  # type: ignore[no-untyped-def]
    server = ready_server(order, max_data_xfer_size=4096)
    raw = make(order)
    server.receive_data(raw, fds)  # a read ends with the send that carried fds (Linux)
    server.receive_data(_reset(order, 77))
    bad = server.next_event()
    assert isinstance(bad, BadMessage), (name, bad)
    assert bad.errno == errno and bad.fds == tuple(fds) and not bad.no_reply
    assert bad.msg_id == 1 or name == "VERSION twice"
    # the stream is still in sync, and the bad message is answered in order
    assert server.next_event() == DeviceReset(msg_id=77)
    out = server.send(ErrorReply(bad.msg_id, None, bad.errno))
    assert out.data == header(order, bad.msg_id, bad.command, 16, 0x21, errno)
    server.send(ErrorReply(77, Command.DEVICE_RESET, E.EIO))
    assert server.outstanding_requests == ()


def test_requests_before_version_are_refused() -> None:
    server = Connection(Role.SERVER, byteorder=L)
    server.receive_data(_dma_map(L, 4) + _version(L, 5))
    bad, ver, _ = drain(server)
    assert isinstance(bad, BadMessage) and bad.errno == E.EINVAL
    assert isinstance(ver, Version) and server.state is State.NEGOTIATING
    server.receive_data(_reset(L, 6))
    bad2 = one(server)
    assert isinstance(bad2, BadMessage) and "NEGOTIATING" in bad2.reason


@pytest.mark.parametrize(
    ("js", "major"),
    [(b"[]\0", 0), (b"{}", 0), (b"{}\0\0", 0), (b"\0", 0), (b"{\0", 0), (b"\xff\0", 0),
     (b"{}\0", 1)],
)
def test_bad_version_requests(js: bytes, major: int) -> None:
    server = Connection(Role.SERVER, byteorder=L)
    server.receive_data(_version(L, 3, major, js))
    bad = one(server)
    assert isinstance(bad, BadMessage) and bad.errno == E.EINVAL
    assert server.state is State.START
    server.send(ErrorReply(3, None, E.EINVAL))
    server.receive_data(_version(L, 4))
    assert isinstance(one(server), Version)


def test_version_with_no_reply_is_refused() -> None:
    server = Connection(Role.SERVER, byteorder=L)
    server.receive_data(header(L, 0, 1, 23, 0x10) + bytes(4) + b"{}\0")
    bad = one(server)
    assert isinstance(bad, BadMessage) and bad.no_reply
    assert server.outstanding_requests == ()


def test_unexpected_reply_on_server() -> None:
    server = ready_server()
    server.receive_data(header(L, 9, 2, 16, 1), [3])
    bad = one(server)
    assert isinstance(bad, BadMessage) and bad.no_reply and bad.fds == (3,)
    with pytest.raises(LocalProtocolError):
        server.send(ErrorReply(9, None, E.EINVAL))


def test_client_refuses_requests_a_client_does_not_take() -> None:
    client = ready_client()
    client.receive_data(header(L, 1, 9, 32) + pack(L, "QII", 0, 0, 4))
    bad = one(client)
    assert isinstance(bad, BadMessage) and bad.errno == E.EINVAL and not bad.no_reply


def test_client_dma_count_over_max() -> None:
    client = ready_client(max_data_xfer_size=4096)
    client.receive_data(header(L, 1, 11, 32) + pack(L, "QI", 0, 4097) + bytes(4))
    bad = one(client)
    assert isinstance(bad, BadMessage) and bad.errno == E.E2BIG


def _client_with(req) -> Connection:  # type: ignore[no-untyped-def]
    client = ready_client()
    client.send(req)
    return client


@pytest.mark.parametrize(
    ("req", "raw"),
    [
        (RegionRead(0, 7, 4, msg_id=1),  # short read (spec §2.8: count must match)
         header(L, 1, 9, 34, 1) + pack(L, "QII", 0, 7, 2) + b"ab"),
        (RegionRead(0, 7, 4, msg_id=1),  # larger than QEMU's buffer
         header(L, 1, 9, 40, 1) + pack(L, "QII", 0, 7, 8) + bytes(8)),
        (DeviceGetRegionInfo(0, msg_id=1),  # caps beyond argsz 32
         header(L, 1, 5, 56, 1) + pack(L, "IIIIQQ", 40, 8, 0, 32, 0, 0) + bytes(8)),
        (DeviceReset(msg_id=1), header(L, 1, 13, 16, 0x21, 0)),  # error without errno
        (DeviceReset(msg_id=1), header(L, 1, 13, 20, 0x21, 5) + bytes(4)),  # error with body
        (DeviceReset(msg_id=1), header(L, 1, 13, 16, 1)),  # fine except: see fds below
    ],
)
def test_client_bad_replies(req, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    client = _client_with(req)
    fds = (5,) if raw == header(L, 1, 13, 16, 1) else ()
    client.receive_data(raw, fds)
    bad = one(client)
    assert isinstance(bad, BadMessage) and bad.no_reply and bad.fds == fds
    assert client.pending_requests == ()


def test_client_version_reply_checks() -> None:
    client = Connection(Role.CLIENT, byteorder=L)
    client.send(Version(msg_id=0))
    client.receive_data(header(L, 0, 1, 23, 1) + pack(L, "HH", 0, 1) + b"{}\0")
    bad = one(client)
    assert isinstance(bad, BadMessage) and client.state is State.START
    client.send(Version(msg_id=1))
    client.receive_data(header(L, 1, 1, 16, 0x21, E.ENOTSUP))
    assert one(client) == ErrorReply(1, Command.VERSION, E.ENOTSUP)
    assert client.state is State.START


# --- fatal --------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(lambda o: header(o, 1, 13, 15), id="size<16"),
        pytest.param(lambda o: header(o, 1, 13, 0), id="size=0"),
        pytest.param(lambda o: header(o, 1, 10, (1 << 20) + 65), id="size>max"),
        pytest.param(lambda o: header(o, 1, 10, 0xFFFFFFFF), id="size=4G"),
    ],
)
def test_fatal_header(order: Order, raw) -> None:  # type: ignore[no-untyped-def]
    server = ready_server(order)
    server.receive_data(raw(order), [1, 2])  # fatal as soon as the header is in
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert isinstance(info.value, ProtocolError)
    assert info.value.fds == (1, 2)
    assert server.state is State.ERROR
    with pytest.raises(RemoteProtocolError) as again:
        server.next_event()
    assert again.value.fds == ()
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x", [3])
    with pytest.raises(LocalProtocolError):
        server.send(ErrorReply(1, None, 5))


def test_size_limit_is_max_data_xfer_plus_overhead() -> None:
    server = ready_server()
    assert server.max_message_size == (1 << 20) + 64
    server.receive_data(header(L, 1, 10, 32 + (1 << 20)) + pack(L, "QII", 0, 0, 1 << 20))
    assert server.next_event() is NEED_DATA  # a maximal REGION_WRITE is fine


@pytest.mark.parametrize("cut", [1, 15, 16, 30])
def test_eof_inside_a_message(cut: int) -> None:
    server = ready_server()
    raw = _dma_map(L)
    server.receive_data(raw[:cut], [4])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.fds == (4,)
    assert server.state is State.ERROR


def test_fds_without_data_and_data_after_eof_are_local_errors() -> None:
    server = ready_server()
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"", [1])
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")


def test_server_dma_request_error_reply() -> None:
    server = ready_server()
    out = server.send(DmaRead(0, 4))
    server.receive_data(header(L, out.msg_id, 11, 16, 0x21, E.EFAULT))
    assert one(server) == ErrorReply(out.msg_id, Command.DMA_READ, E.EFAULT)
