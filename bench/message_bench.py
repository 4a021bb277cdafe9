"""vfio-user message costs from the outside: the vfiod daemon against a minimal Python responder.

Both servers are separate processes driven by the same blocking stdlib client
(bench/stdclient.py) in the same run, so the ratios vfiod / responder are what to compare
(issue 11's targets: REGION_READ round trip <= 0.7x the responder's, pipelined DMA_MAP rate
>= 0.7x, pipelined DMA_UNMAP rate >= 0.85x). vfiod serves a test function behind a POWER8 PHB
(``window_policy = "power8"``), so every DMA_MAP and DMA_UNMAP goes through the PE's TCE
tables, as for a pseries guest. Workloads:

* ``region_read_4b``: synchronous 4-byte REGION_READs of a BAR register (median, p99).
* ``dma_map_4k_pipelined``: 4 KiB DMA_MAPs sent without waiting, each with the same memfd fd
  (QEMU sends the RAM fd with every map), replies collected by a second thread (rate).
* ``dma_unmap_4k_pipelined``: the same pages unmapped the same way (rate).
* ``unmap_storm``: a pseries boot's clear of its default window: synchronous 4 KiB
  DMA_UNMAPs of never-mapped pages, one at a time (rate).

Every workload also records the server's CPU per message from /proc (scheduler nanoseconds,
and the user/system split), which, unlike wall-clock rates, barely moves when the machine is
busy with something else. Rates and round trips are best of ``rounds`` alternating runs.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from bench.stdclient import (
    PAGE,
    CpuSample,
    StdClient,
    cpu_sample,
    dma_map_msg,
    dma_unmap_msg,
)

#: vfiod's test function: BAR0's scratch register.
REGS_BAR = 0
REG_SCRATCH = 0x08
#: The pseries default DMA window: 1 GiB of 4 KiB TCEs, which the guest clears at boot.
STORM_PAGES = 262144

CONFIG = """\
memlock_limit = "64G"

[[phb]]
index = 0
window_policy = "power8"

[[function]]
name = "test0"
personality = "testdev"
phb = 0
"""

TARGETS = {
    "region_read_round_trip": "<= 0.7",
    "dma_map_rate": ">= 0.7",
    "dma_unmap_rate": ">= 0.85",
}


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {path} within {timeout:.0f} s")
        time.sleep(0.02)


@contextmanager
def _process(cmd: list[str], sock: Path, what: str, log: Path,
             start_timeout: float) -> Iterator[int]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(sock, proc, what, start_timeout)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=start_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def responder(tmp: Path, wrapper: Sequence[str] = (),
              start_timeout: float = 30) -> Iterator[tuple[int, Path]]:
    """bench/responder.py in its own process (``wrapper``: e.g. valgrind and its options)."""
    sock = tmp / "responder.sock"
    cmd = [*wrapper, sys.executable, "-m", "bench.responder", str(sock)]
    with _process(cmd, sock, "the responder", tmp / "responder.log", start_timeout) as pid:
        yield pid, sock


@contextmanager
def vfiod_daemon(tmp: Path, config: str = CONFIG, function: str = "test0",
                 wrapper: Sequence[str] = (),
                 start_timeout: float = 30) -> Iterator[tuple[int, Path]]:
    """``python -m vfiod`` on ``config`` with its default logging, as an operator runs it."""
    cfg = tmp / "vfiod.toml"
    cfg.write_text(config)
    sockets = tmp / "vfiod-sockets"
    cmd = [*wrapper, sys.executable, "-m", "vfiod", "--config", str(cfg), "--socket-dir",
           str(sockets), "--state-dir", str(tmp / "vfiod-state")]
    sock = sockets / f"{function}.sock"
    with _process(cmd, sock, "vfiod", tmp / "vfiod.log", start_timeout) as pid:
        yield pid, sock


def _measured(pid: int, n: int, work: Callable[[], float]) -> tuple[float, dict[str, float]]:
    """Run ``work`` (returns seconds); with the server's CPU per message over it."""
    before: CpuSample = cpu_sample(pid)
    seconds = work()
    return seconds, (cpu_sample(pid) - before).per_message(n)


def _summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "n": len(s),
        "median_us": statistics.median(s) * 1e6,
        "p99_us": s[max(0, int(len(s) * 0.99) - 1)] * 1e6,
        "mean_us": statistics.fmean(s) * 1e6,
    }


