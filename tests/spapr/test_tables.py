"""Table arithmetic, sparse storage, LIOBN numbering, default geometry."""

from __future__ import annotations

import pytest

from vfiod import spapr
from vfiod.spapr.tce import TceTable

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    "window,shift,size",
    [
        (GiB, 12, 2 * MiB), (GiB, 16, 128 * KiB), (GiB, 21, 4 * KiB), (GiB, 24, 512),
        (2 * GiB, 12, 4 * MiB), (4 * GiB, 16, 512 * KiB), (64 * GiB, 16, 8 * MiB),
        (64 * GiB, 24, 32 * KiB), (64 * GiB, 21, 256 * KiB), (TiB, 12, 2 * GiB),
        (TiB, 24, 512 * KiB),
    ],
)  # fmt: skip
def test_flat_table_size(window: int, shift: int, size: int) -> None:
    assert spapr.flat_table_size(window, shift) == size


def test_get_table_size_powernv() -> None:
    # 64 GiB @ 64K, 64K host pages: 1 level -> 2 x 8 MiB; 2 levels -> 2 x (8 MiB + 64 KiB)
    assert spapr.get_table_size(16, 64 * GiB, 1) == 16 * MiB
    assert spapr.get_table_size(16, 64 * GiB, 2) == 2 * (8 * MiB + 64 * KiB)
    assert spapr.level_geometry(16, 64 * GiB, 2) == 16  # 64 KiB level tables
    # QEMU defaults in the seed example: 1 GiB @ 4K -> 2 x 2 MiB, 4 GiB @ 64K -> 2 x 512 KiB
    assert spapr.get_table_size(12, GiB, 1) == 4 * MiB
    assert spapr.get_table_size(16, 4 * GiB, 1) == MiB
    # small tables round up to one host page per level
    assert spapr.get_table_size(24, 64 * GiB, 1) == 2 * 64 * KiB


@pytest.mark.parametrize("levels", [0, 6])
def test_get_table_size_bad_levels(levels: int) -> None:
    assert spapr.get_table_size(12, GiB, levels) == 0


def test_get_table_size_refusals() -> None:
    assert spapr.get_table_size(12, 3 * GiB, 1) == 0  # not a power of two
    assert spapr.get_table_size(24, 4 * KiB, 1) == 0  # smaller than a page
    # 2^63 window in 4K pages: 51 entry bits, 1 level of 2^54 bytes -> bits >= 55 refused
    assert spapr.get_table_size(12, 1 << 63, 1) == 0
    assert spapr.get_table_size(12, 1 << 50, 1) != 0


def test_qemu_level_guess_and_kvm_pages() -> None:
    assert spapr.qemu_guess_levels(16, 64 * GiB) == 1  # 23 bits / 24 per level
    assert spapr.qemu_guess_levels(12, TiB) == 2
    assert spapr.kvm_tce_pages(GiB >> 12) == 32  # 2 MiB in 64 KiB pages


def test_sparse_tb_window_costs_what_is_mapped(impl: spapr.fastpath.FastPath) -> None:
    t = TceTable(TiB >> 12, impl)  # 1 TiB in 4K pages = 2 GiB flat
    assert t.allocated_bytes == 0
    t.set(0, 0x1003)
    t.set((TiB >> 12) - 1, 0x2003)
    t.fill(12345, 1000, 0)  # clearing never allocates
    assert t.allocated_bytes == 2 * 4 * KiB
    assert t.get(0) == 0x1003 and t.get((TiB >> 12) - 1) == 0x2003 and t.get(77) == 0
    t.fill_linear(1 << 20, 4096, 0x10000003, 4096)  # 16 MiB mapped -> 8 leaves
    assert t.allocated_bytes == 10 * 4 * KiB
    assert t.get((1 << 20) + 4095) == 0x10000003 + 4095 * 4096
    assert list(t.items())[:1] == [(0, 0x1003)]
    assert t.to_be_bytes(0, 1) == (0x1003).to_bytes(8, "big")


