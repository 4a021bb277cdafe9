"""DDW RTAS calls: query (5 and 6 outputs), create, remove, reset, with RTAS status codes."""

from __future__ import annotations

from spapr_helpers import MEM

from vfiod import spapr
from vfiod.spapr import RTAS_HW_ERROR, RTAS_PARAM_ERROR, RTAS_SUCCESS

DMA64 = 0x0800000000000000


def test_query(phb: spapr.Phb) -> None:
    pe = phb.new_pe()
    assert phb.rtas_query_pe_dma_window(pe) == (0, 1, 0x80000000, 0x107, 0)
    assert phb.rtas_query_pe_dma_window(pe, nret=6) == (0, 1, 1 << 37, 0x107, 0)
    assert phb.rtas_query_pe_dma_window_cells(pe, 6) == [0, 1, 0x20, 0, 0x107, 0]
    assert phb.rtas_query_pe_dma_window(pe, nret=4)[0] == RTAS_PARAM_ERROR
    other = spapr.Phb(index=1).new_pe()
    assert phb.rtas_query_pe_dma_window(other)[0] == RTAS_PARAM_ERROR
    off = spapr.Phb(ddw=False)
    assert off.rtas_query_pe_dma_window(off.new_pe())[0] == RTAS_PARAM_ERROR


def test_create_remove_cycle_like_a_linux_guest(phb: spapr.Phb) -> None:
    pe = phb.new_pe()
    # 4 GiB guest on QEMU defaults: 16M pages, window_shift 32 -> 256 TCEs at 2^59
    st, liobn, start = phb.rtas_create_pe_dma_window(pe, 24, 32)
    assert (st, liobn, start) == (RTAS_SUCCESS, 0x80000001, DMA64)
    w = pe.windows[1]
    assert w is not None and w.nb_entries == 256
    assert phb.rtas_query_pe_dma_window(pe)[1] == 0
    assert phb.rtas_create_pe_dma_window(pe, 16, 30)[0] == RTAS_HW_ERROR  # no free slot
    # direct-map like the guest: IOVA = base + PA
    assert phb.h_put_tce(liobn, start, 0 | spapr.TCE_RW) == spapr.H_PARAMETER  # 0 not RAM here
    assert phb.h_put_tce(liobn, start + MEM, MEM | spapr.TCE_RW) == spapr.H_SUCCESS
    assert phb.rtas_remove_pe_dma_window(liobn) == RTAS_SUCCESS
    assert pe.windows[1] is None
    assert phb.rtas_remove_pe_dma_window(liobn) == RTAS_PARAM_ERROR  # not active
    assert phb.rtas_remove_pe_dma_window(0x80000005) == RTAS_PARAM_ERROR  # unknown


def test_create_parameter_errors(phb: spapr.Phb) -> None:
    pe = phb.new_pe()
    assert phb.rtas_create_pe_dma_window(pe, 13, 32)[0] == RTAS_PARAM_ERROR  # page size
    assert phb.rtas_create_pe_dma_window(pe, 28, 32)[0] == RTAS_PARAM_ERROR  # 256M not enabled
    assert phb.rtas_create_pe_dma_window(pe, 16, 15)[0] == RTAS_PARAM_ERROR  # window < page
    assert phb.rtas_create_pe_dma_window(pe, 12, 44)[0] == RTAS_HW_ERROR  # 2^32 TCEs: uint32
    assert phb.rtas_create_pe_dma_window(pe, 12, 43)[0] == RTAS_SUCCESS


def test_remove_default_then_create_at_zero_and_reset(phb: spapr.Phb) -> None:
    pe = phb.new_pe()
    assert phb.rtas_remove_pe_dma_window(pe.liobn(0)) == RTAS_SUCCESS
    assert pe.active_windows() == 0  # the default window is not brought back
    assert phb.rtas_query_pe_dma_window(pe)[1] == 2
    st, liobn, start = phb.rtas_create_pe_dma_window(pe, 16, 34)
    assert (st, liobn, start) == (0, pe.liobn(0), 0)  # no active window: at 0
    st, liobn2, start2 = phb.rtas_create_pe_dma_window(pe, 24, 36)
    assert (st, liobn2, start2) == (0, pe.liobn(1), DMA64)
    # removing the last non-default window brings the default back (QEMU >= 7.1)
    assert phb.rtas_remove_pe_dma_window(liobn) == 0
    assert phb.rtas_remove_pe_dma_window(liobn2) == 0
    w = pe.windows[0]
    assert w is not None and w.default and w.size == 2 << 30 and w.page_shift == 12
    # reset: everything gone, default back, all invalid
    phb.h_put_tce(pe.liobn(0), 0, MEM | 3)
    phb.rtas_create_pe_dma_window(pe, 16, 32)
    assert phb.rtas_reset_pe_dma_window(pe) == RTAS_SUCCESS
    assert pe.windows[1] is None and phb.h_get_tce(pe.liobn(0), 0) == (0, 0)


def test_no_overlap_when_only_the_64bit_window_is_left(phb: spapr.Phb) -> None:
    pe = phb.new_pe()
    phb.rtas_create_pe_dma_window(pe, 16, 32)
    phb.rtas_remove_pe_dma_window(pe.liobn(0))  # leaves only the window at 2^59
    st, liobn, start = phb.rtas_create_pe_dma_window(pe, 12, 30)
    assert (st, start) == (0, 0)  # QEMU would place it over the 2^59 window


def test_rtas_on_a_container_owned_pe_goes_to_the_container(phb: spapr.Phb) -> None:
    # routing details: tests/spapr/test_rtas_vfio.py
    pe = phb.new_pe()
    c = spapr.Container(spapr.VFIO_SPAPR_TCE_v2_IOMMU)
    c.attach_group(pe.group)
    assert phb.rtas_create_pe_dma_window(pe, 16, 32)[0] == RTAS_SUCCESS
    assert c.windows[1] is pe.windows[1] is not None
    assert phb.rtas_reset_pe_dma_window(pe) == RTAS_SUCCESS
    assert c.windows[1] is None
