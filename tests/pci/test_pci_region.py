"""Regions: handler dispatch, memfd BARs with sparse areas, region_info / index checks."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from vfiod.pci import BarKind, BarSpec, MemoryRegion, PciFunction, Region
from vfiod.pci.constants import (
    REGION_FLAG_CAPS,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
)
from vfiod.pci.region import HOLE_ALIGN


class Recorder:
    """Register handler that logs every access and returns offset-derived values."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, 0))
        return 0x1122334455667788 & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


class Bytes:
    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)

    def read_bytes(self, offset: int, count: int) -> bytes:
        return bytes(self.buf[offset : offset + count])

    def write_bytes(self, offset: int, data: bytes) -> None:
        self.buf[offset : offset + len(data)] = data


def test_register_handler_dispatch_and_splitting() -> None:
    region = Region(0x1000)
    rec = Recorder()
    region.map(0x100, 0x100, rec)
    assert region.read(0x100, 4) == bytes.fromhex("88776655")
    region.write(0x108, (0xDEADBEEFCAFEF00D).to_bytes(8, "little"))
    assert rec.log[-1] == ("w", 0x8, 8, 0xDEADBEEFCAFEF00D)
    rec.log.clear()
    region.write(0x101, b"\x01\x02\x03")  # unaligned: byte then halfword
    assert rec.log == [("w", 1, 1, 1), ("w", 2, 2, 0x0302)]
    # Outside any window: reads zero, writes ignored.
    assert region.read(0, 8) == bytes(8)
    region.write(0, b"\xff" * 8)
    # An access spanning the window edge is split at the edge.
    rec.log.clear()
    region.read(0xFE, 4)
    assert rec.log == [("r", 0, 2, 0)]


def test_bytes_handler_window() -> None:
    region = Region(0x2000)
    b = Bytes(0x1000)
    region.map(0x1000, 0x1000, b)
    region.write(0x1FFC, b"abcd")
    assert b.buf[-4:] == b"abcd"
    assert region.read(0xFFE, 6) == b"\0\0abcd"[:2] + bytes(b.buf[:4])


def test_region_bounds_and_overlap() -> None:
    region = Region(0x1000)
    for off, n in ((0x1000, 1), (0xFFF, 2), (-1, 1)):
        with pytest.raises(OSError) as exc:
            region.read(off, n)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            region.write(off, bytes(n))
    region.map(0, 0x100, Recorder())
    with pytest.raises(ValueError):
        region.map(0x80, 0x100, Recorder())
    with pytest.raises(ValueError):
        region.map(0xF00, 0x200, Recorder())


def test_memory_region_shared_mapping() -> None:
    mr = MemoryRegion(0x10000)
    info = mr.info(2)
    assert info.flags == REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP | REGION_FLAG_CAPS
    assert info.fd == mr.fd and info.offset == 0
    assert info.sparse_areas == [(0, 0x10000)]
    assert info.fd is not None
    # What QEMU does: map the fd at the sparse area and write through it.
    peer = mmap.mmap(info.fd, 0x10000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    peer[0x100:0x104] = b"qemu"
    assert mr.read(0x100, 4) == b"qemu"
    mr.write(0x200, b"vfiod")
    assert peer[0x200:0x205] == b"vfiod"
    mr.reset()
    assert peer[0x100:0x104] == bytes(4)
    peer.close()
    fd = mr.fd
    mr.close()
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF
    mr.close()  # idempotent


def test_memory_region_windows_are_excluded_from_sparse_areas() -> None:
    mr = MemoryRegion(8 * HOLE_ALIGN)
    rec = Recorder()
    mr.map(2 * HOLE_ALIGN, HOLE_ALIGN, rec)
    mr.map(7 * HOLE_ALIGN, HOLE_ALIGN, Recorder())
    areas = mr.info(0).sparse_areas
    assert areas == [(0, 2 * HOLE_ALIGN), (3 * HOLE_ALIGN, 4 * HOLE_ALIGN)]
    for off, size in areas:
        assert off % HOLE_ALIGN == 0 and size % HOLE_ALIGN == 0
    # Window accesses go to the handler, the rest to memory.
    mr.write(2 * HOLE_ALIGN + 4, b"\x01\x00\x00\x00")
    assert rec.log[-1] == ("w", 4, 4, 1)
    with pytest.raises(ValueError):
        mr.map(HOLE_ALIGN + 8, 16, Recorder())  # not page aligned
    mr.close()


def test_msix_in_memfd_bar_kept_off_the_mmap() -> None:
    fn = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
    bar = MemoryRegion(4 * HOLE_ALIGN)
    fn.add_bar(0, bar, BarSpec(bar.size, BarKind.MEM64))
    fn.add_msix(16, 0, 2 * HOLE_ALIGN, 0, 3 * HOLE_ALIGN)
    info = fn.region_info(0)
    assert info.sparse_areas == [(0, 2 * HOLE_ALIGN)]
    assert fn.region_info(1).size == 0  # upper half of the 64-bit BAR
    # Table is readable through the window: entry 0 vector control reset value = masked.
    assert fn.region_read(0, 2 * HOLE_ALIGN + 12, 4) == b"\x01\0\0\0"
    fn.close()
    with pytest.raises(ValueError):
        fn2 = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
        try:
            bar2 = MemoryRegion(4 * HOLE_ALIGN)
            fn2.add_bar(0, bar2)
            fn2.add_msix(16, 0, 2 * HOLE_ALIGN, 0, 2 * HOLE_ALIGN + 0x800)  # same page
        finally:
            fn2.close()


def test_msix_layout_checks() -> None:
    fn = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
    fn.add_bar(4, Region(0x1000))
    with pytest.raises(ValueError):
        fn.add_msix(8, 4, 0xFC0, 4, 0x800)  # table runs past the BAR
    with pytest.raises(ValueError):
        fn.add_msix(8, 4, 0, 4, 0x40)  # overlap
    with pytest.raises(ValueError):
        fn.add_msix(8, 4, 4, 4, 0x800)  # misaligned
    with pytest.raises(ValueError):
        fn.add_msix(8, 2, 0, 4, 0x800)  # no BAR 2
    assert fn.config.walk_caps()[-1][1] != 0x11  # failed attempts left no cap behind
    fn.close()


def test_function_region_indices() -> None:
    fn = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
    fn.add_bar(0, Region(0x1000))
    assert fn.num_regions == 9 and fn.num_irqs == 5 and fn.device_flags == 3
    cfg = fn.region_info(7)
    assert (cfg.size, cfg.flags) == (4096, REGION_FLAG_READ | REGION_FLAG_WRITE)
    for idx in (1, 2, 3, 4, 5, 6, 8):
        info = fn.region_info(idx)
        assert info.size == 0 and info.flags == 0 and info.index == idx
    for idx in (-1, 9, 100):
        with pytest.raises(OSError) as exc:
            fn.region_info(idx)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            fn.region_read(idx, 0, 4)
    with pytest.raises(OSError) as exc:
        fn.region_read(1, 0, 4)  # absent BAR
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        fn.region_write(0, 0xFFE, b"1234")
    assert len(fn.region_read(7, 0, 4096)) == 4096
    with pytest.raises(RuntimeError):
        fn.add_bar(2, Region(0x1000))  # sealed by the first session call
    fn.close()
