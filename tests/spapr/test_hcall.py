"""TCE hypercalls: every check of the spec, KVM-strict (default) and QEMU-compat."""

from __future__ import annotations

from spapr_helpers import MEM, be_list, make_phb

from vfiod import spapr
from vfiod.spapr import H_PARAMETER, H_SUCCESS, TCE_READ, TCE_RW, TCE_WRITE

L0 = 0x80000000  # PE 0, window 0 (2 GiB @ 4K at 0)
NB = (2 << 30) >> 12


def entries(phb: spapr.Phb, ioba: int, n: int) -> list[int]:
    return [phb.h_get_tce(L0, ioba + i * 4096)[1] for i in range(n)]


# -- H_PUT_TCE / H_GET_TCE --


def test_put_get_roundtrip(phb: spapr.Phb) -> None:
    phb.new_pe()
    assert phb.h_put_tce(L0, 0x5000, MEM | TCE_RW) == H_SUCCESS
    assert phb.h_get_tce(L0, 0x5000) == (H_SUCCESS, MEM | TCE_RW)
    assert phb.h_get_tce(L0, 0x6000) == (H_SUCCESS, 0)  # never written
    assert phb.h_put_tce(L0, 0x5000, 0) == H_SUCCESS
    assert phb.h_get_tce(L0, 0x5000) == (H_SUCCESS, 0)
    assert phb.hcall(spapr.H_GET_TCE, L0, 0x5000) == (H_SUCCESS, 0)
    assert phb.hcall(0x1234) == (spapr.H_FUNCTION,)


def test_unknown_liobn_both_modes(phb: spapr.Phb, qphb: spapr.Phb) -> None:
    for p in (phb, qphb):
        p.new_pe()
        for liobn in (0x80000002, 0x80010000, 0x80000100, 0x1_80000000, 0x1234):
            assert p.h_put_tce(liobn, 0, 0) == H_PARAMETER
            assert p.h_get_tce(liobn, 0) == (H_PARAMETER, 0)
            assert p.h_stuff_tce(liobn, 0, 0, 1) == H_PARAMETER
            assert p.h_put_tce_indirect(liobn, 0, be_list([0]), 1) == H_PARAMETER
        # window 1 exists as a LIOBN but is disabled
        assert p.h_put_tce(L0 | 1, 0x0800000000000000, 0) == H_PARAMETER


def test_strict_misaligned_ioba(phb: spapr.Phb) -> None:
    phb.new_pe()
    assert phb.h_put_tce(L0, 0x5010, MEM | TCE_RW) == H_PARAMETER
    assert phb.h_get_tce(L0, 0x5010) == (H_PARAMETER, 0)
    assert entries(phb, 0x5000, 1) == [0]


def test_compat_masks_ioba(qphb: spapr.Phb) -> None:
    qphb.new_pe()
    assert qphb.h_put_tce(L0, 0x5010, MEM | TCE_RW) == H_SUCCESS
    assert qphb.h_get_tce(L0, 0x5FFF) == (H_SUCCESS, MEM | TCE_RW)


def test_out_of_window(phb: spapr.Phb, qphb: spapr.Phb) -> None:
    for p in (phb, qphb):
        p.new_pe()
        assert p.h_put_tce(L0, 2 << 30, 0) == H_PARAMETER
        assert p.h_get_tce(L0, (2 << 30) - 4096) == (H_SUCCESS, 0)
        assert p.h_put_tce(L0, 1 << 64, 0) == H_PARAMETER
        assert p.h_put_tce(L0, -4096, 0) == H_PARAMETER


def test_strict_tce_validation(phb: spapr.Phb) -> None:
    phb.new_pe()
    assert phb.h_put_tce(L0, 0, MEM | 0x800 | TCE_READ) == H_PARAMETER  # misaligned address
    assert phb.h_put_tce(L0, 0, 0x9000_0000 | TCE_READ) == H_PARAMETER  # not in memory
    assert phb.h_put_tce(L0, 0, 0xDEAD_BEEF_0000 & ~3) == H_SUCCESS  # poison: no permission
    assert phb.h_put_tce(L0, 0x1000, MEM | TCE_WRITE) == H_SUCCESS  # write-only stays WO
    assert phb.h_get_tce(L0, 0x1000)[1] == MEM | TCE_WRITE
    unchecked = make_phb(check_tce_memory=False)
    unchecked.new_pe()
    assert unchecked.h_put_tce(L0, 0, 0x9000_0000 | TCE_READ) == H_SUCCESS


