"""Per-message cost of the sans-I/O wire layer and of the session's dispatch, in-process.

No sockets: the numbers are the Python CPU a message costs the daemon before the kernel is
involved, which is what bounds a pseries guest's stream of 4 KiB DMA_MAP/DMA_UNMAPs.

* ``encode_us``: ``Connection.send`` of one event (request from a client, reply from a server).
* ``decode_us``: ``receive_data`` of one message as its own chunk + ``next_event`` (what a
  synchronous QEMU round trip costs), and ``decode_batched_us`` for a chunk of many messages.
* ``server_msgs_per_s``: a stream of DMA_UNMAPs fed in one chunk; ``protocol`` counts
  decode + reply encode only, ``session`` runs the real ``Session`` loop (dispatch to the DMA
  map table, replies through an in-memory channel).

Run: ``python -m bench.protocol_bench`` (prints JSON). Figures are best-of-``repeat``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from vfiod.devices.testdev import TestDevice
from vfiod.protocol import (
    NEED_DATA,
    Connection,
    DmaMap,
    DmaMapReply,
    DmaUnmap,
    DmaUnmapReply,
    RegionRead,
    RegionReadReply,
    Reply,
    Request,
    Role,
    Version,
    VersionReply,
    server_capabilities,
)

#: Fake fd numbers: the wire layer never touches fds, it only passes the integers through.
FAKE_FD = 1000


def _pair() -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    out = client.send(Version(caps=server_capabilities()))
    server.receive_data(out.data, out.fds)
    req = server.next_event()
    assert isinstance(req, Version) and req.msg_id is not None
    out = server.send(VersionReply(caps=server_capabilities(), msg_id=req.msg_id))
    client.receive_data(out.data, out.fds)
    assert isinstance(client.next_event(), VersionReply)
    return client, server


def _requests(name: str, n: int) -> list[Request]:
    if name == "DMA_MAP":
        return [DmaMap(3, i * 4096, 0x100000000 + i * 4096, 4096, FAKE_FD) for i in range(n)]
    if name == "DMA_UNMAP":
        return [DmaUnmap(0, 0x100000000 + i * 4096, 4096) for i in range(n)]
    return [RegionRead(0x10, 0, 4) for _ in range(n)]


def _reply(name: str, msg_id: int) -> Reply:
    if name == "DMA_MAP":
        return DmaMapReply(msg_id=msg_id)
    if name == "DMA_UNMAP":
        return DmaUnmapReply(msg_id=msg_id)
    return RegionReadReply(0x10, 0, b"\x01\x02\x03\x04", msg_id=msg_id)


def _best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def _per_message(name: str, n: int, repeat: int) -> dict[str, float]:
    """encode/decode in us per message, for the request and its reply."""
    reqs = _requests(name, n)

    def enc_request() -> float:
        client, _ = _pair()
        send = client.send
        t0 = time.perf_counter()
        for r in reqs:
            send(r)
        return (time.perf_counter() - t0) / n

    # One stream of wire requests (and their ids) to decode and answer.
    client, _ = _pair()
    outs = [client.send(r) for r in reqs]
    ids = [o.msg_id for o in outs]

    def dec_request(batched: bool) -> float:
        _, server = _pair()
        feed, nxt = server.receive_data, server.next_event
        if batched:
            blob = b"".join(o.data for o in outs)
            fds = [fd for o in outs for fd in o.fds]
            t0 = time.perf_counter()
            # fds ride with the last byte of the chunk: feed per-message when they matter.
            if fds:
                for o in outs:
                    feed(o.data, o.fds)
            else:
                feed(blob)
            for _ in range(n):
                nxt()
        else:
            t0 = time.perf_counter()
            for o in outs:
                feed(o.data, o.fds)
                nxt()
        return (time.perf_counter() - t0) / n

    def enc_reply() -> float:
        _, server = _pair()
        for o in outs:
            server.receive_data(o.data, o.fds)
            server.next_event()
        replies = [_reply(name, i) for i in ids]
        send = server.send
        t0 = time.perf_counter()
        for rep in replies:
            send(rep)
        return (time.perf_counter() - t0) / n

    def dec_reply() -> float:
        client, server = _pair()
        rep_outs = []
        for r in reqs:
            o = client.send(r)
            server.receive_data(o.data, o.fds)
            server.next_event()
            rep_outs.append(server.send(_reply(name, o.msg_id)))
        feed, nxt = client.receive_data, client.next_event
        t0 = time.perf_counter()
        for o in rep_outs:
            feed(o.data, o.fds)
            nxt()
        return (time.perf_counter() - t0) / n

    us = 1e6
    return {
        "request_encode_us": _best(enc_request, repeat) * us,
        "request_decode_us": _best(lambda: dec_request(False), repeat) * us,
        "request_decode_batched_us": _best(lambda: dec_request(True), repeat) * us,
        "reply_encode_us": _best(enc_reply, repeat) * us,
        "reply_decode_us": _best(dec_reply, repeat) * us,
    }


def _unmap_stream(n: int) -> bytes:
    client, _ = _pair()
    return b"".join(client.send(r).data for r in _requests("DMA_UNMAP", n))


def _protocol_server_rate(n: int, repeat: int) -> float:
    blob = _unmap_stream(n)

    def once() -> float:
        _, server = _pair()
        t0 = time.perf_counter()
        server.receive_data(blob)
        nxt, send = server.next_event, server.send
        while True:
            ev = nxt()
            if ev is NEED_DATA:
                break
            assert isinstance(ev, DmaUnmap) and ev.msg_id is not None
            send(DmaUnmapReply(msg_id=ev.msg_id))
        return time.perf_counter() - t0

    return n / _best(once, repeat)


class _MemoryChannel:
    """Stands in for vfiod.transport.Channel: one chunk in, then EOF; replies collected."""

    fds_truncated = False

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = list(chunks)
        self.sent = 0

    async def receive(self) -> tuple[bytes, list[int]]:
        return (self._chunks.pop(0) if self._chunks else b""), []

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self.sent += len(data)

    def close(self) -> None:
        pass


def _session_server_rate(n: int, repeat: int) -> float:
    from vfiod.server.session import Session

    client = Connection(Role.CLIENT)
    version = client.send(Version(caps=server_capabilities())).data
    blob = _unmap_stream(n)

    def once() -> float:
        dev = TestDevice()
        chan = _MemoryChannel([version, blob])
        session = Session(dev, chan, "bench")  # type: ignore[arg-type]

        async def serve() -> float:
            t0 = time.perf_counter()
            await session._serve()
            return time.perf_counter() - t0

        elapsed = trio.run(serve)
        assert session.messages == n + 1, session.messages
        assert chan.sent > 16 * n, chan.sent
        dev.close()
        return elapsed

    return n / _best(once, repeat)


def run(n: int = 5000, repeat: int = 5) -> dict[str, Any]:
    """Per-message encode/decode (us) for DMA_MAP, DMA_UNMAP and REGION_READ, and server
    DMA_UNMAP messages/s from one chunk."""
    results: dict[str, Any] = {
        name: _per_message(name, n, repeat) for name in ("DMA_MAP", "DMA_UNMAP", "REGION_READ")
    }
    results["server_msgs_per_s"] = {
        "protocol": _protocol_server_rate(n, repeat),
        "session": _session_server_rate(n, repeat),
    }
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(int(os.environ.get("N", "5000"))), indent=2))
