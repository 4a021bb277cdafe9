"""vfiod test device: registers, doorbell interrupts, a DMA engine and a shared buffer.

Identity: vendor 0x7E57 ("TEST"), device 0x0001, class 0xff0000 (unassigned). 0x7E57 is not a
PCI-SIG id we rely on anyone owning; it only marks a test function and is never shipped to a
guest outside tests (override with ``vendor_id=`` / ``device_id=``).

BARs

* BAR0: 4 KiB 32-bit MMIO registers, handled in Python (every access is a message).
* BAR2: 64 KiB 64-bit prefetchable memory backed by a memfd, offered to QEMU as mmap (one
  sparse area covering all of it): the device "buffer".
* BAR4: 4 KiB 32-bit MMIO: MSI-X table at 0x000 (8 vectors), PBA at 0x800. Not mmapped.

Interrupts: MSI-X by default (the unit tests' MSI-X subject). ``TestDevice(msix=False)`` offers
an MSI cap with 8 vectors instead and has no BAR4: the variant QEMU 11.1 can hot-unplug (an
MSI-X function aborts it on ``device_del``, see docs/qemu-quirks.md).

BAR0 register map (little endian; 1/2/4/8-byte accesses, partial writes act on their bytes)

====== ================ ===== ==============================================================
offset name             type  meaning
====== ================ ===== ==============================================================
0x00   ID               RO    0x76666474 ("tdfv" in memory): identifies the test device
0x04   VERSION          RO    0x00010000 (major 1, minor 0)
0x08   SCRATCH          RW    no side effect
0x0C   DOORBELL         WO    write n: raise vector n if MSI-X or MSI is enabled (n beyond the
                              vectors is ignored); otherwise set ISR.DOORBELL (INTx)
0x10   ISR              W1C   bit0 DOORBELL, bit1 DMA; INTx is asserted while ISR != 0 and
                              neither MSI-X nor MSI is enabled
0x14   DMA_VECTOR       RW    vector raised when a DMA command completes
0x18   DOORBELL_COUNT   RO    doorbell writes since reset
0x20   DMA_SRC          RW    u64 source (IOVA, or buffer offset for CMD 2)
0x28   DMA_DST          RW    u64 destination (IOVA, or buffer offset for CMD 1)
0x30   DMA_LEN          RW    u32 byte count
0x34   DMA_CMD          RW    write starts a command: 1 host->buffer, 2 buffer->host,
                              3 host->host copy, 4 fill host DST with PATTERN byte
0x38   DMA_PATTERN      RW    low byte is the fill value for CMD 4
0x3C   DMA_STATUS       W1C   bit0 DONE, bit1 FAULT (DmaSpace refused), bit2 INVALID (bad
                              command, length or buffer range)
0x40   DMA_FAULT_ADDR   RO    u64 IOVA of the last DMA fault
====== ================ ===== ==============================================================

DMA commands run synchronously inside the DMA_CMD write, through the function's DmaSpace only
(bus mastering must be enabled in COMMAND). All reads happen before any write, so a read fault
leaves the destination untouched; completion (success or not) sets STATUS and raises the DMA
interrupt. Lengths are limited to the buffer (64 KiB) for commands 1 and 2 and 1 MiB for 3, 4.
"""

from __future__ import annotations

import struct

from vfiod.pci.config import BarKind, BarSpec
from vfiod.pci.dma import DmaFault
from vfiod.pci.function import PciFunction
from vfiod.pci.region import DwordRegisters, FastRange, MemoryRegion, Region

TEST_VENDOR_ID = 0x7E57
TEST_DEVICE_ID = 0x0001
TEST_CLASS_CODE = 0xFF0000

REGS_BAR = 0
BUFFER_BAR = 2
MSIX_BAR = 4
REGS_SIZE = 0x1000
BUFFER_SIZE = 0x10000
MSIX_BAR_SIZE = 0x1000
MSIX_VECTORS = 8
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800

REG_ID = 0x00
REG_VERSION = 0x04
REG_SCRATCH = 0x08
REG_DOORBELL = 0x0C
REG_ISR = 0x10
REG_DMA_VECTOR = 0x14
REG_DOORBELL_COUNT = 0x18
REG_DMA_SRC = 0x20
REG_DMA_DST = 0x28
REG_DMA_LEN = 0x30
REG_DMA_CMD = 0x34
REG_DMA_PATTERN = 0x38
REG_DMA_STATUS = 0x3C
REG_DMA_FAULT_ADDR = 0x40

ID_VALUE = 0x76666474
VERSION_VALUE = 0x00010000

ISR_DOORBELL = 0x1
ISR_DMA = 0x2

CMD_HOST_TO_BUF = 1
CMD_BUF_TO_HOST = 2
CMD_HOST_TO_HOST = 3
CMD_FILL = 4

STATUS_DONE = 0x1
STATUS_FAULT = 0x2
STATUS_INVALID = 0x4

MAX_HOST_DMA = 1 << 20

_STORAGE = {REG_SCRATCH, REG_DMA_VECTOR, REG_DMA_LEN, REG_DMA_PATTERN}
_STORAGE64 = {REG_DMA_SRC, REG_DMA_DST}


