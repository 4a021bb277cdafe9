"""NVMe data-path benchmark: zero-copy (preadv/pwritev straight into guest RAM) vs the copy path.

In-process: an :class:`~vfiod.devices.nvme.NvmeController` whose DMA view is a
:class:`~vfiod.spapr.PeDma` (every DMA through the function's PE and its TCE table, as
in the daemon), guest RAM in a memfd mapped through DMA_MAP, a backing file in /tmp (written
once first, so the page cache is warm). A tiny driver writes SQ entries into the memfd, rings
the doorbell with a BAR0 write (as QEMU's posted REGION_WRITE would) and reaps completions, so
each figure covers the whole command: SQ fetch, PRP walk, translation, data movement, CQ post.

Read and Write of 4 KiB and 1 MiB, ``QD`` commands per doorbell. 1 MiB commands use a PRP list
over every other guest page, so no two pages are adjacent: 256 iovecs per command, the worst
case for a guest whose pages are scattered. The copy path goes through the data mover's bounce
file instead (see vfiod/devices/nvme/mover.py).

Two VFs at once (issue 9 wants >= 1.6x one VF's aggregate on two cores): each VF has its own
controller, PE, guest memory and backing file; one driver thread per VF (as two QEMU processes
would drive them), and, for comparison, one thread ringing both in turn (the daemon today: one
event loop serves every session, so doorbells run one after another). The figures say what
the current synchronous, GIL-bound data path allows, with the process CPU time per wall second.
``run()`` returns a dict of figures.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import time
from typing import Any

from vfiod import spapr
from vfiod.devices.nvme import Command, NvmeController
from vfiod.spapr import ClientMemory, PeDma

PAGE = 4096
BASE = 0x100000
GUEST_BYTES = 64 << 20
DISK_BYTES = 256 << 20
QD = 8  # commands per doorbell
IO_WRITE, IO_READ = 0x01, 0x02


class _Driver:
    """Guest side: queues and data buffers in a memfd, one I/O queue pair."""

    def __init__(self, workdir: str, name: str = "disk") -> None:
        self.ctrl = NvmeController(os.path.join(workdir, f"{name}.img"), DISK_BYTES, io_queues=1)
        self.memfd = os.memfd_create("nvme-bench-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, GUEST_BYTES)
        self.phb = spapr.Phb(index=0)
        self.dma = PeDma(self.phb, self.phb.new_pe(), ClientMemory(spapr.Client()))
        self.dma.map(BASE, GUEST_BYTES, 0, 3, os.dup(self.memfd))
        self.ctrl.attach_dma(self.dma)
        self.ctrl.region_write(7, 0x04, struct.pack("<H", 0x6))  # MEM + bus master
        self._next = BASE
        self.cid = 0
        depth = 64
        asq, acq = self.alloc(1), self.alloc(1)
        self.q = {0: [asq, acq, depth, 0, 0, 1]}  # sq base, cq base, depth, tail, head, phase
        self.wr(0x24, (depth - 1) | ((depth - 1) << 16))
        self.wr(0x28, asq, 8)
        self.wr(0x30, acq, 8)
        self.wr(0x14, 1 | (6 << 16) | (4 << 20))
        cq, sq = self.alloc(1), self.alloc(1)
        self.submit(0, [Command.pack(0x05, 0, prp1=cq, cdw10=1 | ((depth - 1) << 16), cdw11=1)])
        self.submit(0, [Command.pack(0x01, 0, prp1=sq, cdw10=1 | ((depth - 1) << 16),
                                     cdw11=1 | (1 << 16))])  # fmt: skip
        self.q[1] = [sq, cq, depth, 0, 0, 1]

    def alloc(self, pages: int) -> int:
        addr = self._next
        self._next += pages * PAGE
        assert self._next - BASE <= GUEST_BYTES
        return addr

    def wr(self, off: int, value: int, size: int = 4) -> None:
        self.ctrl.region_write(0, off, value.to_bytes(size, "little"))

    def submit(self, qid: int, entries: list[bytes]) -> None:
        """Post ``entries``, ring once, reap every completion (status must be 0)."""
        q = self.q[qid]
        sq, cq, depth = q[0], q[1], q[2]
        for e in entries:
            os.pwrite(self.memfd, e, sq + q[3] * 64 - BASE)
            q[3] = (q[3] + 1) % depth
        self.wr(0x1000 + 8 * qid, q[3])
        for _ in entries:
            raw = os.pread(self.memfd, 16, cq + q[4] * 16 - BASE)
            st = struct.unpack_from("<H", raw, 14)[0]
            if st & 1 != q[5] or st >> 1:
                raise RuntimeError(f"bad completion {raw.hex()}")
            q[4] += 1
            if q[4] == depth:
                q[4] = 0
                q[5] ^= 1
        self.wr(0x1000 + 8 * qid + 4, q[4])

    def close(self) -> None:
        """Idempotent."""
        if self.memfd < 0:
            return
        self.dma.close()
        self.ctrl.close()
        os.close(self.memfd)
        self.memfd = -1


def _commands(d: _Driver, size: int, write: bool) -> list[bytes]:
    """QD commands of ``size`` bytes over distinct LBAs and buffers."""
    op = IO_WRITE if write else IO_READ
    nlb = size // 512
    out = []
    for i in range(QD):
        d.cid = (d.cid + 1) & 0xFFFF
        slba = i * nlb
        if size <= PAGE:
            out.append(Command.pack(op, d.cid, nsid=1, prp1=d.alloc(1), cdw10=slba,
                                    cdw12=nlb - 1))  # fmt: skip
            continue
        npages = size // PAGE
        pages = [d.alloc(2) for _ in range(npages)]  # every other page: nothing merges
        lst = d.alloc(1)
        os.pwrite(d.memfd, struct.pack(f"<{npages - 1}Q", *pages[1:]), lst - BASE)
        out.append(Command.pack(op, d.cid, nsid=1, prp1=pages[0], prp2=lst, cdw10=slba,
                                cdw12=nlb - 1))  # fmt: skip
    return out


def _measure(d: _Driver, cmds: list[bytes], size: int, min_time: float) -> dict[str, float]:
    d.submit(1, cmds)  # warm up
    n = 0
    t0 = time.perf_counter()
    while True:
        d.submit(1, cmds)
        n += len(cmds)
        dt = time.perf_counter() - t0
        if dt >= min_time:
            break
    return {
        "commands_per_s": n / dt,
        "MB_per_s": n * size / dt / 1e6,
        "us_per_command": dt / n * 1e6,
    }


def _warm(d: _Driver) -> None:
    """Warm the page cache: write the whole LBA range the benchmark touches."""
    chunk = os.urandom(1 << 20)
    for off in range(0, QD << 20, 1 << 20):
        os.pwrite(d.ctrl.store.fd, chunk, off)
    os.pwrite(d.memfd, os.urandom(GUEST_BYTES // 4), 0x200000)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _drive(drivers: list[_Driver], cmds: list[list[bytes]], min_time: float,
           threads: bool) -> tuple[int, float, float]:  # fmt: skip
    """Commands completed, wall seconds and process CPU seconds, every driver submitting
    ``cmds[i]`` batches for ``min_time``: each in its own thread, or in turn on this one."""
    for d, c in zip(drivers, cmds, strict=True):
        d.submit(1, c)  # warm up
    done = [0] * len(drivers)
    cpu0, t0 = _cpu(), time.perf_counter()
    if threads:
        def loop(i: int) -> None:
            while time.perf_counter() - t0 < min_time:
                drivers[i].submit(1, cmds[i])
                done[i] += len(cmds[i])

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(len(drivers))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    else:
        while time.perf_counter() - t0 < min_time:
            for i, d in enumerate(drivers):
                d.submit(1, cmds[i])
                done[i] += len(cmds[i])
    return sum(done), time.perf_counter() - t0, _cpu() - cpu0


def _two_vfs(workdir: str, min_time: float) -> dict[str, Any]:
    """One VF alone vs two VFs at once (see the module docstring)."""
    vfs = [_Driver(workdir, f"vf{i}") for i in range(2)]
    try:
        for d in vfs:
            _warm(d)
        out: dict[str, Any] = {}
        for label, size in (("read_4k", PAGE), ("read_1m", 1 << 20)):
            cmds = [_commands(d, size, False) for d in vfs]
            entry: dict[str, Any] = {}
            for mode, drivers, threads in (("one_vf", vfs[:1], False),
                                           ("two_vfs_two_threads", vfs, True),
                                           ("two_vfs_one_thread", vfs, False)):  # fmt: skip
                n, wall, cpu = _drive(drivers, cmds[: len(drivers)], min_time, threads)
                entry[mode] = {"MB_per_s": n * size / wall / 1e6,
                               "commands_per_s": n / wall,
                               "cpu_per_wall_s": cpu / wall}  # fmt: skip
            one = entry["one_vf"]["MB_per_s"]
            for mode in ("two_vfs_two_threads", "two_vfs_one_thread"):
                entry[mode]["over_one_vf"] = entry[mode]["MB_per_s"] / one
            out[label] = entry
        out["target"] = "two VFs >= 1.6x one VF's aggregate on a 2-core machine (issue 9)"
        return out
    finally:
        for d in vfs:
            d.close()


def run(min_time: float = 0.5) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="vfiod-nvme-bench-", dir="/tmp")
    d = _Driver(workdir)
    try:
        _warm(d)
        results: dict[str, Any] = {"qd": QD, "cffi": spapr.default_impl().name}
        for label, size in (("4k", PAGE), ("1m", 1 << 20)):
            for write in (False, True):
                cmds = _commands(d, size, write)
                key = f"{'write' if write else 'read'}_{label}"
                entry: dict[str, Any] = {}
                for mode in ("copy", "zero_copy"):
                    d.ctrl.zero_copy = mode == "zero_copy"
                    entry[mode] = _measure(d, cmds, size, min_time)
                entry["speedup"] = (
                    entry["zero_copy"]["commands_per_s"] / entry["copy"]["commands_per_s"]
                )
                results[key] = entry
        d.close()
        results["two_vfs"] = _two_vfs(workdir, min_time)
        return results
    finally:
        d.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _print(results: dict[str, Any]) -> None:
    for key, entry in results.items():
        if not isinstance(entry, dict) or "copy" not in entry:
            continue
        c, z = entry["copy"], entry["zero_copy"]
        print(
            f"  {key:9s} copy {c['commands_per_s']:9,.0f} cmd/s {c['MB_per_s']:8,.0f} MB/s | "
            f"zero-copy {z['commands_per_s']:9,.0f} cmd/s {z['MB_per_s']:8,.0f} MB/s "
            f"({entry['speedup']:.2f}x)"
        )
    for label, entry in results.get("two_vfs", {}).items():
        if not isinstance(entry, dict):
            continue
        one, two, loop = (entry[m] for m in ("one_vf", "two_vfs_two_threads",
                                             "two_vfs_one_thread"))  # fmt: skip
        print(f"  {label:9s} one VF {one['MB_per_s']:8,.0f} MB/s | two VFs, two threads "
              f"{two['MB_per_s']:8,.0f} MB/s ({two['over_one_vf']:.2f}x, "
              f"{two['cpu_per_wall_s']:.2f} CPU) | two VFs, one thread "
              f"{loop['MB_per_s']:8,.0f} MB/s ({loop['over_one_vf']:.2f}x)")


if __name__ == "__main__":
    import sys

    _print(run(min_time=0.1 if "--quick" in sys.argv else 0.5))
