"""MSI (the cap QEMU 11.1 can hot-unplug): layout, grant and folding, pending, fd ownership."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import pytest
from eventfds import count

from vfiod.devices.testdev import TestDevice
from vfiod.pci import MsiCap, PciFunction, Region
from vfiod.pci.caps import MSI_FLAGS_64BIT
from vfiod.pci.constants import (
    IRQ_INFO_EVENTFD,
    IRQ_INTX,
    IRQ_MSI,
    IRQ_MSIX,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    PCI_CAP_ID_MSI,
)

EVT = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
NONE_TRIGGER = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER
MASK = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK
UNMASK = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK
VECTORS = 4


def efd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)




def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return True
    return False


@pytest.fixture
def fn() -> Iterator[PciFunction]:
    f = PciFunction(vendor_id=0x7E57, device_id=3, class_code=0xFF0000)
    f.add_bar(0, Region(0x1000))
    f.add_msi(VECTORS)
    f.seal()
    yield f
    f.close()


def flags_of(f: PciFunction) -> int:
    assert f.msi is not None
    return struct.unpack("<H", f.region_read(7, f.msi.offset + 2, 2))[0]


def control(f: PciFunction, *, enable: bool = True, mme: int = 2) -> None:
    """Guest write of the Message Control word: enable bit and Multiple Message Enable."""
    assert f.msi is not None
    f.region_write(7, f.msi.offset + 2, struct.pack("<H", int(enable) | (mme << 4)))


def install(f: PciFunction, start: int, n: int) -> list[int]:
    originals = [efd() for _ in range(n)]
    ours = [os.dup(fd) for fd in originals]
    f.set_irqs(IRQ_MSI, EVT, start, n, originals)
    return ours


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def test_cap_layout_and_write_masks(fn: PciFunction) -> None:
    assert fn.msi is not None and fn.msix is None and fn.vectors == VECTORS
    off = fn.msi.offset
    assert fn.config.caps[PCI_CAP_ID_MSI] == off
    assert fn.region_read(7, off, 1) == bytes([PCI_CAP_ID_MSI])
    assert flags_of(fn) == MSI_FLAGS_64BIT | (2 << 1)  # 64-bit, asks for 4, disabled
    # Only enable and MME are writable; MMC and the 64-bit bit stay.
    fn.region_write(7, off + 2, b"\xff\xff")
    assert flags_of(fn) == MSI_FLAGS_64BIT | (2 << 1) | 0x1 | 0x70
    fn.region_write(7, off + 4, b"\xff\xff\xff\xff\xff\xff\xff\xff\x34\x12")
    assert fn.region_read(7, off + 4, 10) == b"\xfc\xff\xff\xff\xff\xff\xff\xff\x34\x12"
    info = fn.irq_info(IRQ_MSI)
    assert info.count == VECTORS and info.flags & IRQ_INFO_EVENTFD
    assert fn.irq_info(IRQ_MSIX).count == 0


@pytest.mark.parametrize("vectors", [0, 3, 64])
def test_vector_counts_are_powers_of_two_up_to_32(vectors: int) -> None:
    f = PciFunction(vendor_id=0x7E57, device_id=3, class_code=0xFF0000)
    with pytest.raises(ValueError):
        f.add_msi(vectors)
    f.close()


def test_disabled_msi_drops_and_enabled_delivers(fn: PciFunction) -> None:
    ours = install(fn, 0, VECTORS)
    assert not fn.irq.msg_enabled
    assert not fn.irq.fire_msi(1)
    assert [count(fd) for fd in ours] == [0, 0, 0, 0]
    control(fn)
    assert fn.irq.msi_enabled and fn.irq.msg_enabled and not fn.irq.msix_enabled
    for v in range(VECTORS):
        assert fn.irq.fire_vector(v)
    assert [count(fd) for fd in ours] == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        fn.irq.fire_msi(VECTORS)
    close_all(ours)


def test_fewer_vectors_granted_fold_onto_the_granted_ones(fn: PciFunction) -> None:
    ours = install(fn, 0, VECTORS)
    control(fn, mme=1)  # 2 of 4
    assert fn.msi is not None and fn.msi.granted == 2
    for v in range(VECTORS):
        fn.irq.fire_msi(v)
    assert [count(fd) for fd in ours] == [2, 2, 0, 0]
    control(fn, mme=0)  # single message: everything on vector 0
    for v in range(VECTORS):
        fn.irq.fire_msi(v)
    assert [count(fd) for fd in ours] == [4, 0, 0, 0]
    control(fn, mme=7)  # more than asked for: still the 4 the function has
    assert fn.msi.granted == VECTORS
    close_all(ours)


def test_pending_until_fd_installed_or_unmasked(fn: PciFunction) -> None:
    control(fn)
    assert not fn.irq.fire_msi(2)  # no eventfd yet: owed, not lost
    ours = install(fn, 0, VECTORS)
    assert [count(fd) for fd in ours] == [0, 0, 1, 0]
    fn.set_irqs(IRQ_MSI, MASK, 1, 1, [])
    assert not fn.irq.fire_msi(1)
    assert fn.irq.fire_msi(3)
    assert [count(fd) for fd in ours] == [0, 0, 0, 1]
    fn.set_irqs(IRQ_MSI, UNMASK, 1, 1, [])
    assert [count(fd) for fd in ours] == [0, 1, 0, 0]
    close_all(ours)


def test_pending_waits_for_enable(fn: PciFunction) -> None:
    ours = install(fn, 0, 1)
    control(fn)
    fn.set_irqs(IRQ_MSI, MASK, 0, 1, [])
    fn.irq.fire_msi(0)
    control(fn, enable=False)
    fn.set_irqs(IRQ_MSI, UNMASK, 0, 1, [])
    assert count(ours[0]) == 0  # disabled: nothing goes out
    control(fn)
    assert count(ours[0]) == 1  # the enable write flushes what was owed
    close_all(ours)


def test_fd_ownership_replace_disable_reset(fn: PciFunction) -> None:
    control(fn)
    first = [efd(), efd()]
    fn.set_irqs(IRQ_MSI, EVT, 0, 2, first)
    second = efd()
    fn.set_irqs(IRQ_MSI, EVT, 0, 1, [second])
    assert is_closed(first[0]) and not is_closed(first[1])
    fn.irq.set_irqs(IRQ_MSI, MASK, 1, 1, [])
    fn.irq.fire_msi(1)
    fn.set_irqs(IRQ_MSI, NONE_TRIGGER, 0, 0, [])  # disable the index (QEMU's MSI off)
    assert is_closed(second) and is_closed(first[1])
    assert fn.irq.msi_pending == [False] * VECTORS
    third = efd()
    fn.set_irqs(IRQ_MSI, EVT, 3, 1, [third])
    fn.reset()
    assert is_closed(third) and not fn.irq.msi_enabled
    assert fn.irq.open_fds() == []
    with pytest.raises(OSError) as exc:
        fn.set_irqs(IRQ_MSI, EVT, 3, 2, [efd(), efd()])  # beyond the 4 vectors
    assert exc.value.errno == errno.EINVAL


def test_raise_irq_prefers_msi_over_intx(fn: PciFunction) -> None:
    intx = efd()
    ours_intx = os.dup(intx)
    fn.set_irqs(IRQ_INTX, EVT, 0, 1, [intx])
    ours = install(fn, 0, VECTORS)
    fn.raise_irq(1)
    assert count(ours_intx) == 1 and count(ours[1]) == 0
    fn.irq.deassert_intx()
    fn.irq.intx_unmask()
    control(fn)
    fn.raise_irq(1)
    assert count(ours[1]) == 1 and count(ours_intx) == 0
    close_all([*ours, ours_intx])


def test_testdev_msi_variant_doorbell() -> None:
    """TestDevice(msix=False): no MSI-X and no BAR4; doorbells raise MSI vectors."""
    dev = TestDevice(msix=False)
    try:
        assert dev.msix is None and isinstance(dev.msi, MsiCap) and dev.vectors == 8
        assert dev.region_info(4).size == 0
        dev.region_write(7, 0x04, struct.pack("<H", 0x6))
        control(dev, mme=3)
        ours = install(dev, 0, 8)
        dev.region_write(0, 0x0C, struct.pack("<I", 5))
        dev.region_write(0, 0x0C, struct.pack("<I", 9))  # beyond the vectors: ignored
        assert [count(fd) for fd in ours] == [0, 0, 0, 0, 0, 1, 0, 0]
        assert dev.registers.doorbells == 2
        close_all(ours)
    finally:
        dev.close()
