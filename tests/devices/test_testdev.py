"""Test device: registers, doorbell interrupts, DMA engine with fake and faulting DMA spaces."""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Iterator

import pytest
from eventfds import count

from vfiod.devices import testdev as td
from vfiod.devices.testdev import TestDevice
from vfiod.pci import DmaFault
from vfiod.pci.constants import (
    IRQ_INTX,
    IRQ_MSIX,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    REGION_FLAG_MMAP,
)

EVT = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
UNMASK = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK


class FakeDma:
    """IOVA space = one bytearray starting at BASE; anything else faults."""

    BASE = 0x100000

    def __init__(self, size: int = 0x20000) -> None:
        self.mem = bytearray(size)

    def _range(self, iova: int, n: int, write: bool) -> slice:
        off = iova - self.BASE
        if off < 0 or off + n > len(self.mem):
            raise DmaFault(iova, n, write, "unmapped")
        return slice(off, off + n)

    def read(self, iova: int, length: int) -> bytes:
        return bytes(self.mem[self._range(iova, length, False)])

    def write(self, iova: int, data: bytes) -> None:
        self.mem[self._range(iova, len(data), True)] = data


class ReadOnlyDma(FakeDma):
    def write(self, iova: int, data: bytes) -> None:
        raise DmaFault(iova, len(data), True, "read-only mapping")


def efd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)




@pytest.fixture
def dev() -> Iterator[TestDevice]:
    d = TestDevice()
    d.region_write(7, 0x04, struct.pack("<H", 0x6))  # MEM + bus master
    yield d
    d.close()


def rd(d: TestDevice, off: int, size: int = 4) -> int:
    return int.from_bytes(d.region_read(0, off, size), "little")


def wr(d: TestDevice, off: int, value: int, size: int = 4) -> None:
    d.region_write(0, off, value.to_bytes(size, "little"))


def dma(d: TestDevice, cmd: int, src: int, dst: int, length: int) -> int:
    wr(d, td.REG_DMA_SRC, src, 8)
    wr(d, td.REG_DMA_DST, dst, 8)
    wr(d, td.REG_DMA_LEN, length)
    wr(d, td.REG_DMA_STATUS, 0xFFFFFFFF)
    wr(d, td.REG_DMA_CMD, cmd)
    return rd(d, td.REG_DMA_STATUS)


def enable_msix(d: TestDevice) -> list[int]:
    assert d.msix is not None
    d.region_write(7, d.msix.offset + 2, struct.pack("<H", 0x8000))
    originals = [efd() for _ in range(td.MSIX_VECTORS)]
    ours = [os.dup(fd) for fd in originals]
    d.set_irqs(IRQ_MSIX, EVT, 0, td.MSIX_VECTORS, originals)
    return ours


def test_what_qemu_requires_of_the_device(dev: TestDevice) -> None:
    cfg = dev.region_read(7, 0, 4096)
    assert len(cfg) == 4096
    vendor, device = struct.unpack_from("<HH", cfg, 0)
    assert (vendor, device) == (td.TEST_VENDOR_ID, td.TEST_DEVICE_ID)
    assert cfg[0x0E] == 0 and cfg[0x3D] == 1
    assert int.from_bytes(cfg[0x09:0x0C], "little") == 0xFF0000
    assert struct.unpack_from("<H", cfg, 0x06)[0] & 0x10
    assert struct.unpack_from("<I", cfg, 0x30)[0] == 0
    # BAR types from the registers, sizes from region info (powers of two).
    bars = [struct.unpack_from("<I", cfg, 0x10 + 4 * i)[0] for i in range(6)]
    assert bars[0] & 0xF == 0 and bars[2] & 0xF == 0xC and bars[4] & 0xF == 0
    sizes = {i: dev.region_info(i).size for i in range(6)}
    assert sizes == {0: 0x1000, 1: 0, 2: 0x10000, 3: 0, 4: 0x1000, 5: 0}
    assert all(s & (s - 1) == 0 for s in sizes.values())
    # MSI-X layout: in BAR4, inside, aligned, disjoint, not in any sparse area.
    msix = dev.config.caps[0x11]
    ctrl, table, pba = struct.unpack_from("<HII", cfg, msix + 2)
    assert (ctrl & 0x7FF) + 1 == td.MSIX_VECTORS == dev.irq_info(IRQ_MSIX).count
    assert table & 7 == 4 and pba & 7 == 4
    t0, t1 = table & ~7, (table & ~7) + 16 * td.MSIX_VECTORS
    p0, p1 = pba & ~7, (pba & ~7) + 8
    assert t0 % 8 == 0 and p0 % 8 == 0 and t1 <= sizes[4] and p1 <= sizes[4]
    assert t1 <= p0 or p1 <= t0
    assert dev.region_info(4).sparse_areas == [] and not dev.region_info(4).flags & REGION_FLAG_MMAP
    # PCIe endpoint.
    exp = dev.config.caps[0x10]
    assert (struct.unpack_from("<H", cfg, exp + 2)[0] >> 4) & 0xF == 0
    # BAR2 is the mmappable buffer.
    info = dev.region_info(2)
    assert info.flags & REGION_FLAG_MMAP and info.fd is not None
    assert info.sparse_areas == [(0, td.BUFFER_SIZE)]