class TestDevRegisters(DwordRegisters):
    """BAR0 register file; dword-based, with 64-bit SRC/DST/FAULT_ADDR as dword pairs."""

    def __init__(self, dev: TestDevice) -> None:
        self.dev = dev
        self.regs: dict[int, int] = {}
        self.reset()

    def reset(self) -> None:
        self.regs = {}
        self.isr = 0
        self.status = 0
        self.doorbells = 0
        self.last_cmd = 0
        self.fault_addr = 0

    # ---- access plumbing ------------------------------------------------------------------

    def _read32(self, reg: int) -> int:
        if reg == REG_ID:
            return ID_VALUE
        if reg == REG_VERSION:
            return VERSION_VALUE
        if reg == REG_ISR:
            return self.isr
        if reg == REG_DOORBELL_COUNT:
            return self.doorbells & 0xFFFFFFFF
        if reg == REG_DMA_CMD:
            return self.last_cmd
        if reg == REG_DMA_STATUS:
            return self.status
        if reg in (REG_DMA_FAULT_ADDR, REG_DMA_FAULT_ADDR + 4):
            return (self.fault_addr >> (8 * (reg - REG_DMA_FAULT_ADDR))) & 0xFFFFFFFF
        return self.regs.get(reg, 0)

    def _write32(self, reg: int, value: int, mask: int) -> None:
        if reg in _STORAGE or any(reg in (r, r + 4) for r in _STORAGE64):
            self.regs[reg] = (self.regs.get(reg, 0) & ~mask) | value
        elif reg == REG_DOORBELL:
            self.dev.doorbell(value)
        elif reg == REG_ISR:
            self.isr &= ~value
            self.dev.update_intx()
        elif reg == REG_DMA_STATUS:
            self.status &= ~value
        elif reg == REG_DMA_CMD:
            self.last_cmd = (self.last_cmd & ~mask) | value
            self.dev.run_dma(self.last_cmd)
        # ID, VERSION, counters and unknown offsets ignore writes.

    def u64(self, reg: int) -> int:
        return self.regs.get(reg, 0) | (self.regs.get(reg + 4, 0) << 32)


class TestDevice(PciFunction):
    """Test personality; see the module docstring for the register map."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        *,
        vendor_id: int = TEST_VENDOR_ID,
        device_id: int = TEST_DEVICE_ID,
        msix: bool = True,
    ) -> None:
        super().__init__(vendor_id=vendor_id, device_id=device_id, class_code=TEST_CLASS_CODE)
        self.registers = TestDevRegisters(self)
        regs = Region(REGS_SIZE)
        regs.map(0, REGS_SIZE, self.registers)
        self.add_bar(REGS_BAR, regs, BarSpec(REGS_SIZE, BarKind.MEM32))
        self.buffer = MemoryRegion(BUFFER_SIZE, "vfiod-testdev-buffer")
        self.add_bar(BUFFER_BAR, self.buffer, BarSpec(BUFFER_SIZE, BarKind.MEM64, True))
        if msix:
            self.add_bar(MSIX_BAR, Region(MSIX_BAR_SIZE), BarSpec(MSIX_BAR_SIZE, BarKind.MEM32))
            self.add_msix(MSIX_VECTORS, MSIX_BAR, MSIX_TABLE_OFFSET, MSIX_BAR, MSIX_PBA_OFFSET)
        else:
            self.add_msi(MSIX_VECTORS)
        self.seal()

    def fast_ranges(self) -> list[FastRange]:
        """Config space, and ID/VERSION: constants, so the session may answer them itself."""
        ident = bytearray(struct.pack("<II", ID_VALUE, VERSION_VALUE))
        return [*super().fast_ranges(), FastRange(REGS_BAR, REG_ID, ident, "ro")]

    # ---- behaviour ----------------------------------------------------------------------------

    def on_reset(self) -> None:
        self.registers.reset()

    def update_intx(self) -> None:
        """INTx level follows ISR while MSI-X and MSI are off."""
        if self.registers.isr and not self.irq.msg_enabled:
            self.irq.assert_intx()
        else:
            self.irq.deassert_intx()

    def _interrupt(self, isr_bit: int, vector: int) -> None:
        self.registers.isr |= isr_bit
        if self.irq.msg_enabled:
            if 0 <= vector < self.vectors:
                self.irq.fire_vector(vector)
        else:
            self.update_intx()

    def doorbell(self, vector: int) -> None:
        self.registers.doorbells += 1
        self._interrupt(ISR_DOORBELL, vector)

    def run_dma(self, cmd: int) -> None:
        """Execute one DMA command and complete it (status + interrupt)."""
        r = self.registers
        src, dst = r.u64(REG_DMA_SRC), r.u64(REG_DMA_DST)
        length = r.regs.get(REG_DMA_LEN, 0)
        status = STATUS_DONE
        try:
            status |= self._dma(cmd, src, dst, length)
        except DmaFault as fault:
            status |= STATUS_FAULT
            r.fault_addr = fault.iova
        r.status = status
        self._interrupt(ISR_DMA, r.regs.get(REG_DMA_VECTOR, 0))

    def _dma(self, cmd: int, src: int, dst: int, length: int) -> int:
        mem = self.buffer.mem
        if cmd == CMD_HOST_TO_BUF:
            if dst + length > BUFFER_SIZE:
                return STATUS_INVALID
            data = self.dma_read(src, length) if length else b""
            mem[dst : dst + length] = data
        elif cmd == CMD_BUF_TO_HOST:
            if src + length > BUFFER_SIZE:
                return STATUS_INVALID
            if length:
                self.dma_write(dst, bytes(mem[src : src + length]))
        elif cmd == CMD_HOST_TO_HOST:
            if length > MAX_HOST_DMA:
                return STATUS_INVALID
            if length:
                self.dma_write(dst, self.dma_read(src, length))
        elif cmd == CMD_FILL:
            if length > MAX_HOST_DMA:
                return STATUS_INVALID
            if length:
                pattern = self.registers.regs.get(REG_DMA_PATTERN, 0) & 0xFF
                self.dma_write(dst, bytes([pattern]) * length)
        else:
            return STATUS_INVALID
        return 0
