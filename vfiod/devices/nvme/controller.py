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

With the C module, the controller keeps one ``struct vfiod_nvme`` (cffi_build/nvme.h) for its
lifetime: the queue state its engines own, and what the C data mover needs of the namespace and
the function (store fd, geometry, write cache, config space, the session's PE view, the
interrupt mirror). While a client is attached, :meth:`NvmeController.background` runs the C
mover's workers in threads of the session's nursery, and the session fast path runs I/O queue
doorbells in C through the hook of :meth:`NvmeController.fast_ranges`. C keeps its own
counters; they are folded into the Python ones whenever those are read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import trio

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
    IO_FLUSH,
    IO_READ,
    IO_WRITE,
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
    CMover,
    Command,
    CompletionQueue,
    QueueEngine,
    SubmissionQueue,
    c_module,
)
from vfiod.metrics import Family, Histogram
from vfiod.pci.caps import MSI_MAX_VECTORS
from vfiod.pci.config import BarKind, BarSpec
from vfiod.pci.dma import DmaFault, DmaSpace
from vfiod.pci.function import PciFunction
from vfiod.pci.region import DwordRegisters, FastRange, Region

log = logging.getLogger(__name__)

DEFAULT_VENDOR_ID = 0x1B36
DEFAULT_DEVICE_ID = 0x0010
DEFAULT_MODEL = "vfiod NVMe controller"
DEFAULT_FIRMWARE = "vfiod01"