def test_compat_stores_verbatim(qphb: spapr.Phb) -> None:
    qphb.new_pe()
    assert qphb.h_put_tce(L0, 0, MEM | 0x800 | TCE_READ) == H_SUCCESS
    assert qphb.h_put_tce(L0, 0x1000, 0x9000_0000 | TCE_READ) == H_SUCCESS
    assert entries(qphb, 0, 2) == [MEM | 0x801, 0x9000_0001]


# -- H_STUFF_TCE --


def test_stuff_strict(phb: spapr.Phb) -> None:
    phb.new_pe()
    phb.h_put_tce_indirect(L0, 0, be_list([MEM + i * 4096 | 3 for i in range(8)]), 8)
    assert phb.h_stuff_tce(L0, 0x2000, 0, 4) == H_SUCCESS
    assert entries(phb, 0, 8)[1:7] == [MEM + 0x1003, 0, 0, 0, 0, MEM + 0x6003]
    assert phb.h_stuff_tce(L0, 0, MEM | TCE_READ, 1) == H_PARAMETER  # KVM: only clear/poison
    assert phb.h_stuff_tce(L0, 0, 0xABC000, 2) == H_SUCCESS  # poison accepted
    assert entries(phb, 0, 2) == [0xABC000, 0xABC000]
    assert phb.h_stuff_tce(L0, 0x10, 0, 1) == H_PARAMETER  # misaligned
    assert phb.h_stuff_tce(L0, 0, 0, 0) == H_SUCCESS  # npages 0: fine, nothing written
    # whole range checked first: nothing written on overrun
    phb.h_put_tce(L0, (NB - 2) << 12, MEM | 3)
    assert phb.h_stuff_tce(L0, (NB - 2) << 12, 0, 3) == H_PARAMETER
    assert phb.h_get_tce(L0, (NB - 2) << 12)[1] == MEM | 3
    assert phb.h_stuff_tce(L0, (NB - 2) << 12, 0, 2) == H_SUCCESS
    assert phb.h_stuff_tce(L0, 4096, 0, (1 << 64) - 1) == H_PARAMETER  # wraps


def test_stuff_compat(qphb: spapr.Phb) -> None:
    qphb.new_pe()
    assert qphb.h_stuff_tce(L0, 0, MEM | TCE_RW, 2) == H_SUCCESS  # perms accepted
    assert entries(qphb, 0, 3) == [MEM | 3, MEM | 3, 0]
    assert qphb.h_stuff_tce(L0, 0, 0, 0) == H_PARAMETER  # npages 0 fails in QEMU
    assert qphb.h_stuff_tce(L0, 0, 0, NB + 1) == H_PARAMETER  # more than the window
    # partial write: entries before the end stay written
    assert qphb.h_stuff_tce(L0, ((NB - 2) << 12) | 0x10, 0x5000, 3) == H_PARAMETER
    assert qphb.h_get_tce(L0, (NB - 2) << 12)[1] == 0x5000
    assert qphb.h_get_tce(L0, (NB - 1) << 12)[1] == 0x5000


# -- H_PUT_TCE_INDIRECT --


def test_indirect_strict_ok_and_limits(phb: spapr.Phb) -> None:
    phb.new_pe()
    vals = [MEM + i * 4096 | 3 for i in range(512)]
    assert phb.h_put_tce_indirect(L0, 0x100000, be_list(vals), 512) == H_SUCCESS
    assert entries(phb, 0x100000, 512) == vals
    assert phb.h_put_tce_indirect(L0, 0, be_list(vals + [3]), 513) == H_PARAMETER
    assert phb.h_put_tce_indirect(L0, 0, b"", 0) == H_SUCCESS  # npages 0
    assert phb.h_put_tce_indirect(L0, 0, be_list(vals[:2]), 3) == H_PARAMETER  # short list
    # unaligned starting leaf: spans two leaves
    assert phb.h_put_tce_indirect(L0, 0x300000 + 100 * 4096, be_list(vals), 512) == H_SUCCESS
    assert entries(phb, 0x300000 + 100 * 4096, 512) == vals


