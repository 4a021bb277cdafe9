"""NVMe data-path benchmark, in-process: the Python data path vs the C data mover, inline and
with its workers; and two VFs driven at once vs one.

An :class:`~vfiod.devices.nvme.NvmeController` whose DMA view is a :class:`~vfiod.spapr.PeDma`
(every DMA through the function's PE and its TCE table, as in the daemon), guest RAM in a memfd
mapped through DMA_MAP, a backing file in /tmp (written once first, so the page cache is warm),
MSI with an eventfd, as QEMU sets it up. A tiny driver (the guest's vCPU) writes ``QD`` SQ
entries into the memfd, rings the doorbell and sleeps on the eventfd until every completion is
in, so each figure covers the whole command: doorbell, SQ fetch, PRP walk, translation, data
movement, CQ post, interrupt. The doorbell goes the way it goes in the daemon: through the
session fast path's C hook (``vfiod_nvme_doorbell_hook``) for the C mover, through region_write
for the Python path.

Read and Write of 4 KiB and 1 MiB. 1 MiB commands use a PRP list over every other guest page,
so no two pages are adjacent: 256 iovecs per command, the worst case for a guest whose pages are
scattered. Modes: ``python`` (``c_mover=False``: the reference twin, zero-copy preadv/pwritev
from Python), ``c`` (the C mover, every command run where its doorbell rings), ``c_async``
(the C mover's workers, as in a session, commands in flight at once).

Two VFs at once (issue 9 wants >= 1.6x one VF's aggregate on two cores): each VF has its own
controller, PE, guest memory, backing file and workers; one driver thread per VF (as two QEMU
processes would drive them). ``cpu_per_wall_s`` is the process's CPU time per wall second
(above 1: more than one core busy). The same comparison through a running daemon, one driver
process per VF, is bench/nvme_vf_bench.py (``two_vfs_daemon``). ``run()`` returns a dict of
figures.
"""

from __future__ import annotations

import os
import select
import shutil
import struct
import tempfile
import threading
import time
from typing import Any

import trio

from bench import nvme_vf_bench
from vfiod import spapr
from vfiod.devices.nvme import Command, NvmeController
from vfiod.spapr import ClientMemory, PeDma

PAGE = 4096
BASE = 0x100000
GUEST_BYTES = 64 << 20
DISK_BYTES = 256 << 20
QD = 8  # commands per doorbell
DEPTH = 64
IO_WRITE, IO_READ = 0x01, 0x02
MODES = ("python", "c", "c_async")