def test_identity_and_scratch(dev: TestDevice) -> None:
    assert rd(dev, td.REG_ID) == td.ID_VALUE
    assert rd(dev, td.REG_VERSION) == td.VERSION_VALUE
    wr(dev, td.REG_ID, 0)
    assert rd(dev, td.REG_ID) == td.ID_VALUE
    wr(dev, td.REG_SCRATCH, 0xA5A5F00D)
    assert rd(dev, td.REG_SCRATCH) == 0xA5A5F00D
    wr(dev, td.REG_SCRATCH + 1, 0x42, 1)
    assert rd(dev, td.REG_SCRATCH) == 0xA5A5420D
    assert rd(dev, td.REG_SCRATCH + 2, 2) == 0xA5A5
    wr(dev, td.REG_DMA_SRC, 0x1122334455667788, 8)
    assert rd(dev, td.REG_DMA_SRC, 8) == 0x1122334455667788
    assert rd(dev, td.REG_DMA_SRC + 4) == 0x11223344


def test_doorbell_msix(dev: TestDevice) -> None:
    ours = enable_msix(dev)
    wr(dev, td.REG_DOORBELL, 5)
    assert [count(fd) for fd in ours] == [0, 0, 0, 0, 0, 1, 0, 0]
    wr(dev, td.REG_DOORBELL, 99)  # beyond the table: ignored
    assert sum(count(fd) for fd in ours) == 0
    assert rd(dev, td.REG_DOORBELL_COUNT) == 2
    for fd in ours:
        os.close(fd)


def test_doorbell_intx_and_isr_ack(dev: TestDevice) -> None:
    fd = efd()
    ours = os.dup(fd)
    dev.set_irqs(IRQ_INTX, EVT, 0, 1, [fd])
    wr(dev, td.REG_DOORBELL, 0)
    assert count(ours) == 1
    assert rd(dev, td.REG_ISR) == td.ISR_DOORBELL
    wr(dev, td.REG_ISR, td.ISR_DOORBELL)  # driver acks, then QEMU unmasks
    dev.set_irqs(IRQ_INTX, UNMASK, 0, 1, [])
    assert count(ours) == 0 and rd(dev, td.REG_ISR) == 0
    wr(dev, td.REG_DOORBELL, 0)
    assert count(ours) == 1
    os.close(ours)


