"""NVMe 1.4 controller personality: one NVM namespace on a file or block device.

Identity. Class 01:08:02 (NVMe I/O controller). By default vendor 0x1B36 / device 0x0010, the
id pair of QEMU's emulated NVMe controller (Red Hat's allocation for QEMU devices). Linux
(``drivers/nvme/host/pci.c``) binds any device of this class; its only quirk for 1b36:0010 is
``NVME_QUIRK_BOGUS_NID`` (namespace NGUID/EUI64/UUID are ignored), which costs us nothing: each
controller still gets a unique serial number and subsystem NQN, so two vfiod controllers never
collapse into one Linux subsystem. Pass ``vendor_id``/``device_id`` to use another pair.

BAR0 (16 KiB, 64-bit, non-prefetchable, every access is a message):

============ =================================================================================
0x0000       controller registers: CAP, VS, INTMS, INTMC, CC, CSTS, NSSR, AQA, ASQ, ACQ
0x1000       doorbells, CAP.DSTRD = 0: SQ y tail at 0x1000 + 8y, CQ y head at 0x1000 + 8y + 4
0x2000       MSI-X table (``io_queues + 1`` vectors; at most 256 fit the page), with ``msix=True``
0x3000       MSI-X PBA, with ``msix=True``
============ =================================================================================

Interrupts. By default an MSI cap asking for the power of two above ``io_queues`` (at most 32
vectors), 64-bit, with INTMS/INTMC masking vectors as NVMe defines for MSI; ``msix=True`` puts
an MSI-X table and PBA in BAR0 instead. MSI is the default because QEMU 11.1 aborts when a
vfio-user function with MSI-X is hot-unplugged (docs/qemu-quirks.md).

Queues. Doorbell writes arrive as posted REGION_WRITEs on the session's task; a SQ tail write
runs the SQ up to the new tail right there: fetch entries (one DMA read per run of entries),
execute, post each completion with its phase tag, then raise each touched CQ's vector once
(MSI-X), or drive the INTx level (asserted while an interrupt-enabled CQ holds entries the host
has not consumed and INTMS bit 0 is clear). A full CQ stalls its SQs until the CQ head doorbell
frees room. A DMA fault while fetching a command or posting a completion is a controller fatal
status (CSTS.CFS); a fault on a data buffer or PRP list ends only that command with Data
Transfer Error, before the data moved if it was the PRP list.

Data path. A command's PRPs are turned into a list of (iova, length) pieces first
(:func:`~vfiod.devices.nvme.prp.prp_pieces`), then :meth:`NvmeController._transfer` moves the
whole list in one call. When the DMA view offers zero-copy (``iovecs``, see
:class:`vfiod.pci.dma.ZeroCopyDma`; PeDma and DmaMapTable do), the whole list is translated at
once (through the PE: one C scatter-gather translation, a fault freezes the PE and nothing
moves) and the data goes straight between the backing store and guest RAM with
``os.preadv``/``os.pwritev`` (at most ``IOV_MAX`` iovecs a call, short counts resumed): no
per-page Python loop, no intermediate copy. Otherwise it goes through ``read``/``write`` of the
view with a bounce buffer. Either way a DMA fault (or EFAULT from the kernel: the client's RAM
file shrank) ends the command with Data Transfer Error; other store errors are Write Fault /
Unrecovered Read Error.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from vfiod.devices.nvme.backing import BackingStore
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
    BAR0_SIZE,
    CC_CSS_MASK,
    CC_CSS_SHIFT,
    CC_EN,
    CC_IOCQES_SHIFT,
    CC_IOSQES_SHIFT,
    CC_MPS_MASK,
    CC_MPS_SHIFT,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    CC_WRITABLE,
    CNS_ACTIVE_NS_LIST,
    CNS_CONTROLLER,
    CNS_NAMESPACE,
    CNS_NS_DESCRIPTORS,
    CQ_ENTRY_SIZE,
    CQES_LOG2,
    CSS_NVM,
    CSTS_CFS,
    CSTS_NSSRO,
    CSTS_RDY,
    CSTS_SHST_COMPLETE,
    CSTS_SHST_MASK,
    DOORBELL_BASE,
    DOORBELL_SIZE,
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
    IO_DSM,
    IO_FLUSH,
    IO_READ,
    IO_WRITE,
    IO_WRITE_ZEROES,
    LOG_ERROR,
    LOG_FW_SLOT,
    LOG_SMART,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NSID_ALL,
    NSSR_MAGIC,
    NVME_CLASS_CODE,
    NVME_VERSION_1_4,
    ONCS_DSM,
    ONCS_TIMESTAMP,
    ONCS_WRITE_ZEROES,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CAP,
    REG_CC,
    REG_CSTS,
    REG_INTMC,
    REG_INTMS,
    REG_NSSR,
    REG_VS,
    REGS_SIZE,
    SC_AER_LIMIT,
    SC_CMD_SEQ_ERROR,
    SC_CQ_INVALID,
    SC_DATA_TRANSFER_ERROR,
    SC_FEAT_NOT_SAVEABLE,
    SC_INTERNAL,
    SC_INVALID_FIELD,
    SC_INVALID_LOG_PAGE,
    SC_INVALID_NS,
    SC_INVALID_OPCODE,
    SC_INVALID_QID,
    SC_INVALID_QSIZE,
    SC_INVALID_QUEUE_DELETION,
    SC_INVALID_VECTOR,
    SC_LBA_RANGE,
    SC_UNRECOVERED_READ,
    SC_WRITE_FAULT,
    SEL_CURRENT,
    SEL_DEFAULT,
    SEL_SAVED,
    SEL_SUPPORTED,
    SQ_ENTRY_SIZE,
    SQES_LOG2,
    STATUS_DNR,
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
from vfiod.devices.nvme.prp import NvmeStatus, Piece, prp_pieces
from vfiod.metrics import Family, Histogram
from vfiod.pci.caps import MSI_MAX_VECTORS
from vfiod.pci.config import BarKind, BarSpec
from vfiod.pci.dma import IOV_MAX, DmaFault, zero_copy
from vfiod.pci.function import PciFunction
from vfiod.pci.region import DwordRegisters, Region

log = logging.getLogger(__name__)

DEFAULT_VENDOR_ID = 0x1B36
DEFAULT_DEVICE_ID = 0x0010
DEFAULT_MODEL = "vfiod NVMe controller"
DEFAULT_FIRMWARE = "vfiod01"

MQES = 1023  #: CAP.MQES: I/O queues of up to 1024 entries
CAP_TIMEOUT = 0x0F  #: CAP.TO in 500 ms units (we are ready synchronously)
MPSMAX = 4  #: host memory pages 4 KiB .. 64 KiB
FETCH_BATCH = 64  #: SQ entries fetched per DMA read
ELPE = 15  #: error log page entries, 0's based
AERL = 3  #: outstanding Asynchronous Event Requests, 0's based
ACL = 3
WCTEMP = 343  #: 70 C
CCTEMP = 358  #: 85 C
NSID = 1

_SQE = struct.Struct("<BBHIQQQQ6I")
_CQE = struct.Struct("<IIHHHH")
_TEMP_SENSORS = (0, 1)  # composite and sensor 1


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


@dataclass(eq=False)
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

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    @property
    def pending(self) -> bool:
        return self.head != self.tail


@dataclass(eq=False)
class SubmissionQueue:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0


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


class _Registers(DwordRegisters):
    """BAR0 0x0000-0x0FFF: controller registers as dwords (64-bit ones as pairs)."""

    def __init__(self, ctrl: NvmeController) -> None:
        self.ctrl = ctrl

    def _read32(self, reg: int) -> int:
        return self.ctrl._reg_read32(reg)

    def _write32(self, reg: int, value: int, mask: int) -> None:
        self.ctrl._reg_write32(reg, value, mask)


class _Doorbells:
    """BAR0 0x1000-0x1FFF: SQ tail / CQ head doorbells (DSTRD 0)."""

    def __init__(self, ctrl: NvmeController) -> None:
        self.ctrl = ctrl

    def read(self, offset: int, size: int) -> int:
        return 0  # doorbells read as zero

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.write(offset, 4, value & 0xFFFFFFFF)
            self.write(offset + 4, 4, value >> 32)
            return
        if size != 4 or offset & 3:
            return  # doorbells are dword registers
        qid, is_cq = divmod(offset // 4, 2)
        if is_cq:
            self.ctrl._cq_doorbell(qid, value & 0xFFFF)
        else:
            self.ctrl._sq_doorbell(qid, value & 0xFFFF)


class NvmeStats:
    """Counters for the metrics endpoint: commands by queue kind and opcode, errors, latency."""

    def __init__(self) -> None:
        self.commands: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, int], int] = {}
        self.latency = Histogram()

    def record(self, admin: bool, opcode: int, status: int, seconds: float) -> None:
        key = ("admin" if admin else "io", opcode)
        self.commands[key] = self.commands.get(key, 0) + 1
        if status:
            self.errors[key] = self.errors.get(key, 0) + 1
        self.latency.observe(seconds)


class NvmeController(PciFunction):
    """NVMe controller personality; see the module docstring for layout and behaviour."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        *,
        block_size: int = 512,
        io_queues: int = 32,
        serial: str | None = None,
        model: str = DEFAULT_MODEL,
        firmware: str = DEFAULT_FIRMWARE,
        vendor_id: int = DEFAULT_VENDOR_ID,
        device_id: int = DEFAULT_DEVICE_ID,
        subsystem_vendor_id: int | None = None,
        subsystem_id: int = 0,
        cntlid: int = 0,
        mdts: int = 8,
        msix: bool = False,
    ) -> None:
        if block_size not in (512, 4096):
            raise ValueError("block_size must be 512 or 4096")
        if not 1 <= io_queues <= 255:
            raise ValueError("io_queues must be 1..255")
        if not 1 <= mdts <= 12:
            raise ValueError("mdts must be 1..12")
        store = BackingStore(path, size)
        try:
            super().__init__(
                vendor_id=vendor_id,
                device_id=device_id,
                class_code=NVME_CLASS_CODE,
                subsystem_vendor_id=subsystem_vendor_id,
                subsystem_id=subsystem_id,
            )
        except BaseException:
            store.close()
            raise
        self.store = store
        self.block_size = block_size
        self.lba_shift = block_size.bit_length() - 1
        self.nsze = store.size >> self.lba_shift
        if self.nsze == 0:
            self.close()
            raise ValueError("backing store smaller than one logical block")
        self.io_queues = io_queues
        self.mdts = mdts
        #: move data with preadv/pwritev when the DMA view offers ``iovecs`` (False: always
        #: through read/write and a bounce buffer, as a view without zero-copy would)
        self.zero_copy = True
        key = os.path.realpath(store.path)
        digest = hashlib.sha256(f"vfiod-nvme:{key}".encode()).hexdigest()
        self.serial = serial if serial is not None else "VFIOD" + digest[:15].upper()
        self.nguid = hashlib.sha256(f"vfiod-nvme-nguid:{self.serial}".encode()).digest()[:16]
        self.ns_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"vfiod-nvme:{self.serial}:ns1").bytes
        subsys = uuid.uuid5(uuid.NAMESPACE_URL, f"vfiod-nvme:{self.serial}:subsystem")
        self.identity = ControllerIdentity(
            vid=vendor_id,
            ssvid=vendor_id if subsystem_vendor_id is None else subsystem_vendor_id,
            serial=self.serial,
            model=model,
            firmware=firmware,
            cntlid=cntlid,
            mdts=mdts,
            nn=1,
            oncs=ONCS_DSM | ONCS_WRITE_ZEROES | ONCS_TIMESTAMP,
            vwc=0x07,  # present; Flush with NSID FFFFFFFFh supported
            aerl=AERL,
            acl=ACL,
            elpe=ELPE,
            wctemp=WCTEMP,
            cctemp=CCTEMP,
            subnqn=f"nqn.2014-08.org.nvmexpress:uuid:{subsys}",
        )
        self.cap = (
            MQES
            | (1 << 16)  # CQR: queues must be physically contiguous
            | (CAP_TIMEOUT << 24)
            | (0 << 32)  # DSTRD
            | (1 << 37)  # CSS: NVM command set
            | (0 << 48)  # MPSMIN: 4 KiB
            | (MPSMAX << 52)
        )

        bar0 = Region(BAR0_SIZE)
        bar0.map(0, REGS_SIZE, _Registers(self))
        bar0.map(DOORBELL_BASE, DOORBELL_SIZE, _Doorbells(self))
        self.add_bar(0, bar0, BarSpec(BAR0_SIZE, BarKind.MEM64))
        if msix:
            self.add_msix(io_queues + 1, 0, MSIX_TABLE_OFFSET, 0, MSIX_PBA_OFFSET)
        else:
            self.add_msi(min(MSI_MAX_VECTORS, 1 << io_queues.bit_length()))
        self.seal()

        self.temperature = 303  #: composite temperature reported, Kelvin
        self.smart = SmartCounters()
        self.stats = NvmeStats()
        self.errors: list[ErrorEntry] = []
        self.error_count = 0
        self._power_on = time.monotonic()
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self._controller_reset()

    # ---- state ------------------------------------------------------------------------------

    def _controller_reset(self) -> None:
        """Controller-level reset (CC.EN 1 -> 0, FLR): queues, AERs and features dropped."""
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.intms = 0
        self.page_size = 4096
        self.fatal = False
        self.aer_cids: list[int] = []
        self.events: deque[tuple[int, int, int]] = deque()
        self.masked_event_types: set[int] = set()
        self.features = Features(nsq=self.io_queues - 1, ncq=self.io_queues - 1)
        self._timestamp_base = 0
        self._timestamp_origin = 0
        self._timestamp_at = time.monotonic()
        self._irq_pending: set[int] = set()
        self.csts &= CSTS_NSSRO
        if self.irq.intx_level:
            self.irq.deassert_intx()

    def on_reset(self) -> None:
        """Function-level reset: registers to power-on values, all queues dropped."""
        self.cc = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.csts = 0
        self._controller_reset()

    def close(self) -> None:
        super().close()
        self.store.close()

    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS_RDY) and not self.fatal

    @property
    def max_transfer(self) -> int:
        """Largest data transfer in bytes (MDTS in units of CAP.MPSMIN = 4 KiB)."""
        return 4096 << self.mdts

    # ---- registers ----------------------------------------------------------------------------

    def _reg_read32(self, reg: int) -> int:
        if reg == REG_CAP:
            return self.cap & 0xFFFFFFFF
        if reg == REG_CAP + 4:
            return self.cap >> 32
        if reg == REG_VS:
            return NVME_VERSION_1_4
        if reg in (REG_INTMS, REG_INTMC):
            return self.intms
        if reg == REG_CC:
            return self.cc
        if reg == REG_CSTS:
            return self.csts
        if reg == REG_AQA:
            return self.aqa
        if reg == REG_ASQ:
            return self.asq & 0xFFFFFFFF
        if reg == REG_ASQ + 4:
            return self.asq >> 32
        if reg == REG_ACQ:
            return self.acq & 0xFFFFFFFF
        if reg == REG_ACQ + 4:
            return self.acq >> 32
        return 0  # NSSR reads 0; CMB, BP, PMR not implemented

    def _reg_write32(self, reg: int, value: int, mask: int) -> None:
        if reg == REG_CC:
            self._write_cc((self.cc & ~mask) | value)
        elif reg == REG_INTMS:
            self.intms |= value
            self._update_intx()
        elif reg == REG_INTMC:
            unmasked = self.intms & value
            self.intms &= ~value
            self._update_intx()
            self._raise_unmasked(unmasked)
        elif reg == REG_CSTS:
            if value & CSTS_NSSRO:
                self.csts &= ~CSTS_NSSRO
        elif reg == REG_AQA:
            self.aqa = ((self.aqa & ~mask) | value) & 0x0FFF0FFF
        elif reg in (REG_ASQ, REG_ASQ + 4):
            shift = 32 if reg == REG_ASQ + 4 else 0
            self.asq = (self.asq & ~(mask << shift)) | (value << shift)
            self.asq &= ~0xFFF
        elif reg in (REG_ACQ, REG_ACQ + 4):
            shift = 32 if reg == REG_ACQ + 4 else 0
            self.acq = (self.acq & ~(mask << shift)) | (value << shift)
            self.acq &= ~0xFFF
        elif reg == REG_NSSR:
            if value == NSSR_MAGIC and mask == 0xFFFFFFFF:
                pass  # CAP.NSSRS = 0: subsystem reset not supported, write ignored
        # CAP, VS, CMB/BP/PMR and reserved offsets ignore writes.

    def _write_cc(self, new: int) -> None:
        old = self.cc
        self.cc = new & CC_WRITABLE
        if old & CC_EN and not new & CC_EN:
            self._controller_reset()
            self.csts &= ~(CSTS_RDY | CSTS_SHST_MASK | CSTS_CFS)
            return
        if not old & CC_EN and new & CC_EN:
            self._enable()
        old_shn = (old >> CC_SHN_SHIFT) & CC_SHN_MASK
        new_shn = (new >> CC_SHN_SHIFT) & CC_SHN_MASK
        if new_shn and not old_shn:
            self._shutdown()

    def _enable(self) -> None:
        css = (self.cc >> CC_CSS_SHIFT) & CC_CSS_MASK
        mps = (self.cc >> CC_MPS_SHIFT) & CC_MPS_MASK
        asqs = (self.aqa & 0xFFF) + 1
        acqs = ((self.aqa >> 16) & 0xFFF) + 1
        page = 4096 << mps
        problems = []
        if css != CSS_NVM:
            problems.append(f"CC.CSS {css}")
        if mps > MPSMAX:
            problems.append(f"CC.MPS {mps}")
        if asqs < 2 or acqs < 2:
            problems.append("admin queue size")
        if not self.asq or not self.acq or self.asq % page or self.acq % page:
            problems.append("admin queue address")
        if problems:
            log.warning("nvme: enable refused: %s", ", ".join(problems))
            self.csts |= CSTS_CFS
            self.fatal = True
            return
        self._controller_reset()
        self.page_size = page
        self.cqs[0] = CompletionQueue(0, self.acq, acqs, vector=0, ien=True, sqs={0})
        self.sqs[0] = SubmissionQueue(0, self.asq, asqs, cqid=0)
        self.csts = (self.csts & CSTS_NSSRO) | CSTS_RDY

    def _shutdown(self) -> None:
        """CC.SHN: make everything acknowledged durable, then report shutdown complete."""
        try:
            self.store.flush()
        except OSError:
            log.exception("nvme: flush during shutdown failed")
        self.csts = (self.csts & ~CSTS_SHST_MASK) | CSTS_SHST_COMPLETE

    # ---- doorbells and queue processing -------------------------------------------------------

    def _sq_doorbell(self, qid: int, tail: int) -> None:
        sq = self.sqs.get(qid)
        if sq is None or tail >= sq.size or not self.ready:
            return  # invalid doorbell write: ignored
        sq.tail = tail
        self._run_sq(sq)
        self._flush_irqs()

    def _cq_doorbell(self, qid: int, head: int) -> None:
        cq = self.cqs.get(qid)
        if cq is None or head >= cq.size or not self.ready:
            return
        cq.head = head
        if qid == 0:
            self._deliver_events()
        for sqid in sorted(cq.sqs):  # SQs that stalled on a full CQ resume here
            sq = self.sqs.get(sqid)
            if sq is not None and sq.head != sq.tail:
                self._run_sq(sq)
        self._flush_irqs()

    def _run_sq(self, sq: SubmissionQueue) -> None:
        cq = self.cqs[sq.cqid]
        while sq.head != sq.tail and self.ready and self.sqs.get(sq.qid) is sq:
            count = (sq.tail - sq.head) % sq.size
            n = min(count, sq.size - sq.head, FETCH_BATCH)
            try:
                raw = self.dma_read(sq.base + sq.head * SQ_ENTRY_SIZE, n * SQ_ENTRY_SIZE)
            except DmaFault as fault:
                self._fatal(f"SQ {sq.qid} fetch: {fault}")
                return
            for i in range(n):
                if cq.full or not self.ready or self.sqs.get(sq.qid) is not sq:
                    return  # resumed by the CQ head doorbell
                cmd = Command(raw, i * SQ_ENTRY_SIZE)
                sq.head = (sq.head + 1) % sq.size
                self._execute(sq, cq, cmd)

    def metrics(self, function: str) -> list[Family]:
        """Prometheus families for this controller (collected by the host's metrics)."""
        commands = Family("vfiod_nvme_commands_total", "counter", "NVMe commands completed.")
        errors = Family("vfiod_nvme_command_errors_total", "counter",
                        "NVMe commands completed with an error status.")
        for (queue, opcode), n in sorted(self.stats.commands.items()):
            commands.add(n, function=function, queue=queue, opcode=f"{opcode:#04x}")
        for (queue, opcode), n in sorted(self.stats.errors.items()):
            errors.add(n, function=function, queue=queue, opcode=f"{opcode:#04x}")
        read = Family("vfiod_nvme_read_bytes_total", "counter", "Bytes read by the guest.")
        read.add(self.smart.bytes_read, function=function)
        written = Family("vfiod_nvme_written_bytes_total", "counter",
                         "Bytes written by the guest.")
        written.add(self.smart.bytes_written, function=function)
        latency = Family("vfiod_nvme_command_seconds", "histogram",
                         "Time from fetching an NVMe command to its completion.")
        latency.add_histogram(Histogram.BUCKETS, self.stats.latency.counts,
                              self.stats.latency.total, function=function)
        return [commands, errors, read, written, latency]

    def _execute(self, sq: SubmissionQueue, cq: CompletionQueue, cmd: Command) -> None:
        status = 0
        dw0: int | None = 0
        lba = 0
        started = time.perf_counter()
        try:
            if cmd.flags & 0xC3:  # FUSE or PSDT (SGL) set: neither is supported
                raise NvmeStatus(SC_INVALID_FIELD)
            dw0 = self._admin(cmd) if sq.qid == 0 else self._io(cmd)
        except NvmeStatus as err:
            status, lba = err.status, err.lba
        except DmaFault as fault:
            log.info("nvme: SQ %d cid %d: %s", sq.qid, cmd.cid, fault)
            status = SC_DATA_TRANSFER_ERROR
        except Exception:
            log.exception("nvme: SQ %d cid %d opcode %#x failed", sq.qid, cmd.cid, cmd.opcode)
            status = SC_INTERNAL
        self.stats.record(sq.qid == 0, cmd.opcode, status, time.perf_counter() - started)
        if status:
            status |= STATUS_DNR
            self._log_error(sq.qid, cmd, status, lba)
            dw0 = 0
        if dw0 is None:
            return  # deferred (Asynchronous Event Request)
        self._post(cq, sq, cmd.cid, status, dw0)

    def _post(
        self, cq: CompletionQueue, sq: SubmissionQueue, cid: int, status: int, dw0: int
    ) -> None:
        entry = _CQE.pack(dw0, 0, sq.head, sq.qid, cid, ((status & 0x7FFF) << 1) | cq.phase)
        try:
            self.dma_write(cq.base + cq.tail * CQ_ENTRY_SIZE, entry)
        except DmaFault as fault:
            self._fatal(f"CQ {cq.qid} post: {fault}")
            return
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail = 0
            cq.phase ^= 1
        if cq.ien:
            self._irq_pending.add(cq.qid)

    def _fatal(self, why: str) -> None:
        log.warning("nvme: controller fatal status: %s", why)
        self.fatal = True
        self.csts |= CSTS_CFS

    # ---- interrupts ---------------------------------------------------------------------------

    def _flush_irqs(self) -> None:
        if self.irq.msg_enabled:
            if self.irq.intx_level:
                self.irq.deassert_intx()
            # INTMS masks MSI vectors (not MSI-X); INTMC raises the ones still owed.
            masked = 0 if self.irq.msix_enabled else self.intms
            for qid in self._irq_pending:
                cq = self.cqs.get(qid)
                if cq is not None and cq.vector < self.vectors and not masked >> cq.vector & 1:
                    self.irq.fire_vector(cq.vector)
            self._irq_pending.clear()
            return
        self._irq_pending.clear()
        self._update_intx()

    def _raise_unmasked(self, bits: int) -> None:
        """MSI vectors just unmasked through INTMC whose CQs hold unconsumed entries fire."""
        if not bits or not self.irq.msi_enabled or self.irq.msix_enabled:
            return
        owed = {cq.vector for cq in self.cqs.values() if cq.ien and cq.pending}
        for vector in sorted(owed):
            if bits >> vector & 1 and vector < self.vectors:
                self.irq.fire_vector(vector)

    def _update_intx(self) -> None:
        """Pin-based level: any interrupt-enabled CQ with unconsumed entries, INTMS bit 0 clear."""
        if self.irq.msg_enabled:
            return
        level = not self.intms & 1 and any(cq.ien and cq.pending for cq in self.cqs.values())
        if level and not self.irq.intx_level:
            self.irq.assert_intx()
        elif not level and self.irq.intx_level:
            self.irq.deassert_intx()

    # ---- data movement ------------------------------------------------------------------------

    def _pieces(self, cmd: Command, length: int) -> list[Piece]:
        return prp_pieces(cmd.prp1, cmd.prp2, length, self.page_size, self.dma_read)

    def _transfer(self, pieces: list[Piece], write_to_guest: bool, file_offset: int) -> None:
        """Move data between the backing store and guest memory along ``pieces``.

        Gets the complete piece list of a command. Zero-copy when the DMA view offers
        ``iovecs`` (see the module docstring), else through ``read``/``write``. Raises DmaFault
        (the PE's translation faulted: nothing moved; or guest memory vanished mid-transfer)
        or OSError from the store.
        """
        iovecs = zero_copy(self.dma) if self.zero_copy else None
        if iovecs is None:
            total = sum(n for _, n in pieces)
            if write_to_guest:
                data = self.store.read(file_offset, total)
                self._to_guest(pieces, data)
            else:
                self.store.write(file_offset, self._from_guest(pieces))
            return
        if not self.bus_master:
            total = sum(n for _, n in pieces)
            iova = pieces[0][0] if pieces else 0
            raise DmaFault(iova, total, write_to_guest, "bus master disabled")
        try:
            with iovecs(pieces, write_to_guest) as views:
                done, total = _vectored_io(self.store.fd, views, file_offset, write_to_guest)
        except OSError as err:
            if err.errno == errno.EFAULT:  # a view without its own EFAULT translation
                iova = pieces[0][0] if pieces else 0
                raise DmaFault(iova, 0, write_to_guest, "guest memory vanished") from err
            raise
        if done < total:  # read past the end of a backing file that shrank: zeros, as a hole
            self._to_guest(_pieces_from(pieces, done), bytes(total - done))

    def _to_guest(self, pieces: list[Piece], data: bytes) -> None:
        if len(pieces) == 1:
            self.dma_write(pieces[0][0], data)
            return
        pos = 0
        for iova, n in pieces:
            self.dma_write(iova, data[pos : pos + n])
            pos += n

    def _from_guest(self, pieces: list[Piece]) -> bytes:
        if len(pieces) == 1:
            return self.dma_read(*pieces[0])
        return b"".join([self.dma_read(iova, n) for iova, n in pieces])

    def _send(self, cmd: Command, data: bytes) -> None:
        """Controller -> host data (Identify, logs, features) along the command's PRPs."""
        self._to_guest(self._pieces(cmd, len(data)), data)

    def _receive(self, cmd: Command, length: int) -> bytes:
        return self._from_guest(self._pieces(cmd, length))

    # ---- errors and events --------------------------------------------------------------------

    def _log_error(self, sqid: int, cmd: Command, status: int, lba: int) -> None:
        self.error_count += 1
        self.smart.error_entries += 1
        entry = ErrorEntry(self.error_count, sqid, cmd.cid, status, lba=lba, nsid=cmd.nsid)
        self.errors.append(entry)
        del self.errors[: -(ELPE + 1)]

    def post_event(self, event_type: int, info: int, log_page: int) -> None:
        """Queue an asynchronous event; completes an outstanding AER if one is waiting."""
        if event_type in self.masked_event_types:
            return
        self.events.append((event_type, info, log_page))
        self._deliver_events()
        self._flush_irqs()

    def _deliver_events(self) -> None:
        cq, sq = self.cqs.get(0), self.sqs.get(0)
        if cq is None or sq is None:
            return
        while self.events and self.aer_cids and not cq.full and self.ready:
            event_type, info, log_page = self.events[0]
            if event_type in self.masked_event_types:
                self.events.popleft()
                continue
            self.events.popleft()
            cid = self.aer_cids.pop(0)
            self.masked_event_types.add(event_type)  # until the host reads the log page
            self._post(cq, sq, cid, 0, event_type | (info << 8) | (log_page << 16))

    def _critical_warning(self) -> int:
        warning = 0
        for sensor in _TEMP_SENSORS:
            over = self.features.temp_thresholds.get((sensor, 0), _default_threshold(sensor, 0))
            under = self.features.temp_thresholds.get((sensor, 1), _default_threshold(sensor, 1))
            if self.temperature >= over or self.temperature <= under:
                warning |= 0x02
        return warning

    # ---- admin commands -----------------------------------------------------------------------

    def _admin(self, cmd: Command) -> int | None:
        op = cmd.opcode
        if op == ADM_IDENTIFY:
            return self._identify(cmd)
        if op == ADM_CREATE_CQ:
            return self._create_cq(cmd)
        if op == ADM_CREATE_SQ:
            return self._create_sq(cmd)
        if op == ADM_DELETE_SQ:
            return self._delete_sq(cmd)
        if op == ADM_DELETE_CQ:
            return self._delete_cq(cmd)
        if op == ADM_GET_FEATURES:
            return self._get_features(cmd)
        if op == ADM_SET_FEATURES:
            return self._set_features(cmd)
        if op == ADM_GET_LOG_PAGE:
            return self._get_log_page(cmd)
        if op == ADM_ASYNC_EVENT:
            if len(self.aer_cids) > AERL:
                raise NvmeStatus(SC_AER_LIMIT)
            self.aer_cids.append(cmd.cid)
            self._deliver_events()
            return None
        if op == ADM_ABORT:
            return 1  # bit 0 set: command not aborted (everything completes synchronously)
        if op == ADM_KEEP_ALIVE:
            return 0
        if op == ADM_DBBUF_CONFIG:
            raise NvmeStatus(SC_INVALID_OPCODE)  # OACS bit 8 clear
        raise NvmeStatus(SC_INVALID_OPCODE)

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
            data = ns_descriptors(self.nguid, self.ns_uuid)
        else:
            raise NvmeStatus(SC_INVALID_FIELD)
        self._send(cmd, data)
        return 0

    def _identify_ns(self) -> bytes:
        shifts = (9, 12)
        return identify_namespace(
            NamespaceIdentity(
                nsze=self.nsze,
                lbaf_index=shifts.index(self.lba_shift),
                lba_shifts=shifts,
                dlfeat=0x09 if self.store.deallocate_zeroes else 0x00,
                nguid=self.nguid,
                uuid=self.ns_uuid,
            )
        )

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
        if cmd.prp1 == 0 or cmd.prp1 % self.page_size:
            raise NvmeStatus(SC_INVALID_FIELD)

    def _create_cq(self, cmd: Command) -> int:
        qid, qsize = self._queue_geometry(cmd, self.features.ncq + 1, set(self.cqs))
        flags = cmd.cdw[11]
        vector = flags >> 16
        if ((self.cc >> CC_IOCQES_SHIFT) & 0xF) != CQES_LOG2:
            raise NvmeStatus(SC_INVALID_FIELD)
        self._check_queue_memory(cmd, bool(flags & 0x1))
        if vector >= self.vectors:
            raise NvmeStatus(SC_INVALID_VECTOR)
        self.cqs[qid] = CompletionQueue(qid, cmd.prp1, qsize, vector=vector, ien=bool(flags & 0x2))
        return 0

    def _create_sq(self, cmd: Command) -> int:
        qid, qsize = self._queue_geometry(cmd, self.features.nsq + 1, set(self.sqs))
        flags = cmd.cdw[11]
        cqid = flags >> 16
        if ((self.cc >> CC_IOSQES_SHIFT) & 0xF) != SQES_LOG2:
            raise NvmeStatus(SC_INVALID_FIELD)
        if cqid == 0 or cqid not in self.cqs:
            raise NvmeStatus(SC_CQ_INVALID)
        self._check_queue_memory(cmd, bool(flags & 0x1))
        self.sqs[qid] = SubmissionQueue(qid, cmd.prp1, qsize, cqid=cqid)
        self.cqs[cqid].sqs.add(qid)
        return 0

    def _delete_sq(self, cmd: Command) -> int:
        qid = cmd.cdw[10] & 0xFFFF
        sq = self.sqs.get(qid)
        if qid == 0 or sq is None:
            raise NvmeStatus(SC_INVALID_QID)
        del self.sqs[qid]
        cq = self.cqs.get(sq.cqid)
        if cq is not None:
            cq.sqs.discard(qid)
        return 0

    def _delete_cq(self, cmd: Command) -> int:
        qid = cmd.cdw[10] & 0xFFFF
        cq = self.cqs.get(qid)
        if qid == 0 or cq is None:
            raise NvmeStatus(SC_INVALID_QID)
        if cq.sqs:
            raise NvmeStatus(SC_INVALID_QUEUE_DELETION)
        del self.cqs[qid]
        self._irq_pending.discard(qid)
        self._update_intx()
        return 0

    # ---- features -----------------------------------------------------------------------------

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
        if fid not in self._FEATURES:
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

    def _set_features(self, cmd: Command) -> int:
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
            before = self._critical_warning()
            for sensor in sensors:
                f.temp_thresholds[(sensor, thsel)] = value & 0xFFFF
            if not before & 0x02 and self._critical_warning() & 0x02:
                if f.async_event & AEC_SMART_TEMPERATURE:
                    self.post_event(AER_TYPE_SMART, AER_SMART_TEMPERATURE, LOG_SMART)
        elif fid == FEAT_ERROR_RECOVERY:
            if cmd.nsid not in (NSID, NSID_ALL):
                raise NvmeStatus(SC_INVALID_NS)
            if value & (1 << 16):  # DULBE needs NSFEAT.DAE
                raise NvmeStatus(SC_INVALID_FIELD)
            f.error_recovery = value & 0xFFFF
        elif fid == FEAT_VOLATILE_WC:
            wce = bool(value & 1)
            if f.wce and not wce:
                self.store.flush()  # what the cache held becomes durable before write-through
            f.wce = wce
        elif fid == FEAT_NUM_QUEUES:
            nsqr, ncqr = value & 0xFFFF, value >> 16
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                raise NvmeStatus(SC_INVALID_FIELD)
            if len(self.sqs) > 1 or len(self.cqs) > 1:
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

    # ---- log pages ----------------------------------------------------------------------------

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
            self.smart.power_on_hours = int((time.monotonic() - self._power_on) // 3600)
            page = smart_log(self.smart, self._critical_warning(), self.temperature)
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

    # ---- I/O commands -------------------------------------------------------------------------

    def _io(self, cmd: Command) -> int:
        op = cmd.opcode
        if op == IO_FLUSH:
            if cmd.nsid not in (NSID, NSID_ALL):
                raise NvmeStatus(SC_INVALID_NS)
            self._flush()
            return 0
        if cmd.nsid != NSID:
            raise NvmeStatus(SC_INVALID_NS)
        if op == IO_READ or op == IO_WRITE:
            self._read_write(cmd, op == IO_WRITE)
            return 0
        if op == IO_WRITE_ZEROES:
            self._write_zeroes(cmd)
            return 0
        if op == IO_DSM:
            self._dsm(cmd)
            return 0
        raise NvmeStatus(SC_INVALID_OPCODE)

    def _lba_range(self, cmd: Command) -> tuple[int, int]:
        slba = cmd.cdw[10] | (cmd.cdw[11] << 32)
        nlb = (cmd.cdw[12] & 0xFFFF) + 1
        if slba + nlb > self.nsze:
            raise NvmeStatus(SC_LBA_RANGE, lba=slba)
        return slba, nlb

    def _flush(self) -> None:
        try:
            self.store.flush()
        except OSError as err:
            log.error("nvme: flush failed: %s", err)
            self.smart.media_errors += 1
            raise NvmeStatus(SC_WRITE_FAULT) from err

    def _read_write(self, cmd: Command, write: bool) -> None:
        slba = cmd.cdw[10] | (cmd.cdw[11] << 32)
        nlb = (cmd.cdw[12] & 0xFFFF) + 1
        length = nlb << self.lba_shift
        if length > self.max_transfer:
            raise NvmeStatus(SC_INVALID_FIELD)
        if slba + nlb > self.nsze:
            raise NvmeStatus(SC_LBA_RANGE, lba=slba)
        pieces = self._pieces(cmd, length)
        try:
            self._transfer(pieces, not write, slba << self.lba_shift)
        except OSError as err:
            log.error("nvme: %s at LBA %d failed: %s", "write" if write else "read", slba, err)
            self.smart.media_errors += 1
            raise NvmeStatus(SC_WRITE_FAULT if write else SC_UNRECOVERED_READ, lba=slba) from err
        if write:
            self.smart.write_cmds += 1
            self.smart.bytes_written += length
            if cmd.cdw[12] & (1 << 30) or not self.features.wce:  # FUA, or write-through
                self._flush()
        else:
            self.smart.read_cmds += 1
            self.smart.bytes_read += length

    def _write_zeroes(self, cmd: Command) -> None:
        slba, nlb = self._lba_range(cmd)
        try:
            if cmd.cdw[12] & (1 << 25) and self.store.deallocate_zeroes:
                self.store.deallocate(slba << self.lba_shift, nlb << self.lba_shift)
            else:
                self.store.write_zeroes(slba << self.lba_shift, nlb << self.lba_shift)
        except OSError as err:
            self.smart.media_errors += 1
            raise NvmeStatus(SC_WRITE_FAULT, lba=slba) from err
        self.smart.write_cmds += 1
        if cmd.cdw[12] & (1 << 30) or not self.features.wce:
            self._flush()

    def _dsm(self, cmd: Command) -> None:
        nr = (cmd.cdw[10] & 0xFF) + 1
        deallocate = bool(cmd.cdw[11] & 0x4)
        raw = self._receive(cmd, nr * 16)
        if not deallocate:
            return  # integral read/write hints only: nothing to do
        ranges = []
        for i in range(nr):  # validate every range before deallocating any
            _attrs, nlb, slba = struct.unpack_from("<IIQ", raw, i * 16)
            if slba + nlb > self.nsze:
                raise NvmeStatus(SC_LBA_RANGE, lba=slba)
            if nlb:
                ranges.append((slba, nlb))
        for slba, nlb in ranges:
            try:
                self.store.deallocate(slba << self.lba_shift, nlb << self.lba_shift)
            except OSError as err:
                self.smart.media_errors += 1
                raise NvmeStatus(SC_WRITE_FAULT, lba=slba) from err


def _vectored_io(fd: int, views: list[memoryview], offset: int, to_guest: bool) -> tuple[int, int]:
    """preadv (``to_guest``) or pwritev ``views`` at ``offset`` of ``fd``; at most IOV_MAX
    iovecs a call, short counts resumed. Returns (bytes moved, bytes asked): a read stops early
    only at end of file. Slices made here for a resumed view are released here."""
    op = os.preadv if to_guest else os.pwritev
    total = sum(v.nbytes for v in views)
    done = 0
    i, n = 0, len(views)
    if n <= IOV_MAX:  # the common case: one call moves everything
        got = op(fd, views, offset)
        if got == total:
            return total, total
        if got == 0 and to_guest:
            return 0, total
    else:
        got = 0
    slices: list[memoryview] = []
    try:
        cur = views if got == 0 else list(views)
        while True:
            # consume ``got`` bytes from the front of cur[i:]
            done += got
            while got and i < n:
                size = cur[i].nbytes
                if got >= size:
                    got -= size
                    i += 1
                else:
                    rest = cur[i][got:]
                    slices.append(rest)
                    if cur is views:
                        cur = list(views)
                    cur[i] = rest
                    got = 0
            if i >= n:
                return done, total
            got = op(fd, cur[i : i + IOV_MAX], offset + done)
            if got == 0:
                if to_guest:
                    return done, total  # end of file
                raise OSError(errno.EIO, "short write to the backing store")
    finally:
        for v in slices:
            v.release()


def _pieces_from(pieces: list[Piece], skip: int) -> list[Piece]:
    """The part of ``pieces`` after its first ``skip`` bytes."""
    out: list[Piece] = []
    for iova, n in pieces:
        if skip >= n:
            skip -= n
            continue
        out.append((iova + skip, n - skip))
        skip = 0
    return out


__all__ = ["Command", "NvmeController"]
