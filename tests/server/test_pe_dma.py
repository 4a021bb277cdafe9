"""PeDma: DMA_MAP/DMA_UNMAP as TCE updates in a PE's windows, device DMA through the PE."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vfiod import spapr
from vfiod.pci.dma import DmaFault
from vfiod.spapr.pe_dma import MIN_WINDOW, ClientMemory, PeDma

R, W, RW = 1, 2, 3
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DMA64 = spapr.DMA64_WINDOW_START
TABLE_2G = spapr.get_table_size(12, 2 * GiB, 1)  # charge of one 2 GiB / 4 KiB window


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Ram:
    """A memfd standing in for guest RAM; ``fd()`` hands out a dup as QEMU sends a new fd."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.memfd = os.memfd_create("pe-dma-test", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, size)

    def fd(self) -> int:
        return os.dup(self.memfd)

    def read(self, off: int, n: int) -> bytes:
        return os.pread(self.memfd, n, off)

    def write(self, off: int, data: bytes) -> None:
        os.pwrite(self.memfd, data, off)

    def close(self) -> None:
        os.close(self.memfd)


@pytest.fixture
def ram() -> Iterator[Ram]:
    r = Ram(4 * MiB)
    yield r
    r.close()


@pytest.fixture
def phb() -> spapr.Phb:
    return spapr.Phb(index=0)


@pytest.fixture
def space() -> spapr.AddressSpace:
    """The host's address space: shared by every client of a test, as in the daemon."""
    return spapr.AddressSpace()


@pytest.fixture
def dma(phb: spapr.Phb, space: spapr.AddressSpace) -> Iterator[PeDma]:
    d = PeDma(phb, phb.new_pe(), ClientMemory(spapr.Client(), space))
    yield d
    d.close()


def thaw(pe: spapr.Pe) -> None:
    """The guest's EEH recovery: thaw IO, hot reset, deactivate."""
    assert pe.eeh_op(spapr.VFIO_EEH_PE_UNFREEZE_IO) == 0
    assert pe.eeh_op(spapr.VFIO_EEH_PE_RESET_HOT) == 0
    assert pe.eeh_op(spapr.VFIO_EEH_PE_RESET_DEACTIVATE) == 0
    assert pe.eeh_state == spapr.EEH_PE_STATE_NORMAL


# -- map / unmap semantics ------------------------------------------------------------------


def test_map_is_tce_update_and_dma_goes_through_it(dma: PeDma, ram: Ram) -> None:
    ram.write(0x5000, b"hello from the guest")
    dma.map(0x10000, 0x4000, 0x4000, RW, ram.fd())
    w = dma.window(0)
    assert w is not None and w.start == 0 and w.size == 2 * GiB and w.page_shift == 12
    file = dma.files[0]
    assert w.get(0x11000) == (file.vaddr + 0x5000) | RW  # one TCE per 4 KiB page
    assert w.get(0x14000) == 0
    assert dma.read(0x11000, 20) == b"hello from the guest"
    dma.write(0x13FF0, b"x" * 16)
    assert ram.read(0x7FF0, 16) == b"x" * 16
    assert dma.mapped_bytes == 0x4000 and dma.backing_count == 1


def test_replace_split_and_unmap_of_never_mapped(dma: PeDma, ram: Ram) -> None:
    ram.write(0, b"A" * 0x10000)
    ram.write(0x100000, b"B" * 0x4000)
    dma.map(0, 0x10000, 0, RW, ram.fd())
    dma.map(0x4000, 0x4000, 0x100000, RW, ram.fd())  # replaces the middle: no EEXIST
    assert dma.mapped_bytes == 0x10000 and dma.backing_count == 1
    assert dma.read(0x3FFE, 4) == b"AABB"
    assert dma.unmap(0x9000, 0x1000) == 0x1000  # splits the last piece
    assert dma.mapped_bytes == 0xF000
    assert dma.read(0x8000, 0x1000) == b"A" * 0x1000
    assert dma.read(0xA000, 0x1000) == b"A" * 0x1000
    # never mapped, inside and outside every window: success, nothing changes
    assert dma.unmap(0x100000, 0x1000) == 0
    assert dma.unmap(0x1_0000_0000, 0x10000) == 0
    assert dma.unmap(DMA64 + 0x1000, 0x1000) == 0
    assert dma.mapped_bytes == 0xF000 and dma.pe.eeh_state == 0
    with pytest.raises(DmaFault):
        dma.read(0x9000, 1)  # the hole left by the split
    assert dma.pe.eeh_state == spapr.EEH_PE_STATE_STOPPED_IO_DMA
    thaw(dma.pe)
    # one unmap covering several maps and the gaps between them
    assert dma.unmap(0, 0x20000) == 0xF000
    assert dma.mapped_bytes == 0
    w = dma.window(0)
    assert w is not None and all(w.get(a) == 0 for a in range(0, 0x10000, 0x1000))


