"""DDW RTAS calls on a PE owned by a VFIO container (QEMU hw/vfio/spapr.c routing).

v2: create -> TCE_CREATE, remove -> TCE_REMOVE, reset -> remove all + default window back; the
container's accounting and table sharing apply, host failures are RTAS -1 and change nothing.
v1: no dynamic windows, every DDW call is -3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
from spapr_helpers import MEM, make_phb

from vfiod import spapr
from vfiod.spapr import RTAS_HW_ERROR, RTAS_PARAM_ERROR, RTAS_SUCCESS
from vfiod.spapr import VFIO_SPAPR_TCE_IOMMU as V1
from vfiod.spapr import VFIO_SPAPR_TCE_v2_IOMMU as V2

GiB = 1 << 30
DMA64 = 0x0800000000000000
RW = spapr.TCE_READ | spapr.TCE_WRITE
T = TypeVar("T")


def table_pages(c: spapr.Container, page_shift: int, size: int, levels: int | None = None) -> int:
    phb = c.phb
    assert phb is not None
    if levels is None:
        levels = spapr.qemu_guess_levels(page_shift, size, phb.host_page_shift)
    return c.client.pages(spapr.get_table_size(page_shift, size, levels, phb.host_page_shift))


def default_pages(c: spapr.Container) -> int:
    phb = c.phb
    assert phb is not None
    return table_pages(c, 12, phb.dma32_size, 1)


def setup(
    v: int = V2, ngroups: int = 1, limit: int | None = None
) -> tuple[spapr.Phb, list[spapr.Pe], spapr.Container]:
    phb = make_phb()
    pes = [phb.new_pe() for _ in range(ngroups)]
    c = spapr.Container(v, spapr.Client(memlock_limit=limit))
    for pe in pes:
        c.attach_group(pe.group)
    return phb, pes, c


def snapshot(phb: spapr.Phb, pes: list[spapr.Pe], c: spapr.Container) -> tuple[object, ...]:
    return (
        list(c.windows),
        [list(pe.windows) for pe in pes],
        c.def_window_pending,
        c.client.locked_vm,
        c.mm,
        [(w.bus_offset, w.page_shift, w.nb_entries, w.accounted) for w in c.windows if w],
    )


def test_create_lands_in_the_container_and_is_charged() -> None:
    phb, (pe,), c = setup()
    assert c.def_window_pending and c.client.locked_vm == 0
    st, liobn, start = phb.rtas_create_pe_dma_window(pe, 16, 32)
    assert (st, liobn, start) == (RTAS_SUCCESS, pe.liobn(1), DMA64)
    w = c.windows[1]
    assert w is not None and pe.windows[1] is w and phb.window(liobn) is w
    assert (w.bus_offset, w.page_shift, w.nb_entries) == (DMA64, 16, 1 << 16)
    # the pending default window was created first (kernel TCE_CREATE), in slot 0 at 0
    d = c.windows[0]
    assert d is not None and d.default and pe.windows[0] is d and d.bus_offset == 0
    assert not c.def_window_pending and c.mm is c.client
    assert c.client.locked_vm == default_pages(c) + table_pages(c, 16, 1 << 32)
    assert w.accounted == table_pages(c, 16, 1 << 32)
    # the guest maps through the LIOBN it was given: the container's table
    assert phb.h_put_tce(liobn, DMA64 + 0x10000, MEM | RW) == spapr.H_SUCCESS
    assert w.table.get(1) == MEM | RW


def test_create_is_shared_by_every_group_of_the_container() -> None:
    phb, (a, b), c = setup(ngroups=2)
    st, liobn, _ = phb.rtas_create_pe_dma_window(a, 16, 30)
    assert st == RTAS_SUCCESS
    assert a.windows[1] is b.windows[1] is c.windows[1] is not None
    assert phb.h_put_tce(liobn, DMA64, MEM | RW) == spapr.H_SUCCESS
    assert b.dma_read(DMA64, 4) == bytes(4)  # B's DMA sees the mapping made via A's LIOBN
    # the second group's RTAS view agrees: no slot left
    assert phb.rtas_query_pe_dma_window(b)[1] == 0
    assert phb.rtas_create_pe_dma_window(b, 16, 30)[0] == RTAS_HW_ERROR


def test_remove_releases_the_window_and_its_charge() -> None:
    phb, (pe,), c = setup()
    _, liobn, _ = phb.rtas_create_pe_dma_window(pe, 16, 32)
    assert phb.rtas_remove_pe_dma_window(liobn) == RTAS_SUCCESS
    assert c.windows[1] is None and pe.windows[1] is None and phb.window(liobn) is None
    assert c.windows[0] is not None  # the default window stays
    assert c.client.locked_vm == default_pages(c)
    assert phb.rtas_remove_pe_dma_window(liobn) == RTAS_PARAM_ERROR  # no longer active


def test_remove_default_then_last_ddw_brings_the_default_back() -> None:
    phb, (pe,), c = setup()
    _, liobn, _ = phb.rtas_create_pe_dma_window(pe, 16, 32)
    assert phb.rtas_remove_pe_dma_window(pe.liobn(0)) == RTAS_SUCCESS
    assert c.windows[0] is None and c.client.locked_vm == table_pages(c, 16, 1 << 32)
    assert phb.rtas_remove_pe_dma_window(liobn) == RTAS_SUCCESS  # last, not the default
    d = c.windows[0]
    assert d is not None and d.default and pe.windows[0] is d and c.windows[1] is None
    assert (d.bus_offset, d.page_shift, d.nb_entries) == (0, 12, phb.dma32_size >> 12)
    assert c.client.locked_vm == default_pages(c)


def test_remove_pending_default_window() -> None:
    # Linux guest, windows_available == 0 path: remove the default window by its LIOBN
    phb, (pe,), c = setup()
    assert phb.rtas_remove_pe_dma_window(pe.liobn(0)) == RTAS_SUCCESS
    assert not c.def_window_pending and c.windows == [None, None]
    assert c.client.locked_vm == 0
    assert phb.rtas_query_pe_dma_window(pe)[1] == 2
    st, liobn, start = phb.rtas_create_pe_dma_window(pe, 24, 32)
    assert (st, liobn, start) == (RTAS_SUCCESS, pe.liobn(0), 0)  # first free slot: 0
    assert c.client.locked_vm == table_pages(c, 24, 1 << 32)


def test_reset_restores_only_the_default_window() -> None:
    phb, (a, b), c = setup(ngroups=2)
    _, liobn, _ = phb.rtas_create_pe_dma_window(a, 16, 32)
    assert phb.h_put_tce(a.liobn(0), 0x1000, MEM | RW) == spapr.H_SUCCESS
    assert phb.h_put_tce(liobn, DMA64, MEM | RW) == spapr.H_SUCCESS
    old_default = c.windows[0]
    assert phb.rtas_reset_pe_dma_window(a) == RTAS_SUCCESS
    d = c.windows[0]
    assert d is not None and d is not old_default and d.default
    assert c.windows[1] is None
    for pe in (a, b):
        assert pe.windows == [d, None]
    assert (d.bus_offset, d.page_shift, d.nb_entries) == (0, 12, phb.dma32_size >> 12)
    assert phb.h_get_tce(a.liobn(0), 0x1000) == (spapr.H_SUCCESS, 0)  # all invalid
    assert c.client.locked_vm == default_pages(c)
    assert phb.rtas_query_pe_dma_window(a)[1] == 1


def test_reset_of_a_fresh_pe_creates_the_default_window() -> None:
    phb, (pe,), c = setup()
    assert phb.rtas_reset_pe_dma_window(pe) == RTAS_SUCCESS
    assert not c.def_window_pending and c.windows[0] is not None and c.windows[1] is None
    assert pe.windows[0] is c.windows[0]
    assert c.client.locked_vm == default_pages(c)


def test_query_windows_available_follows_the_container() -> None:
    phb, (pe,), c = setup()
    avail = lambda: phb.rtas_query_pe_dma_window(pe)[1]  # noqa: E731
    assert phb.rtas_query_pe_dma_window(pe)[0] == RTAS_SUCCESS
    assert avail() == 1  # the pending default window counts
    c.remove_window(0)  # what QEMU does first (drops the pending window)
    assert avail() == 2
    c.create_window(12, 1 << 30)
    assert avail() == 1
    c.create_window(16, 1 << 32)
    assert avail() == 0
    assert phb.rtas_query_pe_dma_window_cells(pe, 6)[:2] == [RTAS_SUCCESS, 0]
    c.remove_window(DMA64)
    assert avail() == 1


def test_v1_container_has_no_ddw() -> None:
    phb, (pe,), c = setup(V1)
    c.enable()
    before = (list(pe.windows), c.client.locked_vm)
    assert phb.rtas_query_pe_dma_window(pe)[0] == RTAS_PARAM_ERROR
    assert phb.rtas_query_pe_dma_window_cells(pe, 6)[0] == RTAS_PARAM_ERROR
    assert phb.rtas_create_pe_dma_window(pe, 16, 32) == (RTAS_PARAM_ERROR, 0, 0)
    assert phb.rtas_remove_pe_dma_window(pe.liobn(0)) == RTAS_PARAM_ERROR
    assert phb.rtas_remove_pe_dma_window(pe.liobn(1)) == RTAS_PARAM_ERROR
    assert phb.rtas_reset_pe_dma_window(pe) == RTAS_PARAM_ERROR
    assert (list(pe.windows), c.client.locked_vm) == before


def test_detach_gives_rtas_back_to_the_platform() -> None:
    phb, (pe,), c = setup()
    phb.rtas_create_pe_dma_window(pe, 16, 32)
    c.detach_group(pe.group)
    assert phb.rtas_query_pe_dma_window(pe)[1] == 1
    st, liobn, start = phb.rtas_create_pe_dma_window(pe, 16, 32)
    assert (st, start) == (RTAS_SUCCESS, DMA64) and c.windows[1] is not pe.windows[1]


# -- errors change nothing --
def _assert_unchanged(
    phb: spapr.Phb, pes: list[spapr.Pe], c: spapr.Container, fn: Callable[[], T]
) -> T:
    before = snapshot(phb, pes, c)
    rc = fn()
    assert snapshot(phb, pes, c) == before
    return rc


def test_create_memlock_failure_changes_nothing() -> None:
    phb, pes, c = setup(limit=0)
    (pe,) = pes
    rc = _assert_unchanged(phb, pes, c, lambda: phb.rtas_create_pe_dma_window(pe, 16, 32))
    assert rc == (RTAS_HW_ERROR, 0, 0)
    assert c.def_window_pending and c.mm is None  # the pending window was not created either
    # enough for the default window only: still all or nothing
    c.client.memlock_limit = default_pages(c) << c.client.page_shift
    rc = _assert_unchanged(phb, pes, c, lambda: phb.rtas_create_pe_dma_window(pe, 16, 32))
    assert rc[0] == RTAS_HW_ERROR


@pytest.mark.parametrize(
    ("page_shift", "window_shift", "status"),
    [
        (13, 32, RTAS_PARAM_ERROR),  # page size not supported
        (16, 15, RTAS_PARAM_ERROR),  # window smaller than a page
        (12, 44, RTAS_HW_ERROR),  # 2^32 TCEs: QEMU's uint32
        (24, 63, RTAS_HW_ERROR),  # past the end of the bus at 2^59
    ],
)
def test_create_refusals_change_nothing(page_shift: int, window_shift: int, status: int) -> None:
    phb, pes, c = setup()
    rc = _assert_unchanged(
        phb, pes, c, lambda: phb.rtas_create_pe_dma_window(pes[0], page_shift, window_shift)
    )
    assert rc == (status, 0, 0)


def test_create_with_both_slots_used_changes_nothing() -> None:
    phb, pes, c = setup()
    phb.rtas_create_pe_dma_window(pes[0], 16, 32)
    rc = _assert_unchanged(phb, pes, c, lambda: phb.rtas_create_pe_dma_window(pes[0], 16, 30))
    assert rc == (RTAS_HW_ERROR, 0, 0)


def test_create_overlapping_the_ddw_changes_nothing() -> None:
    # default removed, DDW at 2^59 remains; a new window at 0 that would reach 2^59 is refused
    phb, pes, c = setup()
    phb.rtas_create_pe_dma_window(pes[0], 24, 32)
    phb.rtas_remove_pe_dma_window(pes[0].liobn(0))
    rc = _assert_unchanged(phb, pes, c, lambda: phb.rtas_create_pe_dma_window(pes[0], 24, 60))
    assert rc == (RTAS_HW_ERROR, 0, 0)


def test_create_from_another_process_changes_nothing() -> None:
    phb, pes, c = setup()
    c.create_window(16, 1 << 30, caller=spapr.Client())  # binds the container elsewhere
    rc = _assert_unchanged(phb, pes, c, lambda: phb.rtas_create_pe_dma_window(pes[0], 16, 30))
    assert rc[0] == RTAS_HW_ERROR
    assert (
        _assert_unchanged(phb, pes, c, lambda: phb.rtas_reset_pe_dma_window(pes[0]))
        == RTAS_HW_ERROR
    )


def test_remove_and_reset_memlock_failures_change_nothing() -> None:
    phb, pes, c = setup()
    (pe,) = pes
    _, liobn, _ = phb.rtas_create_pe_dma_window(pe, 24, 32)  # tiny table
    phb.rtas_remove_pe_dma_window(pe.liobn(0))
    c.client.memlock_limit = c.client.locked_bytes  # no room to grow
    # removing the last (non-default) window needs the default window back: ENOMEM -> -1
    assert (
        _assert_unchanged(phb, pes, c, lambda: phb.rtas_remove_pe_dma_window(liobn))
        == RTAS_HW_ERROR
    )
    assert _assert_unchanged(phb, pes, c, lambda: phb.rtas_reset_pe_dma_window(pe)) == RTAS_HW_ERROR
    assert c.windows[1] is not None and c.windows[1].accounted


def test_remove_unknown_liobn_changes_nothing() -> None:
    phb, pes, c = setup()
    for liobn in (pes[0].liobn(1), phb.liobn(7, 0), 0x1234):
        rc = _assert_unchanged(phb, pes, c, lambda n=liobn: phb.rtas_remove_pe_dma_window(n))
        assert rc == RTAS_PARAM_ERROR
