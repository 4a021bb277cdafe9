"""Where a message's time goes in the running daemon (``python -m vfiod``), from the outside.

Drives the daemon (and, for comparison, bench/responder.py) with the blocking stdlib client
through four workloads: ``storm`` (synchronous never-mapped 4 KiB DMA_UNMAPs, a pseries boot's
window clear), ``read`` (synchronous 4-byte REGION_READs), ``maps`` (pipelined 4 KiB DMA_MAPs,
each with the RAM fd) and ``unmaps`` (the same pages unmapped, pipelined). Per message:

* server CPU (/proc/PID/stat and schedstat) and voluntary context switches (sleeps);
* ``--strace``: system calls, from ``strace -c -f`` attached for the workload only;
* ``--instructions``: user-space instructions, from the server run under valgrind's callgrind
  with its counters zeroed before the workload and dumped after it (``callgrind_control``).

The last two are counts, so they do not move when other work loads the machine; strace and
callgrind slow the server down, so each runs in a pass of its own. docs/performance.md
explains the figures. Run: ``python -m bench.profile_daemon [--strace] [--instructions]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from bench.message_bench import REG_SCRATCH, REGS_BAR, responder, vfiod_daemon
from bench.stdclient import PAGE, StdClient, cpu_sample, dma_map_msg, dma_unmap_msg

WORKLOADS = ("storm", "read", "maps", "unmaps")
#: Far from the pages the workloads use, for the warm-up.
WARM_IOVA = 1 << 30
_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", re.M)


def _warm_up(client: StdClient, ram_fd: int) -> None:
    client.region_read_round_trips(REGS_BAR, REG_SCRATCH, 200, warmup=0)
    client.unmap_storm(200, iova=WARM_IOVA)
    client.pipelined([dma_map_msg(i, WARM_IOVA + i * PAGE, PAGE, i * PAGE) for i in range(200)],
                     ram_fd)
    client.pipelined([dma_unmap_msg(i, WARM_IOVA + i * PAGE, PAGE) for i in range(200)])


def _workload(client: StdClient, name: str, n: int, ram_fd: int) -> Callable[[], object]:
    if name == "storm":
        return partial(client.unmap_storm, n)
    if name == "read":
        return partial(client.region_read_round_trips, REGS_BAR, REG_SCRATCH, n, warmup=0)
    maps = [dma_map_msg(i, i * PAGE, PAGE, i * PAGE) for i in range(n)]
    unmaps = [dma_unmap_msg(i, i * PAGE, PAGE) for i in range(n)]
    if name == "maps":
        return partial(client.pipelined, maps, ram_fd)
    client.pipelined(maps, ram_fd)  # unmaps: the pages are mapped first, unmeasured
    return partial(client.pipelined, unmaps)


@contextmanager
def _strace(pid: int, out: Path) -> Iterator[None]:
    proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    proc.stderr.readline()  # "strace: Process N attached ..."
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def _syscalls(out: Path, n: int) -> dict[str, float]:
    counts = {name: int(calls) for calls, name in _STRACE_ROW.findall(out.read_text())
              if name != "total"}
    per = {name: calls / n for name, calls in sorted(counts.items(), key=lambda kv: -kv[1])
           if calls / n >= 0.005}
    per["total"] = sum(counts.values()) / n
    return per


def _callgrind(pid: int, option: str) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True,
                   timeout=300)


def _instructions(dump: Path) -> int:
    m = re.search(r"^summary:\s*(\d+)", dump.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no instruction total in {dump}")
    return int(m.group(1))


def _server(which: str, tmp: Path, wrapper: Sequence[str], start_timeout: float
            ) -> AbstractContextManager[tuple[int, Path]]:
    if which == "vfiod":
        return vfiod_daemon(tmp, wrapper=wrapper, start_timeout=start_timeout)
    return responder(tmp, wrapper=wrapper, start_timeout=start_timeout)


def profile(which: str, workload: str, n: int, mode: str = "cpu") -> dict[str, Any]:
    """One server, one workload, one measuring mode (cpu, strace or instructions)."""
    with tempfile.TemporaryDirectory(prefix="vfiod-profile-") as tmpdir:
        tmp = Path(tmpdir)
        dump = tmp / "callgrind.out"
        wrapper = (["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}"]
                   if mode == "instructions" else [])
        timeout = 600.0 if wrapper else 30.0
        ram_fd = os.memfd_create("profile-ram", 0)
        try:
            os.ftruncate(ram_fd, max(n, 200) * PAGE)
            with _server(which, tmp, wrapper, timeout) as (pid, sock):
                client = StdClient(sock, timeout=timeout)
                try:
                    client.version()
                    _warm_up(client, ram_fd)
                    work = _workload(client, workload, n, ram_fd)
                    result: dict[str, Any] = {"server": which, "workload": workload,
                                              f"n_{mode}": n}
                    if mode == "strace":
                        trace = tmp / "strace.txt"
                        with _strace(pid, trace):
                            work()
                        result["syscalls_per_message"] = _syscalls(trace, n)
                    elif mode == "instructions":
                        _callgrind(pid, "-z")
                        work()
                        _callgrind(pid, "-d")
                        result["instructions_per_message"] = _instructions(
                            Path(f"{dump}.1")) / n
                    else:
                        before = cpu_sample(pid)
                        t0 = time.perf_counter()
                        work()
                        result["wall_us_per_message"] = (time.perf_counter() - t0) / n * 1e6
                        result["cpu_per_message"] = (cpu_sample(pid) - before).per_message(n)
                finally:
                    client.close()
        finally:
            os.close(ram_fd)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_daemon", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000, help="messages per workload")
    p.add_argument("--strace", action="store_true", help="count syscalls per message")
    p.add_argument("--instructions", action="store_true",
                   help="count user-space instructions per message under callgrind (slow)")
    p.add_argument("--workload", choices=WORKLOADS, action="append",
                   help="only these workloads (repeatable)")
    p.add_argument("--server", choices=("vfiod", "responder"), action="append",
                   help="only these servers (repeatable)")
    args = p.parse_args(argv)
    modes = ["cpu"] + (["strace"] if args.strace else []) + (
        ["instructions"] if args.instructions else [])
    results: list[dict[str, Any]] = []
    for workload in args.workload or WORKLOADS:
        for which in args.server or ("vfiod", "responder"):
            merged: dict[str, Any] = {}
            for mode in modes:
                n = min(args.n, 3000) if mode == "instructions" else args.n
                merged.update(profile(which, workload, n, mode))
            print(json.dumps(merged), flush=True)
            results.append(merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