def test_unmap_all(dma: PeDma, ram: Ram) -> None:
    dma.map(0, 0x10000, 0, RW, ram.fd())
    dma.map(DMA64, 0x10000, 0, RW, ram.fd())
    dma.unmap_all()
    assert dma.mapped_bytes == 0
    assert dma.backing_count == 1  # the registration stays while the client lives
    for iova in (0, DMA64):
        with pytest.raises(DmaFault):
            dma.read(iova, 4)
        thaw(dma.pe)
    dma.map(0, 0x1000, 0, RW, ram.fd())  # and maps work again
    assert dma.read(0, 4) == b"\0" * 4


def test_malformed_maps_change_nothing_and_close_their_fd(dma: PeDma, ram: Ram) -> None:
    before = open_fd_count()
    bad = [
        (0, 0x1000, 0, 0, errno.EINVAL),  # neither READ nor WRITE
        (0, 0x1000, 0, 4, errno.EINVAL),  # unknown flag
        (0, 0, 0, RW, errno.EINVAL),  # empty
        (0x800, 0x1000, 0, RW, errno.EINVAL),  # unaligned iova
        (0, 0x800, 0, RW, errno.EINVAL),  # unaligned size
        (0, 0x1000, 0x800, RW, errno.EINVAL),  # unaligned offset
        (0, 0x1000, ram.size, RW, errno.EINVAL),  # beyond the file
        ((1 << 64) - 0x1000, 0x2000, 0, RW, errno.EINVAL),  # wraps
        (2 * GiB - 0x1000, 0x2000, 0, RW, errno.EINVAL),  # crosses the 32-bit window end
        (2 * GiB, 0x1000, 0, RW, errno.ENXIO),  # between the windows
        (1 << 40, 0x1000, 0, RW, errno.ENXIO),
        (DMA64 - 0x1000, 0x1000, 0, RW, errno.ENXIO),
        (DMA64 + (1 << 54), 0x1000, 0, RW, errno.ENXIO),  # past the largest 64-bit window
    ]
    for iova, size, offset, prot, err in bad:
        with pytest.raises(OSError) as exc:
            dma.map(iova, size, offset, prot, ram.fd())
        assert exc.value.errno == err, (hex(iova), hex(size))
    # a map without an fd (QEMU's ROM blobs) is accepted but backs nothing: DMA there faults
    dma.map(0, 0x1000, 0, RW, None)
    with pytest.raises(DmaFault):
        dma.read(0, 4)
    with pytest.raises(OSError) as exc:
        dma.map(1 << 40, 0x1000, 0, RW, None)  # still outside every window
    assert exc.value.errno == errno.ENXIO
    dma.pe.eeh_op(spapr.VFIO_EEH_PE_UNFREEZE_IO)
    dma.pe.eeh_op(spapr.VFIO_EEH_PE_UNFREEZE_DMA)
    rfd, wfd = os.pipe()
    os.close(wfd)
    with pytest.raises(OSError) as exc:
        dma.map(0, 0x1000, 0, RW, rfd)
    assert exc.value.errno == errno.EINVAL
    for iova, size in [(0x800, 0x1000), (0, 0x800), (0, 0), ((1 << 64) - 0x1000, 0x2000)]:
        with pytest.raises(OSError) as exc:
            dma.unmap(iova, size)
        assert exc.value.errno == errno.EINVAL
    assert open_fd_count() == before
    assert dma.mapped_bytes == 0 and dma.backing_count == 0 and dma.window(1) is None
    assert dma.client.locked_bytes == TABLE_2G


