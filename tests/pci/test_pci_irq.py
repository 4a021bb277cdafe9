"""Interrupts with real eventfds: MSI-X masking/PBA, the q35 rule, INTx auto-mask, fd ownership."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import pytest
from eventfds import count

from vfiod.pci import PciFunction, Region
from vfiod.pci.constants import (
    IRQ_ERR,
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INTX,
    IRQ_MSI,
    IRQ_MSIX,
    IRQ_REQ,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    PCI_STATUS_INTERRUPT,
)

EVT = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
NONE_TRIGGER = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER
MASK = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK
UNMASK = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK
VECTORS = 4
TABLE = 0x000
PBA = 0x800


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
    f = PciFunction(vendor_id=0x7E57, device_id=2, class_code=0xFF0000)
    f.add_bar(0, Region(0x1000))
    f.add_msix(VECTORS, 0, TABLE, 0, PBA)
    f.seal()
    yield f
    f.close()


def msix_control(f: PciFunction, value: int) -> None:
    assert f.msix is not None
    f.region_write(7, f.msix.offset + 2, struct.pack("<H", value))


def pba(f: PciFunction) -> int:
    return int.from_bytes(f.region_read(0, PBA, 8), "little")


def install(f: PciFunction, index: int, start: int, n: int) -> list[int]:
    """Install n eventfds; return our own dups (the function owns the originals)."""
    originals = [efd() for _ in range(n)]
    ours = [os.dup(fd) for fd in originals]
    f.set_irqs(index, EVT, start, n, originals)
    return ours


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def test_irq_info(fn: PciFunction) -> None:
    assert fn.irq_info(IRQ_INTX).count == 1
    assert fn.irq_info(IRQ_INTX).flags == (
        IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
    )
    msix = fn.irq_info(IRQ_MSIX)
    assert msix.count == VECTORS and msix.flags & IRQ_INFO_EVENTFD
    assert fn.irq_info(IRQ_MSI).count == 0
    assert fn.irq_info(IRQ_ERR).count == 1
    assert fn.irq_info(IRQ_REQ).count == 0
    with pytest.raises(OSError) as exc:
        fn.irq_info(5)
    assert exc.value.errno == errno.EINVAL
    nopin = PciFunction(vendor_id=0x7E57, device_id=2, class_code=0xFF0000, interrupt_pin=0)
    assert nopin.irq_info(IRQ_INTX).count == 0
    nopin.close()


def test_q35_installed_fd_fires_without_unmask(fn: PciFunction) -> None:
    msix_control(fn, 0x8000)
    ours = install(fn, IRQ_MSIX, 0, VECTORS)
    # The table's reset value says "masked", but nobody wrote it: must not block delivery.
    assert fn.region_read(0, TABLE + 12, 4) == b"\x01\0\0\0"
    for v in range(VECTORS):
        assert fn.irq.fire_msix(v)
        assert count(ours[v]) == 1
    assert pba(fn) == 0
    close_all(ours)


def test_msix_disabled_drops(fn: PciFunction) -> None:
    ours = install(fn, IRQ_MSIX, 0, 1)
    assert not fn.irq.fire_msix(0)
    assert count(ours[0]) == 0 and pba(fn) == 0
    close_all(ours)


def test_explicit_mask_sets_pending_and_unmask_delivers(fn: PciFunction) -> None:
    msix_control(fn, 0x8000)
    ours = install(fn, IRQ_MSIX, 0, VECTORS)
    fn.set_irqs(IRQ_MSIX, MASK, 1, 2, [])
    assert not fn.irq.fire_msix(1)
    assert not fn.irq.fire_msix(2)
    assert fn.irq.fire_msix(0)
    assert [count(fd) for fd in ours] == [1, 0, 0, 0]
    assert pba(fn) == 0b110
    fn.set_irqs(IRQ_MSIX, UNMASK, 2, 1, [])
    assert [count(fd) for fd in ours] == [0, 0, 1, 0]
    assert pba(fn) == 0b010
    fn.set_irqs(IRQ_MSIX, UNMASK, 1, 1, [])
    assert count(ours[1]) == 1 and pba(fn) == 0
    close_all(ours)


def test_table_mask_bit_written_by_client(fn: PciFunction) -> None:
    msix_control(fn, 0x8000)
    ours = install(fn, IRQ_MSIX, 0, VECTORS)
    ctrl3 = TABLE + 3 * 16 + 12
    fn.region_write(0, ctrl3, b"\x01\0\0\0")  # pseries guest masks vector 3
    assert not fn.irq.fire_msix(3)
    assert count(ours[3]) == 0 and pba(fn) == 0b1000
    # An 8-byte write covering data + vector control (unmask) delivers the pending vector.
    fn.region_write(0, TABLE + 3 * 16 + 8, struct.pack("<IQ", 0x4321, 0)[:8])
    assert count(ours[3]) == 1 and pba(fn) == 0
    assert fn.irq.msix_table is not None
    assert fn.irq.msix_table.message(3)[1] == 0x4321
    close_all(ours)


def test_function_mask(fn: PciFunction) -> None:
    msix_control(fn, 0xC000)
    ours = install(fn, IRQ_MSIX, 0, 1)
    assert not fn.irq.fire_msix(0)
    assert pba(fn) == 1
    msix_control(fn, 0x8000)
    assert count(ours[0]) == 1 and pba(fn) == 0
    close_all(ours)


def test_fire_without_fd_is_pending_until_install(fn: PciFunction) -> None:
    msix_control(fn, 0x8000)
    fn.set_irqs(IRQ_MSIX, EVT, 0, 1, [])  # QEMU: "enable with no vector" (count 1, no fd)
    assert not fn.irq.fire_msix(0)
    assert pba(fn) == 1
    ours = install(fn, IRQ_MSIX, 0, 1)
    assert count(ours[0]) == 1 and pba(fn) == 0
    close_all(ours)


def test_deassign_run_and_replace_close_fds(fn: PciFunction) -> None:
    originals = [efd() for _ in range(VECTORS)]
    fn.set_irqs(IRQ_MSIX, EVT, 0, VECTORS, list(originals))
    assert all(not is_closed(fd) for fd in originals)
    fn.set_irqs(IRQ_MSIX, EVT, 1, 2, [])  # run of 2 with no fds = de-assign 1..2
    assert [is_closed(fd) for fd in originals] == [False, True, True, False]
    assert fn.irq.fd(IRQ_MSIX, 1) is None
    new = efd()
    fn.set_irqs(IRQ_MSIX, EVT, 0, 1, [new])  # replace vector 0
    assert is_closed(originals[0]) and fn.irq.fd(IRQ_MSIX, 0) == new
    fn.set_irqs(IRQ_MSIX, NONE_TRIGGER, 0, 0, [])  # disable whole index
    assert is_closed(new) and is_closed(originals[3])
    assert fn.irq.open_fds() == []


def test_reset_and_close_release_fds(fn: PciFunction) -> None:
    a, b, c = efd(), efd(), efd()
    fn.set_irqs(IRQ_MSIX, EVT, 0, 2, [a, b])
    fn.set_irqs(IRQ_INTX, EVT, 0, 1, [c])
    fn.reset()
    assert is_closed(a) and is_closed(b) and is_closed(c)
    d = efd()
    fn.set_irqs(IRQ_ERR, EVT, 0, 1, [d])
    fn.close()
    assert is_closed(d)


def test_no_fd_leak_across_many_set_irqs(fn: PciFunction) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        fn.set_irqs(IRQ_MSIX, EVT, 0, VECTORS, [efd() for _ in range(VECTORS)])
        fn.set_irqs(IRQ_MSIX, EVT, 2, 1, [])
    fn.set_irqs(IRQ_MSIX, NONE_TRIGGER, 0, 0, [])
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    ("index", "flags", "start", "n", "nfds"),
    [
        (5, EVT, 0, 1, 1),  # bad index
        (IRQ_MSIX, EVT, 3, 2, 2),  # beyond count
        (IRQ_MSIX, EVT, 0, 2, 1),  # fds but not one per sub-index
        (IRQ_MSIX, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 1, 0),
        (IRQ_MSIX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_MASK, 0, 1, 1),
        (IRQ_MSIX, EVT | IRQ_SET_ACTION_MASK, 0, 1, 1),  # two actions
        (IRQ_MSIX, MASK, 0, 1, 1),  # fds without DATA_EVENTFD
        (IRQ_MSI, EVT, 0, 1, 1),  # MSI not supported
    ],
)
def test_set_irqs_errors_close_fds(
    fn: PciFunction, index: int, flags: int, start: int, n: int, nfds: int
) -> None:
    fds = [efd() for _ in range(nfds)]
    with pytest.raises(OSError) as exc:
        fn.set_irqs(index, flags, start, n, fds)
    assert exc.value.errno == errno.EINVAL
    assert all(is_closed(fd) for fd in fds)


def test_disable_unsupported_index_is_harmless(fn: PciFunction) -> None:
    fn.set_irqs(IRQ_MSI, NONE_TRIGGER, 0, 0, [])
    fn.set_irqs(IRQ_REQ, NONE_TRIGGER, 0, 0, [])


def test_loopback_trigger(fn: PciFunction) -> None:
    msix_control(fn, 0x8000)
    ours = install(fn, IRQ_MSIX, 0, VECTORS)
    fn.set_irqs(IRQ_MSIX, NONE_TRIGGER, 1, 2, [])
    assert [count(fd) for fd in ours] == [0, 1, 1, 0]
    close_all(ours)


def test_intx_automask_and_unmask(fn: PciFunction) -> None:
    (ours,) = install(fn, IRQ_INTX, 0, 1)
    fn.irq.assert_intx()
    assert count(ours) == 1
    assert fn.config.peek(0x06, 2) & PCI_STATUS_INTERRUPT
    fn.irq.assert_intx()  # still auto-masked: nothing new
    assert count(ours) == 0
    fn.set_irqs(IRQ_INTX, UNMASK, 0, 1, [])  # EOI while the level is still high
    assert count(ours) == 1
    fn.irq.deassert_intx()
    assert not fn.config.peek(0x06, 2) & PCI_STATUS_INTERRUPT
    fn.set_irqs(IRQ_INTX, UNMASK, 0, 1, [])
    assert count(ours) == 0
    fn.irq.assert_intx()
    assert count(ours) == 1
    os.close(ours)


def test_intx_explicit_mask_and_disable_bit(fn: PciFunction) -> None:
    (ours,) = install(fn, IRQ_INTX, 0, 1)
    fn.set_irqs(IRQ_INTX, MASK, 0, 1, [])
    fn.irq.assert_intx()
    assert count(ours) == 0
    fn.set_irqs(IRQ_INTX, UNMASK, 0, 1, [])
    assert count(ours) == 1
    fn.irq.deassert_intx()
    fn.set_irqs(IRQ_INTX, UNMASK, 0, 1, [])
    fn.region_write(7, 0x04, struct.pack("<H", 0x400))  # COMMAND.INTX_DISABLE
    fn.irq.assert_intx()
    assert count(ours) == 0
    assert fn.config.peek(0x06, 2) & PCI_STATUS_INTERRUPT  # status still shows it
    fn.region_write(7, 0x04, struct.pack("<H", 0))
    assert count(ours) == 1
    os.close(ours)


def test_intx_resample_fd_is_owned(fn: PciFunction) -> None:
    r = efd()
    fn.set_irqs(IRQ_INTX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, 0, 1, [r])
    assert fn.irq.intx_unmask_fd == r
    fn.set_irqs(IRQ_INTX, NONE_TRIGGER, 0, 0, [])
    assert is_closed(r)


def test_err_eventfd(fn: PciFunction) -> None:
    (ours,) = install(fn, IRQ_ERR, 0, 1)
    assert fn.irq.signal_err()
    assert count(ours) == 1
    os.close(ours)


def test_pba_is_read_only(fn: PciFunction) -> None:
    msix_control(fn, 0xC000)
    fn.irq.fire_msix(2)
    fn.region_write(0, PBA, bytes(8))
    assert pba(fn) == 0b100
