"""A vfio-user client's DMA through its function's PE: DMA_MAP/DMA_UNMAP become TCE updates.

:class:`PeDma` is the DMA view a session holds when its function sits behind a PHB, and the
``DmaSpace`` its device uses; every device access goes through the function's PE:

* The session owns a v2 sPAPR :class:`~vfiod.spapr.Container` holding the function's PE group,
  charged to the client's :class:`~vfiod.spapr.Client` (one QEMU process: one "mm").
* The client's RAM files live in its :class:`ClientMemory` (one fd, one mmap and one host
  address range per file, deduplicated by ``(st_dev, st_ino)``, shared by every session of the
  client). Host addresses come from the host's :class:`AddressSpace` and are given back when a
  file goes. Each session preregisters the files it maps with its container: the client's first
  registration charges its locked memory, later ones only take a reference, so guest RAM is
  charged once however many functions map it. Table bytes of every window are charged too.
* A DMA_MAP is one ``Window.map_pages`` batch (the C store underneath) in the window that holds
  the IOVA; TCE permissions come exactly from the DMA_MAP flags (READ -> R, WRITE -> W; unlike
  PowerNV's MAP_DMA, W is not promoted to R|W). Windows use 4 KiB IOMMU pages, so every
  4 KiB-aligned map QEMU sends works (a pseries guest's 64 KiB or 16 MiB TCEs arrive as maps of
  that size, which are simply 16 or 4096 entries). The TCE tables are the only record of what
  is mapped: a map over a mapped range overwrites it, an unmap clears whatever lies in the range
  (a range never mapped costs a lookup of missing leaves: a pseries guest clears its whole
  default window at boot, 262,144 such 4 KiB unmaps), and "how much is mapped" is the tables'
  count of valid entries.
* Window policy (per PHB, chosen by the caller):

  - ``power8``: the layout of a pseries guest. The 32-bit window at ``dma32_start``
    (``dma32_size``, 2 GiB on PHB3) exists from the start; the 64-bit window at
    ``dma64_start`` (2^59) is created on the first map inside it and grows (a power of two,
    at least 2 GiB) when a later map ends beyond it. Anything else is ENXIO.
  - ``flat``: one window at ``dma32_start`` (0) covering what the client maps, grown the same
    way up to 2^54 (the 4 KiB-page geometry limit): a q35 guest without a guest IOMMU, whose
    QEMU maps guest RAM at its physical addresses.

  Table storage is sparse (4 KiB per 2 MiB of IOVA actually mapped) within a per-window budget
  (``max_table_bytes``); growing a window keeps its store, so it costs nothing per entry.
* Errors (error reply with errno, nothing changed): EINVAL for bad flags, a zero, wrapping or
  misaligned range, a map without an fd or beyond its file, a map crossing a window's end;
  ENXIO for an IOVA in no window (or past the policy's limit); EACCES for a writable map of a
  read-only file; ENOMEM when the registration or a window's table would pass the client's
  memlock limit; ENOSPC past ``max_backings`` files or a window's table budget.

Device DMA (``read``/``write``) is ``Pe.translate_regions`` followed by ``pread``/``pwrite`` on
the file; zero-copy DMA (``iovecs``) is one translation of a whole scatter-gather list, lent as
memoryviews of the files' mmaps for the kernel's ``preadv``/``pwritev`` and released when the
``with`` block ends. Either way a read needs R, a write W, and a translation fault anywhere (no
window, invalid TCE, permission, frozen DMA) freezes the PE (EEH) before any byte moves; a
client file that shrank freezes it too (short pread/pwrite, or EFAULT from the kernel during
zero-copy I/O). Python never reads or writes the client's mmap itself, so a client that
truncates its file gets a DMA fault, not a SIGBUS in the daemon.

The C view (``c_view``, ``struct vfiod_pe_dma``) carries the same windows and files, with each
file's fd and this process's address of its mapping, for the C paths: the session fast path
maps and unmaps through it, and the NVMe data mover translates device DMA through it from other
threads, answering TOO_HARD (touching nothing) wherever Python must decide. Its lock is held
here around everything that changes windows or files or frees table nodes. The C mover loads
and stores in a mapping itself only for a tmpfs memfd sealed against shrinking (QEMU's
``memory-backend-memfd`` seals by default); any other file it touches through the kernel too.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .constants import (
    SPAPR_TCE_PAGE_SHIFT,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_SPAPR_TCE_v2_IOMMU,
)
from .container import Container
from .dma import DmaFault, IovecLease
from .fastpath import CffiFastPath, CffiTceStore
from .memlock import Client
from .pe import Pe, RegionPiece
from .phb import Phb
from .tce import get_table_size
from .window import Window

DMA_READ = 1  #: DMA_MAP flag: the device may read this memory
DMA_WRITE = 2  #: DMA_MAP flag: the device may write this memory
POLICIES = ("power8", "flat")

PAGE_SHIFT = SPAPR_TCE_PAGE_SHIFT  #: IOMMU page of every window PeDma creates (4 KiB)
PAGE_SIZE = 1 << PAGE_SHIFT
MIN_WINDOW = 1 << 31  #: smallest lazily created / grown window (2 GiB: 8 MiB of table charge)
MAX_WINDOW = 1 << 54  #: largest 4 KiB-page window the PHB3 table geometry allows
MAX_TABLE_BYTES = 256 << 20  #: default leaf budget of one window (128 GiB of 4 KiB mappings)
HOST_ALIGN = 1 << 24  #: host addresses of RAM files are 16 MiB aligned
HOST_BASE = 1 << 44  #: first host address handed out (far above test/hypercall memory)
_IOVA_LIMIT = 1 << 64
_PAGE_MASK = PAGE_SIZE - 1
_LEAF_BYTES = 4096


class AddressSpace:
    """Host virtual addresses for the clients' RAM files; one per host, owned by it.

    A file gets the same address in every PHB's memory map (so it is registered, and charged,
    once per client), no two live files overlap, a guard gap separates neighbours, and a range
    is reused once its file is gone (first fit), so a long-running daemon whose clients come
    and go never runs out.
    """

    def __init__(self, base: int = HOST_BASE, limit: int = _IOVA_LIMIT,
                 align: int = HOST_ALIGN) -> None:  # fmt: skip
        self.align = align
        self._free: list[tuple[int, int]] = [(base, limit)]  # sorted, coalesced [start, end)
        self._used: dict[int, int] = {}  # start -> end (guard included)

    def _span(self, size: int) -> int:
        return -(-size // self.align) * self.align + self.align  # + a guard gap

    def alloc(self, size: int) -> int:
        span = self._span(size)
        for i, (start, end) in enumerate(self._free):
            if end - start >= span:
                if end - start == span:
                    del self._free[i]
                else:
                    self._free[i] = (start + span, end)
                self._used[start] = start + span
                return start
        raise OSError(errno.ENOMEM, "host address space exhausted")

    def free(self, vaddr: int) -> None:
        end = self._used.pop(vaddr)
        i = bisect.bisect_left(self._free, (vaddr, end))
        self._free.insert(i, (vaddr, end))
        # coalesce with the neighbours
        if i + 1 < len(self._free) and self._free[i][1] == self._free[i + 1][0]:
            self._free[i] = (self._free[i][0], self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][1] == self._free[i][0]:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i][1])
            del self._free[i]

    @property
    def in_use(self) -> int:
        """Ranges handed out and not given back."""
        return len(self._used)


@dataclass(eq=False)
class ClientFile:
    """One RAM file of one client: one fd, one mmap, one host address range."""

    key: tuple[int, int]
    fd: int
    size: int  # bytes of the file when first seen (what may be mapped)
    reg_size: int  # size rounded up to the client's page (what is preregistered/charged)
    vaddr: int  # host address of file offset 0
    writable: bool
    mm: mmap.mmap | None
    refs: int = 0  # PeDma objects holding it
    _address: int = 0  # of the mapping in this process, once asked

    def address(self, ffi: Any) -> int:
        """This process's address of the mapping (for the C data mover), valid while the file
        is open; no buffer export is kept, so the mapping can still be closed."""
        if not self._address and self.mm is not None:
            buf = ffi.from_buffer(self.mm)
            self._address = int(ffi.cast("uintptr_t", buf))
            ffi.release(buf)
        return self._address

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # a zero-copy view still exists; the mapping goes with it
            self.mm = None
        _close_quietly(self.fd)


class ClientMemory:
    """The RAM files of one client (QEMU process), shared by all its sessions.

    The host keeps one per client it admits; it holds the client's locked-memory account
    (``client``) and takes host addresses from the host's ``AddressSpace``.
    """

    def __init__(self, client: Client, space: AddressSpace | None = None) -> None:
        self.client = client
        self.space = space if space is not None else AddressSpace()
        self.files: dict[tuple[int, int], ClientFile] = {}

    def find(self, key: tuple[int, int]) -> ClientFile | None:
        return self.files.get(key)

    def open(self, fd: int, key: tuple[int, int], size: int) -> ClientFile:
        """A new file from ``fd`` (owned by the result from here on, even on error)."""
        try:
            writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
            # HostMemory wants a writable buffer; a read-only file gets a private
            # (copy-on-write) mapping that nobody writes. Python never touches either mapping.
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY
            mm = mmap.mmap(fd, size, access=access)
        except BaseException:
            _close_quietly(fd)
            raise
        page = self.client.page_size
        reg_size = -(-size // page) * page
        try:
            vaddr = self.space.alloc(reg_size)
        except BaseException:
            mm.close()
            _close_quietly(fd)
            raise
        return ClientFile(key, fd, size, reg_size, vaddr, writable, mm)

    def hold(self, file: ClientFile) -> None:
        file.refs += 1
        self.files[file.key] = file

    def release(self, file: ClientFile) -> None:
        """One holder less; the last one closes the file and gives its addresses back."""
        file.refs -= 1
        if file.refs <= 0:
            if self.files.get(file.key) is file:
                del self.files[file.key]
            self.discard(file)

    def discard(self, file: ClientFile) -> None:
        """Close a file nobody holds (a fresh file whose first map failed)."""
        file.close()
        self.space.free(file.vaddr)


class PeDma:
    """The DMA view of one vfio-user session, through one PE of a PHB (see module docstring)."""

    def __init__(
        self,
        phb: Phb,
        pe: Pe,
        memory: ClientMemory,
        policy: str = "power8",
        *,
        max_backings: int = 64,
        max_table_bytes: int = MAX_TABLE_BYTES,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown window policy {policy!r} (one of {POLICIES})")
        if pe.phb is not phb:
            raise ValueError("PE belongs to another PHB")
        if PAGE_SHIFT not in phb.page_shifts:
            raise ValueError("the PHB does not support 4 KiB IOMMU pages")
        self.phb = phb
        self.pe = pe
        self.memory = memory
        self.client = memory.client
        self.policy = policy
        self.max_backings = max_backings
        self.max_leaves = max(1, max_table_bytes // _LEAF_BYTES)
        self._files: dict[tuple[int, int], ClientFile] = {}
        #: the C view of this DMA state (``struct vfiod_pe_dma``, cffi_build/pe_dma.h) the
        #: session fast path maps and unmaps through; None without the C module
        self.c_view: Any = None
        self._maps_total = self._unmaps_total = 0
        impl = phb.impl
        if isinstance(impl, CffiFastPath):
            self.c_view = impl.ffi.new("struct vfiod_pe_dma *")
            impl.lib.vfiod_pe_dma_init(self.c_view)
            if pe.eeh.mirror is not None:
                self.c_view.eeh = pe.eeh.mirror
        self.closed = False
        self.container = Container(VFIO_SPAPR_TCE_v2_IOMMU, self.client)
        try:
            self.container.attach_group(pe.group)
            # Drop the kernel's lazily created default window and create our own, as QEMU's
            # v2 set-up does (REMOVE then CREATE); slot 0 lands at dma32_start.
            self.container.remove_window(phb.dma32_start)
            if policy == "power8":
                self._create(0, phb.dma32_size)
        except BaseException:
            self.container.close()
            raise
        self._sync()

    def __repr__(self) -> str:
        return (
            f"PeDma(phb={self.phb.index}, pe={self.pe.number}, policy={self.policy}, "
            f"mapped={self.mapped_bytes:#x}, files={len(self._files)})"
        )

    # -- counters (in the C view when there is one: the fast path counts there too) ---------

    @property
    def maps_total(self) -> int:
        return int(self.c_view.maps_total) if self.c_view is not None else self._maps_total

    @maps_total.setter
    def maps_total(self, value: int) -> None:
        if self.c_view is not None:
            self.c_view.maps_total = value
        else:
            self._maps_total = value

    @property
    def unmaps_total(self) -> int:
        return int(self.c_view.unmaps_total) if self.c_view is not None else self._unmaps_total

    @unmaps_total.setter
    def unmaps_total(self, value: int) -> None:
        if self.c_view is not None:
            self.c_view.unmaps_total = value
        else:
            self._unmaps_total = value

    def _sync(self) -> None:
        """Tell the C view what the windows and files are now (after any change to them)."""
        c = self.c_view
        if c is None:
            return
        c.closed = int(self.closed)
        for slot in range(len(c.win)):
            w = self.container.windows[slot] if slot < len(self.container.windows) else None
            store = w.table.store if w is not None else None
            if w is None or not isinstance(store, CffiTceStore):
                c.win[slot].size = 0
                c.win[slot].store = self.c_null
                continue
            c.win[slot].start = w.start
            c.win[slot].size = w.size
            c.win[slot].page_shift = w.page_shift
            c.win[slot].store = store.ptr
        files = list(self._files.values())
        impl = self.phb.impl
        assert isinstance(impl, CffiFastPath)
        for i, f in enumerate(files):
            cf = c.files[i]
            cf.dev, cf.ino = f.key
            cf.vaddr = f.vaddr
            cf.size = f.size
            cf.writable = int(f.writable)
            cf.fd = f.fd
            cf.mem = impl.ffi.cast("uint8_t *", f.address(impl.ffi))
            cf.sealed = int(bool(impl.lib.vfiod_dma_file_sealed(f.fd)))
        c.nfiles = len(files)

    @contextmanager
    def _c_locked(self) -> Iterator[None]:
        """Hold the C view's lock: device DMA in other threads (the NVMe data mover) translates
        through the windows and files this changes, and through table nodes it may free."""
        c = self.c_view
        if c is None:
            yield
            return
        impl = self.phb.impl
        assert isinstance(impl, CffiFastPath)
        impl.lib.vfiod_pe_dma_lock(c)
        try:
            yield
        finally:
            impl.lib.vfiod_pe_dma_unlock(c)

    @property
    def c_null(self) -> Any:
        impl = self.phb.impl
        assert isinstance(impl, CffiFastPath)
        return impl.ffi.NULL

    # -- DMA_MAP / DMA_UNMAP ---------------------------------------------------------------

    def map(self, iova: int, size: int, offset: int, prot: int, fd: int | None) -> None:
        """Apply one DMA_MAP. Takes ownership of ``fd`` whatever happens."""
        with self._c_locked():
            self._map(iova, size, offset, prot, fd)

    def _map(self, iova: int, size: int, offset: int, prot: int, fd: int | None) -> None:
        try:
            self._check_open()
            if prot & ~(DMA_READ | DMA_WRITE) or not prot:
                raise OSError(errno.EINVAL, f"bad DMA_MAP flags {prot:#x}")
            if size <= 0 or iova < 0 or offset < 0 or iova + size > _IOVA_LIMIT:
                raise OSError(errno.EINVAL, f"bad DMA range iova={iova:#x} size={size:#x}")
            if (iova | size | offset) & _PAGE_MASK:
                raise OSError(errno.EINVAL, "iova, size and offset must be 4 KiB aligned")
            if fd is None:
                # QEMU maps ROM and BIOS blobs without an fd. Nothing of ours can back them, so
                # they get no TCEs: the map replaces what was there and a device DMA to it
                # faults (and freezes the PE) like any unmapped IOVA.
                self._plan(iova, size)
                self._clear(iova, iova + size)
                self.maps_total += 1
                return
            slot, need = self._plan(iova, size)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "DMA_MAP fd is not a regular file or memfd")
            key = (st.st_dev, st.st_ino)
        except BaseException:
            if fd is not None:
                _close_quietly(fd)
            raise
        file, fresh = self._acquire(fd, key, st.st_size, offset + size, prot)  # owns fd now
        before = self.container.windows[slot]
        try:
            window = self._ensure(slot, need)
            window.map_pages(iova, (file.vaddr + offset, size >> PAGE_SHIFT), prot)
        except BaseException:
            if fresh:
                self._drop(file)
            self._sync()
            raise
        if fresh or window is not before:
            self._sync()  # a new file or a new window: the C view must know
        self.maps_total += 1

    def unmap(self, iova: int, size: int) -> int:
        """Apply one DMA_UNMAP; returns the bytes that were mapped there (0 is fine)."""
        self._check_open()
        if size <= 0 or iova < 0 or iova + size > _IOVA_LIMIT:
            raise OSError(errno.EINVAL, f"bad DMA range iova={iova:#x} size={size:#x}")
        if (iova | size) & _PAGE_MASK:
            raise OSError(errno.EINVAL, "iova and size must be 4 KiB aligned")
        self.unmaps_total += 1
        return self._clear(iova, iova + size)

    def unmap_all(self) -> None:
        """DMA_UNMAP with UNMAP_ALL: every TCE invalid; registrations stay (client alive)."""
        self._check_open()
        self.unmaps_total += 1
        with self._c_locked():  # clearing frees table nodes
            for w in self.container.windows:
                if w is not None:
                    w.clear()

    def close(self) -> None:
        """The client is gone: free windows, drop registrations and files, thaw the PE."""
        if self.closed:
            return
        with self._c_locked():
            self.closed = True
            self.container.close()  # clears and uncharges tables, drops prereg references
            for file in list(self._files.values()):
                self._release_file(file)
            self._files.clear()
            self._sync()
        eeh = self.pe.eeh  # the next client finds the function as a fresh open would
        eeh.reset_asserted = False
        eeh.config_blocked = False
        eeh.thaw()

    # -- queries ---------------------------------------------------------------------------

    @property
    def mapped_bytes(self) -> int:
        """IOVA bytes with a valid TCE (counted by the tables, O(1))."""
        return sum(w.tces_in_use << w.page_shift for w in self.container.windows if w)

    @property
    def backing_count(self) -> int:
        return len(self._files)

    def window(self, slot: int) -> Window | None:
        return self.container.windows[slot] if slot < len(self.container.windows) else None

    @property
    def files(self) -> tuple[ClientFile, ...]:
        """The client files this session has mapped (held until it closes)."""
        return tuple(self._files.values())

    # -- EEH: what the session asks before MMIO and config accesses -------------------------

    @property
    def mmio_frozen(self) -> bool:
        """MMIO of the PE is stopped (frozen, or a reset is asserted): loads read all-ones."""
        return not self.pe.eeh.mmio_enabled

    def access_blocked(self, region: int) -> bool:
        """True if a REGION_READ must return all-ones and a REGION_WRITE be dropped: MMIO of
        a frozen PE (or one in reset), config space while an EEH reset is asserted."""
        eeh = self.pe.eeh
        if region == VFIO_PCI_CONFIG_REGION_INDEX:
            return eeh.config_blocked
        return not eeh.mmio_enabled

    def eeh_op(self, op: int, err_type: int = 0, func: int = 0, addr: int = 0,
               mask: int = 0) -> int:  # fmt: skip
        """VFIO_EEH_PE_OP on this session's container."""
        return self.container.eeh_pe_op(op, err_type, func, addr, mask)

    def device_reset(self) -> None:
        """A function reset (DEVICE_RESET) thaws the PE unless an EEH reset is asserted: a
        guest without EEH (pseries with vfio-user boots with eeh=off) recovers this way."""
        eeh = self.pe.eeh
        if not eeh.reset_asserted:
            eeh.thaw()

    # -- DmaSpace: device DMA through the PE ------------------------------------------------

    def read(self, iova: int, length: int) -> bytes:
        pieces = self._translate([(iova, length)], write=False)
        chunks = []
        for file, off, n in pieces:
            data = os.pread(file.fd, n, off)
            if len(data) != n:
                raise self._fault(iova, length, False, "client RAM file shrank")
            chunks.append(data)
        return b"".join(chunks)

    def write(self, iova: int, data: bytes) -> None:
        length = len(data)
        pieces = self._translate([(iova, length)], write=True)
        ends: dict[int, int] = {}
        for file, off, n in pieces:
            ends[file.fd] = max(ends.get(file.fd, 0), off + n)
        for fd, end in ends.items():  # catch a shrunk file before any byte is written
            if os.fstat(fd).st_size < end:
                raise self._fault(iova, length, True, "client RAM file shrank")
        view = memoryview(data).cast("B")
        pos = 0
        for file, off, n in pieces:
            if os.pwrite(file.fd, view[pos : pos + n], off) != n:
                raise self._fault(iova, length, True, "client RAM file shrank")
            pos += n

    def iovecs(self, pieces: Sequence[tuple[int, int]], write: bool) -> IovecLease:
        """Zero-copy DMA (``ZeroCopyDma``): the whole scatter-gather list goes through the PE
        in one translation (the C translation, one call per window the list touches), then
        each host piece becomes a memoryview of its client file's mmap.

        ``write`` means the device writes guest memory (needs W); else it reads it (needs R).
        Any fault freezes the PE and raises DmaFault before a view exists, so nothing moves.
        The views are only valid inside the lease's ``with`` block; an EFAULT from the kernel
        (the client truncated its file) leaving the block freezes the PE and becomes DmaFault.
        """
        host = self._regions(pieces, write)
        views: list[memoryview] = []
        try:
            for region, off, n in host:
                v = region.buffer[off : off + n]
                views.append(v)
                if v.nbytes != n:  # cannot happen: translation checked the region bounds
                    raise self._sg_fault(pieces, write, "piece beyond its client file")
        except BaseException:
            for v in views:
                v.release()
            raise

        def on_efault(exc: OSError) -> DmaFault:
            return self._sg_fault(pieces, write, "client RAM file shrank")

        return IovecLease(views, (), on_efault)

    def _regions(self, sg: Sequence[tuple[int, int]], write: bool) -> list[RegionPiece]:
        """Translate through the PE (freezing it on a fault); every piece must be a client
        file of this session."""
        host = self.pe.translate_regions(sg, write)
        for region, _, _ in host:
            if not isinstance(region.owner, ClientFile):
                raise self._sg_fault(sg, write, "TCE points at memory of no client file")
        return host

    def _translate(self, sg: Sequence[tuple[int, int]],
                   write: bool) -> list[tuple[ClientFile, int, int]]:  # fmt: skip
        out = []
        for region, off, n in self._regions(sg, write):
            file = region.owner
            assert isinstance(file, ClientFile)
            out.append((file, off, n))
        return out

    def _sg_fault(self, pieces: Sequence[tuple[int, int]], write: bool, reason: str) -> DmaFault:
        iova = pieces[0][0] if pieces else 0
        return self._fault(iova, sum(n for _, n in pieces), write, reason)

    def _fault(self, iova: int, length: int, write: bool, reason: str) -> DmaFault:
        self.pe.dma_fault()  # freezes the PE unless the PHB's fault policy is "error"
        return DmaFault(iova, length, write, reason)

    # -- windows -----------------------------------------------------------------------------

    def _plan(self, iova: int, size: int) -> tuple[int, int]:
        """(window slot, size it must have) for a map; ENXIO/EINVAL, no side effects."""
        end = iova + size
        phb = self.phb
        if self.policy == "power8":
            w0 = self.container.windows[0]
            if w0 is not None and w0.contains(iova):
                if end > w0.end:
                    raise OSError(errno.EINVAL, "map crosses the end of the 32-bit window")
                return 0, w0.size
            base, slot = phb.dma64_start, 1
            if phb.max_windows < 2:
                raise OSError(errno.ENXIO, f"iova {iova:#x} in no window (no 64-bit window)")
        else:
            base, slot = phb.dma32_start, 0
        limit = base + min(MAX_WINDOW, _IOVA_LIMIT - base)
        if not base <= iova < limit:
            raise OSError(errno.ENXIO, f"iova {iova:#x} in no window ({self.policy})")
        if end > limit:
            raise OSError(errno.EINVAL, "map crosses the end of the largest window")
        need = max(MIN_WINDOW, 1 << (end - base - 1).bit_length())
        return slot, min(need, limit - base)

    def _levels(self, size: int) -> int:
        for levels in range(1, self.phb.max_levels + 1):
            if get_table_size(PAGE_SHIFT, size, levels, self.phb.host_page_shift):
                return levels
        raise OSError(errno.EINVAL, f"no table geometry for a {size:#x} window")

    def _create(self, slot: int, size: int, levels: int | None = None) -> Window:
        levels = self._levels(size) if levels is None else levels
        self.container.create_window(PAGE_SHIFT, size, levels)
        w = self.container.windows[slot]
        assert w is not None, "the container placed the window in another slot"
        w.table.store.max_leaves = self.max_leaves
        return w

    def _ensure(self, slot: int, need: int) -> Window:
        """The window of ``slot``, created or grown to ``need`` bytes (entries kept)."""
        w = self.container.windows[slot]
        if w is not None and w.size >= need:
            return w
        if w is None:
            return self._create(slot, need)
        store = w.table.take_store()  # the entries move to the re-created window
        old_size, old_levels = w.size, w.levels
        self.container.remove_window(w.start)
        try:
            new = self._create(slot, need)
        except OSError:
            new = self._create(slot, old_size, old_levels)  # we just gave its charge back
            new.table.adopt(store)
            raise
        new.table.adopt(store)
        return new

    def _clear(self, start: int, end: int) -> int:
        """Invalidate every TCE in [start, end) of every window; returns the bytes that were
        mapped. Missing leaves are skipped, so a range that was never mapped costs nothing."""
        removed = 0
        for w in self.container.windows:
            if w is None:
                continue
            lo, hi = max(start, w.start), min(end, w.end)
            if lo < hi:
                removed += w.clear_pages(lo, (hi - lo) >> PAGE_SHIFT) << PAGE_SHIFT
        return removed

    # -- files -------------------------------------------------------------------------------

    def _acquire(
        self, fd: int, key: tuple[int, int], st_size: int, need: int, prot: int
    ) -> tuple[ClientFile, bool]:
        """This session's reference on the client's file ``key`` (fd consumed); fresh=True if
        the session did not hold it before (so a failing map must drop it again)."""
        try:
            file = self._files.get(key)
            if file is not None:
                _close_quietly(fd)  # the same file again: keep the first fd
                self._check_fits(file, need, prot)
                return file, False
            if len(self._files) >= self.max_backings:
                raise OSError(errno.ENOSPC, f"more than {self.max_backings} distinct RAM files")
            file = self.memory.find(key)
            if file is not None:
                _close_quietly(fd)
                self._check_fits(file, need, prot)
            else:
                if need > st_size:
                    raise OSError(errno.EINVAL, f"DMA_MAP beyond its file ({st_size:#x} bytes)")
                file = self.memory.open(fd, key, st_size)
                fd = -1  # the file owns it now
                try:
                    self._check_fits(file, need, prot)
                except BaseException:
                    self.memory.discard(file)
                    raise
        except BaseException:
            if fd >= 0:
                _close_quietly(fd)
            raise
        shared = file.refs > 0
        try:
            # v2 preregistration: the client's first registration charges, later ones only
            # take a reference (ENOMEM here changes nothing).
            self.container.register_memory(file.vaddr, file.reg_size)
        except BaseException:
            if not shared:
                self.memory.discard(file)
            raise
        try:
            assert file.mm is not None
            self.phb.memory.attach(file.vaddr, file.size, file.mm, file)
        except ValueError as exc:
            self.container.unregister_memory(file.vaddr, file.reg_size)
            if not shared:
                self.memory.discard(file)
            raise OSError(errno.EBUSY, f"host address range taken: {exc}") from None
        except BaseException:
            self.container.unregister_memory(file.vaddr, file.reg_size)
            if not shared:
                self.memory.discard(file)
            raise
        self.memory.hold(file)
        self._files[key] = file
        return file, True

    @staticmethod
    def _check_fits(file: ClientFile, need: int, prot: int) -> None:
        if need > file.size:
            raise OSError(errno.EINVAL, f"DMA_MAP beyond its file ({file.size:#x} bytes)")
        if prot & DMA_WRITE and not file.writable:
            raise OSError(errno.EACCES, "DMA_MAP asks for write access to a read-only file")

    def _drop(self, file: ClientFile) -> None:
        """Undo ``_acquire`` of a fresh file after a failed map (nothing maps it here)."""
        self._files.pop(file.key, None)
        try:
            self.container.unregister_memory(file.vaddr, file.reg_size)
        except OSError:
            pass  # still mapped elsewhere in the client: its charge stays with those
        self._release_file(file)

    def _release_file(self, file: ClientFile) -> None:
        self.phb.memory.detach(file.vaddr)
        self.memory.release(file)

    def _check_open(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "DMA view closed")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
