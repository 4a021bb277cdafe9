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

Queue state lives in one record per queue: fields of the controller's C structure
(``struct vfiod_nvme``, cffi_build/nvme.h) when the C module is built, else a Python twin with
the same fields (:class:`PyQueueState`); :class:`SubmissionQueue` and :class:`CompletionQueue`
are views of those records, so nothing here keeps a second copy. With the C structure, the C
data mover does the common case of I/O queues at the seam, :meth:`QueueEngine._drain`: it
fetches, runs Read/Write/Flush and posts, and hands every entry it cannot do completely back
here (one at a time, in order), so this file stays the reference. A doorbell of an I/O queue
is tried in C first, whole (``vfiod_nvme_doorbell``, also the session fast path's hook), and
done here when C answers TOO_HARD. With the C data mover's workers running (the controller's
background task), drained commands run asynchronously and complete in any order; each holds
one entry of credit on its CQ, so a full CQ still stalls its SQs. Every method that touches
queue state holds the structure's lock, which the C threads take too; see docs/nvme.md.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

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


MAX_QUEUES = 256  #: queue ids 0..255 (the records of the C structure)

#: results of one C drain step and of the C doorbell (cffi_build/nvme.h)
C_DONE, C_STALLED, C_ROOM, C_FETCH, C_COMMAND, C_EXCEPTION, C_GONE, C_TOO_HARD = range(8)
X_POST, X_REDO, X_FLUSH = 1, 2, 3  #: exceptions: commands C consumed and Python completes


class _SqRecord:
    """Python twin of ``struct vfiod_nvme_sq``."""

    __slots__ = ("base", "size", "head", "tail", "cqid", "event_idx", "valid", "inflight")

    def __init__(self) -> None:
        self.base = self.size = self.head = self.tail = self.cqid = 0
        self.event_idx = -1
        self.valid = self.inflight = 0


class _CqRecord:
    """Python twin of ``struct vfiod_nvme_cq``."""

    __slots__ = ("base", "size", "head", "tail", "phase", "vector", "ien", "valid", "event_idx",
                 "inflight", "overflow", "touched", "irq_pending")  # fmt: skip

    def __init__(self) -> None:
        self.base = self.size = self.head = self.tail = self.phase = self.vector = 0
        self.ien = self.valid = 0
        self.event_idx = -1
        self.inflight = self.overflow = self.touched = self.irq_pending = 0


class PyQueueState:
    """Python twin of the queue part of ``struct vfiod_nvme``: the same fields, for a build
    without the C module (or a controller made with ``c_mover=False``)."""

    def __init__(self) -> None:
        self.sq = [_SqRecord() for _ in range(MAX_QUEUES)]
        self.cq = [_CqRecord() for _ in range(MAX_QUEUES)]
        self.enabled = self.halted = self.intms = self.vectors = self.msix_seen = 0
        self.shadow = self.shadow_db = self.shadow_ei = 0


def _field(name: str) -> Any:
    def get(self: Any) -> int:
        return int(getattr(self._r, name))

    def put(self: Any, value: int) -> None:
        setattr(self._r, name, value)

    return property(get, put)


def _event_idx() -> Any:
    def get(self: Any) -> int | None:
        v = int(self._r.event_idx)
        return None if v < 0 else v

    def put(self: Any, value: int | None) -> None:
        self._r.event_idx = -1 if value is None else value

    return property(get, put)


class CompletionQueue:
    """A view of one CQ's record; ``sqs`` (which SQs post here) and ``overflow`` (completions
    that found the CQ full, posted first when the head moves) are Python's alone."""

    __slots__ = ("qid", "_r", "sqs", "overflow")

    base = _field("base")
    size = _field("size")
    vector = _field("vector")
    head = _field("head")
    tail = _field("tail")
    phase = _field("phase")
    inflight = _field("inflight")  #: credit held by commands in flight
    event_idx = _event_idx()  #: last EventIdx published (shadow doorbells on)

    def __init__(self, qid: int, record: Any) -> None:
        self.qid = qid
        self._r = record
        self.sqs: set[int] = set()
        self.overflow: deque[tuple[int, int, int, int, int]] = deque()

    @property
    def ien(self) -> bool:
        return bool(self._r.ien)

    @property
    def full(self) -> bool:
        """No room for one more completion, counting the credit of commands in flight."""
        r = self._r
        return (r.tail - r.head) % r.size + r.inflight + 1 >= r.size

    @property
    def pending(self) -> bool:
        return self.head != self.tail

    def owe(self, entry: tuple[int, int, int, int, int]) -> None:
        self.overflow.append(entry)
        self._r.overflow = len(self.overflow)

    def pay(self) -> tuple[int, int, int, int, int]:
        entry = self.overflow.popleft()
        self._r.overflow = len(self.overflow)
        return entry


