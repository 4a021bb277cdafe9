"""PciFunction: the object a vfio-user session serves (contract in docs/ARCHITECTURE.md).

The session never interprets PCI semantics; it calls region_info / region_read / region_write /
irq_info / set_irqs / reset / attach_dma. Personalities subclass this class, add BARs and caps
in ``__init__``, call :meth:`seal` at the end, and override :meth:`on_reset`.
"""

from __future__ import annotations

from types import TracebackType

from vfiod.pci.caps import MsiCap, MsixCap, PcieCap, PmCap
from vfiod.pci.config import BarKind, BarSpec, ConfigSpace, einval
from vfiod.pci.constants import (
    CONFIG_SPACE_SIZE,
    DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET,
    INTX_PIN_A,
    NUM_IRQS,
    NUM_REGIONS,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    REGION_CONFIG,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    REGION_ROM,
)
from vfiod.pci.dma import DmaFault, DmaSpace, NoDmaSpace
from vfiod.pci.irq import IrqController, IrqInfo
from vfiod.pci.region import (
    HOLE_ALIGN,
    AbsentRegion,
    FastRange,
    MemoryRegion,
    Region,
    RegionInfo,
    RegisterHandler,
    RomRegion,
)

EXP_DEVCTL_OFFSET = 0x08
DEVCTL_BCR_FLR = 0x8000


def _page_round(n: int) -> int:
    return (n + HOLE_ALIGN - 1) // HOLE_ALIGN * HOLE_ALIGN


