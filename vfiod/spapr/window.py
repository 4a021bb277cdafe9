"""A DMA window: a bus-address range, its IOMMU page size and its TCE table.

A window object can be programmed into several PEs at once (VFIO v2 containers share tables
across groups); the LIOBN naming it is per PE and lives in the PE, not here.
Windows act as filters, not offsets: IOVAs are absolute bus addresses.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Sequence
from typing import Protocol

from .constants import TCE_READ, TCE_RW, TCE_WRITE, U64_MASK
from .fastpath import FastPath, RawPiece
from .memory import HostMemory
from .tce import TceTable


class Window:
    """Bus range [bus_offset, bus_offset + nb_entries << page_shift) translated by ``table``."""

    def __init__(
        self,
        bus_offset: int,
        page_shift: int,
        nb_entries: int,
        *,
        levels: int = 1,
        memory: HostMemory | None = None,
        check_memory: bool = True,
        impl: FastPath | None = None,
        default: bool = False,
    ) -> None:
        self.bus_offset = bus_offset
        self.page_shift = page_shift
        self.nb_entries = nb_entries
        self.levels = levels
        self.memory = memory  # where TCE addresses must point (None: unchecked)
        self.check_memory = check_memory
        self.table = TceTable(nb_entries, impl)
        self.default = default  # the platform's 32-bit default window
        self.accounted = 0  # locked-memory bytes charged for this table (containers)

    def __repr__(self) -> str:
        return (
            f"Window(bus_offset={self.bus_offset:#x}, page_shift={self.page_shift}, "
            f"nb_entries={self.nb_entries:#x})"
        )

    # -- geometry --
    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def size(self) -> int:
        return self.nb_entries << self.page_shift

    @property
    def start(self) -> int:
        return self.bus_offset

    @property
    def end(self) -> int:
        return self.bus_offset + self.size

    def contains(self, iova: int) -> bool:
        return self.bus_offset <= iova < self.end

    def index(self, ioba: int) -> int:
        """Table index of ``ioba`` (QEMU convention: relative to the window start)."""
        return (ioba - self.bus_offset) >> self.page_shift

    def ioba_ok(self, ioba: int, npages: int) -> bool:
        """KVM's ioba check: page-aligned, inside the window, whole range too, no wrap."""
        if ioba & (self.page_size - 1) or ioba < self.bus_offset:
            return False
        idx = self.index(ioba)
        return idx + npages <= self.nb_entries

    def _checked_memory(self) -> HostMemory | None:
        return self.memory if self.check_memory else None

    def tce_ok(self, tce: int) -> bool:
        """KVM's TCE check: no permission (poison allowed), or aligned real address in memory."""
        return self.table.impl.validate([tce], 1, self.page_shift, self._checked_memory()) < 0

    # -- raw access (callers validated) --
    def get(self, ioba: int) -> int:
        return self.table.get(self.index(ioba))

    def put(self, ioba: int, tce: int) -> None:
        self.table.set(self.index(ioba), tce & U64_MASK)

    def validate_be(self, data: bytes, n: int) -> int:
        """First bad entry of a big-endian list, or -1 (nothing written)."""
        return self.table.impl.validate_be(data, n, self.page_shift, self._checked_memory())

    def put_be_checked(self, ioba: int, data: bytes, n: int) -> int:
        """Validate then write a big-endian list (-1), or the first bad index, nothing written."""
        return self.table.write_be_checked(
            self.index(ioba), data, n, self.page_shift, self._checked_memory()
        )

    def write_be(self, ioba: int, data: bytes, n: int) -> None:
        self.table.write_be(self.index(ioba), data, n)

    def stuff(self, ioba: int, npages: int, value: int) -> None:
        self.table.fill(self.index(ioba), npages, value & U64_MASK)

    # -- batch map/clear for the session (raise OSError like MAP_DMA/UNMAP_DMA) --
    def _check_range(self, ioba: int, npages: int) -> None:
        if not self.contains(ioba):
            raise OSError(errno.ENXIO, f"iova {ioba:#x} outside window")
        if ioba & (self.page_size - 1):
            raise OSError(errno.EINVAL, f"iova {ioba:#x} not aligned to the IOMMU page")
        if npages < 0 or self.index(ioba) + npages > self.nb_entries:
            raise OSError(errno.EINVAL, "range crosses the window end")

    def map_pages(self, ioba: int, addrs: Sequence[int] | tuple[int, int], perm: int) -> None:
        """Map consecutive IOMMU pages from ``ioba``.

        ``addrs`` is either a list/array of page addresses, or the tuple ``(first_addr, npages)``
        for a contiguous range. All pages are validated (alignment, memory) before anything is
        written; errors raise OSError (ENXIO outside the window, EINVAL otherwise).
        """
        if perm & ~TCE_RW or not perm & TCE_RW:
            raise OSError(errno.EINVAL, "perm must be TCE_READ and/or TCE_WRITE")
        mem = self._checked_memory()
        pgsize = self.page_size
        if isinstance(addrs, tuple):
            first, npages = addrs
            self._check_range(ioba, npages)
            if npages == 0:
                return
            if first & (pgsize - 1) or first < 0 or first + npages * pgsize > 1 << 64:
                raise OSError(errno.EINVAL, "first_addr not aligned to the IOMMU page")
            if mem is not None and not mem.contains(first, npages * pgsize):
                raise OSError(errno.EINVAL, "range not in host memory")
            self.table.fill_linear(self.index(ioba), npages, first | perm, pgsize)
            return
        tces = array("Q", addrs)
        npages = len(tces)
        self._check_range(ioba, npages)
        if any(a & 3 for a in tces):
            raise OSError(errno.EINVAL, "page address not aligned to the IOMMU page")
        for i in range(npages):
            tces[i] |= perm
        bad = self.table.impl.validate(tces, npages, self.page_shift, mem)
        if bad >= 0:
            raise OSError(
                errno.EINVAL, f"page {bad} ({tces[bad] & ~3:#x}) not aligned or not in host memory"
            )
        self.table.write(self.index(ioba), tces, npages)

    def clear_pages(self, ioba: int, npages: int) -> int:
        """Invalidate npages entries from ``ioba`` (never allocates table memory); returns how
        many of them were valid."""
        self._check_range(ioba, npages)
        return self.table.fill(self.index(ioba), npages, 0)

    def clear(self) -> None:
        self.table.clear_all()

    @property
    def tces_in_use(self) -> int:
        """Valid entries (R or W granted): a counter, so reading it costs nothing."""
        return self.table.valid_count

    # -- translation --
    def translate_raw(
        self, sg: Sequence[tuple[int, int]], write: bool, memory: HostMemory
    ) -> list[RawPiece]:
        """Raw pieces through this window (TranslateFault on any problem)."""
        return self.table.impl.translate(
            self.table.store, self.bus_offset, self.page_shift, sg, write, memory
        )

    def maps_into(self, lo: int, hi: int) -> bool:
        """True if any valid entry points into [lo, hi) (used before unregistering memory)."""
        mask = ~(self.page_size - 1) & U64_MASK
        for _, v in self.table.items():
            if v & TCE_RW:
                a = v & mask
                if a < hi and a + self.page_size > lo:
                    return True
        return False


class WindowOwner(Protocol):
    """Who programs a PE's windows (its TVEs): the platform itself (``Pe``), or the VFIO
    container that took the PE's group (``Container``). The guest's DDW RTAS calls (``rtas``),
    the hypercalls (through the PE's slots) and a vfio-user session's DMA view all go through
    it, so none of them needs to know which of the two it is talking to.

    ``ddw_*`` raise ``LookupError`` when the request names nothing (RTAS parameter error) and
    ``OSError`` when the owner cannot do it (RTAS hardware error); either way nothing changed.
    """

    @property
    def windows(self) -> Sequence[Window | None]: ...

    @property
    def ddw_supported(self) -> bool: ...

    def ddw_available(self) -> int: ...

    def ddw_create(self, page_shift: int, window_shift: int) -> tuple[int, int]: ...

    def ddw_remove(self, num: int) -> None: ...

    def ddw_reset(self) -> None: ...


__all__ = ["Window", "WindowOwner", "TCE_READ", "TCE_WRITE"]