class _Driver:
    """Guest side: queues and data buffers in a memfd, one I/O queue pair on MSI vector 1."""

    def __init__(self, workdir: str, name: str = "disk", c_mover: bool = True) -> None:
        self.ctrl = NvmeController(os.path.join(workdir, f"{name}.img"), DISK_BYTES,
                                   io_queues=1, c_mover=c_mover)  # fmt: skip
        self.memfd = os.memfd_create("nvme-bench-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, GUEST_BYTES)
        import fcntl  # QEMU's memory-backend-memfd seals its RAM so

        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.phb = spapr.Phb(index=0)
        self.dma = PeDma(self.phb, self.phb.new_pe(), ClientMemory(spapr.Client()))
        self.dma.map(BASE, GUEST_BYTES, 0, 3, os.dup(self.memfd))
        ctrl = self.ctrl
        ctrl.attach_dma(self.dma)
        ctrl.region_write(7, 0x04, struct.pack("<H", 0x6))  # MEM + bus master
        assert ctrl.msi is not None
        ctrl.region_write(7, ctrl.msi.offset + 2, struct.pack("<H", 0x1 | (1 << 4)))
        self.efd = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        ctrl.set_irqs(1, 4 | 32, 0, 2, [os.dup(fd) for fd in self.efd])  # MSI, eventfds
        self._next = BASE
        self.cid = 0
        cm = ctrl._cmover
        self._hook = (cm.lib.vfiod_nvme_doorbell_hook, cm.c) if cm is not None else None
        self._val = cm.ffi.new("uint8_t[4]") if cm is not None else None
        asq, acq = self.alloc(1), self.alloc(1)
        self.q = {0: [asq, acq, DEPTH, 0, 0, 1]}  # sq base, cq base, depth, tail, head, phase
        self.wr(0x24, (DEPTH - 1) | ((DEPTH - 1) << 16))
        self.wr(0x28, asq, 8)
        self.wr(0x30, acq, 8)
        self.wr(0x14, 1 | (6 << 16) | (4 << 20))
        cq, sq = self.alloc(1), self.alloc(1)
        self.submit(0, [Command.pack(0x05, 0, prp1=cq, cdw10=1 | ((DEPTH - 1) << 16),
                                     cdw11=3 | (1 << 16))])  # fmt: skip
        self.submit(0, [Command.pack(0x01, 0, prp1=sq, cdw10=1 | ((DEPTH - 1) << 16),
                                     cdw11=1 | (1 << 16))])  # fmt: skip
        self.q[1] = [sq, cq, DEPTH, 0, 0, 1]

    def alloc(self, pages: int) -> int:
        addr = self._next
        self._next += pages * PAGE
        assert self._next - BASE <= GUEST_BYTES
        return addr

    def wr(self, off: int, value: int, size: int = 4) -> None:
        self.ctrl.region_write(0, off, value.to_bytes(size, "little"))

    def ring(self, qid: int, cq: bool, value: int) -> None:
        """A doorbell write as the daemon handles it: the fast path's hook for I/O queues when
        the C mover is there (region_write when it punts), region_write otherwise."""
        off = 8 * qid + 4 * cq
        if self._hook is not None and qid:
            assert self._val is not None
            self._val[0:4] = value.to_bytes(4, "little")
            fn, c = self._hook
            if fn(c, off, self._val, 4) == 0:
                return
        self.wr(0x1000 + off, value)

    def submit(self, qid: int, entries: list[bytes]) -> None:
        """Post ``entries``, ring once, wait for every completion (status must be 0)."""
        q = self.q[qid]
        sq, cq, depth = q[0], q[1], q[2]
        for e in entries:
            os.pwrite(self.memfd, e, sq + q[3] * 64 - BASE)
            q[3] = (q[3] + 1) % depth
        self.ring(qid, False, q[3])
        left = len(entries)
        efd = self.efd[qid]
        while left:
            raw = os.pread(self.memfd, 16, cq + q[4] * 16 - BASE)
            st = struct.unpack_from("<H", raw, 14)[0]
            if st & 1 != q[5]:  # nothing new: sleep until the next interrupt
                select.select([efd], [], [], 1.0)
                try:
                    os.eventfd_read(efd)
                except BlockingIOError:
                    pass
                continue
            if st >> 1:
                raise RuntimeError(f"bad completion {raw.hex()}")
            q[4] += 1
            if q[4] == depth:
                q[4] = 0
                q[5] ^= 1
            left -= 1
        self.ring(qid, True, q[4])

    def close(self) -> None:
        """Idempotent."""
        if self.memfd < 0:
            return
        self.dma.close()
        self.ctrl.close()
        os.close(self.memfd)
        for fd in self.efd:
            os.close(fd)
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


def _with_workers(drivers: list[_Driver], run: Any) -> Any:
    """Call ``run()`` in a thread while every driver's controller runs its workers (its
    ``background``, as a session runs it), in a trio nursery on this thread."""

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            for d in drivers:
                nursery.start_soon(d.ctrl.background)
            with trio.fail_after(10):
                for d in drivers:
                    cm = d.ctrl._cmover
                    assert cm is not None
                    while cm.c.workers < d.ctrl.workers:
                        await trio.sleep(0.001)
            out = await trio.to_thread.run_sync(run)
            nursery.cancel_scope.cancel()
        return out

    return trio.run(main)


def _figures(n: int, size: int, wall: float, cpu: float) -> dict[str, float]:
    return {"commands_per_s": n / wall, "MB_per_s": n * size / wall / 1e6,
            "us_per_command": wall / n * 1e6, "cpu_us_per_command": cpu / n * 1e6,
            "cpu_per_wall_s": cpu / wall}  # fmt: skip


def _one_mode(workdir: str, mode: str, min_time: float) -> dict[str, Any]:
    d = _Driver(workdir, f"disk-{mode}", c_mover=mode != "python")
    try:
        _warm(d)
        out: dict[str, Any] = {}
        for label, size in (("4k", PAGE), ("1m", 1 << 20)):
            for write in (False, True):
                cmds = _commands(d, size, write)

                def go(cmds: list[bytes] = cmds) -> tuple[int, float, float]:
                    return _drive([d], [cmds], min_time, False)

                n, wall, cpu = _with_workers([d], go) if mode == "c_async" else go()
                out[f"{'write' if write else 'read'}_{label}"] = _figures(n, size, wall, cpu)
        out["async_commands"] = d.ctrl.async_commands
        return out
    finally:
        d.close()


def _two_vfs(workdir: str, min_time: float) -> dict[str, Any]:
    """One VF alone vs two VFs at once (see the module docstring), with the workers."""
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

                def go(drivers: list[_Driver] = drivers, threads: bool = threads,
                       cmds: list[list[bytes]] = cmds) -> tuple[int, float, float]:  # fmt: skip
                    return _drive(drivers, cmds[: len(drivers)], min_time, threads)

                n, wall, cpu = _with_workers(vfs, go)
                entry[mode] = _figures(n, size, wall, cpu)
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
    try:
        results: dict[str, Any] = {"qd": QD, "cffi": spapr.default_impl().name}
        by_mode = {mode: _one_mode(workdir, mode, min_time) for mode in MODES}
        for key in by_mode["python"]:
            if key == "async_commands":
                continue
            entry = {mode: by_mode[mode][key] for mode in MODES}
            entry["c_async_over_python"] = (entry["c_async"]["commands_per_s"]
                                            / entry["python"]["commands_per_s"])  # fmt: skip
            results[key] = entry
        results["async_commands"] = by_mode["c_async"]["async_commands"]
        results["two_vfs"] = _two_vfs(workdir, min_time)
        results["two_vfs_daemon"] = nvme_vf_bench.run(seconds=max(1.0, 10 * min_time))
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _print(results: dict[str, Any]) -> None:
    for key, entry in results.items():
        if not isinstance(entry, dict) or "python" not in entry:
            continue
        print(f"  {key:9s} " + " | ".join(
            f"{m} {entry[m]['commands_per_s']:8,.0f} cmd/s {entry[m]['MB_per_s']:7,.0f} MB/s "
            f"{entry[m]['cpu_us_per_command']:6.1f} CPU us" for m in MODES)
            + f" ({entry['c_async_over_python']:.2f}x)")  # fmt: skip
    for label, entry in results.get("two_vfs", {}).items():
        if not isinstance(entry, dict):
            continue
        one, two, loop = (entry[m] for m in ("one_vf", "two_vfs_two_threads",
                                             "two_vfs_one_thread"))  # fmt: skip
        print(f"  {label:9s} one VF {one['MB_per_s']:8,.0f} MB/s | two VFs, two threads "
              f"{two['MB_per_s']:8,.0f} MB/s ({two['over_one_vf']:.2f}x, "
              f"{two['cpu_per_wall_s']:.2f} CPU) | two VFs, one thread "
              f"{loop['MB_per_s']:8,.0f} MB/s ({loop['over_one_vf']:.2f}x)")
    for line in nvme_vf_bench.lines(results.get("two_vfs_daemon", {})):
        print(line)


if __name__ == "__main__":
    import sys

    _print(run(min_time=0.1 if "--quick" in sys.argv else 0.5))
