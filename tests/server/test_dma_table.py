"""The per-client DMA map table: replace/overlap semantics, fd dedupe, permissions, no leaks."""

from __future__ import annotations

import errno
import os

import pytest

from vfiod.pci.dma import DmaFault
from vfiod.server.dma import DMA_READ, DMA_WRITE, DmaMapTable

RW = DMA_READ | DMA_WRITE
MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def ram() -> int:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 4 * MiB)
    yield fd
    os.close(fd)


def test_same_file_sent_again_is_mapped_once_and_duplicates_closed(ram: int) -> None:
    table = DmaMapTable()
    before = open_fds()
    for i in range(1000):
        table.map(0x100000000 + i * 4096, 4096, i * 4096, RW, os.dup(ram))
    assert table.backing_count == 1
    assert len(table) == 1000
    # one fd kept for the one RAM file, plus the duplicate Python's mmap holds internally
    assert open_fds() == before + 2
    table.close()
    assert open_fds() == before


def test_read_write_reach_the_client_file(ram: int) -> None:
    table = DmaMapTable()
    table.map(0x10000, 2 * MiB, MiB, RW, os.dup(ram))
    table.write(0x10000 + 100, b"hello")
    assert os.pread(ram, 5, MiB + 100) == b"hello"
    os.pwrite(ram, b"world", MiB + 4096)
    assert table.read(0x10000 + 4096, 5) == b"world"
    table.close()


def test_access_across_two_adjacent_mappings(ram: int) -> None:
    table = DmaMapTable()
    table.map(0x0, 4096, 0, RW, os.dup(ram))
    table.map(0x1000, 4096, 3 * MiB, RW, os.dup(ram))
    table.write(4090, b"0123456789ab")
    assert os.pread(ram, 6, 4090) == b"012345"
    assert os.pread(ram, 6, 3 * MiB) == b"6789ab"
    table.close()


def test_permissions_are_enforced(ram: int) -> None:
    table = DmaMapTable()
    table.map(0x0, 4096, 0, DMA_READ, os.dup(ram))
    table.read(0, 16)
    with pytest.raises(DmaFault):
        table.write(0, b"x")
    table.map(0x1000, 4096, 0, DMA_WRITE, os.dup(ram))
    with pytest.raises(DmaFault):
        table.read(0x1000, 1)
    table.close()


def test_unmapped_and_partially_mapped_accesses_fault(ram: int) -> None:
    table = DmaMapTable()
    table.map(0x2000, 4096, 0, RW, os.dup(ram))
    with pytest.raises(DmaFault):
        table.read(0x1000, 1)
    with pytest.raises(DmaFault):
        table.read(0x2ff0, 0x20)  # runs past the end of the mapping
    table.close()


def test_remap_replaces_and_unmap_splits(ram: int) -> None:
    table = DmaMapTable()
    table.map(0x0, 0x10000, 0, RW, os.dup(ram))
    table.map(0x4000, 0x1000, 2 * MiB, RW, os.dup(ram))  # replace the middle
    assert [(m.iova, m.size, m.offset) for m in table.mappings()] == [
        (0x0, 0x4000, 0),
        (0x4000, 0x1000, 2 * MiB),
        (0x5000, 0xB000, 0x5000),
    ]
    assert table.unmap(0x3000, 0x3000) == 0x3000
    assert [(m.iova, m.size) for m in table.mappings()] == [(0x0, 0x3000), (0x6000, 0xA000)]
    with pytest.raises(DmaFault):
        table.read(0x4000, 1)
    table.close()


def test_unmap_of_never_mapped_range_succeeds(ram: int) -> None:
    table = DmaMapTable()
    assert table.unmap(0x40000000, 4096) == 0
    table.map(0x0, 4096, 0, RW, os.dup(ram))
    assert table.unmap(0x1000, 0x40000000) == 0
    assert len(table) == 1
    table.close()


def test_unmap_all_releases_the_file(ram: int) -> None:
    table = DmaMapTable()
    before = open_fds()
    table.map(0x0, 4096, 0, RW, os.dup(ram))
    table.map(0x100000, 4096, 0, RW, os.dup(ram))
    table.unmap_all()
    assert len(table) == 0 and table.backing_count == 0
    assert open_fds() == before


def test_bad_maps_are_refused_and_their_fd_closed(ram: int, tmp_path) -> None:
    table = DmaMapTable(max_mappings=2)
    before = open_fds()
    cases = [
        (0x0, 4096, 0, 0x4, os.dup(ram), errno.EINVAL),  # unknown flag
        (0x0, 0, 0, RW, os.dup(ram), errno.EINVAL),  # empty
        (0xFFFFFFFFFFFFF000, 0x2000, 0, RW, os.dup(ram), errno.EINVAL),  # wraps
        (0x0, 8 * MiB, 0, RW, os.dup(ram), errno.EINVAL),  # beyond the file
    ]
    r, w = os.pipe()
    os.close(w)
    cases.append((0x0, 4096, 0, RW, r, errno.EINVAL))  # not a file
    for iova, size, offset, prot, fd, err in cases:
        with pytest.raises(OSError) as info:
            table.map(iova, size, offset, prot, fd)
        assert info.value.errno == err
    assert open_fds() == before
    table.map(0x0, 4096, 0, RW, os.dup(ram))
    table.map(0x1000, 4096, 0, RW, os.dup(ram))
    with pytest.raises(OSError) as info:
        table.map(0x2000, 4096, 0, RW, os.dup(ram))
    assert info.value.errno == errno.ENOSPC
    table.close()
    assert open_fds() == before


def test_read_only_file_cannot_be_mapped_writable(tmp_path) -> None:
    path = tmp_path / "rom"
    path.write_bytes(b"\0" * 8192)
    table = DmaMapTable()
    with pytest.raises(OSError) as info:
        table.map(0, 4096, 0, RW, os.open(path, os.O_RDONLY))
    assert info.value.errno == errno.EACCES
    table.map(0, 4096, 0, DMA_READ, os.open(path, os.O_RDONLY))
    assert table.read(0, 4) == b"\0" * 4
    table.close()


def test_truncated_client_file_faults_instead_of_crashing(ram: int) -> None:
    table = DmaMapTable()
    table.map(0x0, 2 * MiB, 0, RW, os.dup(ram))
    os.ftruncate(ram, 4096)
    with pytest.raises(DmaFault):
        table.read(MiB, 16)
    table.close()


def test_many_live_maps_stay_cheap(ram: int) -> None:
    """A guest IOMMU maps every 4 KiB page: 50,000 live maps, then unmap them all."""
    table = DmaMapTable()
    n = 50_000
    for i in range(n):
        table.map(0x800000000 + (i * 4096), 4096, (i % 1024) * 4096, RW, os.dup(ram))
    assert len(table) == n and table.backing_count == 1
    for i in range(0, n, 2):
        table.unmap(0x800000000 + i * 4096, 4096)
    assert len(table) == n // 2
    table.close()