def test_dma_all_commands(dev: TestDevice) -> None:
    fake = FakeDma()
    dev.attach_dma(fake)
    base = FakeDma.BASE
    fake.mem[0:16] = b"0123456789abcdef"
    assert dma(dev, td.CMD_HOST_TO_BUF, base, 0x100, 16) == td.STATUS_DONE
    assert dev.region_read(2, 0x100, 16) == b"0123456789abcdef"
    dev.region_write(2, 0x200, b"from-the-device!")
    assert dma(dev, td.CMD_BUF_TO_HOST, 0x200, base + 0x1000, 16) == td.STATUS_DONE
    assert fake.mem[0x1000:0x1010] == b"from-the-device!"
    assert dma(dev, td.CMD_HOST_TO_HOST, base, base + 0x2000, 10) == td.STATUS_DONE
    assert fake.mem[0x2000:0x200A] == b"0123456789"
    wr(dev, td.REG_DMA_PATTERN, 0x5A)
    assert dma(dev, td.CMD_FILL, 0, base + 0x3000, 0x800) == td.STATUS_DONE
    assert fake.mem[0x3000:0x3800] == b"\x5a" * 0x800 and fake.mem[0x3800] == 0
    # The buffer is the same memory QEMU maps.
    info = dev.region_info(2)
    assert info.fd is not None
    peer = mmap.mmap(info.fd, td.BUFFER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    assert peer[0x100:0x110] == b"0123456789abcdef"
    peer.close()


def test_dma_completion_interrupt_uses_dma_vector(dev: TestDevice) -> None:
    dev.attach_dma(FakeDma())
    ours = enable_msix(dev)
    wr(dev, td.REG_DMA_VECTOR, 3)
    dma(dev, td.CMD_FILL, 0, FakeDma.BASE, 4)
    assert [count(fd) for fd in ours] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert rd(dev, td.REG_ISR) & td.ISR_DMA
    for fd in ours:
        os.close(fd)


def test_dma_faults_leave_no_partial_result(dev: TestDevice) -> None:
    fake = FakeDma()
    dev.attach_dma(fake)
    base = FakeDma.BASE
    dev.region_write(2, 0, b"untouched")
    # host -> buffer from an unmapped IOVA: buffer unchanged.
    status = dma(dev, td.CMD_HOST_TO_BUF, 0xDEAD0000, 0, 9)
    assert status == td.STATUS_DONE | td.STATUS_FAULT
    assert rd(dev, td.REG_DMA_FAULT_ADDR, 8) == 0xDEAD0000
    assert dev.region_read(2, 0, 9) == b"untouched"
    # Source straddles the end of the mapping: nothing written to the destination.
    end = base + len(fake.mem) - 4
    status = dma(dev, td.CMD_HOST_TO_HOST, end, base, 8)
    assert status & td.STATUS_FAULT and fake.mem[0:8] == bytes(8)
    # Destination refused.
    dev.attach_dma(ReadOnlyDma())
    status = dma(dev, td.CMD_BUF_TO_HOST, 0, base, 4)
    assert status == td.STATUS_DONE | td.STATUS_FAULT
    wr(dev, td.REG_DMA_STATUS, td.STATUS_FAULT)
    assert rd(dev, td.REG_DMA_STATUS) == td.STATUS_DONE


def test_dma_invalid_and_no_bus_master() -> None:
    with TestDevice() as d:
        fake = FakeDma()
        d.attach_dma(fake)
        # Bus mastering off (reset state): DMA faults, memory untouched.
        assert dma(d, td.CMD_FILL, 0, FakeDma.BASE, 4) == td.STATUS_DONE | td.STATUS_FAULT
        assert fake.mem[0:4] == bytes(4)
        d.region_write(7, 0x04, struct.pack("<H", 0x4))
        assert dma(d, 9, 0, 0, 4) == td.STATUS_DONE | td.STATUS_INVALID
        assert dma(d, td.CMD_HOST_TO_BUF, FakeDma.BASE, td.BUFFER_SIZE - 2, 4) & td.STATUS_INVALID
        assert dma(d, td.CMD_FILL, 0, FakeDma.BASE, 0) == td.STATUS_DONE


def test_dma_without_attached_space_faults(dev: TestDevice) -> None:
    assert dma(dev, td.CMD_FILL, 0, 0x1000, 4) == td.STATUS_DONE | td.STATUS_FAULT


def test_reset(dev: TestDevice) -> None:
    ours = enable_msix(dev)
    wr(dev, td.REG_SCRATCH, 7)
    dev.region_write(2, 0, b"data")
    wr(dev, td.REG_DOORBELL, 1)
    owned = dev.irq.open_fds()
    assert len(owned) == td.MSIX_VECTORS
    dev.reset()
    assert rd(dev, td.REG_SCRATCH) == 0 and rd(dev, td.REG_ISR) == 0
    assert rd(dev, td.REG_DOORBELL_COUNT) == 0
    assert dev.region_read(2, 0, 4) == bytes(4)
    assert not dev.irq.msix_enabled and dev.irq.open_fds() == []
    for fd in owned:
        with pytest.raises(OSError) as exc:
            os.fstat(fd)
        assert exc.value.errno == errno.EBADF
    assert dev.region_read(7, 0x04, 2) == b"\0\0"
    assert dev.region_info(2).fd is not None  # BAR memory stays mapped across reset
    for fd in ours:
        os.close(fd)


def test_close_releases_everything() -> None:
    before = len(os.listdir("/proc/self/fd"))
    d = TestDevice()
    d.set_irqs(IRQ_MSIX, EVT, 0, 2, [efd(), efd()])
    d.close()
    d.close()
    assert len(os.listdir("/proc/self/fd")) == before
