"""Dynamic DMA window RTAS calls (ibm,query/create/remove/reset-pe-dma-window).

QEMU's behaviour, which is the only implementation: status 0 success, -1 hardware error
(no free slot, table too large), -3 parameter error. Two deliberate differences, both to keep
windows from overlapping: a new window goes at the 32-bit start whenever no active window sits
there (QEMU uses the 64-bit start as soon as any window is active), and a window overlapping an
active one is refused with -1.

A PE owned by a VFIO container (QEMU hw/vfio/spapr.c): with a v2 container the calls act on the
container's windows (create -> TCE_CREATE, remove -> TCE_REMOVE, reset -> remove all and
re-create the default window), so the container's accounting and table sharing apply; any
failure of the host side is -1 (QEMU reports a failed window creation as a hardware error) and
changes nothing. A v1 container has no dynamic windows: every DDW call is -3, as with ddw=off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import (
    DDW_LARGEST_BLOCK_5,
    DDW_LARGEST_BLOCK_6,
    RTAS_HW_ERROR,
    RTAS_PARAM_ERROR,
    RTAS_SUCCESS,
)

if TYPE_CHECKING:
    from .pe import Pe
    from .phb import Phb


def _pe_ok(phb: Phb, pe: Pe) -> bool:
    return phb.ddw and phb.pes.get(pe.number) is pe


def _no_ddw(pe: Pe) -> bool:
    """A v1 container owns the PE: no dynamic windows (QEMU: ddw unavailable -> -3)."""
    c = pe.container
    return c is not None and not c.v2


def query_cells(phb: Phb, pe: Pe, nret: int = 5) -> list[int]:
    """The raw return cells: 5 (largest block as one 32-bit cell) or 6 (hi/lo cells)."""
    if nret not in (5, 6) or not _pe_ok(phb, pe) or _no_ddw(pe):
        return [RTAS_PARAM_ERROR] + [0] * (max(nret, 1) - 1)
    c = pe.container
    if c is not None:
        avail = c.guest_windows_available()
    else:
        avail = phb.max_windows - pe.active_windows()
    mask = phb.ddw_page_mask
    if nret == 5:
        return [RTAS_SUCCESS, avail, DDW_LARGEST_BLOCK_5, mask, 0]
    big = DDW_LARGEST_BLOCK_6
    return [RTAS_SUCCESS, avail, big >> 32, big & 0xFFFFFFFF, mask, 0]


def query(phb: Phb, pe: Pe, nret: int = 5) -> tuple[int, int, int, int, int]:
    """(status, windows_available, largest_block, page_size_mask, migration_capable).

    With nret=6 largest_block is still one int: the hi/lo cells joined (2^37); use
    ``query_cells`` for the cells as the guest sees them.
    """
    cells = query_cells(phb, pe, nret)
    if nret == 6:
        return cells[0], cells[1], (cells[2] << 32) | cells[3], cells[4], cells[5]
    if nret != 5:
        return cells[0], 0, 0, 0, 0
    return cells[0], cells[1], cells[2], cells[3], cells[4]


def create(phb: Phb, pe: Pe, page_shift: int, window_shift: int) -> tuple[int, int, int]:
    """(status, liobn, start): a new all-invalid window in the first free slot."""
    if not _pe_ok(phb, pe) or _no_ddw(pe):
        return RTAS_PARAM_ERROR, 0, 0
    if page_shift not in phb.page_shifts or window_shift < page_shift or window_shift > 64:
        return RTAS_PARAM_ERROR, 0, 0
    c = pe.container
    if c is None:
        try:
            num = pe.windows.index(None)
        except ValueError:
            return RTAS_HW_ERROR, 0, 0
    nb = 1 << (window_shift - page_shift)
    if nb >= 1 << 32:
        return RTAS_HW_ERROR, 0, 0  # QEMU keeps nb_table in a uint32
    if c is not None:
        try:
            num, start = c.guest_create_window(page_shift, window_shift)
        except OSError:
            return RTAS_HW_ERROR, 0, 0  # host TCE_CREATE failed (ENOSPC, ENOMEM, EINVAL...)
        return RTAS_SUCCESS, pe.liobn(num), start
    active = [w for w in pe.windows if w is not None]
    start = (
        phb.dma32_start if all(w.bus_offset != phb.dma32_start for w in active) else phb.dma64_start
    )
    end = start + (1 << window_shift)
    if end > 1 << 64 or any(w.bus_offset < end and start < w.end for w in active):
        return RTAS_HW_ERROR, 0, 0
    pe.set_window(num, phb.make_window(start, page_shift, nb))
    return RTAS_SUCCESS, pe.liobn(num), start


def remove(phb: Phb, liobn: int) -> int:
    """Remove a window; removing the last non-default window brings the default one back."""
    found = phb.find_liobn(liobn)
    if not phb.ddw or found is None:
        return RTAS_PARAM_ERROR
    pe, num = found
    c = pe.container
    if _no_ddw(pe):
        return RTAS_PARAM_ERROR
    w = pe.windows[num]
    if c is not None:
        if w is not None:
            start = w.bus_offset
        elif num == 0 and c.def_window_pending:
            start = phb.dma32_start  # the default window the host has not created yet
        else:
            return RTAS_PARAM_ERROR
        try:
            c.guest_remove_window(start)
        except OSError:
            return RTAS_HW_ERROR
        return RTAS_SUCCESS
    if w is None:
        return RTAS_PARAM_ERROR
    w.clear()
    pe.set_window(num, None)
    if pe.active_windows() == 0 and not w.default:
        phb.reset_windows(pe)
    return RTAS_SUCCESS


def reset(phb: Phb, pe: Pe) -> int:
    """Every window removed, the default 32-bit window back, all TCEs invalid."""
    if not _pe_ok(phb, pe) or _no_ddw(pe):
        return RTAS_PARAM_ERROR
    c = pe.container
    if c is not None:
        try:
            c.guest_reset_windows()
        except OSError:
            return RTAS_HW_ERROR
        return RTAS_SUCCESS
    phb.reset_windows(pe)
    return RTAS_SUCCESS
