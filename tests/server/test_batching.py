"""Per-message fast paths of the session, transport and client keep the protocol's promises.

A pipelined burst in one chunk is answered in order (one send for the lot), NO_REPLY requests
stay unanswered inside a burst, replies queued before a fatal message still go out, and the
client's requester-reads path still serves the server's own DMA requests.
"""

from __future__ import annotations

import errno
import socket
import struct

import trio

from vfiod import client
from vfiod.devices import testdev as td
from vfiod.protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    DmaRead,
    DmaReadReply,
    DmaUnmap,
    DmaUnmapReply,
    DmaWrite,
    DmaWriteReply,
    ErrorReply,
    Event,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    Role,
    Version,
    VersionReply,
    server_capabilities,
)
from vfiod.server.endpoint import Endpoint
from vfiod.transport import Channel


async def _negotiated(path: object) -> tuple[trio.socket.SocketType, Connection]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    conn = Connection(Role.CLIENT)
    await _sendall(sock, conn.send(Version(caps=client.QEMU_CAPABILITIES)).data)
    assert isinstance(await _events(sock, conn, 1), list)
    return sock, conn


async def _sendall(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


async def _events(sock: trio.socket.SocketType, conn: Connection, n: int) -> list[Event]:
    out: list[Event] = []
    while len(out) < n:
        ev = conn.next_event()
        if ev is NEED_DATA:
            conn.receive_data(await sock.recv(1 << 16))
            continue
        assert ev is not CLOSED
        assert isinstance(ev, Event)
        out.append(ev)
    return out


async def test_burst_in_one_chunk_is_answered_in_order(endpoint: Endpoint) -> None:
    sock, conn = await _negotiated(endpoint.path)
    with sock:
        outs = [conn.send(DmaUnmap(0, 0x10000 * i, 0x1000)) for i in range(300)]
        posted = conn.send(RegionWrite(td.REG_SCRATCH, td.REGS_BAR, b"\x07\0\0\0", no_reply=True))
        bad = conn.send(DmaUnmap(0x80, 0, 0x1000))  # flags the server refuses: EINVAL
        read = conn.send(RegionRead(td.REG_SCRATCH, td.REGS_BAR, 4))
        await _sendall(sock, b"".join(o.data for o in [*outs, posted, bad, read]))
        got = await _events(sock, conn, 302)
        assert [e.msg_id for e in got] == [o.msg_id for o in [*outs, bad, read]]
        assert all(isinstance(e, DmaUnmapReply) for e in got[:300])
        assert isinstance(got[300], ErrorReply) and got[300].errno == errno.EINVAL
        assert isinstance(got[301], RegionReadReply) and got[301].data == b"\x07\0\0\0"
        assert conn.next_event() is NEED_DATA  # the posted write got no reply


async def test_replies_before_a_fatal_message_still_go_out(endpoint: Endpoint) -> None:
    sock, conn = await _negotiated(endpoint.path)
    with sock:
        outs = [conn.send(DmaUnmap(0, 0x1000 * i, 0x1000)) for i in range(3)]
        # then a reply to a request the server never made: fatal for the session
        stray = struct.pack("=HHIII", 999, int(DmaUnmapReply.command), 16, 1, 0)
        await _sendall(sock, b"".join(o.data for o in outs) + stray)
        got = await _events(sock, conn, 3)
        assert [e.msg_id for e in got] == [o.msg_id for o in outs]
        assert await sock.recv(100) == b""  # then the session ends


async def test_channel_send_many_messages_and_fds_in_order() -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ca, cb = Channel(a), Channel(b)
    r, w = trio.socket.socketpair()
    try:
        big = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffer, partial sends
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ca.send, big)
            got = bytearray()
            while len(got) < len(big):
                data, fds = await cb.receive()
                assert not fds
                got += data
            assert got == big
        await ca.send(b"x", [w.fileno()])
        data, fds = await cb.receive()
        assert data == b"x" and len(fds) == 1
        socket.socket(fileno=fds[0]).close()
        ca.close()
        assert (await cb.receive())[0] == b""
    finally:
        for s in (a, b, r, w):
            s.close()


