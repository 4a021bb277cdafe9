"""NVMe VFs of a running daemon driven from other processes: one VF alone vs two at once.

``python -m vfiod`` serves an NVMe PF with two VFs behind a PHB (flat window policy), as an
operator runs it. Each VF gets its own driver process (what a QEMU process is to the daemon),
speaking vfio-user on a plain stdlib socket (bench/stdclient.py): guest RAM is a sealed memfd
shared through DMA_MAP (as QEMU's ``memory-backend-memfd`` does), MSI vectors are eventfds
given with SET_IRQS, registers and doorbells are REGION_WRITEs (doorbells posted, NO_REPLY, as
QEMU posts writes to a memory BAR). The driver rings ``QD`` reads at a time and sleeps on the
I/O queue's eventfd until they are all complete, so each figure covers the daemon's whole path:
the doorbell message (the session fast path's C hook), the C data mover and its workers, the
completions and the interrupt eventfd.

Issue 9 wants two VFs at once >= 1.6x one VF's aggregate on a 2-core machine. The daemon's
CPU per command comes from /proc (all its threads); ``daemon_cores`` is its CPU time per wall
second. ``run()`` returns a dict of figures.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import select
import struct
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.message_bench import vfiod_daemon
from bench.stdclient import (
    FLAG_NO_REPLY,
    REGION_WRITE,
    StdClient,
    _header,
    cpu_sample,
    dma_map_msg,
    region_read_msg,
)

RAM = 64 << 20
NS_SIZE = 256 << 20
QD = 8
DEPTH = 64
ASQ, ACQ, IOSQ, IOCQ = (0x1000 * i for i in range(1, 5))
LISTS = 0x10000
DATA = 0x100000
SET_IRQS = 8
CONFIG = """
[[phb]]
index = 0
window_policy = "flat"