class PciFunction:
    """One emulated PCI function: config space, BAR regions, interrupts, reset, DMA view."""

    device_flags: int = DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET
    num_regions: int = NUM_REGIONS
    num_irqs: int = NUM_IRQS

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int | None = None,
        subsystem_id: int = 0,
        interrupt_pin: int = INTX_PIN_A,
        pm: bool = True,
        pcie: bool = True,
        flr: bool = True,
        err_irq: bool = True,
    ) -> None:
        self.config = ConfigSpace()
        self.config.init_header(
            vendor_id=vendor_id,
            device_id=device_id,
            class_code=class_code,
            revision=revision,
            subsystem_vendor_id=vendor_id if subsystem_vendor_id is None else subsystem_vendor_id,
            subsystem_id=subsystem_id,
            interrupt_pin=interrupt_pin,
        )
        self.bars: dict[int, Region] = {}
        self.bar_specs: dict[int, BarSpec] = {}
        self.rom: Region | None = None
        self.pm: PmCap | None = PmCap.add(self.config) if pm else None
        self.pcie: PcieCap | None = PcieCap.add(self.config, flr=flr) if pcie else None
        if self.pcie is not None and flr:
            self.config.add_hook(self.pcie.offset + EXP_DEVCTL_OFFSET, 2, self._on_devctl)
        self.msix: MsixCap | None = None
        self.msi: MsiCap | None = None
        self.irq = IrqController(self.config, err_irq=err_irq)
        self.dma: DmaSpace = NoDmaSpace()
        self._closed = False

    # ---- building -----------------------------------------------------------------------------

    def add_bar(self, index: int, region: Region, spec: BarSpec | None = None) -> Region:
        """Attach a region as BAR ``index``; a MEM64 spec also claims ``index + 1``."""
        self._check_building()
        if spec is None:
            spec = BarSpec(region.size)
        if spec.size != region.size:
            raise ValueError("BAR spec size differs from region size")
        span = (index, index + 1) if spec.kind is BarKind.MEM64 else (index,)
        if any(i in self.bars for i in span):
            raise ValueError(f"BAR {index} already in use")
        self.config.init_bar(index, spec)
        self.bars[index] = region
        self.bar_specs[index] = spec
        if spec.kind is BarKind.MEM64:
            self.bars[index + 1] = AbsentRegion()
        return region

    def add_rom(self, image: bytes) -> RomRegion:
        """Expansion ROM (region 6) with a sizable ROM BAR."""
        self._check_building()
        rom = RomRegion(image)
        self.config.init_rom(rom.size)
        self.rom = rom
        return rom

    def add_msix(
        self,
        vectors: int,
        table_bar: int,
        table_offset: int,
        pba_bar: int,
        pba_offset: int,
    ) -> MsixCap:
        """MSI-X cap plus the table/PBA handlers mapped into the (already added) BARs.

        In a memfd-backed BAR the table and PBA each take whole pages so they stay out of the
        sparse-mmap areas.
        """
        self._check_building()
        sizes = {i: r.size for i, r in self.bars.items()}
        probe = MsixCap(self.config, 0, vectors, table_bar, table_offset, pba_bar, pba_offset)
        probe.check_layout(sizes)
        table_region = self.bars[table_bar]
        pba_region = self.bars[pba_bar]
        if table_bar == pba_bar and isinstance(table_region, MemoryRegion):
            t0, t1 = table_offset // HOLE_ALIGN, _page_round(table_offset + probe.table_size)
            p0, p1 = pba_offset // HOLE_ALIGN, _page_round(pba_offset + probe.pba_size)
            if t0 * HOLE_ALIGN < p1 and p0 * HOLE_ALIGN < t1:
                raise ValueError("MSI-X table and PBA must be on separate pages in a mmapped BAR")
        cap = MsixCap.add(self.config, vectors, table_bar, table_offset, pba_bar, pba_offset)
        self.msix = cap
        self.irq.attach_msix(cap)
        assert self.irq.msix_table is not None and self.irq.msix_pba is not None
        self._map_window(table_region, table_offset, cap.table_size, self.irq.msix_table)
        self._map_window(pba_region, pba_offset, cap.pba_size, self.irq.msix_pba)
        return cap

    def add_msi(self, vectors: int) -> MsiCap:
        """MSI cap asking for ``vectors`` (a power of two up to 32); nothing lands in a BAR.

        Unlike MSI-X, MSI lets a function be hot-unplugged from QEMU 11.1 (docs/qemu-quirks.md).
        """
        self._check_building()
        cap = MsiCap.add(self.config, vectors)
        self.msi = cap
        self.irq.attach_msi(cap)
        return cap

    @property
    def vectors(self) -> int:
        """Message vectors the function can raise: MSI-X table entries, else MSI vectors."""
        if self.msix is not None:
            return self.msix.vectors
        return self.msi.vectors if self.msi is not None else 0

    @staticmethod
    def _map_window(region: Region, offset: int, size: int, handler: RegisterHandler) -> None:
        if isinstance(region, MemoryRegion):
            start = offset - offset % HOLE_ALIGN
            end = _page_round(offset + size)
            inner = _Shifted(handler, offset - start)
            region.map(start, end - start, inner)
        else:
            region.map(offset, size, handler)

    def _check_building(self) -> None:
        if self.config.sealed:
            raise RuntimeError("function layout is sealed")

    def seal(self) -> None:
        """Freeze the layout and snapshot config defaults for reset; idempotent."""
        if not self.config.sealed:
            self.config.seal()

    # ---- session contract ---------------------------------------------------------------------

    def region_info(self, index: int) -> RegionInfo:
        self.seal()
        if index == REGION_CONFIG:
            return RegionInfo(
                index=index, flags=REGION_FLAG_READ | REGION_FLAG_WRITE, size=CONFIG_SPACE_SIZE
            )
        return self._region(index).info(index)

    def _region(self, index: int) -> Region:
        if not 0 <= index < self.num_regions or index == REGION_CONFIG:
            raise einval(f"no region {index}")
        if index == REGION_ROM:
            return self.rom or AbsentRegion()
        return self.bars.get(index) or AbsentRegion()

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self.seal()
        if index == REGION_CONFIG:
            return self.config.read(offset, count)
        return self._region(index).read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.seal()
        if index == REGION_CONFIG:
            self.config.write(offset, data)
            return
        self._region(index).write(offset, data)

    def irq_info(self, index: int) -> IrqInfo:
        return self.irq.info(index)

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int]) -> None:
        """DEVICE_SET_IRQS; the function owns ``fds`` from this call on, even on error."""
        self.seal()
        self.irq.set_irqs(index, flags, start, count, fds)

    def reset(self) -> None:
        """Function-level reset: config defaults (minus sticky bits), BARs, IRQs, personality."""
        self.seal()
        self.irq.reset()
        self.config.reset()
        self.irq.sync_mirror()  # MSI and MSI-X enables were in config space
        for region in self.bars.values():
            region.reset()
        self.on_reset()

    def attach_dma(self, dma: DmaSpace) -> None:
        self.dma = dma

    async def background(self) -> None:
        """Work the function does on its own while a client is attached (the session runs
        this in its nursery after attach_dma, and cancels it and waits for it before it resets
        the function and closes the DMA view). Threads a function needs are started here, so
        that a nursery owns them; most functions need none."""
        return None

    def fast_ranges(self) -> list[FastRange]:
        """What the session may serve itself (see :class:`FastRange`): config space, whose
        writes only need masks except where a hook watches. Personalities add registers they
        keep current in a buffer. Seals the layout (the buffers are final from here on)."""
        self.seal()
        cfg = self.config
        return [FastRange(REGION_CONFIG, 0, cfg.data, "config", cfg.wmask, cfg.w1cmask,
                          cfg.hooked_bytes())]  # fmt: skip

    def close(self) -> None:
        """Close eventfds, memfds and mmaps; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.irq.close()
        for region in self.bars.values():
            region.close()
        if self.rom is not None:
            self.rom.close()

    def __enter__(self) -> PciFunction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- for personalities --------------------------------------------------------------------

    def on_reset(self) -> None:
        """Personality hook: put device registers back to power-on state."""
        return None

    @property
    def bus_master(self) -> bool:
        return bool(self.config.peek(PCI_COMMAND, 2) & PCI_COMMAND_MASTER)

    def dma_read(self, iova: int, length: int) -> bytes:
        """Device DMA read; faults when bus mastering is off, as on hardware."""
        if not self.bus_master:
            raise DmaFault(iova, length, False, "bus master disabled")
        return self.dma.read(iova, length)

    def dma_write(self, iova: int, data: bytes) -> None:
        if not self.bus_master:
            raise DmaFault(iova, len(data), True, "bus master disabled")
        self.dma.write(iova, data)

    def raise_irq(self, vector: int = 0) -> bool:
        """Signal ``vector`` if MSI-X or MSI is enabled, else assert INTx (level)."""
        if self.irq.msg_enabled:
            return self.irq.fire_vector(vector)
        self.irq.assert_intx()
        return False

    def _on_devctl(self, old: int, new: int) -> None:
        if new & DEVCTL_BCR_FLR:
            self.reset()


class _Shifted:
    """Adapts a register handler to a page-aligned window that starts before it."""

    def __init__(self, inner: RegisterHandler, shift: int) -> None:
        self.inner = inner
        self.shift = shift

    def read(self, offset: int, size: int) -> int:
        off = offset - self.shift
        if off < 0:
            return 0
        return self.inner.read(off, size)

    def write(self, offset: int, size: int, value: int) -> None:
        off = offset - self.shift
        if off >= 0:
            self.inner.write(off, size, value)

    def reset(self) -> None:
        return None
