"""Locked-memory accounting per client, charged the way the kernel charges ``locked_vm``.

One client = one QEMU process = one ``mm``. Increments fail with ENOMEM (changing nothing)
when they would pass the limit; decrements never fail. What is charged:

* v1 container: the 32-bit window size at ENABLE, per container;
* v2: each distinct preregistered region once per client, however many containers register it;
* both: the accounted size of every TCE table a container creates (``get_table_size``).

The known problem this fixes, for a 4 GiB guest with 3 IOMMU groups, each with the 2 GiB
32-bit window and a 4 GiB DDW: per-container window accounting needs 3 x (2 + 4) = 18 GiB,
preregistration needs 4 GiB plus a few MiB of tables (``per_container_estimate`` /
``prereg_estimate``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass, field

from .constants import HOST_PAGE_SHIFT
from .memory import HostMemory
from .tce import get_table_size
from .window import WindowOwner


@dataclass(eq=False)
class PreregRegion:
    """A v2 preregistered (pinned, accounted) region of the client's memory."""

    vaddr: int
    size: int
    page_shift: int  # largest IOMMU page it can back
    containers: set[WindowOwner] = field(default_factory=set)

    @property
    def end(self) -> int:
        return self.vaddr + self.size


class Client:
    """A client process: its memlock limit, locked_vm counter and preregistered regions."""

    def __init__(
        self,
        memlock_limit: int | None = None,
        *,
        page_shift: int = HOST_PAGE_SHIFT,
        cap_ipc_lock: bool = False,
        memory: HostMemory | None = None,
        name: str = "",
    ) -> None:
        self.memlock_limit = memlock_limit  # bytes, like RLIMIT_MEMLOCK; None = unlimited
        self.page_shift = page_shift
        self.cap_ipc_lock = cap_ipc_lock
        self.memory = memory  # the client's address space (pin checks); None = unchecked
        self.name = name
        self.locked_vm = 0  # pages
        self.regions: dict[tuple[int, int], PreregRegion] = {}
        self.containers: set[WindowOwner] = set()  # its containers (windows to check)

    def __repr__(self) -> str:
        return f"Client({self.name!r}, locked={self.locked_bytes:#x}, limit={self.memlock_limit})"

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def locked_bytes(self) -> int:
        return self.locked_vm << self.page_shift

    def pages(self, nbytes: int) -> int:
        """Bytes -> pages as the kernel does (shift, so partial pages are not charged)."""
        return nbytes >> self.page_shift

    def account(self, npages: int) -> None:
        """Charge npages; ENOMEM and no change if that passes the limit."""
        if npages <= 0:
            return
        if self.memlock_limit is not None and not self.cap_ipc_lock:
            if self.locked_vm + npages > self.memlock_limit >> self.page_shift:
                raise OSError(errno.ENOMEM, "RLIMIT_MEMLOCK exceeded")
        self.locked_vm += npages

    def unaccount(self, npages: int) -> None:
        self.locked_vm = max(0, self.locked_vm - max(0, npages))

    def find_region(self, vaddr: int, size: int) -> PreregRegion | None:
        """The registered region containing [vaddr, vaddr+size), if any."""
        for r in self.regions.values():
            if r.vaddr <= vaddr and vaddr + size <= r.end:
                return r
        return None


# --- the formulas of the spec, as plain arithmetic ---

GiB = 1 << 30
MiB = 1 << 20


def per_container_estimate(n_containers: int, window_sizes: Iterable[int]) -> int:
    """Bytes needed when every container pays for every window it could map."""
    return n_containers * sum(window_sizes)


def prereg_estimate(
    ram: int,
    n_containers: int,
    windows: Iterable[tuple[int, int, int]],
    host_page_shift: int = HOST_PAGE_SHIFT,
) -> int:
    """Bytes needed with v2 preregistration: RAM once + each container's table accounting.

    ``windows`` are (page_shift, window_size, levels) of one container's tables.
    """
    tables = sum(get_table_size(s, w, lv, host_page_shift) for s, w, lv in windows)
    return ram + n_containers * tables


def v1_estimate(n_containers: int, dma32_size: int) -> int:
    """Bytes v1 ENABLE charges: the 32-bit window size, per container."""
    return n_containers * dma32_size