CAP_TIMEOUT = 0x0F  #: CAP.TO in 500 ms units (we are ready synchronously)
MPSMAX = 4  #: host memory pages 4 KiB .. 64 KiB
ACL = 3
WORKERS = 2  #: C data mover threads per controller while a client is attached


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
        ctrl = self.ctrl
        queues = ctrl.queues
        if queues is not None and queues.doorbell(offset, value):
            ctrl.collect()
            return  # done whole by the C data mover (which counted it)
        ctrl._stats.doorbells[is_cq] += 1
        if queues is None:
            return  # not enabled (or fatal and reset since): ignored
        if is_cq:
            queues.cq_doorbell(qid, value & 0xFFFF)
        else:
            queues.sq_doorbell(qid, value & 0xFFFF)
        ctrl.collect()


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
    soon as it sees it; False leaves every doorbell an MMIO write. ``c_mover=False`` keeps
    everything in Python (the reference the tests compare the C data mover against), as does a
    build without the C module.
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
        c_mover: bool = True,
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

        self._smart = SmartCounters()
        self._stats = NvmeStats()
        self.mover = DataMover(self, store)
        self.admin = AdminCommands(
            self.identity, self.namespace, self.mover, self._smart,
            io_queues=io_queues, vectors=self.vectors, max_transfer=self.max_transfer,
            cc=lambda: self.cc, collect=self.collect,
        )  # fmt: skip
        self.nvm = NvmCommands(
            self.namespace, self.mover, self._smart, self.max_transfer,
            write_cache=lambda: self.admin.features.wce,
        )  # fmt: skip
        self.workers = WORKERS
        self._cmover: CMover | None = None
        self._notify = -1
        self._keep: list[Any] = []  # buffers the C structure points into
        module = c_module() if c_mover else None
        if module is not None:
            self._cmover = self._make_c(module)
        #: the queue engine while the controller is enabled (None: disabled, or after reset)
        self.queues: QueueEngine | None = None
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self._controller_reset()

    # ---- the C data mover -------------------------------------------------------------------

    def _make_c(self, module: Any) -> CMover:
        ffi, lib = module.ffi, module.lib
        raw = lib.vfiod_nvme_new()
        if raw == ffi.NULL:
            raise MemoryError("cannot allocate the NVMe data mover")
        c = ffi.gc(raw, lib.vfiod_nvme_free)
        ns = self.namespace
        c.fd = self.store.fd
        c.lba_shift = ns.lba_shift
        c.nsze = ns.nsze
        c.max_transfer = self.max_transfer
        c.page_size = 4096
        c.wce = 1
        config = ffi.from_buffer("uint8_t[]", self.config.data)
        self._keep.append(config)
        c.config = config
        if self.irq.mirror is not None:
            c.irq = self.irq.mirror
            self._notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            c.notify_fd = self._notify
            self.irq.mirror.notify_fd = self._notify
        for i, bound in enumerate(Histogram.BUCKETS):
            c.lat_bounds_ns[i] = int(bound * 1e9)
        return CMover(module, c)

    @property
    def c_mover(self) -> bool:
        """Whether the C data mover runs the common case (the C module, a PE's C view, the
        zero-copy path): the I/O queues' doorbells and commands then go through C first."""
        return self._cmover is not None and self._cmover.c.dma != self._cmover.ffi.NULL

    def attach_dma(self, dma: DmaSpace) -> None:
        super().attach_dma(dma)
        self._sync_c()

    def _sync_c(self) -> None:
        """Tell the C structure what it may use now: the session's PE view (only for the
        zero-copy path it does), the write cache setting, the host page size."""
        cm = self._cmover
        if cm is None:
            return
        view = getattr(self.dma, "c_view", None)
        use = view is not None and self.mover.zero_copy
        with cm.locked():
            cm.c.dma = view if use else cm.ffi.NULL
            cm.c.wce = int(self.admin.features.wce)
            cm.c.page_size = self.mover.page_size

    def collect(self) -> None:
        """Fold the C data mover's counters into the Python ones (and zero them there)."""
        cm = self._cmover
        if cm is None:
            return
        c = cm.c
        with cm.locked():
            smart, stats = self._smart, self._stats
            smart.read_cmds += c.reads
            smart.write_cmds += c.writes
            smart.bytes_read += c.bytes_read
            smart.bytes_written += c.bytes_written
            self.store.syncs += c.syncs
            c.reads = c.writes = c.bytes_read = c.bytes_written = c.syncs = 0
            for kind, opcode in enumerate((IO_READ, IO_WRITE, IO_FLUSH)):
                if c.ok[kind]:
                    key = ("io", opcode)
                    stats.commands[key] = stats.commands.get(key, 0) + c.ok[kind]
                    c.ok[kind] = 0
            for i in range(len(stats.latency.counts)):
                stats.latency.counts[i] += c.lat[i]
                c.lat[i] = 0
            stats.latency.total += c.lat_ns / 1e9
            c.lat_ns = 0
            stats.doorbells[0] += c.doorbells[0]
            stats.doorbells[1] += c.doorbells[1]
            c.doorbells[0] = c.doorbells[1] = 0

    @property
    def smart(self) -> SmartCounters:
        self.collect()
        return self._smart

    @property
    def stats(self) -> NvmeStats:
        self.collect()
        return self._stats

    @property
    def async_commands(self) -> int:
        """Commands the C data mover's workers ran (0 without them)."""
        cm = self._cmover
        return int(cm.c.jobs_async) if cm is not None else 0

    @property
    def hooked_doorbells(self) -> int:
        """Doorbell writes the session fast path did through the C hook (no Python)."""
        cm = self._cmover
        return int(cm.c.hooked) if cm is not None else 0

    async def background(self) -> None:
        """While a client is attached: the C data mover's workers (threads of the session's
        nursery, the GIL released) and the task that does what C leaves for Python. Cancelled,
        it stops the workers, which finish every command in flight first, so no iovec into
        guest RAM outlives the session's DMA view."""
        cm = self._cmover
        if cm is None:
            return
        lib, c = cm.lib, cm.c
        limiter = trio.CapacityLimiter(max(1, self.workers))
        lib.vfiod_nvme_start(c)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.workers):  # 0: every command runs where its doorbell does
                    nursery.start_soon(_worker, lib.vfiod_nvme_worker, c, limiter)
                nursery.start_soon(self._serve_python)
                try:
                    await trio.sleep_forever()
                finally:
                    lib.vfiod_nvme_stop(c)  # the workers drain the queue, then return
        finally:
            lib.vfiod_nvme_stop(c)
            self._service()

    async def _serve_python(self) -> None:
        """Wait for the C side's notifications and do what they ask."""
        fd = self._notify
        if fd < 0:
            await trio.sleep_forever()
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            self._service()

    def _service(self) -> None:
        queues = self.queues
        if queues is not None:
            queues.service()
        else:
            self.irq.fire_pending()
        self.collect()

    def fast_ranges(self) -> list[FastRange]:
        """Config space, and the doorbell page as a hook: the session fast path runs an I/O
        queue's doorbell write in C (``vfiod_nvme_doorbell_hook``), punting what C cannot do
        completely (the admin queue, commands for Python, any doubt) to region_write."""
        ranges = super().fast_ranges()
        cm = self._cmover
        if cm is not None:
            hook = cm.ffi.addressof(cm.lib, "vfiod_nvme_doorbell_hook")
            ranges.append(FastRange(0, DOORBELL_BASE, bytearray(), "hook", hook=hook,
                                    hook_ctx=cm.c, hook_size=DOORBELL_SIZE))  # fmt: skip
        return ranges

    # ---- state ------------------------------------------------------------------------------

    def _controller_reset(self) -> None:
        """Controller-level reset (CC.EN 1 -> 0, FLR): queues, AERs and features dropped."""
        if self.queues is not None:
            self.queues.close()  # commands in flight finish first
        self.queues = None
        self.mover.page_size = 4096
        self.fatal = False
        self.admin.reset()
        self.csts &= CSTS_NSSRO
        if self.irq.intx_level:
            self.irq.deassert_intx()
        self._sync_c()

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
        self.collect()
        self.mover.close()
        self.store.close()
        if self._notify >= 0:
            os.close(self._notify)
            self._notify = -1

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
        self._sync_c()

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
        self._sync_c()
        queues = QueueEngine(self, self.irq, self.vectors, self, self._fatal, self._cmover)
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
        result = self._dispatch(sqid, cmd, self._run)
        if sqid == 0:
            self._sync_c()  # Set Features may have turned the write cache on or off
        return result

    def flush_failed(self, sqid: int, cmd: Command, err: int) -> tuple[int, int]:
        """A Flush or FUA write the C data mover ran whose fdatasync failed: the media error
        the command set reports (SMART, error log, statistics), as if it had failed here."""

        def fail(sqid: int, cmd: Command) -> int | None:
            return self.nvm.flush_failed(OSError(err, os.strerror(err) if err else "EIO"))

        result = self._dispatch(sqid, cmd, fail)
        assert result is not None
        return result

    def _run(self, sqid: int, cmd: Command) -> int | None:
        if cmd.flags & 0xC3:  # FUSE or PSDT (SGL) set: neither is supported
            raise NvmeStatus(SC_INVALID_FIELD)
        if sqid == 0:
            assert self.queues is not None
            return self.admin.execute(self.queues, cmd)
        return self.nvm.execute(cmd)

    def _dispatch(self, sqid: int, cmd: Command,
                  run: Callable[[int, Command], int | None]) -> tuple[int, int] | None:  # fmt: skip
        status = 0
        dw0: int | None = 0
        lba = 0
        admin = sqid == 0
        started = time.perf_counter()
        try:
            dw0 = run(sqid, cmd)
        except NvmeStatus as err:
            status, lba = err.status, err.lba
        except DmaFault as fault:
            log.info("nvme: SQ %d cid %d: %s", sqid, cmd.cid, fault)
            status = SC_DATA_TRANSFER_ERROR
        except Exception:
            log.exception("nvme: SQ %d cid %d opcode %#x failed", sqid, cmd.cid, cmd.opcode)
            status = SC_INTERNAL
        self._stats.record(admin, cmd.opcode, status, time.perf_counter() - started)
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
        self.collect()
        commands = Family("vfiod_nvme_commands_total", "counter", "NVMe commands completed.")
        errors = Family("vfiod_nvme_command_errors_total", "counter",
                        "NVMe commands completed with an error status.")
        for (queue, opcode), n in sorted(self._stats.commands.items()):
            commands.add(n, function=function, queue=queue, opcode=f"{opcode:#04x}")
        for (queue, opcode), n in sorted(self._stats.errors.items()):
            errors.add(n, function=function, queue=queue, opcode=f"{opcode:#04x}")
        read = Family("vfiod_nvme_read_bytes_total", "counter", "Bytes read by the guest.")
        read.add(self._smart.bytes_read, function=function)
        written = Family("vfiod_nvme_written_bytes_total", "counter",
                         "Bytes written by the guest.")
        written.add(self._smart.bytes_written, function=function)
        latency = Family("vfiod_nvme_command_seconds", "histogram",
                         "Time from fetching an NVMe command to its completion.")
        latency.add_histogram(Histogram.BUCKETS, self._stats.latency.counts,
                              self._stats.latency.total, function=function)
        doorbells = Family("vfiod_nvme_doorbell_writes_total", "counter",
                           "MMIO doorbell writes (each one a vfio-user message).")
        doorbells.add(self._stats.doorbells[0], function=function, queue="sq")
        doorbells.add(self._stats.doorbells[1], function=function, queue="cq")
        return [commands, errors, read, written, latency, doorbells]


async def _worker(work: Callable[[Any], None], c: Any, limiter: trio.CapacityLimiter) -> None:
    await trio.to_thread.run_sync(work, c, limiter=limiter)


__all__ = ["Command", "NvmeController"]