def test_read_only_file(dma: PeDma, ram: Ram) -> None:
    ro = os.open(f"/proc/self/fd/{ram.memfd}", os.O_RDONLY)
    with pytest.raises(OSError) as exc:
        dma.map(0, 0x1000, 0, RW, os.dup(ro))
    assert exc.value.errno == errno.EACCES
    dma.map(0, 0x1000, 0, R, ro)
    ram.write(0, b"ro")
    assert dma.read(0, 2) == b"ro"
    with pytest.raises(DmaFault):
        dma.write(0, b"no")
    assert ram.read(0, 2) == b"ro"


# -- windows ----------------------------------------------------------------------------------


def test_power8_windows(dma: PeDma, ram: Ram) -> None:
    w0 = dma.window(0)
    assert w0 is not None and (w0.start, w0.size) == (0, 2 * GiB)
    assert dma.window(1) is None  # the 64-bit window comes with the first map inside it
    assert dma.pe.windows[0] is w0
    ram.write(0x2000, b"dma64")
    dma.map(DMA64, 0x10000, 0, RW, ram.fd())
    w1 = dma.window(1)
    assert w1 is not None and w1.start == DMA64 and w1.size == MIN_WINDOW
    assert dma.pe.windows[1] is w1
    assert dma.read(DMA64 + 0x2000, 5) == b"dma64"
    # a map beyond its end grows it; what was mapped stays mapped
    dma.map(DMA64 + 8 * GiB, 0x1000, 0x2000, R, ram.fd())
    w1 = dma.window(1)
    assert w1 is not None and w1.start == DMA64 and w1.size == 16 * GiB
    assert dma.pe.windows[1] is w1
    assert dma.read(DMA64 + 0x2000, 5) == b"dma64"
    assert dma.read(DMA64 + 8 * GiB, 5) == b"dma64"
    charged = TABLE_2G + spapr.get_table_size(12, 16 * GiB, 1) + dma.client.page_size * 64
    assert dma.client.locked_bytes == charged  # 4 MiB of RAM + both tables
    assert dma.unmap(DMA64, 0x10000) == 0x10000
    with pytest.raises(DmaFault):
        dma.read(DMA64 + 0x2000, 1)


def test_flat_window(phb: spapr.Phb, ram: Ram) -> None:
    dma = PeDma(phb, phb.new_pe(), ClientMemory(spapr.Client()), policy="flat")
    try:
        assert dma.window(0) is None and dma.window(1) is None
        ram.write(0x3000, b"flat")
        dma.map(0, 0xA0000, 0, RW, ram.fd())  # low RAM
        w = dma.window(0)
        assert w is not None and w.start == 0 and w.size == MIN_WINDOW
        dma.map(100 * GiB, 0x100000, 0, RW, ram.fd())  # RAM high up: the window grows
        w = dma.window(0)
        assert w is not None and w.start == 0 and w.size == 128 * GiB
        assert dma.read(0x3000, 4) == b"flat" and dma.read(100 * GiB + 0x3000, 4) == b"flat"
        # storage stays proportional to what is mapped, not to the window
        assert w.table.allocated_bytes <= 2 * 4 * KiB
        with pytest.raises(OSError) as exc:
            dma.map(1 << 54, 0x1000, 0, RW, ram.fd())
        assert exc.value.errno == errno.ENXIO
        assert dma.unmap(DMA64, 0x1000) == 0
    finally:
        dma.close()


def test_bad_policy(phb: spapr.Phb) -> None:
    with pytest.raises(ValueError):
        PeDma(phb, phb.new_pe(), ClientMemory(spapr.Client()), policy="x86")


# -- permissions, faults, EEH ----------------------------------------------------------------------


