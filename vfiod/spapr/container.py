"""A VFIO sPAPR TCE container (v1 and v2), with the errno each misuse gets.

v1 (VFIO_SPAPR_TCE_IOMMU): one group, ENABLE charges the 32-bit window, MAP_DMA pins pages.
v2 (VFIO_SPAPR_TCE_v2_IOMMU): memory is preregistered once per client, windows are created
and removed by the user, and all groups of the container share the same tables.
Methods raise ``OSError(errno, message)``; the session turns that into an error reply.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from .constants import (
    MAX_LEVELS,
    SPAPR_TCE_PAGE_SHIFT,
    TCE_READ,
    TCE_WRITE,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_EEH,
    VFIO_IOMMU_SPAPR_INFO_DDW,
    VFIO_SPAPR_TCE_IOMMU,
    VFIO_SPAPR_TCE_v2_IOMMU,
)
from .memlock import Client, PreregRegion
from .pe import IommuGroup, Pe, PeHost
from .tce import get_table_size, qemu_guess_levels
from .window import Window

_MAP_FLAGS = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE


def _err(code: int, msg: str) -> OSError:
    return OSError(code, msg)


def _ctz(x: int) -> int:
    return (x & -x).bit_length() - 1 if x else 64


@dataclass(frozen=True)
class SpaprTceInfo:
    """vfio_iommu_spapr_tce_info (GET_INFO)."""

    argsz: int
    flags: int
    dma32_window_start: int
    dma32_window_size: int
    pgsizes: int = 0
    max_dynamic_windows_supported: int = 0
    levels: int = 0

    def to_bytes(self) -> bytes:
        """Native-endian struct; only 16 bytes when argsz < 32, as the kernel copies back."""
        head = struct.pack(
            "=IIII", self.argsz, self.flags, self.dma32_window_start, self.dma32_window_size
        )
        if self.argsz < 32:
            return head
        return head + struct.pack(
            "=QII", self.pgsizes, self.max_dynamic_windows_supported, self.levels
        )


class Container:
    """VFIO sPAPR container semantics over the PEs of one or more PHBs."""

    def __init__(self, iommu_type: int, client: Client | None = None, *, eeh: bool = True) -> None:
        if iommu_type not in (VFIO_SPAPR_TCE_IOMMU, VFIO_SPAPR_TCE_v2_IOMMU):
            raise _err(errno.EINVAL, f"not an sPAPR IOMMU type: {iommu_type}")
        self.iommu_type = iommu_type
        self.v2 = iommu_type == VFIO_SPAPR_TCE_v2_IOMMU
        self.client = client if client is not None else Client()
        self.eeh = eeh
        self.mm: Client | None = None  # bound by the first ENABLE/REGISTER/CREATE/REMOVE
        self.groups: list[IommuGroup] = []
        self.windows: list[Window | None] = []
        self.enabled = False
        self.def_window_pending = False
        self.enable_pages = 0  # v1 ENABLE charge
        self.prereg: set[PreregRegion] = set()
        self.client.containers.add(self)

    def __repr__(self) -> str:
        return f"Container(v{2 if self.v2 else 1}, groups={[g.name for g in self.groups]})"

    # -- helpers --
    @property
    def phb(self) -> PeHost | None:
        pe = self.groups[0].pe if self.groups else None
        return pe.phb if pe else None

    def _pes(self) -> list[Pe]:
        return [g.pe for g in self.groups if g.pe is not None]

    def _bind_mm(self, caller: Client | None) -> Client:
        """The first mm-using call binds the container to its process; others get EPERM."""
        who = caller if caller is not None else self.client
        if self.mm is None:
            self.mm = who
        elif self.mm is not who:
            raise _err(errno.EPERM, "container belongs to another process")
        return who

    def _check_mm(self, caller: Client | None) -> None:
        if caller is not None and self.mm is not None and caller is not self.mm:
            raise _err(errno.EPERM, "container belongs to another process")

    def _need_v1(self) -> None:
        if self.v2:
            raise _err(errno.ENOTTY, "v1-only ioctl on a v2 container")

    def _need_v2(self) -> None:
        if not self.v2:
            raise _err(errno.ENOTTY, "v2-only ioctl on a v1 container")

    def _need_phb(self) -> PeHost:
        phb = self.phb
        if phb is None:
            raise _err(errno.ENXIO, "no group attached")
        return phb

    def _window_for(self, iova: int) -> Window | None:
        for w in self.windows:
            if w is not None and w.contains(iova):
                return w
        return None

    # -- CHECK_EXTENSION / GET_INFO --
    def check_extension(self, ext: int) -> int:
        if ext in (VFIO_SPAPR_TCE_IOMMU, VFIO_SPAPR_TCE_v2_IOMMU):
            return 1
        if ext == VFIO_EEH:
            return 1 if self.eeh else 0
        return 0

    def get_info(self, argsz: int = 32) -> SpaprTceInfo:
        phb = self.phb
        if phb is None:
            raise _err(errno.ENXIO, "no group attached")
        if argsz < 16:
            raise _err(errno.EINVAL, "argsz < 16")
        if self.v2 and phb.ddw and argsz >= 32:
            return SpaprTceInfo(
                argsz, VFIO_IOMMU_SPAPR_INFO_DDW, phb.dma32_start, phb.dma32_size,
                phb.pgsizes, phb.max_windows, MAX_LEVELS,
            )  # fmt: skip
        return SpaprTceInfo(argsz, 0, phb.dma32_start, phb.dma32_size)

    # -- groups --
    def attach_group(self, group: IommuGroup) -> None:
        """Take ownership of the group's PE; it gets this container's windows."""
        pe = group.pe
        if pe is None:
            raise _err(errno.ENODEV, "group has no PE")
        if group.container is not None:
            raise _err(errno.EBUSY, "group already attached")
        if self.v2 and not pe.phb.ddw:
            raise _err(errno.EINVAL, "v2 needs a platform with dynamic windows")
        if not self.v2 and self.groups:
            raise _err(errno.EBUSY, "a v1 container takes one group")
        phb = self.phb
        if phb is not None and phb.model != pe.phb.model:
            raise _err(errno.EPERM, "groups of different platforms")
        for w in self.windows:
            if w is not None and w.page_shift not in pe.phb.page_shifts:
                raise _err(errno.EINVAL, "group cannot host the container's page size")
        # take ownership: the platform's own tables of the PE go away
        for num, w in enumerate(pe.windows):
            if w is not None:
                w.clear()
                pe.set_window(num, None)
        if not self.windows:
            self.windows = [None] * pe.phb.max_windows
        if not self.groups and all(w is None for w in self.windows):
            self.def_window_pending = True
        for num, w in enumerate(self.windows):
            if w is not None and num < len(pe.windows):
                pe.set_window(num, w)
        group.container = self
        self.groups.append(group)

    def detach_group(self, group: IommuGroup) -> None:
        """Give the PE back to the platform (default window, all invalid)."""
        if group not in self.groups:
            raise _err(errno.EINVAL, "group not attached to this container")
        self.groups.remove(group)
        group.container = None
        pe = group.pe
        if pe is not None:
            for num in range(len(pe.windows)):
                pe.set_window(num, None)
            pe.reset_windows()
        if not self.groups:
            for w in self.windows:
                if w is not None:
                    w.clear()

    # -- v1 ENABLE / DISABLE --
    def enable(self, *, caller: Client | None = None) -> None:
        """v1: charge the 32-bit window size to the client (per container)."""
        self._need_v1()
        if self.enabled:
            raise _err(errno.EBUSY, "already enabled")
        phb = self.phb
        if phb is None:
            raise _err(errno.ENODEV, "no group attached")
        if phb.dma32_size == 0:
            raise _err(errno.EPERM, "no 32-bit window")
        mm = self._bind_mm(caller)
        pages = mm.pages(phb.dma32_size)
        mm.account(pages)
        self.enable_pages = pages
        self.enabled = True

    def disable(self, *, caller: Client | None = None) -> None:
        self._need_v1()
        self._check_mm(caller)
        if self.enabled and self.mm is not None:
            self.mm.unaccount(self.enable_pages)
        self.enable_pages = 0
        self.enabled = False

    # -- v2 preregistration --
    def register_memory(
        self, vaddr: int, size: int, flags: int = 0, *, caller: Client | None = None
    ) -> None:
        """v2: pin and charge a region once per client; also v2's "enable"."""
        self._need_v2()
        mm = self._bind_mm(caller)
        if flags:
            raise _err(errno.EINVAL, "flags must be 0")
        psize = mm.page_size
        if vaddr < 0 or size <= 0 or (vaddr | size) & (psize - 1) or vaddr + size > 1 << 64:
            raise _err(errno.EINVAL, "vaddr/size not page aligned, empty or wrapping")
        region = mm.regions.get((vaddr, size))
        if region is not None:
            if self in region.containers:
                raise _err(errno.EBUSY, "region already registered by this container")
            region.containers.add(self)  # same mm: a reference, no new charge
            self.prereg.add(region)
            self.enabled = True
            return
        end = vaddr + size
        if any(r.vaddr < end and vaddr < r.end for r in mm.regions.values()):
            raise _err(errno.EINVAL, "overlaps a different registered region")
        page_shift = min(_ctz(vaddr | size), 63)
        if mm.memory is not None:
            if not mm.memory.covered(vaddr, size):
                raise _err(errno.EFAULT, "region not backed by client memory")
            page_shift = min(page_shift, mm.memory.min_page_shift(vaddr, size))
        mm.account(mm.pages(size))
        region = PreregRegion(vaddr, size, page_shift, {self})
        mm.regions[(vaddr, size)] = region
        self.prereg.add(region)
        self.enabled = True

    def _region_mapped(self, mm: Client, region: PreregRegion) -> bool:
        for c in mm.containers:
            for w in c.windows:
                if w is not None and w.maps_into(region.vaddr, region.end):
                    return True
        return False

    def unregister_memory(
        self, vaddr: int, size: int, flags: int = 0, *, caller: Client | None = None
    ) -> None:
        """v2: drop this container's reference; the last one uncharges (EBUSY while mapped)."""
        self._need_v2()
        if self.mm is None:
            raise _err(errno.EPERM, "nothing registered yet")
        self._check_mm(caller)
        mm = self.mm
        if flags:
            raise _err(errno.EINVAL, "flags must be 0")
        if (vaddr | size) & (mm.page_size - 1):
            raise _err(errno.EINVAL, "vaddr/size not page aligned")
        region = mm.regions.get((vaddr, size))
        if region is None or self not in region.containers:
            raise _err(errno.ENOENT, "no such registered region")
        if len(region.containers) == 1 and self._region_mapped(mm, region):
            raise _err(errno.EBUSY, "region still mapped by TCEs")
        region.containers.discard(self)
        self.prereg.discard(region)
        if not region.containers:
            del mm.regions[(vaddr, size)]
            mm.unaccount(mm.pages(size))

    # -- v2 windows --
    def _make_window(
        self, mm: Client, phb: PeHost, page_shift: int, window_size: int, levels: int,
        default: bool = False,
    ) -> int:  # fmt: skip
        try:
            num = self.windows.index(None)
        except ValueError:
            raise _err(errno.ENOSPC, "both window slots are in use") from None
        if page_shift not in phb.page_shifts:
            raise _err(errno.EINVAL, f"page shift {page_shift} not supported")
        table_bytes = get_table_size(page_shift, window_size, levels, phb.host_page_shift)
        if table_bytes == 0:
            raise _err(errno.EINVAL, "levels, window size or address bits refused")
        start = phb.dma32_start if num == 0 else phb.dma64_start
        if start + window_size > 1 << 64:
            raise _err(errno.EINVAL, "window does not fit the bus")
        pages = mm.pages(table_bytes)
        mm.account(pages)
        w = phb.make_window(
            start, page_shift, window_size >> page_shift, levels=levels, default=default
        )
        w.accounted = pages
        self.windows[num] = w
        for pe in self._pes():
            if num < len(pe.windows):
                pe.set_window(num, w)
        return start

    def _create_pending(self, mm: Client) -> None:
        if self.def_window_pending:
            phb = self._need_phb()
            self._make_window(mm, phb, SPAPR_TCE_PAGE_SHIFT, phb.dma32_size, 1, default=True)
            self.def_window_pending = False

    def create_window(
        self,
        page_shift: int,
        window_size: int,
        levels: int = 1,
        flags: int = 0,
        *,
        caller: Client | None = None,
    ) -> int:
        """v2 TCE_CREATE: the start address is the platform's (slot 0: 0, slot 1: 2^59)."""
        self._need_v2()
        mm = self._bind_mm(caller)
        phb = self._need_phb()
        if flags:
            raise _err(errno.EINVAL, "flags must be 0")
        self._create_pending(mm)
        return self._make_window(mm, phb, page_shift, window_size, levels)

    def remove_window(self, start: int, *, caller: Client | None = None) -> None:
        """v2 TCE_REMOVE: clear, unprogram and uncharge the window containing ``start``."""
        self._need_v2()
        mm = self._bind_mm(caller)
        phb = self._need_phb()
        if self.def_window_pending and start == phb.dma32_start:
            self.def_window_pending = False
            return
        for num, w in enumerate(self.windows):  # noqa: B007 - num used after the loop
            if w is not None and w.contains(start):
                break
        else:
            raise _err(errno.EINVAL, f"no window at {start:#x}")
        for pe in self._pes():
            if num < len(pe.windows) and pe.windows[num] is w:
                pe.set_window(num, None)
        w.clear()
        self.windows[num] = None
        mm.unaccount(w.accounted)
        w.accounted = 0

    # -- guest DDW RTAS routed to the host windows (QEMU hw/vfio/spapr.c) --
    # The guest's create/remove/reset on a PE of this container become TCE_CREATE /
    # TCE_REMOVE on the container, so accounting and table sharing stay the container's.
    # Unlike the raw ioctls these are all-or-nothing: everything that could fail is checked
    # (including the locked-memory charge) before anything changes.
    def _guest_mm(self) -> Client:
        """The client the guest's QEMU runs as (EPERM if the container is bound elsewhere)."""
        if self.mm is not None and self.mm is not self.client:
            raise _err(errno.EPERM, "container belongs to another process")
        return self.client

    @staticmethod
    def _probe_charge(mm: Client, add_pages: int, release_pages: int) -> None:
        """ENOMEM (and no change) if charging add_pages after releasing release_pages fails."""
        delta = add_pages - release_pages
        if delta > 0:
            mm.account(delta)
            mm.unaccount(delta)

    def _default_pages(self, mm: Client, phb: PeHost) -> int:
        if not phb.dma32_size:
            return 0
        size = get_table_size(SPAPR_TCE_PAGE_SHIFT, phb.dma32_size, 1, phb.host_page_shift)
        return mm.pages(size)

    @property
    def ddw_supported(self) -> bool:
        """Only a v2 container has dynamic windows."""
        return self.v2

    def ddw_available(self) -> int:
        """Free window slots as the guest counts them (a pending default window is in use)."""
        used = sum(1 for w in self.windows if w is not None) + int(self.def_window_pending)
        return max(0, len(self.windows) - used)

    def ddw_create(self, page_shift: int, window_shift: int) -> tuple[int, int]:
        """(slot, start) of a new host window for ibm,create-pe-dma-window; nothing on error.

        Levels as QEMU first asks for them; slot and start are the platform's (slot 1: 2^59).
        """
        self._need_v2()
        phb = self._need_phb()
        mm = self._guest_mm()
        size = 1 << window_shift
        pending = self.def_window_pending
        free = [i for i, w in enumerate(self.windows) if w is None and not (pending and i == 0)]
        if not free:
            raise _err(errno.ENOSPC, "both window slots are in use")
        num = free[0]
        start = phb.dma32_start if num == 0 else phb.dma64_start
        if page_shift not in phb.page_shifts:
            raise _err(errno.EINVAL, f"page shift {page_shift} not supported")
        levels = qemu_guess_levels(page_shift, size, phb.host_page_shift)
        table_bytes = get_table_size(page_shift, size, levels, phb.host_page_shift)
        if table_bytes == 0 or start + size > 1 << 64:
            raise _err(errno.EINVAL, "levels, window size or address bits refused")
        busy = [(w.bus_offset, w.end) for w in self.windows if w is not None]
        charge = mm.pages(table_bytes)
        if pending:
            busy.append((phb.dma32_start, phb.dma32_start + phb.dma32_size))
            charge += self._default_pages(mm, phb)
        if any(s < start + size and start < e for s, e in busy):
            raise _err(errno.EINVAL, "window would overlap an active window")
        self._probe_charge(mm, charge, 0)
        got = self.create_window(page_shift, size, levels)
        return num, got

    def ddw_remove(self, num: int) -> None:
        """ibm,remove-pe-dma-window of slot ``num``: TCE_REMOVE; removing the last non-default
        window brings the default window back (QEMU >= 7.1), all or nothing."""
        phb = self._need_phb()
        w = self.windows[num] if num < len(self.windows) else None
        if w is not None:
            self._guest_remove(w.bus_offset)
        elif num == 0 and self.def_window_pending:
            self._guest_remove(phb.dma32_start)  # the default window not created yet
        else:
            raise LookupError(f"no window in slot {num}")

    def _guest_remove(self, start: int) -> None:
        self._need_v2()
        phb = self._need_phb()
        mm = self._guest_mm()
        if self.def_window_pending and start == phb.dma32_start:
            self.remove_window(start)  # drops the pending default window, no charge
            return
        w = self._window_for(start)
        if w is None:
            raise _err(errno.EINVAL, f"no window at {start:#x}")
        restore = not w.default and all(x is None or x is w for x in self.windows)
        if restore:
            self._probe_charge(mm, self._default_pages(mm, phb), w.accounted)
        self.remove_window(w.bus_offset)
        if restore and phb.dma32_size:
            self._make_window(mm, phb, SPAPR_TCE_PAGE_SHIFT, phb.dma32_size, 1, default=True)

    def ddw_reset(self) -> None:
        """ibm,reset-pe-dma-window: every window removed, the default one back, all invalid."""
        self._need_v2()
        phb = self._need_phb()
        mm = self._guest_mm()
        release = sum(w.accounted for w in self.windows if w is not None)
        self._probe_charge(mm, self._default_pages(mm, phb), release)
        for w in list(self.windows):
            if w is not None:
                self.remove_window(w.bus_offset)
        self.def_window_pending = False
        if phb.dma32_size:
            self._bind_mm(None)
            self._make_window(mm, phb, SPAPR_TCE_PAGE_SHIFT, phb.dma32_size, 1, default=True)

    # -- MAP / UNMAP --
    def _dma_window(self, iova: int, size: int, mm: Client) -> Window:
        self._create_pending(mm)
        w = self._window_for(iova)
        if w is None:
            raise _err(errno.ENXIO, f"iova {iova:#x} in no window")
        return w

    def map_dma(
        self, vaddr: int, iova: int, size: int, flags: int, *, caller: Client | None = None
    ) -> None:
        """Map [vaddr, vaddr+size) at iova; replaces existing entries (no EEXIST)."""
        if not self.enabled:
            raise _err(errno.EPERM, "container not enabled (ENABLE / REGISTER_MEMORY first)")
        self._check_mm(caller)
        mm = self.mm or self.client
        if flags & ~_MAP_FLAGS:
            raise _err(errno.EINVAL, "unknown flags")
        w = self._dma_window(iova, size, mm)
        mask = w.page_size - 1
        if size & mask or vaddr & mask or size < 0 or vaddr < 0:
            raise _err(errno.EINVAL, "size or vaddr not a multiple of the IOMMU page")
        if not flags & _MAP_FLAGS:
            raise _err(errno.EINVAL, "neither READ nor WRITE")
        if iova & mask:
            raise _err(errno.EINVAL, "iova not aligned to the IOMMU page")  # kernel returns 1
        npages = size >> w.page_shift
        if w.index(iova) + npages > w.nb_entries:
            raise _err(errno.EINVAL, "range crosses the window end")
        perm = 0
        if flags & VFIO_DMA_MAP_FLAG_READ:
            perm |= TCE_READ
        if flags & VFIO_DMA_MAP_FLAG_WRITE:
            perm |= TCE_WRITE | TCE_READ  # PowerNV promotes W to R|W
        if npages == 0:
            return
        if self.v2:
            region = mm.find_region(vaddr, size)
            if region is None:
                raise _err(errno.EINVAL, "vaddr range not preregistered")
            if w.page_shift > region.page_shift:
                raise _err(errno.EINVAL, "IOMMU page larger than the region's pages")
        elif mm.memory is not None:
            if not mm.memory.covered(vaddr, size):
                raise _err(errno.EFAULT, "vaddr range not backed")
            if mm.memory.min_page_shift(vaddr, size) < w.page_shift:
                raise _err(errno.EPERM, "host page smaller than the IOMMU page")
        w.table.fill_linear(w.index(iova), npages, vaddr | perm, w.page_size)

    def unmap_dma(
        self, iova: int, size: int, flags: int = 0, *, caller: Client | None = None
    ) -> None:
        """Invalidate [iova, iova+size); never-mapped entries are fine."""
        if not self.enabled:
            raise _err(errno.EPERM, "container not enabled")
        self._check_mm(caller)
        mm = self.mm or self.client
        if flags:
            raise _err(errno.EINVAL, "flags must be 0")
        w = self._dma_window(iova, size, mm)
        mask = w.page_size - 1
        if size & mask or size < 0:
            raise _err(errno.EINVAL, "size not a multiple of the IOMMU page")
        if iova & mask:
            raise _err(errno.EINVAL, "iova not aligned to the IOMMU page")  # kernel returns 1
        npages = size >> w.page_shift
        if w.index(iova) + npages > w.nb_entries:
            raise _err(errno.EINVAL, "range crosses the window end")
        if npages:
            w.table.fill(w.index(iova), npages, 0)

    # -- EEH --
    def eeh_pe_op(
        self, op: int, err_type: int = 0, func: int = 0, addr: int = 0, mask: int = 0
    ) -> int:
        """VFIO_EEH_PE_OP on every attached PE; first non-zero result wins."""
        pes = self._pes()
        if not pes:
            raise _err(errno.ENODEV, "no PE attached")
        for pe in pes:
            rc = pe.eeh_op(op, err_type, func, addr, mask)
            if rc:
                return rc
        return 0

    # -- lifetime --
    def close(self) -> None:
        """What closing the container fd does: detach, free tables, uncharge everything."""
        mm = self.mm or self.client
        for g in list(self.groups):
            self.detach_group(g)
        for num, w in enumerate(self.windows):
            if w is not None:
                w.clear()
                mm.unaccount(w.accounted)
                self.windows[num] = None
        for region in list(self.prereg):
            region.containers.discard(self)
            if not region.containers:
                mm.regions.pop((region.vaddr, region.size), None)
                mm.unaccount(mm.pages(region.size))
        self.prereg.clear()
        if self.enabled and not self.v2:
            mm.unaccount(self.enable_pages)
        self.enabled = False
        self.def_window_pending = False
        self.client.containers.discard(self)
