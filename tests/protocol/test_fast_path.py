"""The compiled per-command codecs and the READY fast path say what the generic rules say."""

from __future__ import annotations

import errno

import pytest
from proto_helpers import ORDERS, Order, drain, header, pair

from vfiod.protocol import (
    NEED_DATA,
    BadMessage,
    Connection,
    DmaMap,
    DmaMapReply,
    DmaRead,
    DmaUnmap,
    DmaUnmapReply,
    LocalProtocolError,
    ReceiveBuffer,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteReply,
    Role,
)


def test_take_skips_the_header_and_keeps_fd_attribution() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"a" * 10)
    buf.feed(b"b" * 10, [7])
    assert buf.take(8, 2) == (b"a" * 6, ())
    assert buf.take(12, 4) == (b"bbbbbbbb", (7,))
    big = bytes(range(256)) * 64
    buf.feed(big, [8])
    assert buf.take(len(big), 16) == (big[16:], (8,))
    assert len(buf) == 0


@pytest.mark.parametrize("order", ORDERS)
def test_burst_in_one_chunk_with_the_fd_on_its_last_message(order: Order) -> None:
    client, server = pair(order)
    outs = [client.send(DmaUnmap(0, 0x1000 * i, 0x1000)) for i in range(5000)]
    last = client.send(DmaMap(3, 0, 0x1000, 0x1000, 42))
    server.receive_data(b"".join(o.data for o in [*outs, last]), last.fds)
    events = drain(server)
    assert events[-1] is NEED_DATA
    assert [e.msg_id for e in events[:-1]] == [o.msg_id for o in [*outs, last]]  # type: ignore
    assert isinstance(events[-2], DmaMap) and events[-2].fd == 42
    assert all(isinstance(e, DmaUnmap) for e in events[:-2])
    for e in events[:-1]:
        assert isinstance(e, DmaUnmap | DmaMap) and e.msg_id is not None
        reply = DmaUnmapReply if isinstance(e, DmaUnmap) else DmaMapReply
        assert len(server.send(reply(msg_id=e.msg_id)).data) == 16
    assert server.outstanding_requests == ()


def test_fast_path_keeps_every_rule() -> None:
    client, server = pair()
    good = client.send(DmaUnmap(0, 0, 0x1000)).data
    # NO_REPLY: decoded, nothing owed
    posted = client.send(RegionWrite(0, 0, b"abcd", no_reply=True)).data
    server.receive_data(posted)
    ev = server.next_event()
    assert isinstance(ev, RegionWrite) and ev.no_reply and server.outstanding_requests == ()
    # argsz that disagrees with the body: EINVAL and an owed error reply
    bad = bytearray(good)
    bad[16] = 99
    server.receive_data(bytes(bad))
    ev = server.next_event()
    assert isinstance(ev, BadMessage) and ev.errno == errno.EINVAL
    assert server.outstanding_requests == (ev.msg_id,)
    with pytest.raises(LocalProtocolError):
        server.send(DmaUnmapReply(msg_id=ev.msg_id))  # a BadMessage gets an error reply only
    # an fd on a message that takes none
    server2 = pair()[1]
    server2.receive_data(good, [5])
    ev = server2.next_event()
    assert isinstance(ev, BadMessage) and ev.fds == (5,)
    # a request only a server sends, and a count above max_data_xfer_size
    server3 = pair()[1]
    dma = header("little", 1, 11, 16 + 12) + (0).to_bytes(8, "little") + (4).to_bytes(4, "little")
    server3.receive_data(dma)
    ev = server3.next_event()
    assert isinstance(ev, BadMessage) and ev.errno == errno.EINVAL
    big = client.send(RegionRead(0, 0, 4)).data
    server3.max_data_xfer_size = 2
    server3.receive_data(big)
    ev = server3.next_event()
    assert isinstance(ev, BadMessage) and ev.errno == errno.E2BIG


def test_max_message_size_follows_max_data_xfer_size() -> None:
    conn = Connection(Role.SERVER)
    conn.max_data_xfer_size = 1 << 22
    assert conn.max_message_size == (1 << 22) + 64
    conn.max_data_xfer_size = 16
    assert conn.max_message_size == 8 + 200 * 24 + 64


def test_encode_errors_are_local() -> None:
    client, server = pair()
    with pytest.raises(LocalProtocolError, match="header field out of range"):
        client.send(DmaUnmap(0, 0, 0x1000, msg_id=1 << 16))
    with pytest.raises(LocalProtocolError, match="field out of range"):
        client.send(DmaUnmap(0, 1 << 64, 0x1000))
    with pytest.raises(LocalProtocolError, match="bad field type"):
        client.send(RegionWrite(0, 0, None))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        client.send(DmaRead(0, 4))  # a client never sends DMA_READ
    out = client.send(RegionRead(0x10, 0, 4))
    server.receive_data(out.data)
    req = server.next_event()
    assert isinstance(req, RegionRead)
    with pytest.raises(LocalProtocolError):
        server.send(RegionReadReply(0x10, 0, b"toolong", msg_id=out.msg_id))
    with pytest.raises(LocalProtocolError):
        server.send(RegionWriteReply(msg_id=out.msg_id))  # wrong command
    reply = server.send(RegionReadReply(0x10, 0, b"1234", msg_id=out.msg_id))
    assert reply.data[-4:] == b"1234" and reply.msg_id == out.msg_id
    client.receive_data(reply.data)
    ev = client.next_event()
    assert isinstance(ev, RegionReadReply) and ev.data == b"1234"