def test_permissions(dma: PeDma, ram: Ram) -> None:
    dma.map(0, 0x1000, 0, R, ram.fd())
    dma.map(0x1000, 0x1000, 0x1000, W, ram.fd())
    ram.write(0, b"readable")
    assert dma.read(0, 8) == b"readable"
    dma.write(0x1000, b"writable")
    assert ram.read(0x1000, 8) == b"writable"
    with pytest.raises(DmaFault) as exc:
        dma.write(0, b"nope")
    assert exc.value.write and exc.value.iova == 0
    assert ram.read(0, 8) == b"readable"
    thaw(dma.pe)
    with pytest.raises(DmaFault):
        dma.read(0x1000, 8)  # W only: no read (no PowerNV-style W -> R|W promotion)
    thaw(dma.pe)


def test_fault_freezes_the_pe_and_touches_no_memory(dma: PeDma, ram: Ram) -> None:
    dma.map(0, 0x2000, 0, RW, ram.fd())
    assert not dma.mmio_frozen and not dma.access_blocked(0)
    with pytest.raises(DmaFault) as exc:
        dma.write(0x1000, b"\xaa" * 0x2000)  # first half mapped, second half not
    assert exc.value.iova == 0x2000
    assert ram.read(0x1000, 0x1000) == b"\0" * 0x1000  # nothing written, not even the start
    pe = dma.pe
    assert pe.eeh_state == spapr.EEH_PE_STATE_STOPPED_IO_DMA
    assert dma.mmio_frozen and dma.access_blocked(0) and dma.access_blocked(5)
    assert not dma.access_blocked(7)  # config space stays readable while frozen
    with pytest.raises(DmaFault):
        dma.read(0, 4)  # DMA stays stopped, even where mapped
    # EEH recovery through the container (VFIO_EEH_PE_OP), step by step
    assert dma.eeh_op(spapr.VFIO_EEH_PE_GET_STATE) == spapr.EEH_PE_STATE_STOPPED_IO_DMA
    dma.eeh_op(spapr.VFIO_EEH_PE_UNFREEZE_IO)
    assert not dma.mmio_frozen
    dma.eeh_op(spapr.VFIO_EEH_PE_RESET_HOT)
    assert dma.mmio_frozen and dma.access_blocked(7)  # config blocked during the reset
    dma.eeh_op(spapr.VFIO_EEH_PE_RESET_DEACTIVATE)
    assert not dma.access_blocked(0) and not dma.access_blocked(7)
    dma.write(0x1000, b"ok")
    assert ram.read(0x1000, 2) == b"ok"


def test_device_reset_thaws(dma: PeDma, ram: Ram) -> None:
    with pytest.raises(DmaFault):
        dma.read(0, 4)
    assert dma.mmio_frozen
    dma.device_reset()
    assert not dma.mmio_frozen and dma.pe.eeh_state == 0


def test_dma_after_unmap_faults(dma: PeDma, ram: Ram) -> None:
    dma.map(0x100000, 0x10000, 0, RW, ram.fd())
    dma.write(0x100000, b"before")
    dma.unmap(0x100000, 0x10000)
    with pytest.raises(DmaFault):
        dma.write(0x100000, b"after!")
    assert ram.read(0, 6) == b"before"
    assert dma.pe.frozen


def test_shrunk_client_file_is_a_fault_not_a_crash(dma: PeDma, ram: Ram) -> None:
    dma.map(0, 0x10000, 0, RW, ram.fd())
    os.ftruncate(ram.memfd, 0x4000)
    assert dma.read(0, 4) == b"\0" * 4
    with pytest.raises(DmaFault):
        dma.read(0x8000, 4)
    assert dma.pe.frozen
    thaw(dma.pe)
    with pytest.raises(DmaFault):
        dma.write(0x3000, b"\1" * 0x2000)
    assert ram.read(0x3000, 0x1000) == b"\0" * 0x1000  # checked before any byte moved


def test_other_pe_is_isolated(phb: spapr.Phb, ram: Ram) -> None:
    memory = ClientMemory(spapr.Client())
    a = PeDma(phb, phb.new_pe(), memory)
    b = PeDma(phb, phb.new_pe(), memory)
    try:
        a.map(0, 0x1000, 0, RW, ram.fd())
        with pytest.raises(DmaFault):
            b.read(0, 4)
        assert b.pe.frozen and not a.pe.frozen
        assert a.read(0, 4) == b"\0" * 4
    finally:
        a.close()
        b.close()


# -- accounting and lifetime ----------------------------------------------------------------------