class SubmissionQueue:
    """A view of one SQ's record."""

    __slots__ = ("qid", "_r")

    base = _field("base")
    size = _field("size")
    cqid = _field("cqid")
    head = _field("head")
    tail = _field("tail")
    event_idx = _event_idx()

    def __init__(self, qid: int, record: Any) -> None:
        self.qid = qid
        self._r = record


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

    def flush_failed(self, sqid: int, cmd: Command, err: int) -> tuple[int, int]:
        """The completion of a Flush (or FUA write) the C mover ran whose fdatasync failed
        with ``err``: the media error the command set reports, as if it had run here."""
        ...

    def cq_space(self, cqid: int) -> None:
        """The host consumed entries of CQ ``cqid`` (deferred completions may go out)."""
        ...


class GuestMemory(Protocol):
    """Small DMAs of the engine (SQ entries, CQ entries, shadow slots); raise DmaFault."""

    def dma_read(self, iova: int, length: int) -> bytes: ...

    def dma_write(self, iova: int, data: bytes) -> None: ...


class CMover:
    """The C side of one controller: its ``struct vfiod_nvme`` and the cffi module."""

    def __init__(self, module: Any, struct: Any) -> None:
        self.ffi = module.ffi
        self.lib = module.lib
        self.c = struct
        self._exc = self.ffi.new("struct vfiod_nvme_exc *")
        self._owner = 0  # the Python thread holding the lock (the daemon's: the trio thread)
        self._depth = 0  # how deep it holds it

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the structure's lock (C threads post completions and run doorbells); taken
        once per outermost caller (admin commands nest calls inside a batch)."""
        me = threading.get_ident()
        if self._owner != me:
            self.lib.vfiod_nvme_lock(self.c)  # the GIL is released while it waits
            self._owner = me
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._owner = 0
                self.lib.vfiod_nvme_unlock(self.c)

    def take(self) -> tuple[int, int, int, int, int, bytes] | None:
        """The oldest exception: (kind, sqid, cqid, sqhd, err, entry), or None."""
        x = self._exc
        if not self.lib.vfiod_nvme_take(self.c, x):
            return None
        return (int(x.kind), int(x.sqid), int(x.cqid), int(x.sqhd), int(x.err),
                bytes(self.ffi.buffer(x.sqe, SQ_ENTRY_SIZE)))  # fmt: skip


def c_module() -> Any:
    """The C module when it has the NVMe data mover (None: the Python twin runs everything;
    VFIOD_NO_CFFI=1 or VFIOD_NO_NVME_C=1 forces that)."""
    for name in ("VFIOD_NO_CFFI", "VFIOD_NO_NVME_C"):
        if os.environ.get(name, "") not in ("", "0"):
            return None
    try:
        from vfiod import _fast  # type: ignore[attr-defined]  # optional C extension
    except ImportError:  # pragma: no cover - depends on the build
        return None
    return _fast if hasattr(_fast.lib, "vfiod_nvme_new") else None


class QueueEngine:
    """All queues of one enabled controller; see the module docstring."""

    def __init__(
        self,
        memory: GuestMemory,
        irq: IrqController,
        vectors: int,
        sink: CommandSink,
        on_fatal: Callable[[str], None],
        mover: CMover | None = None,
    ) -> None:
        self._memory = memory
        self._irq = irq
        self.vectors = vectors
        self._sink = sink
        self._on_fatal = on_fatal
        self._mover = mover
        self._sqs: dict[int, SubmissionQueue] = {}
        self._cqs: dict[int, CompletionQueue] = {}
        self.shadow: ShadowBuffers | None = None
        if mover is not None:
            self._s: Any = mover.c
            with self._locked():
                mover.lib.vfiod_nvme_quiesce(self._s, MAX_QUEUES)
                mover.lib.vfiod_nvme_reset_queues(self._s)
                self._s.vectors = vectors
                self._s.enabled = 1
        else:
            self._s = PyQueueState()
            self._s.vectors = vectors
            self._s.enabled = 1

    # ---- the lock ------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        mover = self._mover
        if mover is None:
            yield
            return
        with mover.locked():
            yield

    # ---- state -------------------------------------------------------------------------------

    @property
    def halted(self) -> bool:
        return bool(self._s.halted)

    @halted.setter
    def halted(self, value: bool) -> None:
        self._s.halted = int(value)

    @property
    def intms(self) -> int:
        return int(self._s.intms)

    @intms.setter
    def intms(self, value: int) -> None:
        self._s.intms = value & 0xFFFFFFFF

    @property
    def _msix_seen(self) -> bool:
        return bool(self._s.msix_seen)

    @_msix_seen.setter
    def _msix_seen(self, value: bool) -> None:
        self._s.msix_seen = int(value)

    def _set_shadow(self, buffers: ShadowBuffers | None) -> None:
        self.shadow = buffers
        self._s.shadow = int(buffers is not None)
        self._s.shadow_db = buffers.doorbells if buffers else 0
        self._s.shadow_ei = buffers.event_idx if buffers else 0

    def close(self) -> None:
        """The controller resets: wait for commands in flight (their completions are dropped
        with the queues), then forget every queue."""
        with self._locked():
            self._quiesce(MAX_QUEUES)
            self._s.enabled = 0
            if self._mover is not None:
                self._mover.lib.vfiod_nvme_reset_queues(self._s)
            self._sqs.clear()
            self._cqs.clear()

    def _quiesce(self, sqid: int) -> None:
        """Wait until no command of SQ ``sqid`` (every SQ: MAX_QUEUES) runs in a worker; the
        completions that need Python are done here."""
        if self._mover is not None:
            self._mover.lib.vfiod_nvme_quiesce(self._s, sqid)
            self._service_exceptions()

    # ---- the surface for the admin command set -----------------------------------------------

    @property
    def sqs(self) -> Mapping[int, SubmissionQueue]:
        return self._sqs

    @property
    def cqs(self) -> Mapping[int, CompletionQueue]:
        return self._cqs

    def create_cq(self, qid: int, base: int, size: int, vector: int, ien: bool) -> None:
        with self._locked():
            r = self._s.cq[qid]
            r.base, r.size, r.vector, r.ien = base, size, vector, int(ien)
            r.head = r.tail = r.inflight = r.overflow = r.touched = r.irq_pending = 0
            r.phase = 1
            r.event_idx = -1
            r.valid = 1
            cq = CompletionQueue(qid, r)
            self._cqs[qid] = cq
            if self.shadow is not None:  # a stale slot from an earlier queue must not be read
                if self._write_slot(self.shadow.doorbells, qid, True, 0):
                    self._publish_cq(cq)

    def create_sq(self, qid: int, base: int, size: int, cqid: int) -> None:
        with self._locked():
            r = self._s.sq[qid]
            r.base, r.size, r.cqid = base, size, cqid
            r.head = r.tail = r.inflight = 0
            r.event_idx = -1
            r.valid = 1
            sq = SubmissionQueue(qid, r)
            self._sqs[qid] = sq
            self._cqs[cqid].sqs.add(qid)
            if self.shadow is not None:
                if self._write_slot(self.shadow.doorbells, qid, False, 0):
                    self._publish_sq(sq)

    def delete_sq(self, qid: int) -> None:
        """Commands of the SQ still running finish (and complete) first."""
        with self._locked():
            self._quiesce(qid)
            sq = self._sqs.pop(qid)
            sq._r.valid = 0
            if self._mover is not None:
                self._mover.lib.vfiod_nvme_drop_run(self._s)
            cq = self._cqs.get(sq.cqid)
            if cq is not None:
                cq.sqs.discard(qid)

    def delete_cq(self, qid: int) -> None:
        with self._locked():
            cq = self._cqs.pop(qid)
            r = cq._r
            r.valid = r.touched = r.irq_pending = 0
            self.update_intx()

    def configure_shadow(self, buffers: ShadowBuffers) -> None:
        """Doorbell Buffer Config: from now on every queue follows its shadow slots. The
        current SQ tails and CQ heads go into the shadow buffer (the host reads its previous
        value from there) and every EventIdx is published. The caller translated both buffers
        first; a fault here (guest memory vanished meanwhile) is controller fatal status."""
        with self._locked():
            self._set_shadow(buffers)
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
        with self._locked():
            sq = self._sqs.get(sqid)
            if sq is None:
                return
            self._post(self._cqs[sq.cqid], sq, cid, status, dw0)

    def has_room(self, sqid: int) -> bool:
        """Whether the CQ of SQ ``sqid`` can take a completion now."""
        with self._locked():
            sq = self._sqs.get(sqid)
            if sq is None or self.halted:
                return False
            cq = self._cqs[sq.cqid]
            return not cq.overflow and self._room(cq)

    def finish(self) -> None:
        """End of a batch that did not come from a doorbell (an event posted from outside)."""
        with self._locked():
            self._end_batch()

    def service(self) -> None:
        """What the C side left for Python: completions its workers could not finish,
        vectors the interrupt mirror could not deliver, the INTx level."""
        with self._locked():
            if self._mover is not None:
                self._s.need_python = 0
            self._service_exceptions()
            self._end_batch()
            self._irq.fire_pending()

    # ---- doorbells -----------------------------------------------------------------------------

    def doorbell(self, offset: int, value: int) -> bool:
        """An MMIO doorbell write (offset in the doorbell page), done whole by the C data mover
        when it can: True if it was (the C side counted it)."""
        mover = self._mover
        if mover is None:
            return False
        with self._locked():
            if mover.lib.vfiod_nvme_doorbell(self._s, offset, value) != C_DONE:
                return False
            self._irq.fire_pending()
            return True

    def sq_doorbell(self, qid: int, tail: int) -> None:
        """MMIO SQ tail write. With shadow doorbells an I/O queue's tail comes from its shadow
        slot (written before the doorbell, maybe newer than this posted write, which can arrive
        after the engine already read a later tail); the admin queue's MMIO value is written
        through to its slot first."""
        with self._locked():
            sq = self._sqs.get(qid)
            if sq is None or tail >= sq.size or self.halted:
                return  # invalid doorbell write: ignored
            sq.tail = tail
            if qid == 0 and self.shadow is not None and not self._mirror(qid, False, tail):
                return
            self._run_sq(sq)
            self._end_batch()

    def cq_doorbell(self, qid: int, head: int) -> None:
        with self._locked():
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
            cq._r.touched = 1
            self._cq_progress(cq)
            self._end_batch()

    def set_intms(self, bits: int) -> None:
        with self._locked():
            self.intms |= bits
            self.update_intx()

    def clear_intms(self, bits: int) -> None:
        with self._locked():
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
        head doorbell resumes it). I/O queues go through the C data mover when there is one."""
        mover = self._mover
        if mover is not None and sq.qid and mover.c.dma != mover.ffi.NULL:
            return self._drain_c(mover, sq, cq)
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

    def _drain_c(self, mover: CMover, sq: SubmissionQueue, cq: CompletionQueue) -> bool:
        """The same loop, stepped by C (``vfiod_nvme_drain``): C runs what it can and hands
        the rest back here one piece at a time, in the order the loop above meets them."""
        lib, c = mover.lib, mover.c
        if c.nexc:
            self._service_exceptions()  # completions C left for us go before new ones
        room_at = -1  # the SQ head when _room last found room
        while True:
            rc = lib.vfiod_nvme_drain(c, sq.qid)
            if rc == C_ROOM and room_at == sq.head:  # C and _room disagree: never spin
                raise AssertionError(f"SQ {sq.qid}: the C mover sees no room _room found")
            room_at = -1
            if rc == C_DONE or rc == C_GONE:
                return False
            if rc == C_STALLED:
                return True
            if rc == C_COMMAND:
                cmd = Command(bytes(mover.ffi.buffer(c.cmd, SQ_ENTRY_SIZE)))
                lib.vfiod_nvme_consume(c, sq.qid)
                result = self._sink.execute(sq.qid, cmd)
                if result is not None:
                    self._post(cq, sq, cmd.cid, result[0], result[1])
            elif rc == C_EXCEPTION:
                self._service_exceptions()
            elif rc == C_FETCH:
                iova, n = int(c.fetch_iova), int(c.fetch_n)
                try:
                    raw = self._memory.dma_read(iova, n * SQ_ENTRY_SIZE)
                except DmaFault as fault:
                    self._fatal(f"SQ {sq.qid} fetch: {fault}")
                    return False
                lib.vfiod_nvme_put_run(c, sq.qid, raw, n)
            elif rc == C_ROOM:
                if not self._room(cq):
                    lib.vfiod_nvme_drop_run(c)
                    return True
                room_at = sq.head
            else:  # pragma: no cover - a result this file does not know
                raise AssertionError(f"vfiod_nvme_drain returned {rc}")
            if self.halted or self._sqs.get(sq.qid) is not sq:
                return False

    def _service_exceptions(self) -> None:
        """Complete the commands the C mover consumed but could not finish, oldest first."""
        mover = self._mover
        if mover is None:
            return
        while (x := mover.take()) is not None:
            kind, sqid, cqid, sqhd, err, raw = x
            mover.lib.vfiod_nvme_release(mover.c, cqid)  # the credit becomes the entry
            sq = self._sqs.get(sqid)
            cq = self._cqs.get(cqid)
            cmd = Command(raw)
            if sq is None or cq is None:
                continue
            if kind == X_POST:
                if not self.halted:
                    self._write_cqe(cq, sqid, cmd.cid, 0, 0, sqhd)
                continue
            if kind == X_REDO:
                result = self._sink.execute(sqid, cmd)
            else:
                result = self._sink.flush_failed(sqid, cmd, err)
            if result is not None:
                self._post(cq, sq, cmd.cid, result[0], result[1])

    def _cq_progress(self, cq: CompletionQueue) -> None:
        """The CQ head moved: owed completions first, then deferred ones, then stalled SQs."""
        while cq.overflow and not self.halted and self._room(cq):
            sqid, cid, status, dw0, sqhd = cq.pay()
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
            cq.owe((sq.qid, cid, status, dw0, sq.head))
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
        r = cq._r
        tail = r.tail + 1
        if tail == r.size:
            tail = 0
            r.phase ^= 1
        r.tail = tail
        r.touched = 1
        if r.ien:
            r.irq_pending = 1

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
        """Publish CQ EventIdx for what changed, then signal interrupts (once per CQ). The C
        data mover does the common case (message interrupts) itself."""
        mover = self._mover
        if mover is not None and mover.lib.vfiod_nvme_end_batch(self._s) == C_DONE:
            self._irq.fire_pending()
            return
        msix = self._irq.msg_enabled  # MSI-X or MSI: messages, not the INTx level
        touched = [qid for qid, cq in self._cqs.items() if cq._r.touched]
        if self.shadow is not None and not self.halted:
            if msix != self._msix_seen:
                touched = list(self._cqs)
            for qid in sorted(touched):
                cq = self._cqs.get(qid)
                if cq is not None and not self._publish_cq(cq):
                    break
        self._msix_seen = msix
        pending = []
        for cq in self._cqs.values():
            r = cq._r
            r.touched = 0
            if r.irq_pending:
                r.irq_pending = 0
                pending.append(cq)
        if msix:
            if self._irq.intx_level:
                self._irq.deassert_intx()
            # INTMS masks MSI vectors (not MSI-X); INTMC raises the ones still owed.
            masked = 0 if self._irq.msix_enabled else self.intms
            for cq in pending:
                if cq.vector < self.vectors and not masked >> cq.vector & 1:
                    self._irq.fire_vector(cq.vector)
            return
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
    "CMover",
    "Command",
    "CommandSink",
    "CompletionQueue",
    "GuestMemory",
    "PyQueueState",
    "QueueEngine",
    "ShadowBuffers",
    "SubmissionQueue",
]
