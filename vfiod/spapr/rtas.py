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

Which of the two applies is not this module's business: it talks to ``pe.owner``, the PE's
``WindowOwner`` (the PE itself, or the container that took its group).
"""

from __future__ import annotations

from typing import Protocol

from .constants import (
    DDW_LARGEST_BLOCK_5,
    DDW_LARGEST_BLOCK_6,
    RTAS_HW_ERROR,
    RTAS_PARAM_ERROR,
    RTAS_SUCCESS,
)
from .pe import Pe


class DdwHost(Protocol):
    """What the DDW calls need of the PHB (``Phb`` is one; it imports this module)."""

    ddw: bool
    page_shifts: tuple[int, ...]
    pes: dict[int, Pe]

    @property
    def ddw_page_mask(self) -> int: ...

    def find_liobn(self, liobn: int) -> tuple[Pe, int] | None: ...


def _ddw_pe(phb: DdwHost, pe: Pe) -> bool:
    """The PE is the PHB's and whoever owns its windows offers dynamic windows (a v1
    container does not: QEMU then reports DDW unavailable, -3)."""
    return phb.ddw and phb.pes.get(pe.number) is pe and pe.owner.ddw_supported


def query_cells(phb: DdwHost, pe: Pe, nret: int = 5) -> list[int]:
    """The raw return cells: 5 (largest block as one 32-bit cell) or 6 (hi/lo cells)."""
    if nret not in (5, 6) or not _ddw_pe(phb, pe):
        return [RTAS_PARAM_ERROR] + [0] * (max(nret, 1) - 1)
    avail = pe.owner.ddw_available()
    mask = phb.ddw_page_mask
    if nret == 5:
        return [RTAS_SUCCESS, avail, DDW_LARGEST_BLOCK_5, mask, 0]
    big = DDW_LARGEST_BLOCK_6
    return [RTAS_SUCCESS, avail, big >> 32, big & 0xFFFFFFFF, mask, 0]


def query(phb: DdwHost, pe: Pe, nret: int = 5) -> tuple[int, int, int, int, int]:
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


def _status(action: object, *args: int) -> int:
    """Run an owner's DDW action: LookupError -> parameter error, OSError -> hardware error."""
    try:
        action(*args)  # type: ignore[operator]
    except LookupError:
        return RTAS_PARAM_ERROR
    except OSError:
        return RTAS_HW_ERROR
    return RTAS_SUCCESS


def create(phb: DdwHost, pe: Pe, page_shift: int, window_shift: int) -> tuple[int, int, int]:
    """(status, liobn, start): a new all-invalid window in the first free slot."""
    if not _ddw_pe(phb, pe):
        return RTAS_PARAM_ERROR, 0, 0
    if page_shift not in phb.page_shifts or window_shift < page_shift or window_shift > 64:
        return RTAS_PARAM_ERROR, 0, 0
    if window_shift - page_shift >= 32:
        return RTAS_HW_ERROR, 0, 0  # QEMU keeps nb_table in a uint32
    try:
        num, start = pe.owner.ddw_create(page_shift, window_shift)
    except (OSError, LookupError):
        return RTAS_HW_ERROR, 0, 0  # no free slot, overlap, host TCE_CREATE failed...
    return RTAS_SUCCESS, pe.liobn(num), start


def remove(phb: DdwHost, liobn: int) -> int:
    """Remove a window; removing the last non-default window brings the default one back."""
    found = phb.find_liobn(liobn)
    if not phb.ddw or found is None:
        return RTAS_PARAM_ERROR
    pe, num = found
    if not _ddw_pe(phb, pe):
        return RTAS_PARAM_ERROR
    return _status(pe.owner.ddw_remove, num)


def reset(phb: DdwHost, pe: Pe) -> int:
    """Every window removed, the default 32-bit window back, all TCEs invalid."""
    if not _ddw_pe(phb, pe):
        return RTAS_PARAM_ERROR
    return _status(pe.owner.ddw_reset)


__all__ = ["DdwHost", "create", "query", "query_cells", "remove", "reset"]
