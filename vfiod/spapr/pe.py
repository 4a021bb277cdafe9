"""Partitionable endpoints and their IOMMU groups.

One PE per function (PF or VF): it owns up to two window slots (TVEs), its EEH state and its
IOMMU group. Every device access of the function is attributed to its PE, so a fault by one
function freezes only that function, and its DMA reaches only what its own tables allow.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Protocol

from .constants import EEH_PE_STATE_NORMAL
from .dma import DmaFault
from .eeh import EehState
from .fastpath import CffiFastPath, FastPath, TranslateFault
from .memory import HostMemory, MemoryRegion, Piece
from .window import Window, WindowOwner

#: A translated piece with its memory region: (region, offset in the region, length).
RegionPiece = tuple[MemoryRegion, int, int]


class PeHost(Protocol):
    """What PEs (and the containers that own them) need of their PHB; ``Phb`` is one. A
    protocol, so that this module does not import the PHB that imports it."""

    index: int
    model: str
    max_windows: int
    ddw: bool
    eeh: bool
    eeh_inject: bool
    page_shifts: tuple[int, ...]
    dma32_start: int
    dma32_size: int
    dma64_start: int
    host_page_shift: int
    memory: HostMemory
    impl: FastPath
    dma_fault: str  # "freeze" (EEH) or "error" (the access fails, the PE goes on)

    @property
    def pgsizes(self) -> int: ...

    def liobn(self, pe_number: int, num: int) -> int: ...

    def make_window(self, start: int, page_shift: int, nb_entries: int, *, levels: int = 1,
                    default: bool = False) -> Window: ...  # fmt: skip

    def default_window(self) -> Window: ...


class IommuGroup:
    """The VFIO unit of ownership: here exactly one PE (SR-IOV gives every VF its own)."""

    def __init__(self, pe: Pe, group_id: int) -> None:
        self.pe: Pe | None = pe
        self.id = group_id
        #: the VFIO container that took the group (a ``Container``), which then owns the
        #: PE's windows; None while the platform owns them
        self.container: WindowOwner | None = None

    @property
    def name(self) -> str:
        pe = self.pe
        return f"domain{pe.phb.index}-pe{pe.number:x}" if pe else f"group{self.id}"

    def __repr__(self) -> str:
        return f"IommuGroup({self.id}, {self.name})"


class Pe:
    """One PE of a PHB: window slots, EEH state, IOMMU group, translation of device accesses.

    Without a container the platform owns the PE's windows and the PE answers the guest's DDW
    calls itself (``WindowOwner``); once a container takes the group, ``owner`` is the
    container."""

    def __init__(self, phb: PeHost, number: int) -> None:
        self.phb = phb
        self.number = number
        self.windows: list[Window | None] = [None] * phb.max_windows
        self.fault_count = 0  # device accesses that faulted, whatever the policy did
        self.eeh = EehState(supported=phb.eeh, inject_supported=phb.eeh_inject)
        if isinstance(phb.impl, CffiFastPath):  # the C fast paths read the EEH state too
            self.eeh.mirror = phb.impl.ffi.new("struct vfiod_eeh_flags *")
        self.group = IommuGroup(self, phb.index * 0x10000 + number)

    def __repr__(self) -> str:
        return f"Pe(phb={self.phb.index}, number={self.number}, eeh_state={self.eeh_state})"

    # -- naming --
    def liobn(self, num: int) -> int:
        """LIOBN of window slot ``num`` (0 or 1) of this PE."""
        return self.phb.liobn(self.number, num)

    @property
    def container(self) -> WindowOwner | None:
        return self.group.container

    @property
    def owner(self) -> WindowOwner:
        """Who programs this PE's windows now: its group's container, or the PE itself."""
        return self.group.container or self

    # -- windows --
    def set_window(self, num: int, window: Window | None) -> None:
        """Program (or with None, clear) a TVE slot."""
        self.windows[num] = window

    def active_windows(self) -> int:
        return sum(1 for w in self.windows if w is not None)

    def window_for(self, iova: int) -> Window | None:
        for w in self.windows:
            if w is not None and w.contains(iova):
                return w
        return None

    def reset_windows(self) -> None:
        """Drop every window and re-create the default one (all TCEs invalid)."""
        for num, w in enumerate(self.windows):
            if w is not None:
                w.clear()
                self.set_window(num, None)
        if self.phb.dma32_size:
            self.set_window(0, self.phb.default_window())

    # -- WindowOwner: the guest's DDW calls while the platform owns the windows --
    @property
    def ddw_supported(self) -> bool:
        return self.phb.ddw

    def ddw_available(self) -> int:
        return self.phb.max_windows - self.active_windows()

    def ddw_create(self, page_shift: int, window_shift: int) -> tuple[int, int]:
        """A new all-invalid window in the first free slot; at the 32-bit start whenever no
        active window sits there (QEMU would use the 64-bit start as soon as any is active)."""
        try:
            num = self.windows.index(None)
        except ValueError:
            raise OSError(errno.ENOSPC, "no free window slot") from None
        phb = self.phb
        active = [w for w in self.windows if w is not None]
        start = (phb.dma32_start if all(w.bus_offset != phb.dma32_start for w in active)
                 else phb.dma64_start)  # fmt: skip
        end = start + (1 << window_shift)
        if end > 1 << 64 or any(w.bus_offset < end and start < w.end for w in active):
            raise OSError(errno.EBUSY, "the window would overlap an active one")
        self.set_window(num, phb.make_window(start, page_shift, 1 << (window_shift - page_shift)))
        return num, start

    def ddw_remove(self, num: int) -> None:
        """Removing the last non-default window brings the default one back."""
        w = self.windows[num]
        if w is None:
            raise LookupError(f"no window in slot {num}")
        w.clear()
        self.set_window(num, None)
        if self.active_windows() == 0 and not w.default:
            self.reset_windows()

    def ddw_reset(self) -> None:
        self.reset_windows()

    # -- EEH --
    @property
    def eeh_state(self) -> int:
        """0 normal, 1 reset, 2 stopped (MMIO+DMA), 4 DMA stopped, 5 unavailable."""
        return self.eeh.state

    @property
    def frozen(self) -> bool:
        return self.eeh.state != EEH_PE_STATE_NORMAL

    def freeze(self) -> None:
        self.eeh.freeze()

    def dma_fault(self) -> None:
        """A device access of this PE faulted: count it, and freeze the PE if the PHB's fault
        policy says so (EEH, as POWER hardware does); with "error" only the access fails."""
        self.fault_count += 1
        if self.phb.dma_fault == "freeze":
            self.eeh.freeze()

    def eeh_op(
        self, op: int, err_type: int = 0, func: int = 0, addr: int = 0, mask: int = 0
    ) -> int:
        return self.eeh.op(op, err_type, func, addr, mask)

    def on_reset(self, hook: Callable[[int], None]) -> None:
        """Call ``hook(op)`` when a hot/fundamental reset of this PE is deactivated."""
        self.eeh.reset_hooks.append(hook)

    # -- MMIO and config filtered by the EEH state --
    def mmio_read(self, size: int, read: Callable[[], bytes]) -> bytes:
        """Loads of a frozen PE return all-ones and never reach the device."""
        if not self.eeh.mmio_enabled:
            return b"\xff" * size
        return read()

    def mmio_write(self, write: Callable[[], None]) -> bool:
        """Stores of a frozen PE are dropped; returns whether it reached the device."""
        if not self.eeh.mmio_enabled:
            return False
        write()
        return True

    def config_read(self, size: int, read: Callable[[], bytes]) -> bytes:
        if self.eeh.config_blocked:
            return b"\xff" * size
        return read()

    # -- DMA translation --
    def _fault(self, iova: int, length: int, write: bool, reason: str) -> DmaFault:
        self.dma_fault()
        return DmaFault(iova, length, write, reason)

    def translate_sg(self, sg: Sequence[tuple[int, int]], write: bool) -> list[Piece]:
        """Host pieces for a scatter-gather list of (iova, length); DmaFault freezes the PE.

        The whole list is translated before the caller touches any byte, so a fault anywhere
        means nothing is read or written.
        """
        return [(r.buffer, off, ln) for r, off, ln in self.translate_regions(sg, write)]

    def translate_regions(self, sg: Sequence[tuple[int, int]], write: bool) -> list[RegionPiece]:
        """Like ``translate_sg``, with the memory region of each piece (its owner tells the
        DMA view which client file backs it)."""
        if not self.eeh.dma_enabled:
            total = sum(n for _, n in sg)
            raise DmaFault(sg[0][0] if sg else 0, total, write, "DMA of the PE is frozen")
        mem = self.phb.memory
        raw: list[tuple[int, int, int]] = []
        i = 0
        n = len(sg)
        while i < n:
            iova, length = sg[i]
            if length == 0:
                i += 1
                continue
            if length < 0 or iova < 0 or iova + length > 1 << 64:
                raise self._fault(iova, length, write, "bad range")
            w = self.window_for(iova)
            if w is None:
                raise self._fault(iova, length, write, "no window")
            j = i + 1
            lo, hi = w.bus_offset, w.end  # hoisted: this loop runs once per PRP page
            while j < n and sg[j][1] > 0 and lo <= sg[j][0] < hi:
                j += 1
            try:
                part = w.translate_raw(sg[i:j], write, mem)
            except TranslateFault as f:
                reason = "no permission, invalid TCE or unbacked address"
                raise self._fault(f.iova, sg[i + f.index][1], write, reason) from None
            if raw and part and raw[-1][0] == part[0][0] and raw[-1][1] + raw[-1][2] == part[0][1]:
                r0, o0, l0 = raw.pop()
                part[0] = (r0, o0, l0 + part[0][2])
            raw.extend(part)
            i = j
        return [(mem.region(r), off, ln) for r, off, ln in raw]

    def translate(self, iova: int, length: int, write: bool) -> list[Piece]:
        """Host pieces (buffer, offset, length) for a device access; DmaFault freezes the PE."""
        return self.translate_sg([(iova, length)], write)

    def dma_read(self, iova: int, length: int) -> bytes:
        """Device reads memory (needs TCE_READ)."""
        pieces = self.translate(iova, length, False)
        return b"".join(bytes(buf[off : off + ln]) for buf, off, ln in pieces)

    def dma_write(self, iova: int, data: bytes) -> None:
        """Device writes memory (needs TCE_WRITE)."""
        pieces = self.translate(iova, len(data), True)
        view = memoryview(data).cast("B")
        pos = 0
        for buf, off, ln in pieces:
            buf[off : off + ln] = view[pos : pos + ln]
            pos += ln

    # DmaSpace protocol (ARCHITECTURE.md): a function's DMA goes through its PE.
    read = dma_read
    write = dma_write
