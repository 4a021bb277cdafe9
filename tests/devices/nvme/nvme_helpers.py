"""A tiny NVMe host driver for tests: guest RAM in a bytearray, queues, command submission."""

from __future__ import annotations

import fcntl
import os
import random
import struct
from dataclasses import dataclass
from typing import Any

from vfiod import spapr
from vfiod.devices.nvme import Command, NvmeController
from vfiod.pci import DmaFault
from vfiod.server.dma import DmaMapTable
from vfiod.spapr import ClientMemory, PeDma

PAGE = 4096
BASE = 0x100000
ADMIN_DEPTH = 32


class FakeDma:
    """IOVA space = one bytearray at BASE; ranges in ``holes`` (and anything outside) fault,
    ranges in ``readonly`` fault on device writes only. A read/write-only DMA view (no
    ``iovecs``): the controller's copy path for views that cannot translate ahead."""

    def __init__(self, size: int = 8 << 20) -> None:
        self.mem = bytearray(size)
        self.holes: list[tuple[int, int]] = []
        self.readonly: list[tuple[int, int]] = []
        self.reads = 0
        self.writes = 0

    def _range(self, iova: int, n: int, write: bool) -> slice:
        off = iova - BASE
        if off < 0 or off + n > len(self.mem):
            raise DmaFault(iova, n, write, "unmapped")
        for start, size in self.holes + (self.readonly if write else []):
            if iova < start + size and start < iova + n:
                raise DmaFault(iova, n, write, "hole")
        return slice(off, off + n)

    @property
    def size(self) -> int:
        return len(self.mem)

    def read(self, iova: int, length: int) -> bytes:
        self.reads += 1
        return bytes(self.mem[self._range(iova, length, False)])

    def write(self, iova: int, data: bytes) -> None:
        self.writes += 1
        self.mem[self._range(iova, len(data), True)] = data

    def peek(self, iova: int, n: int) -> bytes:
        return bytes(self.mem[iova - BASE : iova - BASE + n])

    def poke(self, iova: int, data: bytes) -> None:
        self.mem[iova - BASE : iova - BASE + len(data)] = data


class GuestRam:
    """Guest RAM in a memfd behind a real DMA view, as a session builds it: a :class:`PeDma`
    (DMA through the function's PE and its TCE table) or, with ``pe=False``, a plain
    :class:`DmaMapTable`. IOVA ``BASE + i * PAGE`` is memfd page ``pages[i]``: identity, or a
    random permutation with ``scramble`` (so host pieces never merge). ``view`` is what the
    controller gets; ``peek``/``poke`` work on the memfd, never through the DMA view."""

    def __init__(
        self, size: int = 8 << 20, *, pe: bool = True, scramble: bool = False, seed: int = 0,
        dma_fault: str = "freeze", sealed: bool = False,
    ) -> None:  # fmt: skip
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealed else 0)
        self.memfd = os.memfd_create("nvme-guest", flags)
        os.ftruncate(self.memfd, size)
        if sealed:  # as QEMU's memory-backend-memfd does: the C mover then uses memcpy
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.npages = size // PAGE
        self.pages = list(range(self.npages))
        if scramble:
            random.Random(seed).shuffle(self.pages)
        self.view: Any
        if pe:
            self.phb = spapr.Phb(index=0, dma_fault=dma_fault)
            self.pe: spapr.Pe | None = self.phb.new_pe()
            self.view = PeDma(self.phb, self.pe, ClientMemory(spapr.Client()))
        else:
            self.pe = None
            self.view = DmaMapTable()
        if scramble:
            for i, page in enumerate(self.pages):
                self.view.map(BASE + i * PAGE, PAGE, page * PAGE, 3, os.dup(self.memfd))
        else:
            self.view.map(BASE, size, 0, 3, os.dup(self.memfd))

    @property
    def size(self) -> int:
        return self.npages * PAGE

    def _spans(self, iova: int, n: int) -> list[tuple[int, int]]:
        out = []
        while n:
            i, off = divmod(iova - BASE, PAGE)
            take = min(n, PAGE - off)
            out.append((self.pages[i] * PAGE + off, take))
            iova += take
            n -= take
        return out

    def peek(self, iova: int, n: int) -> bytes:
        return b"".join(os.pread(self.memfd, ln, off) for off, ln in self._spans(iova, n))

    def poke(self, iova: int, data: bytes) -> None:
        pos = 0
        for off, ln in self._spans(iova, len(data)):
            os.pwrite(self.memfd, data[pos : pos + ln], off)
            pos += ln

    def snapshot(self) -> bytes:
        return os.pread(self.memfd, self.size, 0)

    def restore(self, data: bytes) -> None:
        os.pwrite(self.memfd, data, 0)

    # DmaSpace, for hosts that attach this object itself
    def read(self, iova: int, length: int) -> bytes:
        data: bytes = self.view.read(iova, length)
        return data

    def write(self, iova: int, data: bytes) -> None:
        self.view.write(iova, data)

    def close(self) -> None:
        """Idempotent: tests may close the view early (leak checks) and the fixture again."""
        self.view.close()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