def test_same_file_charged_once_per_client(ram: Ram) -> None:
    phbs = [spapr.Phb(index=0), spapr.Phb(index=1)]
    client = spapr.Client(memlock_limit=64 * MiB)
    memory = ClientMemory(client)
    dmas = [PeDma(phbs[0], phbs[0].new_pe(), memory), PeDma(phbs[0], phbs[0].new_pe(), memory),
            PeDma(phbs[1], phbs[1].new_pe(), memory)]  # fmt: skip
    try:
        for i, d in enumerate(dmas):
            d.map(i * 0x10000, 0x10000, 0, RW, ram.fd())  # a new fd number every time
            d.map(0x100000, ram.size, 0, RW, ram.fd())
        assert client.locked_bytes == ram.size + 3 * TABLE_2G
        assert len(client.regions) == 1
        dmas[0].write(0x100000, b"shared")
        assert dmas[2].read(0x100000, 6) == b"shared"
        dmas[0].close()
        assert client.locked_bytes == ram.size + 2 * TABLE_2G  # still registered by the others
        assert dmas[1].read(0x100000, 6) == b"shared"
        dmas[1].close()
        dmas[2].close()
        assert client.locked_bytes == 0 and not client.regions
    finally:
        for d in dmas:
            d.close()


def test_other_client_is_charged_separately(
    phb: spapr.Phb, ram: Ram, space: spapr.AddressSpace
) -> None:
    a, b = spapr.Client(), spapr.Client()
    da = PeDma(phb, phb.new_pe(), ClientMemory(a, space))
    db = PeDma(phb, phb.new_pe(), ClientMemory(b, space))
    try:
        da.map(0, ram.size, 0, RW, ram.fd())
        db.map(0, ram.size, 0, RW, ram.fd())
        assert a.locked_bytes == b.locked_bytes == ram.size + TABLE_2G
    finally:
        da.close()
        db.close()


def test_enomem_over_the_limit_changes_nothing(phb: spapr.Phb) -> None:
    small, big = Ram(1 * MiB), Ram(16 * MiB)
    client = spapr.Client(memlock_limit=TABLE_2G + 4 * MiB)
    dma = PeDma(phb, phb.new_pe(), ClientMemory(client))
    try:
        dma.map(0, 0x10000, 0, RW, small.fd())
        locked = client.locked_bytes
        assert locked == TABLE_2G + 1 * MiB
        fds = open_fd_count()
        with pytest.raises(OSError) as exc:
            dma.map(0x100000, 0x10000, 0, RW, big.fd())  # registering 16 MiB: over the limit
        assert exc.value.errno == errno.ENOMEM
        assert client.locked_bytes == locked and dma.mapped_bytes == 0x10000
        assert dma.backing_count == 1
        assert open_fd_count() == fds
        w = dma.window(0)
        assert w is not None and w.get(0x100000) == 0
        # the 64-bit window's table (8 MiB for 2 GiB) does not fit either: nothing changes
        with pytest.raises(OSError) as exc:
            dma.map(DMA64, 0x10000, 0, RW, small.fd())
        assert exc.value.errno == errno.ENOMEM
        assert dma.window(1) is None and client.locked_bytes == locked
        assert open_fd_count() == fds
        # a fresh file failing on the window table is unregistered again
        tiny = Ram(64 * KiB)
        with pytest.raises(OSError):
            dma.map(DMA64, 0x10000, 0, RW, tiny.fd())
        tiny.close()
        assert client.locked_bytes == locked and dma.backing_count == 1
        assert len(client.regions) == 1
        assert dma.read(0, 4) == b"\0" * 4
    finally:
        dma.close()
        small.close()
        big.close()
    assert client.locked_bytes == 0