[[function]]
name = "nvme0"
personality = "nvme"
backing = "@DIR@/pf.img"
size = "@SIZE@"
totalvfs = 2
numvfs = 2
"""


def _region_write(msg_id: int, region: int, offset: int, data: bytes, posted: bool) -> bytes:
    body = struct.pack("=QII", offset, region, len(data)) + data
    return _header(msg_id, REGION_WRITE, 16 + len(body), FLAG_NO_REPLY if posted else 0) + body


def _sqe(opcode: int, cid: int, nsid: int = 0, prp1: int = 0, prp2: int = 0, cdw10: int = 0,
         cdw11: int = 0, cdw12: int = 0) -> bytes:  # fmt: skip
    return struct.pack("<BBHIQQQQ6I", opcode, 0, cid, nsid, 0, 0, prp1, prp2, cdw10, cdw11,
                       cdw12, 0, 0, 0)  # fmt: skip


class _Guest:
    """One VF's driver: admin queue, I/O queue pair 1 on MSI vector 1, read batches."""

    def __init__(self, sock: str) -> None:
        self.c = StdClient(sock)
        self.c.version()
        self.ram = os.memfd_create("nvme-vf-bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.ram, RAM)
        fcntl.fcntl(self.ram, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.id = 0
        self.c.call(dma_map_msg(self._id(), 0, RAM, 0), (self.ram,))
        cfg = self.c.call(region_read_msg(self._id(), 7, 0, 256))[16:]
        self._cfg_write(0x04, struct.pack("<H", 0x6))  # memory space + bus master
        msi = self._cap(cfg, 0x05)
        self._cfg_write(msi + 2, struct.pack("<H", 0x1 | (1 << 4)))  # enable, 2 vectors
        self.efd = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        body = struct.pack("=IIIII", 20, 4 | 32, 1, 0, 2)  # MSI, DATA_EVENTFD | TRIGGER
        self.c.call(_header(self._id(), SET_IRQS, 16 + len(body)) + body, tuple(self.efd))
        self._reg(0x24, (DEPTH - 1) | ((DEPTH - 1) << 16))
        self._reg(0x28, ASQ, 8)
        self._reg(0x30, ACQ, 8)
        self._reg(0x14, 1 | (6 << 16) | (4 << 20))
        self.q = {0: [ASQ, ACQ, 0, 0, 1], 1: [IOSQ, IOCQ, 0, 0, 1]}  # sq, cq, tail, head, phase
        self.batch([_sqe(0x05, 1, prp1=IOCQ, cdw10=1 | ((DEPTH - 1) << 16),
                         cdw11=3 | (1 << 16))], 0)  # fmt: skip
        self.batch([_sqe(0x01, 2, prp1=IOSQ, cdw10=1 | ((DEPTH - 1) << 16),
                         cdw11=1 | (1 << 16))], 0)  # fmt: skip

    def _id(self) -> int:
        self.id = (self.id + 1) & 0xFFFF
        return self.id

    @staticmethod
    def _cap(cfg: bytes, cap_id: int) -> int:
        pos = cfg[0x34]
        while pos:
            if cfg[pos] == cap_id:
                return pos
            pos = cfg[pos + 1]
        raise RuntimeError(f"no capability {cap_id:#x}")

    def _cfg_write(self, offset: int, data: bytes) -> None:
        self.c.call(_region_write(self._id(), 7, offset, data, False))

    def _reg(self, offset: int, value: int, size: int = 4) -> None:
        self.c.call(_region_write(self._id(), 0, offset, value.to_bytes(size, "little"), False))

    def _ring(self, qid: int, cq: bool, value: int) -> None:
        self.c.sock.sendall(_region_write(self._id(), 0, 0x1000 + 8 * qid + 4 * cq,
                                          value.to_bytes(4, "little"), True))  # fmt: skip

    def batch(self, entries: list[bytes], qid: int = 1) -> None:
        """Post ``entries``, ring once (posted), sleep on the queue's eventfd until every one
        completed, ring the CQ head (posted)."""
        q = self.q[qid]
        for e in entries:
            os.pwrite(self.ram, e, q[0] + q[2] * 64)
            q[2] = (q[2] + 1) % DEPTH
        self._ring(qid, False, q[2])
        left = len(entries)
        efd = self.efd[qid]
        while left:
            raw = os.pread(self.ram, 16, q[1] + q[3] * 16)
            st = struct.unpack_from("<H", raw, 14)[0]
            if st & 1 != q[4]:
                select.select([efd], [], [], 5.0)
                try:
                    os.eventfd_read(efd)
                except BlockingIOError:
                    pass
                continue
            if st >> 1:
                raise RuntimeError(f"command failed: {raw.hex()}")
            q[3] += 1
            if q[3] == DEPTH:
                q[3] = 0
                q[4] ^= 1
            left -= 1
        self._ring(qid, True, q[3])

    def commands(self, size: int, write: bool) -> list[bytes]:
        """QD commands over distinct LBAs; buffers on every other page (a guest's scattered
        pages: nothing merges), PRP lists where they take more than two pages."""
        nlb, npages = size // 512, size // 4096
        out = []
        for i in range(QD):
            pages = [DATA + (2 * npages * i + 2 * k) * 4096 for k in range(npages)]
            prp2 = pages[1] if npages == 2 else 0
            if npages > 2:
                prp2 = LISTS + i * 4096
                os.pwrite(self.ram, struct.pack(f"<{npages - 1}Q", *pages[1:]), prp2)
            out.append(_sqe(0x01 if write else 0x02, 100 + i, nsid=1, prp1=pages[0],
                            prp2=prp2, cdw10=i * nlb, cdw12=nlb - 1))  # fmt: skip
        return out

    def close(self) -> None:
        self.c.close()
        os.close(self.ram)
        for fd in self.efd:
            os.close(fd)


def _driver(sock: str, size: int, start: float, seconds: float, conn: Connection) -> None:
    """One VF's guest in its own process: warm the LBAs up, wait for ``start``, run reads
    until ``seconds`` later, send back (commands, wall seconds)."""
    g = _Guest(sock)
    try:
        g.batch(g.commands(size, True))
        reads = g.commands(size, False)
        g.batch(reads)
        conn.send("ready")
        while time.time() < start:
            time.sleep(0.001)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            g.batch(reads)
            n += len(reads)
        conn.send((n, time.perf_counter() - t0))
    finally:
        g.close()


def _round(socks: list[str], pid: int, size: int, seconds: float) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe() for _ in socks]
    start = time.time() + 3.0
    procs = [ctx.Process(target=_driver, args=(s, size, start, seconds, w))
             for s, (_, w) in zip(socks, pipes, strict=True)]  # fmt: skip
    for p in procs:
        p.start()
    for r, _ in pipes:
        if not r.poll(60) or r.recv() != "ready":
            raise RuntimeError("a VF driver did not get ready")
    while time.time() < start:
        time.sleep(0.001)
    before, t0 = cpu_sample(pid), time.perf_counter()
    results = [r.recv() for r, _ in pipes]
    wall = time.perf_counter() - t0
    cpu = cpu_sample(pid) - before
    for p in procs:
        p.join(30)
    n = sum(k for k, _ in results)
    return {"commands_per_s": n / wall, "MB_per_s": n * size / wall / 1e6,
            "daemon_cpu_us_per_command": cpu.sched_ns / 1e3 / n,
            "daemon_cores": cpu.sched_ns / 1e9 / wall}  # fmt: skip


def run(seconds: float = 5.0) -> dict[str, Any]:
    out: dict[str, Any] = {"qd": QD, "seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="vfiod-vf-bench-") as tmpdir:
        tmp = Path(tmpdir)
        config = CONFIG.replace("@DIR@", tmpdir).replace("@SIZE@", str(NS_SIZE))
        with vfiod_daemon(tmp, config, "nvme0-vf0") as (pid, sock0):
            sock1 = sock0.parent / "nvme0-vf1.sock"
            for label, size in (("read_4k", 4096), ("read_1m", 1 << 20)):
                one = _round([str(sock0)], pid, size, seconds)
                two = _round([str(sock0), str(sock1)], pid, size, seconds)
                two["over_one_vf"] = two["MB_per_s"] / one["MB_per_s"]
                out[label] = {"one_vf": one, "two_vfs": two}
    out["target"] = "two VFs >= 1.6x one VF's aggregate on a 2-core machine (issue 9)"
    return out


def lines(results: dict[str, Any]) -> list[str]:
    out = []
    for label in ("read_4k", "read_1m"):
        e = results.get(label)
        if not e:
            continue
        one, two = e["one_vf"], e["two_vfs"]
        out.append(f"  daemon, {label}: one VF {one['MB_per_s']:8,.1f} MB/s "
                   f"({one['daemon_cpu_us_per_command']:.1f} daemon CPU us/command, "
                   f"{one['daemon_cores']:.2f} cores) | two VFs {two['MB_per_s']:8,.1f} MB/s "
                   f"({two['daemon_cores']:.2f} cores): {two['over_one_vf']:.2f}x")
    return out


if __name__ == "__main__":
    import sys

    print("\n".join(lines(run(seconds=1.0 if "--quick" in sys.argv else 5.0))))