@dataclass
class Cqe:
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    phase: int
    status: int  # 15-bit status field

    @property
    def sc(self) -> int:
        """(SCT << 8) | SC, without DNR/More/CRD."""
        return self.status & 0x7FF

    @property
    def dnr(self) -> bool:
        return bool(self.status & (1 << 14))


@dataclass
class HostQueue:
    qid: int
    sq_base: int
    cq_base: int
    depth: int
    cq_depth: int
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1


class Host:
    """Drives an NvmeController through BAR0 region accesses and guest RAM."""

    def __init__(self, ctrl: NvmeController, dma: FakeDma | GuestRam | None = None) -> None:
        self.ctrl = ctrl
        self.dma = dma or FakeDma()
        # GuestRam: the controller gets the real DMA view (PeDma / DmaMapTable) itself
        ctrl.attach_dma(self.dma.view if isinstance(self.dma, GuestRam) else self.dma)
        ctrl.region_write(7, 0x04, struct.pack("<H", 0x6))  # MEM + bus master
        self._next = BASE
        self.queues: dict[int, HostQueue] = {}
        self.cid = 0
        self.shadow: tuple[int, int] | None = None  # (shadow doorbells, EventIdx) IOVAs
        self.shadow_admin = False  # Linux keeps the admin queue on MMIO doorbells
        self.mmio: list[tuple[int, bool]] = []  # doorbell writes sent: (qid, is CQ)
        self.skipped: list[tuple[int, bool]] = []  # shadow updates that needed no write
        self.defer_mmio = False
        self.pending_mmio: list[tuple[int, bool, int]] = []

    # ---- memory -------------------------------------------------------------------------------

    def alloc(self, pages: int = 1) -> int:
        addr = self._next
        self._next += pages * PAGE
        assert self._next - BASE <= self.dma.size
        return addr

    # ---- registers ----------------------------------------------------------------------------

    def rd(self, off: int, size: int = 4) -> int:
        return int.from_bytes(self.ctrl.region_read(0, off, size), "little")

    def wr(self, off: int, value: int, size: int = 4) -> None:
        self.ctrl.region_write(0, off, value.to_bytes(size, "little"))

    def cc(self, *, en: bool = True, shn: int = 0, mps: int = 0) -> int:
        return int(en) | (mps << 7) | (shn << 14) | (6 << 16) | (4 << 20)

    def enable(self, depth: int = ADMIN_DEPTH) -> None:
        asq, acq = self.alloc(), self.alloc()
        self.wr(0x24, (depth - 1) | ((depth - 1) << 16))
        self.wr(0x28, asq & 0xFFFFFFFF)
        self.wr(0x2C, asq >> 32)
        self.wr(0x30, acq, 8)
        self.wr(0x14, self.cc(en=False))
        assert self.rd(0x14) == self.cc(en=False)
        self.wr(0x14, self.cc())
        assert self.rd(0x1C) & 1, "CSTS.RDY"
        self.queues = {0: HostQueue(0, asq, acq, depth, depth)}
        self.shadow = None  # a controller reset forgets the shadow buffers

    # ---- submission ---------------------------------------------------------------------------

    def next_cid(self) -> int:
        self.cid = (self.cid + 1) & 0xFFFF
        return self.cid

    def push(self, qid: int, entry: bytes, ring: bool = True) -> None:
        q = self.queues[qid]
        self.dma.poke(q.sq_base + q.sq_tail * 64, entry)
        q.sq_tail = (q.sq_tail + 1) % q.depth
        if ring:
            self.ring(qid)

    def ring(self, qid: int) -> None:
        self._doorbell(qid, False, self.queues[qid].sq_tail)

    # ---- doorbells, MMIO or shadow (as Linux's nvme_dbbuf_update_and_check_event) -------------

    def dbbuf(self, dbs: int | None = None, eis: int | None = None) -> Cqe:
        """Doorbell Buffer Config; on success I/O queues use shadow doorbells from now on."""
        dbs = self.alloc() if dbs is None else dbs
        eis = self.alloc() if eis is None else eis
        cqe = self.admin(0x7C, prp1=dbs, prp2=eis)
        if cqe.sc == 0:
            self.shadow = (dbs, eis)
        return cqe

    def slot(self, base: int, qid: int, cq: bool) -> int:
        return int.from_bytes(self.dma.peek(base + 8 * qid + 4 * cq, 4), "little")

    def _doorbell(self, qid: int, cq: bool, value: int) -> None:
        if self.shadow is not None and (qid != 0 or self.shadow_admin):
            dbs, eis = self.shadow
            old = self.slot(dbs, qid, cq)
            self.dma.poke(dbs + 8 * qid + 4 * cq, value.to_bytes(4, "little"))
            if not need_event(self.slot(eis, qid, cq) & 0xFFFF, value, old):
                self.skipped.append((qid, cq))
                return
        self.mmio.append((qid, cq))
        if self.defer_mmio:
            self.pending_mmio.append((qid, cq, value))
            return
        self.wr(0x1000 + 8 * qid + 4 * cq, value)

    def flush_mmio(self) -> None:
        """Deliver the doorbell writes held back with ``defer_mmio`` (posted writes that
        reach the controller after the host went on)."""
        pending, self.pending_mmio = self.pending_mmio, []
        for qid, cq, value in pending:
            self.wr(0x1000 + 8 * qid + 4 * cq, value)

    def poll(self, qid: int, ack: bool = True) -> Cqe | None:
        q = self.queues[qid]
        raw = self.dma.peek(q.cq_base + q.cq_head * 16, 16)
        dw0, _dw1, sqhd, sqid, cid, st = struct.unpack("<IIHHHH", raw)
        if st & 1 != q.phase:
            return None
        q.cq_head += 1
        if q.cq_head == q.cq_depth:
            q.cq_head = 0
            q.phase ^= 1
        if ack:
            self._doorbell(qid, True, q.cq_head)
        return Cqe(dw0, sqhd, sqid, cid, st & 1, st >> 1)

    def submit(self, qid: int, opcode: int, **fields: int) -> Cqe:
        cid = fields.pop("cid", None)
        if cid is None:
            cid = self.next_cid()
        self.push(qid, Command.pack(opcode, cid, **fields))
        cqe = self.poll(qid)
        assert cqe is not None, "no completion"
        assert cqe.cid == cid and cqe.sqid == qid
        return cqe

    def admin(self, opcode: int, **fields: int) -> Cqe:
        return self.submit(0, opcode, **fields)

    # ---- common commands ----------------------------------------------------------------------

    def identify(self, cns: int, nsid: int = 0) -> tuple[Cqe, bytes]:
        buf = self.alloc()
        cqe = self.admin(0x06, nsid=nsid, prp1=buf, cdw10=cns)
        return cqe, self.dma.peek(buf, 4096)

    def create_io_queue(
        self, qid: int, depth: int = 64, vector: int | None = None, ien: bool = True,
        cq_depth: int | None = None,
    ) -> None:  # fmt: skip
        cq_depth = depth if cq_depth is None else cq_depth
        cq = self.alloc((cq_depth * 16 + PAGE - 1) // PAGE)
        sq = self.alloc((depth * 64 + PAGE - 1) // PAGE)
        vec = qid if vector is None else vector
        r = self.admin(
            0x05, prp1=cq, cdw10=qid | ((cq_depth - 1) << 16),
            cdw11=1 | (int(ien) << 1) | (vec << 16),
        )  # fmt: skip
        assert r.sc == 0, hex(r.status)
        r = self.admin(0x01, prp1=sq, cdw10=qid | ((depth - 1) << 16), cdw11=1 | (qid << 16))
        assert r.sc == 0, hex(r.status)
        self.queues[qid] = HostQueue(qid, sq, cq, depth, cq_depth)

    def rw(
        self,
        qid: int,
        write: bool,
        slba: int,
        nlb: int,
        prp1: int,
        prp2: int = 0,
        fua: bool = False,
        nsid: int = 1,
    ) -> Cqe:
        cdw12 = (nlb - 1) | (int(fua) << 30)
        return self.submit(
            qid,
            0x01 if write else 0x02,
            nsid=nsid,
            prp1=prp1,
            prp2=prp2,
            cdw10=slba & 0xFFFFFFFF,
            cdw11=slba >> 32,
            cdw12=cdw12,
        )

    def prp_list(self, pages: list[int], list_addr: int | None = None) -> int:
        """Write a PRP list (single page) holding ``pages``; returns its address."""
        addr = self.alloc() if list_addr is None else list_addr
        self.dma.poke(addr, struct.pack(f"<{len(pages)}Q", *pages))
        return addr


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Whether moving a doorbell from ``old`` to ``new`` passes ``event_idx`` (16-bit)."""
    return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF


def efd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