def test_close_releases_everything(phb: spapr.Phb) -> None:
    before = open_fd_count()
    ram = Ram(1 * MiB)
    pe = phb.new_pe()
    client = spapr.Client()
    memory = ClientMemory(client)
    dma = PeDma(phb, pe, memory)
    dma.map(0, 0x1000, 0, RW, ram.fd())
    one_file = open_fd_count()  # Python's mmap keeps a dup of its own: 2 fds per file
    for i in range(1, 100):
        dma.map(i * 0x1000, 0x1000, i * 0x1000, RW, ram.fd())
    assert open_fd_count() == one_file  # every duplicate fd was closed at once
    other = Ram(64 * KiB)
    dma.map(DMA64, 0x1000, 0, RW, other.fd())
    assert dma.backing_count == 2 and len(phb.memory.regions) == 2
    with pytest.raises(DmaFault):
        dma.read(1 * MiB, 1)
    dma.close()
    dma.close()  # idempotent
    assert open_fd_count() == before + 2
    assert client.locked_bytes == 0 and not phb.memory.regions
    assert pe.container is None and not pe.frozen
    w = pe.windows[0]
    assert w is not None and w.default and pe.windows[1] is None  # the platform's again
    with pytest.raises(OSError):
        dma.map(0, 0x1000, 0, RW, ram.fd())
    ram.close()
    other.close()
    assert open_fd_count() == before
    # the PE can be given to the next client
    again = PeDma(phb, pe, memory)
    again.close()
    assert memory.space.in_use == 0  # every host address range was given back


# -- scale: a guest IOMMU maps every 4 KiB page; a pseries guest clears its window at boot -----


