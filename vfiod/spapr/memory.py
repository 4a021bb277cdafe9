"""Host memory map: the address space a TCE's real address points into.

The session registers each piece of client memory here (a writable buffer at an address it
chooses); TCE addresses, v2 preregistered vaddrs and MAP_DMA vaddrs all live in this space.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .constants import HOST_PAGE_SHIFT

#: One piece of a translated access: (buffer, offset into buffer, length).
Piece = tuple[memoryview, int, int]


class DmaFault(Exception):
    """A device access hit no window, an invalid TCE, a missing permission or unbacked memory.

    Raised before anything is read or written; the PE is frozen when this comes from translation.
    """

    def __init__(self, iova: int, length: int, write: bool, reason: str) -> None:
        super().__init__(
            f"DMA fault at iova {iova:#x} (+{length:#x}, {'write' if write else 'read'}): {reason}"
        )
        self.iova = iova
        self.length = length
        self.write = write
        self.reason = reason


@dataclass(eq=False)
class MemoryRegion:
    """One registered range of host memory and the buffer that backs it."""

    addr: int
    size: int
    buffer: memoryview
    page_shift: int = HOST_PAGE_SHIFT  # backing page size (hugepages make this larger)

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(eq=False)
class HostMemory:
    """Sorted, non-overlapping regions; lookups are a bisect so hot paths stay cheap.

    ``starts``/``ends`` are kept as u64 arrays so the C fast path can search them directly;
    ``generation`` changes on every add/remove so caches built from them can notice.
    """

    _regions: list[MemoryRegion] = field(default_factory=list)
    starts: array = field(default_factory=lambda: array("Q"))
    ends: array = field(default_factory=lambda: array("Q"))
    generation: int = 0

    def add(
        self, addr: int, size: int, buffer: Any, page_shift: int = HOST_PAGE_SHIFT
    ) -> MemoryRegion:
        """Register ``buffer`` (writable, >= ``size`` bytes) at ``addr``; overlaps are refused."""
        if size <= 0 or addr < 0 or addr + size > 1 << 64:
            raise ValueError("bad region")
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise ValueError("buffer must be writable")
        if len(view) < size:
            raise ValueError("buffer smaller than region")
        i = bisect.bisect_left(self.starts, addr)
        if i > 0 and self._regions[i - 1].end > addr:
            raise ValueError("overlaps an existing region")
        if i < len(self._regions) and self._regions[i].addr < addr + size:
            raise ValueError("overlaps an existing region")
        region = MemoryRegion(addr, size, view[:size], page_shift)
        self._regions.insert(i, region)
        self.starts.insert(i, addr)
        self.ends.insert(i, addr + size)
        self.generation += 1
        return region

    def remove(self, addr: int) -> MemoryRegion:
        """Drop the region starting at ``addr`` (KeyError if there is none)."""
        i = bisect.bisect_left(self.starts, addr)
        if i == len(self._regions) or self._regions[i].addr != addr:
            raise KeyError(addr)
        region = self._regions.pop(i)
        del self.starts[i]
        del self.ends[i]
        self.generation += 1
        return region

    @property
    def regions(self) -> Sequence[MemoryRegion]:
        return tuple(self._regions)

    def region_index(self, addr: int) -> int:
        """Index of the region containing ``addr`` or -1."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.ends[i]:
            return i
        return -1

    def region(self, i: int) -> MemoryRegion:
        return self._regions[i]

    def find(self, addr: int) -> MemoryRegion | None:
        i = self.region_index(addr)
        return self._regions[i] if i >= 0 else None

    def lookup(self, addr: int) -> tuple[memoryview, int]:
        """(buffer, offset) of ``addr``; KeyError if unbacked."""
        i = self.region_index(addr)
        if i < 0:
            raise KeyError(addr)
        r = self._regions[i]
        return r.buffer, addr - r.addr

    def contains(self, addr: int, size: int) -> bool:
        """True if [addr, addr+size) lies inside one region."""
        i = self.region_index(addr)
        return i >= 0 and addr + size <= self.ends[i]

    def covered(self, addr: int, size: int) -> bool:
        """True if [addr, addr+size) is fully backed, possibly by several adjacent regions."""
        end = addr + size
        while addr < end:
            i = self.region_index(addr)
            if i < 0:
                return False
            addr = self.ends[i]
        return True

    def min_page_shift(self, addr: int, size: int) -> int:
        """Smallest backing page shift over [addr, addr+size) (caller checked it is covered)."""
        end = addr + size
        shift = 64
        while addr < end:
            i = self.region_index(addr)
            if i < 0:
                return 0
            shift = min(shift, self._regions[i].page_shift)
            addr = self.ends[i]
        return shift