# --- client: the requester reads, the server's DMA requests are still served ---------------


async def _fake_server(listener: trio.socket.SocketType, rounds: int) -> None:
    """Answers VERSION, then for each REGION_READ first does a DMA_WRITE and a DMA_READ of
    the client's memory at 0x1000 and returns what it read back."""
    sock, _ = await listener.accept()
    chan = Channel(sock)
    conn = Connection(Role.SERVER)

    stash: list[Event] = []  # requests that arrived while we waited for a DMA reply

    async def next_ev(want: type = Event) -> Event:
        for ev in stash:
            if isinstance(ev, want):
                stash.remove(ev)
                return ev
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                data, fds = await chan.receive()
                conn.receive_data(data, fds)
                continue
            assert isinstance(ev, Event)
            if isinstance(ev, want):
                return ev
            stash.append(ev)

    with sock:
        ver = await next_ev()
        assert isinstance(ver, Version) and ver.msg_id is not None
        out = conn.send(VersionReply(caps=server_capabilities(), msg_id=ver.msg_id))
        await chan.send(out.data)
        for i in range(rounds):
            req = await next_ev(RegionRead)
            assert isinstance(req, RegionRead) and req.msg_id is not None
            w = conn.send(DmaWrite(0x1000, bytes([i]) * 4))
            await chan.send(w.data)
            assert isinstance(await next_ev(DmaWriteReply), DmaWriteReply)
            r = conn.send(DmaRead(0x1000, 4))
            await chan.send(r.data)
            back = await next_ev(DmaReadReply)
            assert isinstance(back, DmaReadReply)
            out = conn.send(RegionReadReply(req.offset, req.region, back.data, msg_id=req.msg_id))
            await chan.send(out.data)
        # unsolicited: a DMA_WRITE while the client waits for nothing
        w = conn.send(DmaWrite(0x1000, b"idle"))
        await chan.send(w.data)
        assert isinstance(await next_ev(), DmaWriteReply)
        await trio.sleep_forever()


async def test_client_serves_server_dma_while_a_request_waits(tmp_path: object) -> None:
    path = f"{tmp_path}/fake.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_fake_server, listener, 20)
            async with client.connect(path) as dev:
                ram = dev.guest_memory(1 << 16)
                dev._dma.append((0, ram, 0, ram.size))  # as dma_map_memory records it
                for i in range(10):
                    assert await dev.region_read(0, 0, 4) == bytes([i]) * 4

                async def one(i: int) -> None:
                    await dev.region_read(0, 0, 4)

                async with trio.open_nursery() as readers:  # concurrent requesters
                    for i in range(10):
                        readers.start_soon(one, i)
                with trio.fail_after(10):
                    while ram.read(0x1000, 4) != b"idle":
                        await trio.sleep(0.01)
                assert dev.server_dma_requests == 41
                ram.close()
            nursery.cancel_scope.cancel()


async def test_client_request_after_server_closes_fails_cleanly(tmp_path: object) -> None:
    path = f"{tmp_path}/gone.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)

    async def close_after_version() -> None:
        sock, _ = await listener.accept()
        conn = Connection(Role.SERVER)
        conn.receive_data(await sock.recv(4096))
        ver = conn.next_event()
        assert isinstance(ver, Version) and ver.msg_id is not None
        await _sendall(sock, conn.send(VersionReply(msg_id=ver.msg_id)).data)
        await sock.recv(4096)
        sock.close()

    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_after_version)
            async with client.connect(path) as dev:
                try:
                    await dev.region_read(0, 0, 4)
                except ConnectionError:
                    pass
                else:
                    raise AssertionError("expected ConnectionError")