def test_many_live_maps_and_never_mapped_unmaps_stay_cheap(dma: PeDma) -> None:
    n = 50_000
    ram = Ram(n * 4 * KiB)
    try:
        base = 1 * GiB
        t0 = time.perf_counter()
        for i in range(n):
            dma.map(base + i * 0x1000, 0x1000, i * 0x1000, RW, ram.fd())
        t_map = time.perf_counter() - t0
        assert dma.mapped_bytes == n * 0x1000 and dma.backing_count == 1
        w = dma.window(0)
        assert w is not None
        assert w.table.allocated_bytes <= (n // 512 + 2) * 4 * KiB  # ~ 8 bytes per live map
        ram.write(123 * 0x1000 + 7, b"page 123")
        assert dma.read(base + 123 * 0x1000 + 7, 8) == b"page 123"

        # the boot-time clear of a 1 GiB default window: 262,144 4 KiB unmaps of nothing
        t0 = time.perf_counter()
        for i in range(262_144):
            dma.unmap(i * 0x1000, 0x1000)
        t_unmap = time.perf_counter() - t0
        assert dma.mapped_bytes == n * 0x1000
        assert dma.read(base + 123 * 0x1000 + 7, 8) == b"page 123"

        # I/O behind a guest IOMMU: map, DMA, unmap, with the 50,000 maps still live
        pairs = 20_000
        fd = ram.fd()
        t0 = time.perf_counter()
        for i in range(pairs):
            iova = 0x1000 * (i % 1024)
            dma.map(iova, 0x1000, 0, RW, os.dup(fd))
            dma.unmap(iova, 0x1000)
        t_pairs = time.perf_counter() - t0
        os.close(fd)
        assert dma.mapped_bytes == n * 0x1000

        t0 = time.perf_counter()
        assert dma.unmap(base, n * 0x1000) == n * 0x1000
        t_big = time.perf_counter() - t0
        assert dma.mapped_bytes == 0 and w.get(base + 0x1000) == 0
        print(
            f"\nPeDma: {n} live 4K maps {t_map:.2f} s ({n / t_map:,.0f}/s); "
            f"262,144 never-mapped unmaps {t_unmap:.2f} s ({262_144 / t_unmap:,.0f}/s); "
            f"map+unmap pairs {pairs / t_pairs:,.0f}/s; one unmap of {n} maps {t_big * 1e3:.1f} ms"
        )
    finally:
        ram.close()


# -- zero-copy: iovecs ----------------------------------------------------------------------------


def test_iovecs_translates_the_whole_list_once(
    dma: PeDma, ram: Ram, monkeypatch: pytest.MonkeyPatch
) -> None:
    # IOVA pages 0..7 -> file pages 7..0 (reversed), so no two host pieces merge.
    for i in range(8):
        dma.map(i * 0x1000, 0x1000, (7 - i) * 0x1000, RW, ram.fd())
    calls: list[Sequence[tuple[int, int]]] = []
    real = spapr.Window.translate_raw

    def spy(
        self: spapr.Window, sg: Sequence[tuple[int, int]], write: bool, memory: spapr.HostMemory
    ) -> list[tuple[int, int, int]]:
        calls.append(sg)
        return real(self, sg, write, memory)

    monkeypatch.setattr(spapr.Window, "translate_raw", spy)
    pieces = [(0x800, 0x1000), (0x3000, 0x10), (0x5000, 0x2000)]
    with dma.iovecs(pieces, write=True) as views:
        assert [v.nbytes for v in views] == [0x800, 0x800, 0x10, 0x1000, 0x1000]
        assert all(not v.readonly for v in views)
        os.preadv(ram.memfd, views, 0)  # the kernel fills guest RAM from "the disk"
    assert len(calls) == 1 and list(calls[0]) == pieces  # one C translation for the list
    with pytest.raises(ValueError):
        views[0].tobytes()  # released when the block ended
    assert not dma.pe.frozen


def test_iovecs_data_lands_in_the_client_file(dma: PeDma, ram: Ram, tmp_path: Path) -> None:
    dma.map(0x10000, 0x4000, 0x4000, RW, ram.fd())
    disk = os.open(tmp_path / "disk", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(disk, bytes(range(256)) * 32, 0)
        with dma.iovecs([(0x10100, 0x1000), (0x12000, 0x1000)], write=True) as views:
            assert os.preadv(disk, views, 0) == 0x2000
        assert ram.read(0x4100, 0x1000) + ram.read(0x6000, 0x1000) == bytes(range(256)) * 32
        ram.write(0x5000, b"guest data" * 100)
        with dma.iovecs([(0x11000, 1000)], write=False) as views:
            assert os.pwritev(disk, views, 0x10000) == 1000
        assert os.pread(disk, 1000, 0x10000) == (b"guest data" * 100)[:1000]
    finally:
        os.close(disk)


def test_iovecs_permissions_and_faults_freeze_before_lending(dma: PeDma, ram: Ram) -> None:
    dma.map(0, 0x1000, 0, R, ram.fd())
    dma.map(0x1000, 0x1000, 0x1000, W, ram.fd())
    dma.map(0x2000, 0x1000, 0x2000, RW, ram.fd())
    with dma.iovecs([(0, 0x1000)], write=False) as views:
        assert views[0].nbytes == 0x1000
    with dma.iovecs([(0x1000, 0x1000)], write=True):
        pass
    assert not dma.pe.frozen
    with pytest.raises(DmaFault):
        dma.iovecs([(0x2000, 0x100), (0, 0x100)], write=True)  # R-only piece, device writes
    assert dma.pe.frozen
    thaw(dma.pe)
    with pytest.raises(DmaFault):
        dma.iovecs([(0x2000, 0x100), (0x1000, 0x100)], write=False)  # W-only piece, device reads
    assert dma.pe.frozen
    thaw(dma.pe)
    with pytest.raises(DmaFault):
        dma.iovecs([(0x2000, 0x100), (0x5000, 0x100), (0x2100, 0x10)], write=False)  # unmapped
    assert dma.pe.frozen
    with pytest.raises(DmaFault):  # frozen: every DMA faults
        dma.iovecs([(0x2000, 0x100)], write=False)


def test_iovecs_efault_in_the_block_is_a_fault(dma: PeDma, ram: Ram) -> None:
    dma.map(0, 0x10000, 0, RW, ram.fd())
    os.ftruncate(ram.memfd, 0x4000)
    src = os.memfd_create("src", os.MFD_CLOEXEC)
    try:
        os.pwrite(src, b"\1" * 0x1000, 0)
        with pytest.raises(DmaFault, match="shrank"):
            with dma.iovecs([(0x8000, 0x1000)], write=True) as views:
                os.preadv(src, views, 0)  # the kernel meets the hole: EFAULT, no SIGBUS
        assert dma.pe.frozen
    finally:
        os.close(src)


def test_iovecs_released_views_let_close_unmap(phb: spapr.Phb) -> None:
    before = open_fd_count()
    ram = Ram(1 * MiB)
    dma = PeDma(phb, phb.new_pe(), ClientMemory(spapr.Client()))
    dma.map(0, 1 * MiB, 0, RW, ram.fd())
    with dma.iovecs([(0, 0x3000), (0x8000, 0x1000)], write=False):
        pass
    mm = dma.files[0].mm
    dma.close()
    assert mm is not None and mm.closed  # no view kept the mapping alive
    ram.close()
    assert open_fd_count() == before


# -- the host's address space and the table budget -------------------------------------------------


def test_address_space_reuses_ranges_of_files_gone() -> None:
    space = spapr.AddressSpace(base=1 << 40, limit=(1 << 40) + (1 << 30), align=1 << 24)
    a = space.alloc(1 << 20)
    b = space.alloc(1 << 25)
    assert a == 1 << 40 and b == a + 2 * (1 << 24)  # 16 MiB aligned, a guard gap after each
    space.free(a)
    assert space.alloc(1 << 24) == a  # first fit: the hole a left
    with pytest.raises(OSError) as exc:
        space.alloc(1 << 30)
    assert exc.value.errno == errno.ENOMEM
    space.free(b)
    space.free(a)
    assert space.in_use == 0 and space.alloc(1 << 29) == 1 << 40  # coalesced again


def test_clients_coming_and_going_reuse_host_addresses(phb: spapr.Phb) -> None:
    space = spapr.AddressSpace()
    seen = set()
    for _ in range(5):
        ram = Ram(1 * MiB)
        dma = PeDma(phb, phb.new_pe(), ClientMemory(spapr.Client(), space))
        dma.map(0, 0x1000, 0, RW, ram.fd())
        seen.add(dma.files[0].vaddr)
        dma.close()
        phb.remove_pe(dma.pe)
        ram.close()
    assert len(seen) == 1 and space.in_use == 0


def test_table_budget_is_enospc_and_changes_nothing(phb: spapr.Phb, ram: Ram) -> None:
    dma = PeDma(phb, phb.new_pe(), ClientMemory(spapr.Client()), max_table_bytes=2 * 4096)
    try:
        dma.map(0, 0x1000, 0, RW, ram.fd())  # leaf 0
        dma.map(0x200000, 0x1000, 0, RW, ram.fd())  # leaf 1: the budget is full
        with pytest.raises(OSError) as exc:
            dma.map(0x400000, 0x1000, 0, RW, ram.fd())
        assert exc.value.errno == errno.ENOSPC
        # a map that straddles an existing and a new leaf fails as a whole
        with pytest.raises(OSError):
            dma.map(0x3FF000, 0x3000, 0, RW, ram.fd())
        w = dma.window(0)
        assert w is not None and w.get(0x3FF000) == 0 and dma.mapped_bytes == 0x2000
        assert dma.unmap(0x200000, 0x1000) == 0x1000  # unmaps never need a leaf
    finally:
        dma.close()


# -- the PHB's DMA fault policy --------------------------------------------------------------------


def test_error_policy_fails_the_access_and_keeps_the_pe_running(ram: Ram) -> None:
    phb = spapr.Phb(index=0, dma_fault="error")
    dma = PeDma(phb, phb.new_pe(), ClientMemory(spapr.Client()))
    try:
        dma.map(0, 0x2000, 0, RW, ram.fd())
        with pytest.raises(DmaFault):
            dma.write(0x1000, b"\xaa" * 0x2000)  # runs off the end of the mapping
        assert ram.read(0x1000, 0x1000) == b"\0" * 0x1000  # nothing written
        with pytest.raises(DmaFault):
            dma.iovecs([(0, 0x1000), (0x8000, 0x10)], write=False)
        pe = dma.pe
        assert pe.fault_count == 2 and not pe.frozen and pe.eeh.freeze_count == 0
        assert not dma.access_blocked(0)  # MMIO goes on
        dma.write(0, b"still working")  # and so does DMA
        assert ram.read(0, 13) == b"still working"
    finally:
        dma.close()


def test_freeze_policy_counts_faults_too(dma: PeDma, ram: Ram) -> None:
    with pytest.raises(DmaFault):
        dma.read(0, 4)
    assert dma.pe.fault_count == 1 and dma.pe.frozen
    with pytest.raises(ValueError):
        spapr.Phb(dma_fault="ignore")
