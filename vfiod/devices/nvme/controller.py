"""NVMe 1.4 controller personality: one NVM namespace on a file or block device.

Identity. Class 01:08:02 (NVMe I/O controller). By default vendor 0x1B36 / device 0x0010, the
id pair of QEMU's emulated NVMe controller (Red Hat's allocation for QEMU devices). Linux
(``drivers/nvme/host/pci.c``) binds any device of this class; its only quirk for 1b36:0010 is
``NVME_QUIRK_BOGUS_NID`` (namespace NGUID/EUI64/UUID are ignored), which costs us nothing: each
controller still gets a unique serial number and subsystem NQN, so two vfiod controllers never
collapse into one Linux subsystem. Pass ``vendor_id``/``device_id`` to use another pair.

BAR0 (16 KiB, 64-bit, non-prefetchable, every access is a message; the offsets are the
``BAR0_*``/``DOORBELL_*``/``MSIX_*`` constants in :mod:`vfiod.devices.nvme.constants`):

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

Shape (as in QEMU's hw/nvme and SPDK's vfio-user target, the queue engine is apart from the
command sets and the data mover apart from both):

* this module: registers (CC enable/disable/shutdown, CSTS), the dispatch of fetched commands
  to a command set (status, error log, statistics), metrics;
* :mod:`~vfiod.devices.nvme.queues`: the queue engine, sole owner of SQ/CQ state, doorbells
  (MMIO and shadow), SQ fetch, CQ posting, interrupts per doorbell batch;
* :mod:`~vfiod.devices.nvme.admin` and :mod:`~vfiod.devices.nvme.nvm`: the command sets;
* :mod:`~vfiod.devices.nvme.mover`: PRP pieces, translation of a whole transfer before any byte
  moves, zero-copy preadv/pwritev or a bounce file.

A DMA fault on a data buffer or PRP list ends only that command, with Data Transfer Error and
nothing moved; one on an SQ entry, a CQ entry or a shadow doorbell is controller fatal status
(CSTS.CFS) until the host resets the controller. docs/nvme.md describes the data path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Mapping

from vfiod.devices.nvme.admin import AERL, CCTEMP, ELPE, MQES, WCTEMP, AdminCommands, Features
from vfiod.devices.nvme.backing import BackingStore
from vfiod.devices.nvme.constants import (
    BAR0_SIZE,
    CC_CSS_MASK,
    CC_CSS_SHIFT,
    CC_EN,
    CC_MPS_MASK,
    CC_MPS_SHIFT,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    CC_WRITABLE,
    CSS_NVM,
    CSTS_CFS,
    CSTS_NSSRO,
    CSTS_RDY,
    CSTS_SHST_COMPLETE,
    CSTS_SHST_MASK,
    DOORBELL_BASE,
    DOORBELL_SIZE,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NSSR_MAGIC,
    NVME_CLASS_CODE,
    NVME_VERSION_1_4,
    OACS_DBBUF,
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
    SC_DATA_TRANSFER_ERROR,
    SC_INTERNAL,
    SC_INVALID_FIELD,
    STATUS_DNR,
)
from vfiod.devices.nvme.identify import ControllerIdentity, ErrorEntry, SmartCounters
from vfiod.devices.nvme.mover import DataMover
from vfiod.devices.nvme.nvm import Namespace, NvmCommands
from vfiod.devices.nvme.prp import NvmeStatus
from vfiod.devices.nvme.queues import (
    Command,
    CompletionQueue,
    QueueEngine,
    SubmissionQueue,
)
from vfiod.metrics import Family, Histogram
from vfiod.pci.caps import MSI_MAX_VECTORS
from vfiod.pci.config import BarKind, BarSpec
from vfiod.pci.dma import DmaFault
from vfiod.pci.function import PciFunction
from vfiod.pci.region import DwordRegisters, Region

log = logging.getLogger(__name__)

DEFAULT_VENDOR_ID = 0x1B36
DEFAULT_DEVICE_ID = 0x0010
DEFAULT_MODEL = "vfiod NVMe controller"
DEFAULT_FIRMWARE = "vfiod01"

CAP_TIMEOUT = 0x0F  #: CAP.TO in 500 ms units (we are ready synchronously)
MPSMAX = 4  #: host memory pages 4 KiB .. 64 KiB
ACL = 3


class _Registers(DwordRegisters):
    """BAR0 0x0000-0x0FFF: controller registers as dwords (64-bit ones as pairs)."""

    def __init__(self, ctrl: NvmeController) -> None:
        self.ctrl = ctrl

    def _read32(self, reg: int) -> int:
        return self.ctrl._reg_read32(reg)

    def _write32(self, reg: int, value: int, mask: int) -> None:
        self.ctrl._reg_write32(reg, value, mask)


class _Doorbells:
    """BAR0 0x1000-0x1FFF: SQ tail / CQ head doorbells (DSTRD 0), handed to the queue engine."""

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
        self.ctrl.stats.doorbells[is_cq] += 1
        queues = self.ctrl.queues
        if queues is None:
            return  # not enabled (or fatal and reset since): ignored
        if is_cq:
            queues.cq_doorbell(qid, value & 0xFFFF)
        else:
            queues.sq_doorbell(qid, value & 0xFFFF)


class NvmeStats:
    """Counters for the metrics endpoint: commands by queue kind and opcode, errors, latency."""

    def __init__(self) -> None:
        self.commands: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, int], int] = {}
        self.latency = Histogram()
        #: MMIO doorbell writes: [SQ tail, CQ head] (shadow doorbells make them rare)
        self.doorbells = [0, 0]

    def record(self, admin: bool, opcode: int, status: int, seconds: float) -> None:
        key = ("admin" if admin else "io", opcode)
        self.commands[key] = self.commands.get(key, 0) + 1
        if status:
            self.errors[key] = self.errors.get(key, 0) + 1
        self.latency.observe(seconds)


class NvmeController(PciFunction):
    """NVMe controller personality; see the module docstring for layout and behaviour.

    ``shadow_doorbells`` advertises Doorbell Buffer Config (OACS bit 8), which Linux uses as
    soon as it sees it; False leaves every doorbell an MMIO write.
    """

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
        shadow_doorbells: bool = True,
        msix: bool = False,
    ) -> None:
        if block_size not in (512, 4096):
            raise ValueError("block_size must be 512 or 4096")
        if not 1 <= io_queues <= 255:
            raise ValueError("io_queues must be 1..255")
        if not 1 <= mdts <= 12:
            raise ValueError("mdts must be 1..12")
        store = BackingStore(path, size)
        if store.size >> (block_size.bit_length() - 1) == 0:
            store.close()
            raise ValueError("backing store smaller than one logical block")
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
        self.io_queues = io_queues
        self.mdts = mdts
        key = os.path.realpath(store.path)
        digest = hashlib.sha256(f"vfiod-nvme:{key}".encode()).hexdigest()
        self.serial = serial if serial is not None else "VFIOD" + digest[:15].upper()
        self.namespace = Namespace(
            store=store,
            lba_shift=block_size.bit_length() - 1,
            nguid=hashlib.sha256(f"vfiod-nvme-nguid:{self.serial}".encode()).digest()[:16],
            uuid=uuid.uuid5(uuid.NAMESPACE_URL, f"vfiod-nvme:{self.serial}:ns1").bytes,
        )
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
            oacs=OACS_DBBUF if shadow_doorbells else 0,
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

        self.smart = SmartCounters()
        self.stats = NvmeStats()
        self.mover = DataMover(self, store)
        self.admin = AdminCommands(
            self.identity, self.namespace, self.mover, self.smart,
            io_queues=io_queues, vectors=self.vectors, max_transfer=self.max_transfer,
            cc=lambda: self.cc,
        )  # fmt: skip
        self.nvm = NvmCommands(
            self.namespace, self.mover, self.smart, self.max_transfer,
            write_cache=lambda: self.admin.features.wce,
        )  # fmt: skip
        #: the queue engine while the controller is enabled (None: disabled, or after reset)
        self.queues: QueueEngine | None = None
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self._controller_reset()

    # ---- state ------------------------------------------------------------------------------

    def _controller_reset(self) -> None:
        """Controller-level reset (CC.EN 1 -> 0, FLR): queues, AERs and features dropped."""
        self.queues = None
        self.mover.page_size = 4096
        self.fatal = False
        self.admin.reset()
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
        self.mover.close()  # its bounce file too: a client leaves nothing of its own behind

    def close(self) -> None:
        super().close()
        self.mover.close()
        self.store.close()

    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS_RDY) and not self.fatal

    @property
    def max_transfer(self) -> int:
        """Largest data transfer in bytes (MDTS in units of CAP.MPSMIN = 4 KiB)."""
        return 4096 << self.mdts

    # ---- views used by tests, tools and metrics ----------------------------------------------

    @property
    def sqs(self) -> Mapping[int, SubmissionQueue]:
        return self.queues.sqs if self.queues is not None else {}

    @property
    def cqs(self) -> Mapping[int, CompletionQueue]:
        return self.queues.cqs if self.queues is not None else {}

    @property
    def zero_copy(self) -> bool:
        """Namespace data straight between the store and guest RAM (see DataMover)."""
        return self.mover.zero_copy

    @zero_copy.setter
    def zero_copy(self, value: bool) -> None:
        self.mover.zero_copy = value

    @property
    def nsze(self) -> int:
        return self.namespace.nsze

    @property
    def nguid(self) -> bytes:
        return self.namespace.nguid

    @property
    def features(self) -> Features:
        return self.admin.features

    @property
    def errors(self) -> list[ErrorEntry]:
        return self.admin.errors

    @property
    def aer_cids(self) -> list[int]:
        return self.admin.aer_cids

    def post_event(self, event_type: int, info: int, log_page: int) -> None:
        """Queue an asynchronous event; completes an outstanding AER if one is waiting."""
        queues = self.queues if self.ready else None
        self.admin.post_event(queues, event_type, info, log_page)
        if queues is not None:
            queues.finish()

    # ---- registers ----------------------------------------------------------------------------

    def _reg_read32(self, reg: int) -> int:
        if reg == REG_CAP:
            return self.cap & 0xFFFFFFFF
        if reg == REG_CAP + 4:
            return self.cap >> 32
        if reg == REG_VS:
            return NVME_VERSION_1_4
        if reg in (REG_INTMS, REG_INTMC):
            return self.queues.intms if self.queues is not None else 0
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
            if self.queues is not None:
                self.queues.set_intms(value)
        elif reg == REG_INTMC:
            if self.queues is not None:
                self.queues.clear_intms(value)
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
        self.mover.page_size = page
        queues = QueueEngine(self, self.irq, self.vectors, self, self._fatal)
        queues.create_cq(0, self.acq, acqs, vector=0, ien=True)
        queues.create_sq(0, self.asq, asqs, cqid=0)
        self.queues = queues
        self.csts = (self.csts & CSTS_NSSRO) | CSTS_RDY

    def _shutdown(self) -> None:
        """CC.SHN: make everything acknowledged durable, then report shutdown complete."""
        try:
            self.store.flush()
        except OSError:
            log.exception("nvme: flush during shutdown failed")
        self.csts = (self.csts & ~CSTS_SHST_MASK) | CSTS_SHST_COMPLETE

    def _fatal(self, why: str) -> None:
        self.fatal = True
        self.csts |= CSTS_CFS

    # ---- dispatch (the engine's CommandSink) ------------------------------------------------

    def execute(self, sqid: int, cmd: Command) -> tuple[int, int] | None:
        """One fetched command to its command set; errors become a status (DNR set), go to
        the error log and the statistics."""
        status = 0
        dw0: int | None = 0
        lba = 0
        admin = sqid == 0
        started = time.perf_counter()
        try:
            if cmd.flags & 0xC3:  # FUSE or PSDT (SGL) set: neither is supported
                raise NvmeStatus(SC_INVALID_FIELD)
            if admin:
                assert self.queues is not None
                dw0 = self.admin.execute(self.queues, cmd)
            else:
                dw0 = self.nvm.execute(cmd)
        except NvmeStatus as err:
            status, lba = err.status, err.lba
        except DmaFault as fault:
            log.info("nvme: SQ %d cid %d: %s", sqid, cmd.cid, fault)
            status = SC_DATA_TRANSFER_ERROR
        except Exception:
            log.exception("nvme: SQ %d cid %d opcode %#x failed", sqid, cmd.cid, cmd.opcode)
            status = SC_INTERNAL
        self.stats.record(admin, cmd.opcode, status, time.perf_counter() - started)
        if status:
            status |= STATUS_DNR
            self.admin.log_error(sqid, cmd, status, lba)
            return status, 0
        if dw0 is None:
            return None  # deferred (Asynchronous Event Request)
        return 0, dw0

    def cq_space(self, cqid: int) -> None:
        if cqid == 0 and self.queues is not None:
            self.admin.deliver_events(self.queues)

    # ---- metrics ------------------------------------------------------------------------------

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
        doorbells = Family("vfiod_nvme_doorbell_writes_total", "counter",
                           "MMIO doorbell writes (each one a vfio-user message).")
        doorbells.add(self.stats.doorbells[0], function=function, queue="sq")
        doorbells.add(self.stats.doorbells[1], function=function, queue="cq")
        return [commands, errors, read, written, latency, doorbells]


__all__ = ["Command", "NvmeController"]
