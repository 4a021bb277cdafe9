"""Per-layer cost of one vfio-user message inside the daemon, measured in-process, layer by layer.

Each probe runs the daemon's own code for one message in a loop, adding one layer at a time,
so each layer's cost is the difference between two probes (docs/performance.md has the
table and what it means):

* ``decode``: ``Connection.receive_data`` + ``next_event`` of one DMA_UNMAP (the protocol layer
  in); ``protocol``: + encoding its reply (``Connection.send``).
* ``session_no_model``: ``Session._process`` with the DMA view's ``unmap`` stubbed (dispatch
  glue); ``session``: the real ``Session._process`` with a ``PeDma`` on a POWER8 PHB
  (a never-mapped 4 KiB unmap, as in a pseries boot's storm); ``session_region_read`` and
  ``session_dma_map`` do the same for a 4-byte BAR read and a 4 KiB map with an fd.
* ``syscalls``: the socket calls alone on a socketpair (the peer's send and recv included);
  ``trio_wait``: + ``trio.lowlevel.wait_readable`` before the recvmsg (one scheduler round:
  epoll_ctl, epoll_wait, reschedule); ``channel``: ``vfiod.transport.Channel`` receive + send
  instead (its lock and cancellation checkpoint too).

Figures are CPU microseconds per message from ``time.thread_time`` (best of ``repeat``; the
kernel's share from ``getrusage``): warm caches, no sleeping, so they are floors of what the
daemon pays. ``--instructions`` also
counts user-space instructions per message under valgrind's callgrind (the difference of two
run lengths, so start-up cancels out), which no other load on the machine can move.

Run: ``python -m bench.layer_bench [--instructions]`` (prints JSON).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from bench.message_bench import CONFIG
from bench.stdclient import (
    HEADER,
    PAGE,
    QEMU_CAPS,
    VERSION,
    dma_map_msg,
    dma_unmap_msg,
    region_read_msg,
)

PROBES = ("decode", "protocol", "session_no_model", "session", "session_region_read",
          "session_dma_map", "syscalls", "trio_wait", "channel")
WARMUP = 300
RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
_REPLY = HEADER.pack(1, 3, 16, 1, 0)
_VERSION_MSG = (HEADER.pack(0, VERSION, 20 + len(QEMU_CAPS), 0, 0)
                + struct.pack("=HH", 0, 0) + QEMU_CAPS)


def _session(tmp: Path) -> Any:
    """A real Session of a test function on a POWER8 PHB, its PeDma set up, VERSION done."""
    from vfiod import config as vconfig
    from vfiod.host import Host
    from vfiod.transport import Peer

    parsed = vconfig.parse(CONFIG, "layer-bench")
    host = Host(vconfig.Config(tmp, parsed.functions, phbs=parsed.phbs,
                               memlock_limit=parsed.memlock_limit))
    slot = host.slot("test0")
    peer = Peer(os.getpid(), os.getuid(), os.getgid())
    # no channel: the probes feed the protocol and take the replies themselves
    session = slot.endpoint._session_factory(slot.function, None, "test0", peer)  # type: ignore[arg-type]
    session.dma = session._dma_factory()
    session.function.attach_dma(session.dma)
    session.conn.receive_data(_VERSION_MSG)
    session._process([])
    return session


def _sync_probe(name: str, n: int, tmp: Path) -> Callable[[int], None]:
    """The loop body of a probe without trio: one message per call."""
    from vfiod.protocol import DmaUnmapReply

    unmaps = [dma_unmap_msg(i, (i % 200000) * PAGE, PAGE) for i in range(n)]
    session = _session(tmp)
    conn, process = session.conn, session._process
    if name == "decode":
        def body(i: int) -> None:
            conn.receive_data(unmaps[i])
            conn.next_event()
            conn.next_event()
            conn._inbound.clear()
        return body
    if name == "protocol":
        def body(i: int) -> None:
            conn.receive_data(unmaps[i])
            ev = conn.next_event()
            conn.next_event()
            conn.send(DmaUnmapReply(msg_id=ev.msg_id))
        return body
    if name in ("session_no_model", "session"):
        if name == "session_no_model":
            session.dma.unmap = lambda iova, size: 0
        def body(i: int) -> None:
            conn.receive_data(unmaps[i])
            process([])
        return body
    if name == "session_region_read":
        reads = [region_read_msg(i, 0, 8, 4) for i in range(n)]
        def body(i: int) -> None:
            conn.receive_data(reads[i])
            process([])
        return body
    if name == "session_dma_map":
        maps = [dma_map_msg(i, i * PAGE, PAGE, i * PAGE) for i in range(n)]
        ram = os.memfd_create("layer-bench-ram", 0)
        os.ftruncate(ram, n * PAGE)
        dup = os.dup
        def body(i: int) -> None:
            conn.receive_data(maps[i], [dup(ram)])  # each map brings its own fd, as QEMU's
            process([])
        return body
    raise ValueError(name)


def _socket_probe(name: str, peer: socket.socket, server: socket.socket
                  ) -> Callable[[bytes], Awaitable[None]]:
    from vfiod.transport import RECV_CHUNK, Channel

    buf = bytearray(64)
    rbuf = bytearray(RECV_CHUNK)
    rview = memoryview(rbuf)
    anc = socket.CMSG_SPACE(64 * 4)
    flags = socket.MSG_CMSG_CLOEXEC

    async def syscalls(m: bytes) -> None:
        peer.send(m)
        nbytes = server.recvmsg_into([rview], anc, flags)[0]
        bytes(rview[:nbytes])
        server.send(_REPLY)
        peer.recv_into(buf)

    async def trio_wait(m: bytes) -> None:
        peer.send(m)
        await trio.lowlevel.wait_readable(server)
        nbytes = server.recvmsg_into([rview], anc, flags)[0]
        bytes(rview[:nbytes])
        server.send(_REPLY)
        peer.recv_into(buf)

    channel = Channel(trio.socket.from_stdlib_socket(server))

    async def through_channel(m: bytes) -> None:
        peer.send(m)
        await channel.receive()
        await channel.send(_REPLY)
        peer.recv_into(buf)

    return {"syscalls": syscalls, "trio_wait": trio_wait, "channel": through_channel}[name]


class _Meter:
    """CPU of this thread: total from thread_time, the kernel's share from getrusage."""

    def __enter__(self) -> _Meter:
        self.t0 = time.thread_time()
        self.sys0 = resource.getrusage(RUSAGE_THREAD).ru_stime
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.thread_time() - self.t0
        self.sys = resource.getrusage(RUSAGE_THREAD).ru_stime - self.sys0


