"""The admin command set: Identify, queue management, features, log pages, asynchronous
events, Doorbell Buffer Config, Abort, Keep Alive.

Queue state itself belongs to the :class:`~vfiod.devices.nvme.queues.QueueEngine`: Create and
Delete check their fields here and then call the engine. Features, outstanding Asynchronous
Event Requests, queued events and the timestamp live here and go back to their defaults on every
controller reset (:meth:`AdminCommands.reset`); the error log and SMART counters survive resets.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vfiod.devices.nvme.constants import (
    ADM_ABORT,
    ADM_ASYNC_EVENT,
    ADM_CREATE_CQ,
    ADM_CREATE_SQ,
    ADM_DBBUF_CONFIG,
    ADM_DELETE_CQ,
    ADM_DELETE_SQ,
    ADM_GET_FEATURES,
    ADM_GET_LOG_PAGE,
    ADM_IDENTIFY,
    ADM_KEEP_ALIVE,
    ADM_SET_FEATURES,
    AEC_SMART_TEMPERATURE,
    AER_SMART_TEMPERATURE,
    AER_TYPE_ERROR,
    AER_TYPE_SMART,
    CC_IOCQES_SHIFT,
    CC_IOSQES_SHIFT,
    CNS_ACTIVE_NS_LIST,
    CNS_CONTROLLER,
    CNS_NAMESPACE,
    CNS_NS_DESCRIPTORS,
    CQES_LOG2,
    FEAT_ARBITRATION,
    FEAT_ASYNC_EVENT,
    FEAT_CAP_CHANGEABLE,
    FEAT_CAP_NS_SPECIFIC,
    FEAT_ERROR_RECOVERY,
    FEAT_IRQ_COALESCE,
    FEAT_IRQ_CONFIG,
    FEAT_NUM_QUEUES,
    FEAT_POWER_MGMT,
    FEAT_TEMP_THRESHOLD,
    FEAT_TIMESTAMP,
    FEAT_VOLATILE_WC,
    FEAT_WRITE_ATOMIC,
    LOG_ERROR,
    LOG_FW_SLOT,
    LOG_SMART,
    NSID_ALL,
    OACS_DBBUF,
    SC_AER_LIMIT,
    SC_CMD_SEQ_ERROR,
    SC_CQ_INVALID,
    SC_FEAT_NOT_SAVEABLE,
    SC_INVALID_FIELD,
    SC_INVALID_LOG_PAGE,
    SC_INVALID_NS,
    SC_INVALID_OPCODE,
    SC_INVALID_QID,
    SC_INVALID_QSIZE,
    SC_INVALID_QUEUE_DELETION,
    SC_INVALID_VECTOR,
    SEL_CURRENT,
    SEL_DEFAULT,
    SEL_SAVED,
    SEL_SUPPORTED,
    SQES_LOG2,
)
from vfiod.devices.nvme.identify import (
    ControllerIdentity,
    ErrorEntry,
    NamespaceIdentity,
    SmartCounters,
    active_ns_list,
    error_log,
    firmware_slot_log,
    identify_controller,
    identify_namespace,
    ns_descriptors,
    smart_log,
)
from vfiod.devices.nvme.mover import DataMover
from vfiod.devices.nvme.nvm import NSID, Namespace
from vfiod.devices.nvme.prp import NvmeStatus
from vfiod.devices.nvme.queues import DOORBELL_SLOT, Command, QueueEngine, ShadowBuffers

MQES = 1023  #: CAP.MQES: I/O queues of up to 1024 entries
ELPE = 15  #: error log page entries, 0's based
AERL = 3  #: outstanding Asynchronous Event Requests, 0's based
WCTEMP = 343  #: 70 C
CCTEMP = 358  #: 85 C
_TEMP_SENSORS = (0, 1)  # composite and sensor 1

_FEATURES = (
    FEAT_ARBITRATION,
    FEAT_POWER_MGMT,
    FEAT_TEMP_THRESHOLD,
    FEAT_ERROR_RECOVERY,
    FEAT_VOLATILE_WC,
    FEAT_NUM_QUEUES,
    FEAT_IRQ_COALESCE,
    FEAT_IRQ_CONFIG,
    FEAT_WRITE_ATOMIC,
    FEAT_ASYNC_EVENT,
    FEAT_TIMESTAMP,
)


@dataclass
class Features:
    """Set Features state; back to these defaults on every controller reset."""

    arbitration: int = 0
    power_state: int = 0
    temp_thresholds: dict[tuple[int, int], int] = field(default_factory=dict)
    error_recovery: int = 0
    wce: bool = True
    nsq: int = 0  # 0's based allocation; filled in by the controller
    ncq: int = 0
    queues_set: bool = False
    irq_coalesce: int = 0
    irq_config: dict[int, int] = field(default_factory=dict)
    write_atomic: int = 0
    async_event: int = 0


def _default_threshold(sensor: int, thsel: int) -> int:
    if thsel == 0:
        return WCTEMP if sensor == 0 else 0xFFFF
    return 0


class AdminCommands:
    """Executes admin queue commands for one controller."""

    def __init__(
        self,
        identity: ControllerIdentity,
        namespace: Namespace,
        mover: DataMover,
        smart: SmartCounters,
        *,
        io_queues: int,
        vectors: int,
        max_transfer: int,
        cc: Callable[[], int],
        collect: Callable[[], None] = lambda: None,
    ) -> None:
        self.identity = identity
        self.ns = namespace
        self.mover = mover
        self.smart = smart
        self.io_queues = io_queues
        self.vectors = vectors
        self.max_transfer = max_transfer
        self._cc = cc
        self._collect = collect  # brings counters kept elsewhere (the C data mover) up to date
        self.temperature = 303  #: composite temperature reported, Kelvin
        self.errors: list[ErrorEntry] = []
        self.error_count = 0
        self._power_on = time.monotonic()
        self.reset()

    def reset(self) -> None:
        """Controller reset: features to defaults, AERs and queued events dropped."""
        self.features = Features(nsq=self.io_queues - 1, ncq=self.io_queues - 1)
        self.aer_cids: list[int] = []
        self.events: deque[tuple[int, int, int]] = deque()
        self.masked_event_types: set[int] = set()
        self._timestamp_base = 0
        self._timestamp_origin = 0
        self._timestamp_at = time.monotonic()

    @property
    def shadow_doorbells(self) -> bool:
        return bool(self.identity.oacs & OACS_DBBUF)

    def execute(self, q: QueueEngine, cmd: Command) -> int | None:
        """Run ``cmd``; dw0, or None when it completes later (AER). Raises NvmeStatus (and
        DmaFault for a data transfer that faulted)."""
        op = cmd.opcode
        if op == ADM_IDENTIFY:
            return self._identify(cmd)
        if op == ADM_CREATE_CQ:
            return self._create_cq(q, cmd)
        if op == ADM_CREATE_SQ:
            return self._create_sq(q, cmd)
        if op == ADM_DELETE_SQ:
            return self._delete_sq(q, cmd)
        if op == ADM_DELETE_CQ:
            return self._delete_cq(q, cmd)
        if op == ADM_GET_FEATURES:
            return self._get_features(cmd)
        if op == ADM_SET_FEATURES:
            return self._set_features(q, cmd)
        if op == ADM_GET_LOG_PAGE:
            return self._get_log_page(cmd)
        if op == ADM_ASYNC_EVENT:
            if len(self.aer_cids) > AERL:
                raise NvmeStatus(SC_AER_LIMIT)
            self.aer_cids.append(cmd.cid)
            self.deliver_events(q)
            return None
        if op == ADM_ABORT:
            return 1  # bit 0 set: command not aborted (everything completes synchronously)
        if op == ADM_KEEP_ALIVE:
            return 0
        if op == ADM_DBBUF_CONFIG and self.shadow_doorbells:
            return self._dbbuf_config(q, cmd)
        raise NvmeStatus(SC_INVALID_OPCODE)

    # ---- data --------------------------------------------------------------------------------

    def _send(self, cmd: Command, data: bytes) -> None:
        """Controller -> host data along the command's PRPs (all translated before any moves)."""
        self.mover.to_guest(self.mover.pieces(cmd.prp1, cmd.prp2, len(data)), data)

    def _receive(self, cmd: Command, length: int) -> bytes:
        return self.mover.from_guest(self.mover.pieces(cmd.prp1, cmd.prp2, length))

    # ---- identify ----------------------------------------------------------------------------

    def _identify(self, cmd: Command) -> int:
        cns = cmd.cdw[10] & 0xFF
        nsid = cmd.nsid
        if cns == CNS_CONTROLLER:
            data = identify_controller(self.identity)
        elif cns == CNS_NAMESPACE:
            if nsid != NSID:  # 0, FFFFFFFFh (no NS management) and beyond NN
                raise NvmeStatus(SC_INVALID_NS)
            data = self._identify_ns()
        elif cns == CNS_ACTIVE_NS_LIST:
            if nsid >= 0xFFFFFFFE:
                raise NvmeStatus(SC_INVALID_NS)
            data = active_ns_list([NSID], nsid)
        elif cns == CNS_NS_DESCRIPTORS:
            if nsid != NSID:
                raise NvmeStatus(SC_INVALID_NS)
            data = ns_descriptors(self.ns.nguid, self.ns.uuid)
        else:
            raise NvmeStatus(SC_INVALID_FIELD)
        self._send(cmd, data)
        return 0

    def _identify_ns(self) -> bytes:
        shifts = (9, 12)
        return identify_namespace(
            NamespaceIdentity(
                nsze=self.ns.nsze,
                lbaf_index=shifts.index(self.ns.lba_shift),
                lba_shifts=shifts,
                dlfeat=0x09 if self.ns.store.deallocate_zeroes else 0x00,
                nguid=self.ns.nguid,
                uuid=self.ns.uuid,
            )
        )

    # ---- queues ------------------------------------------------------------------------------

    @staticmethod
    def _queue_geometry(cmd: Command, limit: int, existing: set[int]) -> tuple[int, int]:
        qid = cmd.cdw[10] & 0xFFFF
        qsize = (cmd.cdw[10] >> 16) + 1
        if qid == 0 or qid > limit or qid in existing:
            raise NvmeStatus(SC_INVALID_QID)
        if qsize < 2 or qsize > MQES + 1:
            raise NvmeStatus(SC_INVALID_QSIZE)
        return qid, qsize

    def _check_queue_memory(self, cmd: Command, contiguous: bool) -> None:
        if not contiguous:
            raise NvmeStatus(SC_INVALID_FIELD)  # CAP.CQR: only physically contiguous queues
        if cmd.prp1 == 0 or cmd.prp1 % self.mover.page_size:
            raise NvmeStatus(SC_INVALID_FIELD)

    def _create_cq(self, q: QueueEngine, cmd: Command) -> int:
        qid, qsize = self._queue_geometry(cmd, self.features.ncq + 1, set(q.cqs))
        flags = cmd.cdw[11]
        vector = flags >> 16
        if ((self._cc() >> CC_IOCQES_SHIFT) & 0xF) != CQES_LOG2:
            raise NvmeStatus(SC_INVALID_FIELD)
        self._check_queue_memory(cmd, bool(flags & 0x1))
        if vector >= self.vectors:
            raise NvmeStatus(SC_INVALID_VECTOR)
        q.create_cq(qid, cmd.prp1, qsize, vector=vector, ien=bool(flags & 0x2))
        return 0

    def _create_sq(self, q: QueueEngine, cmd: Command) -> int:
        qid, qsize = self._queue_geometry(cmd, self.features.nsq + 1, set(q.sqs))
        flags = cmd.cdw[11]
        cqid = flags >> 16
        if ((self._cc() >> CC_IOSQES_SHIFT) & 0xF) != SQES_LOG2:
            raise NvmeStatus(SC_INVALID_FIELD)
        if cqid == 0 or cqid not in q.cqs:
            raise NvmeStatus(SC_CQ_INVALID)
        self._check_queue_memory(cmd, bool(flags & 0x1))
        q.create_sq(qid, cmd.prp1, qsize, cqid)
        return 0

    @staticmethod
    def _delete_sq(q: QueueEngine, cmd: Command) -> int:
        qid = cmd.cdw[10] & 0xFFFF
        if qid == 0 or qid not in q.sqs:
            raise NvmeStatus(SC_INVALID_QID)
        q.delete_sq(qid)
        return 0

    @staticmethod
    def _delete_cq(q: QueueEngine, cmd: Command) -> int:
        qid = cmd.cdw[10] & 0xFFFF
        cq = q.cqs.get(qid)
        if qid == 0 or cq is None:
            raise NvmeStatus(SC_INVALID_QID)
        if cq.sqs:
            raise NvmeStatus(SC_INVALID_QUEUE_DELETION)
        q.delete_cq(qid)
        return 0

    def _dbbuf_config(self, q: QueueEngine, cmd: Command) -> int:
        """Doorbell Buffer Config: PRP1 = shadow doorbells, PRP2 = EventIdx, one memory page
        each. Both are translated first (the controller reads and writes the shadow buffer and
        writes EventIdx), so a buffer the host cannot hand us ends this command with Data
        Transfer Error and leaves the doorbells as they were."""
        page = self.mover.page_size
        dbs, eis = cmd.prp1, cmd.prp2
        if dbs % page or eis % page:
            raise NvmeStatus(SC_INVALID_FIELD)
        span = DOORBELL_SLOT * (self.io_queues + 1)  # every queue pair this controller has
        self.mover.check([(dbs, span)], write=True)
        self.mover.check([(dbs, span)], write=False)
        self.mover.check([(eis, span)], write=True)
        q.configure_shadow(ShadowBuffers(dbs, eis))
        return 0

    # ---- features ----------------------------------------------------------------------------

    def _feature_value(self, fid: int, cdw11: int, f: Features) -> int:
        if fid == FEAT_ARBITRATION:
            return f.arbitration
        if fid == FEAT_POWER_MGMT:
            return f.power_state
        if fid == FEAT_TEMP_THRESHOLD:
            sensor, thsel = self._temp_select(cdw11)
            value = f.temp_thresholds.get((sensor, thsel), _default_threshold(sensor, thsel))
            return value | (sensor << 16) | (thsel << 20)
        if fid == FEAT_ERROR_RECOVERY:
            return f.error_recovery
        if fid == FEAT_VOLATILE_WC:
            return int(f.wce)
        if fid == FEAT_NUM_QUEUES:
            return f.nsq | (f.ncq << 16)
        if fid == FEAT_IRQ_COALESCE:
            return f.irq_coalesce
        if fid == FEAT_IRQ_CONFIG:
            vector = cdw11 & 0xFFFF
            if vector >= self.vectors:
                raise NvmeStatus(SC_INVALID_FIELD)
            return vector | (f.irq_config.get(vector, 0) << 16)
        if fid == FEAT_WRITE_ATOMIC:
            return f.write_atomic
        if fid == FEAT_ASYNC_EVENT:
            return f.async_event
        raise NvmeStatus(SC_INVALID_FIELD)

    @staticmethod
    def _temp_select(cdw11: int) -> tuple[int, int]:
        sensor = (cdw11 >> 16) & 0xF
        thsel = (cdw11 >> 20) & 0x3
        if sensor not in _TEMP_SENSORS or thsel > 1:
            raise NvmeStatus(SC_INVALID_FIELD)
        return sensor, thsel

    def _get_features(self, cmd: Command) -> int:
        fid = cmd.cdw[10] & 0xFF
        sel = (cmd.cdw[10] >> 8) & 0x7
        if fid not in _FEATURES:
            raise NvmeStatus(SC_INVALID_FIELD)
        if fid == FEAT_ERROR_RECOVERY and cmd.nsid not in (NSID, NSID_ALL):
            raise NvmeStatus(SC_INVALID_NS)
        if sel == SEL_SUPPORTED:
            caps = FEAT_CAP_CHANGEABLE
            if fid == FEAT_ERROR_RECOVERY:
                caps |= FEAT_CAP_NS_SPECIFIC
            return caps
        if sel not in (SEL_CURRENT, SEL_DEFAULT, SEL_SAVED):
            raise NvmeStatus(SC_INVALID_FIELD)
        current = sel == SEL_CURRENT
        if fid == FEAT_TIMESTAMP:
            self._send(cmd, self._timestamp_bytes() if current else bytes(8))
            return 0
        f = self.features if current else Features(nsq=self.io_queues - 1, ncq=self.io_queues - 1)
        return self._feature_value(fid, cmd.cdw[11], f)

    def _set_features(self, q: QueueEngine, cmd: Command) -> int:
        fid = cmd.cdw[10] & 0xFF
        if cmd.cdw[10] & (1 << 31):
            raise NvmeStatus(SC_FEAT_NOT_SAVEABLE)
        value = cmd.cdw[11]
        f = self.features
        if fid == FEAT_ARBITRATION:
            f.arbitration = value
        elif fid == FEAT_POWER_MGMT:
            if value & 0x1F:  # only power state 0 exists (NPSS 0)
                raise NvmeStatus(SC_INVALID_FIELD)
            f.power_state = value & 0xFF
        elif fid == FEAT_TEMP_THRESHOLD:
            raw_sensor = (value >> 16) & 0xF
            thsel = (value >> 20) & 0x3
            if thsel > 1 or (raw_sensor != 0xF and raw_sensor not in _TEMP_SENSORS):
                raise NvmeStatus(SC_INVALID_FIELD)
            sensors = _TEMP_SENSORS if raw_sensor == 0xF else (raw_sensor,)
            before = self.critical_warning()
            for sensor in sensors:
                f.temp_thresholds[(sensor, thsel)] = value & 0xFFFF
            if not before & 0x02 and self.critical_warning() & 0x02:
                if f.async_event & AEC_SMART_TEMPERATURE:
                    self.post_event(q, AER_TYPE_SMART, AER_SMART_TEMPERATURE, LOG_SMART)
        elif fid == FEAT_ERROR_RECOVERY:
            if cmd.nsid not in (NSID, NSID_ALL):
                raise NvmeStatus(SC_INVALID_NS)
            if value & (1 << 16):  # DULBE needs NSFEAT.DAE
                raise NvmeStatus(SC_INVALID_FIELD)
            f.error_recovery = value & 0xFFFF
        elif fid == FEAT_VOLATILE_WC:
            wce = bool(value & 1)
            if f.wce and not wce:
                self.ns.store.flush()  # what the cache held becomes durable before write-through
            f.wce = wce
        elif fid == FEAT_NUM_QUEUES:
            nsqr, ncqr = value & 0xFFFF, value >> 16
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                raise NvmeStatus(SC_INVALID_FIELD)
            if len(q.sqs) > 1 or len(q.cqs) > 1:
                raise NvmeStatus(SC_CMD_SEQ_ERROR)
            f.nsq = min(nsqr, self.io_queues - 1)
            f.ncq = min(ncqr, self.io_queues - 1)
            f.queues_set = True
            return f.nsq | (f.ncq << 16)
        elif fid == FEAT_IRQ_COALESCE:
            f.irq_coalesce = value & 0xFFFF
        elif fid == FEAT_IRQ_CONFIG:
            vector = value & 0xFFFF
            if vector >= self.vectors:
                raise NvmeStatus(SC_INVALID_FIELD)
            f.irq_config[vector] = (value >> 16) & 1
        elif fid == FEAT_WRITE_ATOMIC:
            f.write_atomic = value & 1
        elif fid == FEAT_ASYNC_EVENT:
            f.async_event = value & 0x3FF
        elif fid == FEAT_TIMESTAMP:
            data = self._receive(cmd, 8)
            self._timestamp_base = int.from_bytes(data[:6], "little")
            self._timestamp_origin = 1
            self._timestamp_at = time.monotonic()
        else:
            raise NvmeStatus(SC_INVALID_FIELD)
        return 0

    def _timestamp_bytes(self) -> bytes:
        elapsed = int((time.monotonic() - self._timestamp_at) * 1000)
        stamp = (self._timestamp_base + elapsed) & ((1 << 48) - 1)
        return stamp.to_bytes(6, "little") + bytes([self._timestamp_origin << 1, 0])

    # ---- log pages ---------------------------------------------------------------------------

    def _get_log_page(self, cmd: Command) -> int:
        lid = cmd.cdw[10] & 0xFF
        rae = bool(cmd.cdw[10] & (1 << 15))
        numd = (((cmd.cdw[11] & 0xFFFF) << 16) | (cmd.cdw[10] >> 16)) + 1
        length = numd * 4
        offset = cmd.cdw[12] | (cmd.cdw[13] << 32)
        if offset & 3 or length > self.max_transfer:
            raise NvmeStatus(SC_INVALID_FIELD)
        if lid == LOG_ERROR:
            page = error_log(self.errors, ELPE + 1)
            event_type = AER_TYPE_ERROR
        elif lid == LOG_SMART:
            if cmd.nsid not in (0, NSID, NSID_ALL):
                raise NvmeStatus(SC_INVALID_FIELD)
            self._collect()
            self.smart.power_on_hours = int((time.monotonic() - self._power_on) // 3600)
            page = smart_log(self.smart, self.critical_warning(), self.temperature)
            event_type = AER_TYPE_SMART
        elif lid == LOG_FW_SLOT:
            page = firmware_slot_log(self.identity.firmware)
            event_type = -1
        else:
            raise NvmeStatus(SC_INVALID_LOG_PAGE)
        if offset > len(page):
            raise NvmeStatus(SC_INVALID_FIELD)
        data = page[offset : offset + length]
        data += bytes(length - len(data))
        self._send(cmd, data)
        if not rae and event_type in self.masked_event_types:
            self.masked_event_types.discard(event_type)
        return 0

    # ---- errors and events -------------------------------------------------------------------

    def log_error(self, sqid: int, cmd: Command, status: int, lba: int) -> None:
        self.error_count += 1
        self.smart.error_entries += 1
        entry = ErrorEntry(self.error_count, sqid, cmd.cid, status, lba=lba, nsid=cmd.nsid)
        self.errors.append(entry)
        del self.errors[: -(ELPE + 1)]

    def post_event(self, q: QueueEngine | None, event_type: int, info: int,
                   log_page: int) -> None:  # fmt: skip
        """Queue an asynchronous event; completes an outstanding AER if one is waiting."""
        if event_type in self.masked_event_types:
            return
        self.events.append((event_type, info, log_page))
        if q is not None:
            self.deliver_events(q)

    def deliver_events(self, q: QueueEngine) -> None:
        """Complete waiting AERs with queued events while the admin CQ has room."""
        while self.events and self.aer_cids and q.has_room(0):
            event_type, info, log_page = self.events.popleft()
            if event_type in self.masked_event_types:
                continue
            cid = self.aer_cids.pop(0)
            self.masked_event_types.add(event_type)  # until the host reads the log page
            q.complete(0, cid, 0, event_type | (info << 8) | (log_page << 16))

    def critical_warning(self) -> int:
        warning = 0
        for sensor in _TEMP_SENSORS:
            over = self.features.temp_thresholds.get((sensor, 0), _default_threshold(sensor, 0))
            under = self.features.temp_thresholds.get((sensor, 1), _default_threshold(sensor, 1))
            if self.temperature >= over or self.temperature <= under:
                warning |= 0x02
        return warning


__all__ = ["AERL", "ELPE", "MQES", "AdminCommands", "Features"]