def test_liobn_scheme() -> None:
    phb0, phb1 = spapr.Phb(index=0), spapr.Phb(index=1)
    a, b = phb0.new_pe(), phb0.new_pe()
    # PE 0 keeps QEMU's numbering
    assert a.liobn(0) == 0x80000000 and a.liobn(1) == 0x80000001
    assert phb1.new_pe().liobn(1) == 0x80000101
    assert b.liobn(0) == 0x80010000 and b.liobn(1) == 0x80010001
    assert spapr.split_liobn(0x80010101) == (1, 1, 1)
    assert spapr.split_liobn(0x1_80000000) is None and spapr.split_liobn(0x100) is None
    assert phb0.find_liobn(b.liobn(1)) == (b, 1)
    assert phb0.find_liobn(0x80000100) is None  # another PHB's
    with pytest.raises(ValueError):
        spapr.make_liobn(0, 1 << 15, 0)


def test_defaults() -> None:
    phb = spapr.Phb()
    pe = phb.new_pe()
    w = pe.windows[0]
    assert w is not None and pe.windows[1] is None
    assert (w.bus_offset, w.size, w.page_shift) == (0, 2 * GiB, 12)
    assert phb.dma64_start == 0x0800000000000000
    assert phb.pgsizes == 0x1211000 and phb.ddw_page_mask == 0x107
    assert spapr.Phb(page_shifts=(12, 16, 24, 28)).pgsizes == 0x11011000
    assert pe.group.name == "domain0-pe0"
    vfs = phb.new_pes(4)
    assert [p.number for p in vfs] == [1, 2, 3, 4]


def test_host_memory() -> None:
    mem = spapr.HostMemory()
    buf = bytearray(0x2000)
    mem.add(0x1000, 0x2000, buf)
    with pytest.raises(ValueError):
        mem.add(0x2000, 0x1000, bytearray(0x1000))
    with pytest.raises(ValueError):
        mem.add(0x10000, 0x1000, bytes(0x1000))  # read-only
    b, off = mem.lookup(0x2800)
    assert off == 0x1800 and len(b) == 0x2000
    assert mem.contains(0x1000, 0x2000) and not mem.contains(0x1000, 0x2001)
    mem.add(0x3000, 0x1000, bytearray(0x1000))
    assert mem.covered(0x1000, 0x3000) and not mem.contains(0x1000, 0x3000)
    mem.remove(0x3000)
    with pytest.raises(KeyError):
        mem.lookup(0x3000)


def test_window_map_pages_and_clear(impl: spapr.fastpath.FastPath) -> None:
    import errno

    from spapr_helpers import MEM, make_phb

    phb = make_phb(impl)
    pe = phb.new_pe()
    w = pe.windows[0]
    assert w is not None
    w.map_pages(0x10000, (MEM, 600), spapr.TCE_RW)  # contiguous, spans two leaves
    assert w.get(0x10000 + 599 * 4096) == MEM + 599 * 4096 | 3
    w.map_pages(0x1000, [MEM + 0x5000, MEM], spapr.TCE_READ)
    assert [w.get(0x1000), w.get(0x2000)] == [MEM + 0x5000 | 1, MEM | 1]
    cases = [
        (lambda: w.map_pages(2 << 30, (MEM, 1), 3), errno.ENXIO),
        (lambda: w.map_pages(0x1800, (MEM, 1), 3), errno.EINVAL),
        (lambda: w.map_pages(0, (MEM + 8, 1), 3), errno.EINVAL),
        (lambda: w.map_pages(0, [MEM, 0x9000_0000], 3), errno.EINVAL),  # not in memory
        (lambda: w.map_pages(0, [MEM | 1], 3), errno.EINVAL),
        (lambda: w.map_pages(0, [MEM], 4), errno.EINVAL),
        (lambda: w.map_pages((2 << 30) - 4096, (MEM, 2), 3), errno.EINVAL),
    ]
    for fn, code in cases:
        with pytest.raises(OSError) as e:
            fn()
        assert e.value.errno == code
    assert w.get(0) == 0  # the refused list wrote nothing
    w.clear_pages(0x10000, 600)
    assert w.get(0x10000) == 0 and w.get(0x1000) == MEM + 0x5000 | 1