class _Server:
    """One server under test, its client connection and the results gathered for it."""

    def __init__(self, name: str, pid: int, sock: Path, ram_fd: int) -> None:
        self.name = name
        self.pid = pid
        self.client = StdClient(sock)
        self.client.version()
        self.ram_fd = ram_fd
        self.results: dict[str, Any] = {}

    def keep_best(self, key: str, entry: dict[str, Any], better: Callable[[Any, Any], bool]
                  ) -> None:
        old = self.results.get(key)
        if old is None or better(entry, old):
            self.results[key] = entry

    def region_read(self, n: int) -> None:
        box: list[list[float]] = []

        def work() -> float:
            box.append(self.client.region_read_round_trips(REGS_BAR, REG_SCRATCH, n))
            return 0.0

        _, cpu = _measured(self.pid, n, work)
        entry = {**_summary(box[0]), "server": cpu}
        self.keep_best("region_read_4b", entry, lambda a, b: a["median_us"] < b["median_us"])

    def maps_and_unmaps(self, n: int) -> None:
        maps = [dma_map_msg(i, i * PAGE, PAGE, i * PAGE) for i in range(n)]
        unmaps = [dma_unmap_msg(i, i * PAGE, PAGE) for i in range(n)]
        for key, msgs, fd in (("dma_map_4k_pipelined", maps, self.ram_fd),
                              ("dma_unmap_4k_pipelined", unmaps, None)):
            seconds, cpu = _measured(self.pid, n, partial(self.client.pipelined, msgs, fd))
            entry = {"n": n, "per_s": n / seconds, "server": cpu}
            self.keep_best(key, entry, lambda a, b: a["per_s"] > b["per_s"])

    def storm(self, n: int) -> None:
        seconds, cpu = _measured(self.pid, n, lambda: self.client.unmap_storm(n))
        entry = {"n": n, "per_s": n / seconds, "us_per_message": seconds / n * 1e6,
                 "server": cpu}
        self.keep_best("unmap_storm", entry, lambda a, b: a["per_s"] > b["per_s"])


def _ratios(v: dict[str, Any], r: dict[str, Any]) -> dict[str, float]:
    return {
        "region_read_round_trip": v["region_read_4b"]["median_us"]
        / r["region_read_4b"]["median_us"],
        "dma_map_rate": v["dma_map_4k_pipelined"]["per_s"] / r["dma_map_4k_pipelined"]["per_s"],
        "dma_unmap_rate": v["dma_unmap_4k_pipelined"]["per_s"]
        / r["dma_unmap_4k_pipelined"]["per_s"],
        "storm_rate": v["unmap_storm"]["per_s"] / r["unmap_storm"]["per_s"],
        "storm_server_cpu": v["unmap_storm"]["server"]["cpu_us"]
        / r["unmap_storm"]["server"]["cpu_us"],
    }


def run(reads: int = 20000, maps: int = 10000, storm: int = STORM_PAGES,
        rounds: int = 2) -> dict[str, Any]:
    """Every workload against both servers, alternating, best of ``rounds``; the storm once."""
    with tempfile.TemporaryDirectory(prefix="vfiod-msg-bench-") as tmpdir:
        tmp = Path(tmpdir)
        ram_fd = os.memfd_create("bench-ram", 0)
        try:
            os.ftruncate(ram_fd, maps * PAGE)
            with responder(tmp) as (rpid, rsock), vfiod_daemon(tmp) as (vpid, vsock):
                servers = [_Server("responder", rpid, rsock, ram_fd),
                           _Server("vfiod", vpid, vsock, ram_fd)]
                try:
                    for _ in range(rounds):
                        for s in servers:
                            s.region_read(reads)
                        for s in servers:
                            s.maps_and_unmaps(maps)
                    for s in servers:
                        s.storm(storm)
                finally:
                    for s in servers:
                        s.client.close()
        finally:
            os.close(ram_fd)
    resp, vfiod = servers[0].results, servers[1].results
    return {
        "note": " ".join(__doc__.split("\n\n")[0].split()),
        "vfiod_config": CONFIG,
        "rounds": rounds,
        "responder": resp,
        "vfiod": vfiod,
        "vfiod_over_responder": _ratios(vfiod, resp),
        "targets": TARGETS,
    }


if __name__ == "__main__":
    import json

    quick = "--quick" in sys.argv
    print(json.dumps(run(reads=2000, maps=2000, storm=20000, rounds=1) if quick else run(),
                     indent=2))
