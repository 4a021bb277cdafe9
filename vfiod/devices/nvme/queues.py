"""The NVMe queue engine: every submission and completion queue of an enabled controller.

One :class:`QueueEngine` exists from CC.EN 0 -> 1 until the next controller reset, and it is
the only owner of queue state: base IOVA, size, head, tail, phase tag, vector and the shadow
doorbell configuration. Everything else goes through its small surface: the admin command set
creates and deletes queues and configures shadow doorbells, the controller forwards doorbell
writes and INTMS/INTMC, and the command sets get commands to execute and hand back a status.

A doorbell write is one *batch*: the engine fetches the SQ entries up to the new tail (one DMA
read per run of entries), hands each to the :class:`CommandSink`, posts each completion with its
phase tag, and when the batch is over raises each touched CQ's vector once (MSI-X), or drives
the INTx level (asserted while an interrupt-enabled CQ holds entries the host has not consumed
and INTMS bit 0 is clear). A full CQ stalls its SQs until the CQ head doorbell frees room. A DMA
fault while fetching a command, posting a completion or touching a shadow doorbell or EventIdx
is controller fatal status (the engine halts and CSTS.CFS is set): the controller no longer
knows where the host's queues stand.

Shadow doorbells (Doorbell Buffer Config, NVMe 1.4 5.7): the host keeps every queue's SQ tail /
CQ head in a shadow buffer in its memory and writes the MMIO doorbell only when the new value
passes the EventIdx the controller published for that queue. The engine reads the shadow value
when it processes a queue, then publishes EventIdx and reads the shadow again, so a value
written while the batch ran is never missed; an I/O queue's MMIO doorbell only wakes the engine
(the shadow slot is written first and may already be newer than a posted MMIO write). SQ
EventIdx = the tail the engine has seen: every new submission after a batch rings once. CQ
EventIdx = the head the engine has seen when it needs to hear about the host's progress (INTx,
or an SQ stalled on the full CQ), else a value the host only passes when its head wraps (the
engine reads the shadow head itself whenever the CQ looks full), which spares most CQ head
doorbells. The admin queue follows its shadow slots too, but its MMIO doorbell values are
written through to them first, because drivers that never update the admin queue's shadow
slots (Linux) must not have stale values read back.

All guest memory accesses go through the function's DMA view (the PE's translation on sPAPR).
The per-batch loop (:meth:`QueueEngine._drain`) is the seam a C data mover replaces for I/O
queues: it takes the queue pair's state, moves the data and posts completions, and returns
which vectors to signal; see docs/nvme.md.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from vfiod.devices.nvme.constants import CQ_ENTRY_SIZE, SQ_ENTRY_SIZE
from vfiod.pci.dma import DmaFault
from vfiod.pci.irq import IrqController

log = logging.getLogger(__name__)

FETCH_BATCH = 64  #: SQ entries fetched per DMA read
DOORBELL_SLOT = 8  #: bytes per queue pair in the doorbell page and the shadow buffers (DSTRD 0)
#: CQ EventIdx while the engine does not need the host's CQ head: a host only passes it when its
#: head wraps (queue indexes stay below MQES + 1 < 0xFFFF)
EVENTIDX_QUIET = 0xFFFF

_SQE = struct.Struct("<BBHIQQQQ6I")
_CQE = struct.Struct("<IIHHHH")
_DWORD = struct.Struct("<I")


class Command:
    """One 64-byte submission queue entry."""

    __slots__ = ("opcode", "flags", "cid", "nsid", "prp1", "prp2", "cdw")

    def __init__(self, raw: bytes | memoryview, offset: int = 0) -> None:
        f = _SQE.unpack_from(raw, offset)
        self.opcode: int = f[0]
        self.flags: int = f[1]
        self.cid: int = f[2]
        self.nsid: int = f[3]
        self.prp1: int = f[6]
        self.prp2: int = f[7]
        self.cdw: tuple[int, ...] = (0,) * 10 + f[8:14]  # cdw[10] .. cdw[15]

    @staticmethod
    def pack(
        opcode: int,
        cid: int,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw10: int = 0,
        cdw11: int = 0,
        cdw12: int = 0,
        cdw13: int = 0,
        cdw14: int = 0,
        cdw15: int = 0,
        flags: int = 0,
    ) -> bytes:
        """Build an SQ entry (for tests and tools)."""
        return _SQE.pack(
            opcode, flags, cid, nsid, 0, 0, prp1, prp2, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15
        )


@dataclass(eq=False, slots=True)
class CompletionQueue:
    qid: int
    base: int
    size: int
    vector: int
    ien: bool
    head: int = 0
    tail: int = 0
    phase: int = 1
    sqs: set[int] = field(default_factory=set)
    #: completions that found the CQ full, posted first when the head moves
    overflow: deque[tuple[int, int, int, int, int]] = field(default_factory=deque)
    event_idx: int | None = None  #: last EventIdx published (shadow doorbells on)

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    @property
    def pending(self) -> bool:
        return self.head != self.tail


@dataclass(eq=False, slots=True)
class SubmissionQueue:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0
    event_idx: int | None = None  #: last EventIdx published (shadow doorbells on)


@dataclass(frozen=True)
class ShadowBuffers:
    """Guest IOVAs of the shadow doorbell and EventIdx buffers (one memory page each)."""

    doorbells: int
    event_idx: int


class CommandSink(Protocol):
    """Where the engine sends the commands it fetches (the controller's dispatch)."""

    def execute(self, sqid: int, cmd: Command) -> tuple[int, int] | None:
        """Run one command: (status, dw0) completes it now; None completes it later through
        :meth:`QueueEngine.complete` (Asynchronous Event Request)."""
        ...

    def cq_space(self, cqid: int) -> None:
        """The host consumed entries of CQ ``cqid`` (deferred completions may go out)."""
        ...


class GuestMemory(Protocol):
    """Small DMAs of the engine (SQ entries, CQ entries, shadow slots); raise DmaFault."""

    def dma_read(self, iova: int, length: int) -> bytes: ...

    def dma_write(self, iova: int, data: bytes) -> None: ...


class QueueEngine:
    """All queues of one enabled controller; see the module docstring."""

    def __init__(
        self,
        memory: GuestMemory,
        irq: IrqController,
        vectors: int,
        sink: CommandSink,
        on_fatal: Callable[[str], None],
    ) -> None:
        self._memory = memory
        self._irq = irq
        self.vectors = vectors
        self._sink = sink
        self._on_fatal = on_fatal
        self._sqs: dict[int, SubmissionQueue] = {}
        self._cqs: dict[int, CompletionQueue] = {}
        self.intms = 0
        self.halted = False
        self.shadow: ShadowBuffers | None = None
        self._irq_pending: set[int] = set()
        self._touched: set[int] = set()  # CQs whose EventIdx may need publishing
        self._msix_seen = False

    # ---- the surface for the admin command set -----------------------------------------------

    @property
    def sqs(self) -> Mapping[int, SubmissionQueue]:
        return self._sqs

    @property
    def cqs(self) -> Mapping[int, CompletionQueue]:
        return self._cqs

    def create_cq(self, qid: int, base: int, size: int, vector: int, ien: bool) -> None:
        cq = CompletionQueue(qid, base, size, vector, ien)
        self._cqs[qid] = cq
        if self.shadow is not None:  # a stale slot from an earlier queue must not be read
            if self._write_slot(self.shadow.doorbells, qid, True, 0):
                self._publish_cq(cq)

    def create_sq(self, qid: int, base: int, size: int, cqid: int) -> None:
        sq = SubmissionQueue(qid, base, size, cqid)
        self._sqs[qid] = sq
        self._cqs[cqid].sqs.add(qid)
        if self.shadow is not None:
            if self._write_slot(self.shadow.doorbells, qid, False, 0):
                self._publish_sq(sq)

    def delete_sq(self, qid: int) -> None:
        sq = self._sqs.pop(qid)
        cq = self._cqs.get(sq.cqid)
        if cq is not None:
            cq.sqs.discard(qid)

    def delete_cq(self, qid: int) -> None:
        del self._cqs[qid]
        self._irq_pending.discard(qid)
        self._touched.discard(qid)
        self.update_intx()

    def configure_shadow(self, buffers: ShadowBuffers) -> None:
        """Doorbell Buffer Config: from now on every queue follows its shadow slots. The
        current SQ tails and CQ heads go into the shadow buffer (the host reads its previous
        value from there) and every EventIdx is published. The caller translated both buffers
        first; a fault here (guest memory vanished meanwhile) is controller fatal status."""
        self.shadow = buffers
        for sq in self._sqs.values():
            sq.event_idx = None
            if not self._write_slot(buffers.doorbells, sq.qid, False, sq.tail):
                return
            if not self._publish_sq(sq):
                return
        for cq in self._cqs.values():
            cq.event_idx = None
            if not self._write_slot(buffers.doorbells, cq.qid, True, cq.head):
                return
            if not self._publish_cq(cq):
                return

    def complete(self, sqid: int, cid: int, status: int, dw0: int) -> None:
        """Post a completion for a command of SQ ``sqid`` that completed later (AER); queued
        behind the CQ's head when the CQ is full."""
        sq = self._sqs.get(sqid)
        if sq is None:
            return
        self._post(self._cqs[sq.cqid], sq, cid, status, dw0)

    def has_room(self, sqid: int) -> bool:
        """Whether the CQ of SQ ``sqid`` can take a completion now."""
        sq = self._sqs.get(sqid)
        if sq is None or self.halted:
            return False
        cq = self._cqs[sq.cqid]
        return not cq.overflow and self._room(cq)

    def finish(self) -> None:
        """End of a batch that did not come from a doorbell (an event posted from outside)."""
        self._end_batch()

    # ---- doorbells -----------------------------------------------------------------------------

    def sq_doorbell(self, qid: int, tail: int) -> None:
        """MMIO SQ tail write. With shadow doorbells an I/O queue's tail comes from its shadow
        slot (written before the doorbell, maybe newer than this posted write, which can arrive
        after the engine already read a later tail); the admin queue's MMIO value is written
        through to its slot first."""
        sq = self._sqs.get(qid)
        if sq is None or tail >= sq.size or self.halted:
            return  # invalid doorbell write: ignored
        sq.tail = tail
        if qid == 0 and self.shadow is not None and not self._mirror(qid, False, tail):
            return
        self._run_sq(sq)
        self._end_batch()

    def cq_doorbell(self, qid: int, head: int) -> None:
        cq = self._cqs.get(qid)
        if cq is None or head >= cq.size or self.halted:
            return
        cq.head = head
        shadow = self.shadow
        if shadow is not None:
            if qid == 0:
                if not self._mirror(qid, True, head):
                    return
            else:
                value = self._read_slot(shadow.doorbells, qid, True)
                if value is None:
                    return
                if value < cq.size:
                    cq.head = value
        self._touched.add(qid)
        self._cq_progress(cq)
        self._end_batch()

    def set_intms(self, bits: int) -> None:
        self.intms |= bits
        self.update_intx()

    def clear_intms(self, bits: int) -> None:
        unmasked = self.intms & bits
        self.intms &= ~bits
        self.update_intx()
        self._raise_unmasked(unmasked)

    def _raise_unmasked(self, bits: int) -> None:
        """MSI vectors just unmasked through INTMC whose CQs hold unconsumed entries fire."""
        if not bits or not self._irq.msi_enabled or self._irq.msix_enabled:
            return
        owed = {cq.vector for cq in self._cqs.values() if cq.ien and cq.pending}
        for vector in sorted(owed):
            if bits >> vector & 1 and vector < self.vectors:
                self._irq.fire_vector(vector)

    # ---- the batch -----------------------------------------------------------------------------

    def _run_sq(self, sq: SubmissionQueue) -> None:
        cq = self._cqs[sq.cqid]
        shadow = self.shadow
        if shadow is None:
            self._drain(sq, cq)
            return
        if not self._load_sq_tail(sq, shadow):
            return
        while True:
            stalled = self._drain(sq, cq)
            if self.halted or self._sqs.get(sq.qid) is not sq:
                return
            # Publish what we have seen, then look again: the host reads EventIdx after it
            # writes its shadow slot, so a tail written after our first read either shows up
            # now or finds the new EventIdx behind it and rings the doorbell.
            if not self._publish_sq(sq):
                return
            before = sq.tail
            if not self._load_sq_tail(sq, shadow):
                return
            if stalled or sq.tail == before:
                return

    def _drain(self, sq: SubmissionQueue, cq: CompletionQueue) -> bool:
        """Fetch and execute SQ entries up to the tail. True if a full CQ stopped it (the CQ
        head doorbell resumes it)."""
        while sq.head != sq.tail:
            if self.halted or self._sqs.get(sq.qid) is not sq:
                return False
            count = (sq.tail - sq.head) % sq.size
            n = min(count, sq.size - sq.head, FETCH_BATCH)
            try:
                raw = self._memory.dma_read(sq.base + sq.head * SQ_ENTRY_SIZE, n * SQ_ENTRY_SIZE)
            except DmaFault as fault:
                self._fatal(f"SQ {sq.qid} fetch: {fault}")
                return False
            for i in range(n):
                if self.halted or self._sqs.get(sq.qid) is not sq:
                    return False
                if cq.overflow or not self._room(cq):
                    return True
                cmd = Command(raw, i * SQ_ENTRY_SIZE)
                sq.head = (sq.head + 1) % sq.size
                result = self._sink.execute(sq.qid, cmd)
                if result is not None:
                    self._post(cq, sq, cmd.cid, result[0], result[1])
        return False

    def _cq_progress(self, cq: CompletionQueue) -> None:
        """The CQ head moved: owed completions first, then deferred ones, then stalled SQs."""
        while cq.overflow and not self.halted and self._room(cq):
            sqid, cid, status, dw0, sqhd = cq.overflow.popleft()
            self._write_cqe(cq, sqid, cid, status, dw0, sqhd)
        if self.halted:
            return
        self._sink.cq_space(cq.qid)
        for sqid in sorted(cq.sqs):
            sq = self._sqs.get(sqid)
            if sq is not None and sq.head != sq.tail:
                self._run_sq(sq)

    def _post(self, cq: CompletionQueue, sq: SubmissionQueue, cid: int, status: int,
              dw0: int) -> None:  # fmt: skip
        if self.halted:
            return
        if cq.overflow or not self._room(cq):
            cq.overflow.append((sq.qid, cid, status, dw0, sq.head))
            return
        self._write_cqe(cq, sq.qid, cid, status, dw0, sq.head)

    def _write_cqe(self, cq: CompletionQueue, sqid: int, cid: int, status: int, dw0: int,
                   sqhd: int) -> None:  # fmt: skip
        entry = _CQE.pack(dw0, 0, sqhd, sqid, cid, ((status & 0x7FFF) << 1) | cq.phase)
        try:
            self._memory.dma_write(cq.base + cq.tail * CQ_ENTRY_SIZE, entry)
        except DmaFault as fault:
            self._fatal(f"CQ {cq.qid} post: {fault}")
            return
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail = 0
            cq.phase ^= 1
        self._touched.add(cq.qid)
        if cq.ien:
            self._irq_pending.add(cq.qid)

    def _room(self, cq: CompletionQueue) -> bool:
        if not cq.full:
            return True
        shadow = self.shadow
        if shadow is None or self.halted:
            return False
        # Full as far as we know. Ask to hear about the next head update, then look at the
        # head the host keeps in its shadow slot (it may have moved without a doorbell).
        if not self._publish_event_idx(cq, cq.head):
            return False
        head = self._read_slot(shadow.doorbells, cq.qid, True)
        if head is None:
            return False
        if head < cq.size:
            cq.head = head
        return not cq.full

    def _end_batch(self) -> None:
        """Publish CQ EventIdx for what changed, then signal interrupts (once per CQ)."""
        msix = self._irq.msg_enabled  # MSI-X or MSI: messages, not the INTx level
        if self.shadow is not None and not self.halted:
            if msix != self._msix_seen:
                self._touched.update(self._cqs)
            for qid in sorted(self._touched):
                cq = self._cqs.get(qid)
                if cq is not None and not self._publish_cq(cq):
                    break
        self._msix_seen = msix
        self._touched.clear()
        if msix:
            if self._irq.intx_level:
                self._irq.deassert_intx()
            # INTMS masks MSI vectors (not MSI-X); INTMC raises the ones still owed.
            masked = 0 if self._irq.msix_enabled else self.intms
            for qid in self._irq_pending:
                cq = self._cqs.get(qid)
                if (cq is not None and cq.vector < self.vectors
                        and not masked >> cq.vector & 1):  # fmt: skip
                    self._irq.fire_vector(cq.vector)
            self._irq_pending.clear()
            return
        self._irq_pending.clear()
        self.update_intx()

    def update_intx(self) -> None:
        """Pin-based level: any interrupt-enabled CQ with unconsumed entries, INTMS bit 0 clear."""
        if self._irq.msg_enabled:
            return
        level = not self.intms & 1 and any(cq.ien and cq.pending for cq in self._cqs.values())
        if level and not self._irq.intx_level:
            self._irq.assert_intx()
        elif not level and self._irq.intx_level:
            self._irq.deassert_intx()

    def _fatal(self, why: str) -> None:
        log.warning("nvme: controller fatal status: %s", why)
        self.halted = True
        self._on_fatal(why)

    # ---- shadow doorbells and EventIdx ---------------------------------------------------------

    def _load_sq_tail(self, sq: SubmissionQueue, shadow: ShadowBuffers) -> bool:
        tail = self._read_slot(shadow.doorbells, sq.qid, False)
        if tail is None:
            return False
        if tail < sq.size:  # a value beyond the queue is ignored, like such a doorbell write
            sq.tail = tail
        return True

    def _publish_sq(self, sq: SubmissionQueue) -> bool:
        if sq.event_idx == sq.tail:
            return True
        assert self.shadow is not None
        if not self._write_slot(self.shadow.event_idx, sq.qid, False, sq.tail):
            return False
        sq.event_idx = sq.tail
        return True

    def _publish_cq(self, cq: CompletionQueue) -> bool:
        """The CQ's resting EventIdx: its head while the engine needs every head update (INTx
        level, or an SQ waiting for room), else EVENTIDX_QUIET."""
        need = not self._irq.msg_enabled or any(
            (sq := self._sqs.get(s)) is not None and sq.head != sq.tail for s in cq.sqs
        )
        value = cq.head if need or cq.overflow else EVENTIDX_QUIET
        return self._publish_event_idx(cq, value)

    def _publish_event_idx(self, cq: CompletionQueue, value: int) -> bool:
        if cq.event_idx == value:
            return True
        assert self.shadow is not None
        if not self._write_slot(self.shadow.event_idx, cq.qid, True, value):
            return False
        cq.event_idx = value
        return True

    def _mirror(self, qid: int, cq: bool, value: int) -> bool:
        assert self.shadow is not None
        return self._write_slot(self.shadow.doorbells, qid, cq, value)

    def _read_slot(self, base: int, qid: int, cq: bool) -> int | None:
        iova = base + qid * DOORBELL_SLOT + (4 if cq else 0)
        try:
            raw = self._memory.dma_read(iova, 4)
        except DmaFault as fault:
            self._fatal(f"shadow doorbell of {'CQ' if cq else 'SQ'} {qid}: {fault}")
            return None
        value: int = _DWORD.unpack(raw)[0] & 0xFFFF
        return value

    def _write_slot(self, base: int, qid: int, cq: bool, value: int) -> bool:
        iova = base + qid * DOORBELL_SLOT + (4 if cq else 0)
        try:
            self._memory.dma_write(iova, _DWORD.pack(value))
        except DmaFault as fault:
            self._fatal(f"shadow buffer slot of {'CQ' if cq else 'SQ'} {qid}: {fault}")
            return False
        return True


__all__ = [
    "Command",
    "CommandSink",
    "CompletionQueue",
    "GuestMemory",
    "QueueEngine",
    "ShadowBuffers",
    "SubmissionQueue",
]