def run_probe(name: str, n: int) -> tuple[float, float]:
    """(CPU, kernel CPU) seconds per message of ``n`` messages through probe ``name``, after a
    warm-up."""
    n = max(n, 1)
    with tempfile.TemporaryDirectory(prefix="vfiod-layer-bench-") as tmpdir:
        total = WARMUP + n
        if name in ("syscalls", "trio_wait", "channel"):
            msgs = [dma_unmap_msg(i, (i % 200000) * PAGE, PAGE) for i in range(total)]

            async def main() -> _Meter:
                peer, server = socket.socketpair()
                server.setblocking(False)
                try:
                    body = _socket_probe(name, peer, server)
                    for m in msgs[:WARMUP]:
                        await body(m)
                    with _Meter() as meter:
                        for m in msgs[WARMUP:]:
                            await body(m)
                    return meter
                finally:
                    peer.close()
                    server.close()

            meter = trio.run(main)
        else:
            sync_body = _sync_probe(name, total, Path(tmpdir))
            for i in range(WARMUP):
                sync_body(i)
            with _Meter() as meter:
                for i in range(WARMUP, total):
                    sync_body(i)
        return meter.cpu / n, meter.sys / n


def _instructions(name: str, n: int) -> int:
    """User-space instructions of one probe process under callgrind (start-up included)."""
    with tempfile.TemporaryDirectory(prefix="vfiod-callgrind-") as tmpdir:
        out = Path(tmpdir) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, "-m", "bench.layer_bench", "--probe", name, "--n", str(n)],
            check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        m = re.search(r"^summary:\s*(\d+)", out.read_text(), re.M)
        if m is None:
            raise RuntimeError(f"no instruction total in callgrind's output for {name}")
        return int(m.group(1))


LAYERS = ("protocol_decode", "protocol_encode", "session_dispatch", "pedma_unmap",
          "socket_syscalls_with_peer", "trio_wait_readable", "channel_glue")


def _layers(per: dict[str, float]) -> dict[str, float]:
    """What each layer adds per storm DMA_UNMAP, from the differences between probes."""
    return {
        "protocol_decode": per["decode"],
        "protocol_encode": per["protocol"] - per["decode"],
        "session_dispatch": per["session_no_model"] - per["protocol"],
        "pedma_unmap": per["session"] - per["session_no_model"],
        "socket_syscalls_with_peer": per["syscalls"],
        "trio_wait_readable": per["trio_wait"] - per["syscalls"],
        "channel_glue": per["channel"] - per["trio_wait"],
    }


def run(n: int = 20000, repeat: int = 3, instructions: bool = False) -> dict[str, Any]:
    best = {p: min(run_probe(p, n) for _ in range(repeat)) for p in PROBES}
    us = {p: cpu * 1e6 for p, (cpu, _) in best.items()}
    results: dict[str, Any] = {
        "note": "in-process, warm caches, no sleeping: floors of what the daemon pays; "
                "see docs/performance.md",
        "probe_cpu_us": us,
        "probe_kernel_us": {p: kernel * 1e6 for p, (_, kernel) in best.items()},
        "layer_cpu_us": _layers(us),
    }
    if instructions:
        if shutil.which("valgrind") is None:
            results["instructions"] = "valgrind not installed"
        else:
            small, large = 1000, 3000
            per = {p: (_instructions(p, large) - _instructions(p, small)) / (large - small)
                   for p in PROBES}
            results["probe_instructions"] = per
            results["layer_instructions"] = _layers(per)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.layer_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instructions", action="store_true",
                   help="also count instructions per message under callgrind (minutes)")
    p.add_argument("--n", type=int, default=20000, help="messages per probe")
    p.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)  # one run, for callgrind
    args = p.parse_args(argv)
    if args.probe:
        run_probe(args.probe, args.n)
        return 0
    import json

    print(json.dumps(run(args.n, instructions=args.instructions), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