def test_indirect_strict_writes_nothing_on_bad_entry(phb: spapr.Phb) -> None:
    phb.new_pe()
    vals = [MEM + i * 4096 | 3 for i in range(16)]
    for bad in (MEM | 0x804 | 1, 0x9000_0000 | 1):
        lst = vals[:8] + [bad] + vals[9:]
        assert phb.h_put_tce_indirect(L0, 0, be_list(lst), 16) == H_PARAMETER
        assert entries(phb, 0, 16) == [0] * 16
    # poison entries are fine in a list
    assert phb.h_put_tce_indirect(L0, 0, be_list([0xF000, MEM | 1]), 2) == H_SUCCESS


def test_indirect_strict_range_and_alignment(phb: spapr.Phb) -> None:
    phb.new_pe()
    lst = be_list([MEM | 3] * 4)
    assert phb.h_put_tce_indirect(L0, (NB - 2) << 12, lst, 4) == H_PARAMETER
    assert entries(phb, (NB - 2) << 12, 2) == [0, 0]
    assert phb.h_put_tce_indirect(L0, 0x10, lst, 4) == H_PARAMETER


def test_indirect_list_by_address(phb: spapr.Phb) -> None:
    phb.new_pe()
    buf, off = phb.memory.lookup(MEM + 0x4000)
    buf[off : off + 16] = be_list([MEM | 1, MEM + 0x1000 | 2])
    assert phb.h_put_tce_indirect(L0, 0, MEM + 0x4000, 2) == H_SUCCESS
    assert entries(phb, 0, 2) == [MEM | 1, MEM + 0x1000 | 2]
    assert phb.h_put_tce_indirect(L0, 0, MEM + 0x4008, 2) == H_PARAMETER  # list not 4K aligned
    assert phb.h_put_tce_indirect(L0, 0, 0x9000_0000, 2) == H_PARAMETER  # list not in memory


def test_indirect_compat(qphb: spapr.Phb) -> None:
    qphb.new_pe()
    assert qphb.h_put_tce_indirect(L0, 0, b"", 0) == H_PARAMETER  # npages 0
    assert qphb.h_put_tce_indirect(L0, 0, be_list([3] * 513), 513) == H_PARAMETER
    assert qphb.h_put_tce_indirect(L0, 0, MEM + 8, 1) == H_PARAMETER  # misaligned list
    # entries stored verbatim, bad ones included, ioba masked
    lst = [MEM | 3, MEM | 0x805, 0x9000_0001]
    assert qphb.h_put_tce_indirect(L0, 0x2ABC, be_list(lst), 3) == H_SUCCESS
    assert entries(qphb, 0x2000, 3) == lst
    # overrun: earlier entries stay written
    assert qphb.h_put_tce_indirect(L0, (NB - 1) << 12, be_list([MEM | 1] * 3), 3) == H_PARAMETER
    assert qphb.h_get_tce(L0, (NB - 1) << 12)[1] == MEM | 1


def test_hypercalls_on_ddw_and_per_pe_tables(phb: spapr.Phb) -> None:
    a, b = phb.new_pe(), phb.new_pe()
    st, liobn, start = phb.rtas_create_pe_dma_window(b, 16, 32)
    assert st == 0 and liobn == b.liobn(1) and start == 0x0800000000000000
    assert phb.h_put_tce(liobn, start + 0x10000, MEM | 3) == H_SUCCESS
    assert phb.h_put_tce(liobn, start + 0x1000, MEM | 3) == H_PARAMETER  # 64K pages
    assert phb.h_put_tce(liobn, start + 0x10000, MEM + 0x1000 | 3) == H_PARAMETER
    assert phb.h_get_tce(liobn, start + 0x10000) == (H_SUCCESS, MEM | 3)
    # PE a's tables are its own
    assert phb.h_get_tce(a.liobn(0), 0)[1] == 0
    phb.h_put_tce(b.liobn(0), 0, MEM | 3)
    assert phb.h_get_tce(a.liobn(0), 0)[1] == 0
