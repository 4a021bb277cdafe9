"""The POWER8 (PHB3-like) host bridge: PEs, LIOBN naming, default geometry, hypercall entry.

LIOBN scheme. QEMU names a PHB's windows ``0x80000000 | index << 8 | window_num``: one pair per
PHB. Here every PE has its own pair, so the PE number goes in the free middle bits::

    liobn = 0x80000000 | pe << 16 | index << 8 | window_num     (pe < 2^15, index < 256)

PE 0 gets exactly QEMU's LIOBNs (PHB0: 0x80000000 / 0x80000001; PHB1: 0x80000100 / ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import hcall, rtas
from .constants import (
    DDW_PGSIZE_BITS,
    DEFAULT_PAGE_SHIFTS,
    DMA32_WINDOW_SIZE,
    DMA32_WINDOW_START,
    DMA64_WINDOW_START,
    H_FUNCTION,
    H_GET_TCE,
    H_PARAMETER,
    H_PUT_TCE,
    H_PUT_TCE_INDIRECT,
    H_STUFF_TCE,
    HOST_PAGE_SHIFT,
    LIOBN_INDEX_SHIFT,
    LIOBN_PCI_FLAG,
    LIOBN_PE_BITS,
    LIOBN_PE_SHIFT,
    LIOBN_WINDOW_MASK,
    MAX_LEVELS,
    MAX_WINDOWS,
    SPAPR_TCE_PAGE_SHIFT,
)
from .fastpath import FastPath, default_impl
from .memory import HostMemory
from .pe import Pe
from .window import Window

DMA_FAULT_POLICIES = ("freeze", "error")


def make_liobn(index: int, pe: int, num: int) -> int:
    """LIOBN of window ``num`` of PE ``pe`` on PHB ``index`` (see module docstring)."""
    if (
        not 0 <= index < 256
        or not 0 <= pe < 1 << LIOBN_PE_BITS
        or not 0 <= num <= LIOBN_WINDOW_MASK
    ):
        raise ValueError("index, pe or window number out of the LIOBN fields")
    return LIOBN_PCI_FLAG | pe << LIOBN_PE_SHIFT | index << LIOBN_INDEX_SHIFT | num


def split_liobn(liobn: int) -> tuple[int, int, int] | None:
    """(index, pe, num) of a PCI LIOBN, None if it is not one (bit 31 clear or > 32 bits)."""
    if liobn >> 32 or not liobn & LIOBN_PCI_FLAG:
        return None
    return (
        (liobn >> LIOBN_INDEX_SHIFT) & 0xFF,
        (liobn >> LIOBN_PE_SHIFT) & ((1 << LIOBN_PE_BITS) - 1),
        liobn & LIOBN_WINDOW_MASK,
    )


class Phb:
    """A PHB with its PEs; hypercalls and DDW RTAS calls enter here."""

    model = "phb3"  # containers refuse to mix groups of different platform models (EPERM)

    def __init__(
        self,
        index: int = 0,
        *,
        num_pes: int = 256,
        page_shifts: Iterable[int] = DEFAULT_PAGE_SHIFTS,
        dma32_start: int = DMA32_WINDOW_START,
        dma32_size: int = DMA32_WINDOW_SIZE,
        dma64_start: int = DMA64_WINDOW_START,
        max_windows: int = MAX_WINDOWS,
        ddw: bool = True,
        eeh: bool = True,
        eeh_inject: bool = True,
        qemu_compat: bool = False,
        dma_fault: str = "freeze",
        memory: HostMemory | None = None,
        check_tce_memory: bool = True,
        host_page_shift: int = HOST_PAGE_SHIFT,
        impl: FastPath | None = None,
    ) -> None:
        if not 0 <= index < 256:
            raise ValueError("PHB index must fit 8 bits")
        if not 1 <= num_pes <= 1 << LIOBN_PE_BITS:
            raise ValueError("too many PEs for the LIOBN scheme")
        self.index = index
        self.num_pes = num_pes
        self.page_shifts = tuple(sorted(set(page_shifts)))
        self.dma32_start = dma32_start
        self.dma32_size = dma32_size
        self.dma64_start = dma64_start
        self.max_windows = max_windows
        self.ddw = ddw and max_windows > 1
        self.eeh = eeh
        self.eeh_inject = eeh_inject
        self.qemu_compat = qemu_compat
        if dma_fault not in DMA_FAULT_POLICIES:
            raise ValueError(f"dma_fault must be one of {DMA_FAULT_POLICIES}, not {dma_fault!r}")
        #: what a DMA fault does to the faulting PE: "freeze" (EEH, as POWER hardware: MMIO
        #: reads all-ones and DMA stops until the guest or an operator recovers the PE) or
        #: "error" (only the faulting access fails: a device completes its command with an
        #: error and goes on; for guests without EEH, such as x86)
        self.dma_fault = dma_fault
        self.memory = memory if memory is not None else HostMemory()
        self.check_tce_memory = check_tce_memory
        self.host_page_shift = host_page_shift
        self.max_levels = MAX_LEVELS
        self.impl: FastPath = impl or default_impl()
        self.pes: dict[int, Pe] = {}

    def __repr__(self) -> str:
        return f"Phb(index={self.index}, pes={len(self.pes)})"

    # -- geometry --
    @property
    def pgsizes(self) -> int:
        """Supported IOMMU page sizes as a byte mask (VFIO GET_INFO ddw.pgsizes)."""
        return sum(1 << s for s in self.page_shifts)

    @property
    def ddw_page_mask(self) -> int:
        """Supported page sizes as the DDW RTAS mask (4K|64K|2M|16M = 0x107)."""
        return sum(DDW_PGSIZE_BITS.get(s, 0) for s in self.page_shifts)

    def make_window(self, start: int, page_shift: int, nb_entries: int, *, levels: int = 1,
                    default: bool = False) -> Window:  # fmt: skip
        return Window(
            start, page_shift, nb_entries, levels=levels, memory=self.memory,
            check_memory=self.check_tce_memory, impl=self.impl, default=default,
        )  # fmt: skip

    def default_window(self) -> Window:
        """The 32-bit window every PE starts with: dma32_start, dma32_size, 4 KiB pages."""
        return self.make_window(
            self.dma32_start,
            SPAPR_TCE_PAGE_SHIFT,
            self.dma32_size >> SPAPR_TCE_PAGE_SHIFT,
            default=True,
        )

    # -- PEs and LIOBNs --
    def new_pe(self, number: int | None = None) -> Pe:
        """A PE (one per function) with its group and the default 32-bit window active."""
        if number is None:
            number = next((n for n in range(self.num_pes) if n not in self.pes), -1)
            if number < 0:
                raise OSError(28, "no free PE number")  # ENOSPC
        if not 0 <= number < self.num_pes or number in self.pes:
            raise ValueError(f"PE number {number} unavailable")
        pe = Pe(self, number)
        self.pes[number] = pe
        pe.reset_windows()
        return pe

    def new_pes(self, count: int) -> list[Pe]:
        """A contiguous block of PEs, as SR-IOV enable allocates one per VF."""
        free = [n for n in range(self.num_pes) if n not in self.pes]
        for i, first in enumerate(free):
            if free[i : i + count] == list(range(first, first + count)):
                return [self.new_pe(n) for n in range(first, first + count)]
        raise OSError(28, f"no block of {count} free PEs")

    def remove_pe(self, pe: Pe) -> None:
        if pe.container is not None:
            raise OSError(16, "PE's group is attached to a container")  # EBUSY
        self.pes.pop(pe.number, None)
        pe.group.pe = None

    def liobn(self, pe_number: int, num: int) -> int:
        return make_liobn(self.index, pe_number, num)

    def find_liobn(self, liobn: int) -> tuple[Pe, int] | None:
        """(pe, window slot) named by a LIOBN of this PHB, or None."""
        parts = split_liobn(liobn)
        if parts is None or parts[0] != self.index:
            return None
        pe = self.pes.get(parts[1])
        if pe is None or parts[2] >= self.max_windows:
            return None
        return pe, parts[2]

    def window(self, liobn: int) -> Window | None:
        """The active window a LIOBN names (None: unknown LIOBN or disabled window)."""
        # inlined split_liobn: this is on every hypercall
        if liobn >> 32 or not liobn & LIOBN_PCI_FLAG or (liobn >> 8) & 0xFF != self.index:
            return None
        pe = self.pes.get((liobn >> LIOBN_PE_SHIFT) & ((1 << LIOBN_PE_BITS) - 1))
        num = liobn & LIOBN_WINDOW_MASK
        if pe is None or num >= self.max_windows:
            return None
        return pe.windows[num]

    # -- hypercalls (PAPR return codes; see hcall.py for the two personalities) --
    def h_put_tce(self, liobn: int, ioba: int, tce: int) -> int:
        return hcall.h_put_tce(self, liobn, ioba, tce)

    def h_get_tce(self, liobn: int, ioba: int) -> tuple[int, int]:
        return hcall.h_get_tce(self, liobn, ioba)

    def h_stuff_tce(self, liobn: int, ioba: int, tce_value: int, npages: int) -> int:
        return hcall.h_stuff_tce(self, liobn, ioba, tce_value, npages)

    def h_put_tce_indirect(self, liobn: int, ioba: int, tce_list: Any, npages: int) -> int:
        return hcall.h_put_tce_indirect(self, liobn, ioba, tce_list, npages)

    def hcall(self, opcode: int, *args: Any) -> tuple[int, ...]:
        """Dispatch by opcode: returns (rc, outputs...) like the guest's registers."""
        try:
            if opcode == H_PUT_TCE:
                return (self.h_put_tce(*args),)
            if opcode == H_GET_TCE:
                return self.h_get_tce(*args)
            if opcode == H_STUFF_TCE:
                return (self.h_stuff_tce(*args),)
            if opcode == H_PUT_TCE_INDIRECT:
                return (self.h_put_tce_indirect(*args),)
        except TypeError:
            return (H_PARAMETER,)
        return (H_FUNCTION,)

    # -- DDW RTAS (RTAS status codes; see rtas.py) --
    def rtas_query_pe_dma_window(self, pe: Pe, nret: int = 5) -> tuple[int, int, int, int, int]:
        """(status, windows_available, largest_block, page_size_mask, migration_capable).

        nret=6 is the 64-bit extension: largest_block is returned as one int (hi<<32|lo);
        ``rtas_query_pe_dma_window_cells`` gives the raw hi/lo cells.
        """
        return rtas.query(self, pe, nret)

    def rtas_query_pe_dma_window_cells(self, pe: Pe, nret: int = 5) -> list[int]:
        return rtas.query_cells(self, pe, nret)

    def rtas_create_pe_dma_window(
        self, pe: Pe, page_shift: int, window_shift: int
    ) -> tuple[int, int, int]:
        return rtas.create(self, pe, page_shift, window_shift)

    def rtas_remove_pe_dma_window(self, liobn: int) -> int:
        return rtas.remove(self, liobn)

    def rtas_reset_pe_dma_window(self, pe: Pe) -> int:
        return rtas.reset(self, pe)
