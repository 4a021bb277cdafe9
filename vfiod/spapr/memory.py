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


@dataclass(eq=False)
class MemoryRegion:
    """One registered range of host memory and the buffer that backs it."""

    addr: int
    size: int
    buffer: memoryview
    page_shift: int = HOST_PAGE_SHIFT  # backing page size (hugepages make this larger)
    owner: object = None  # what the memory is (a DMA view's client file), for who translates
    refs: int = 1  # users of a region shared through ``attach``

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
        self, addr: int, size: int, buffer: Any, page_shift: int = HOST_PAGE_SHIFT,
        owner: object = None,
    ) -> MemoryRegion:  # fmt: skip
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
        region = MemoryRegion(addr, size, view[:size], page_shift, owner)
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

    def attach(self, addr: int, size: int, buffer: Any, owner: object) -> MemoryRegion:
        """``add``, or one more reference to the same owner's region already at ``addr`` (the
        same client file mapped by several PEs of this PHB is registered once)."""
        i = bisect.bisect_left(self.starts, addr)
        if i < len(self._regions):
            region = self._regions[i]
            if region.addr == addr and region.owner is owner and owner is not None:
                if region.size != size:
                    raise ValueError("the owner's region has another size")
                region.refs += 1
                return region
        return self.add(addr, size, buffer, owner=owner)

    def detach(self, addr: int) -> None:
        """Drop one reference to the region at ``addr``; the last one removes it and releases
        its view of the buffer (so the memory behind it can be unmapped)."""
        i = bisect.bisect_left(self.starts, addr)
        if i == len(self._regions) or self._regions[i].addr != addr:
            raise KeyError(addr)
        region = self._regions[i]
        region.refs -= 1
        if region.refs > 0:
            return
        self.remove(addr)
        try:
            region.buffer.release()
        except BufferError:
            pass  # a view of it is still exported; the memory goes when that view does

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
