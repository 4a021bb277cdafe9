"""A vfio-user client's DMA through the POWER8 platform: DMA_MAP/DMA_UNMAP become TCE updates.

:class:`PeDma` is a drop-in for :class:`vfiod.server.dma.DmaMapTable` in a session
(``map``/``unmap``/``unmap_all``/``close``/``len``/``backing_count`` and the ``DmaSpace``
``read``/``write``), but every device access goes through the function's PE:

* The session owns a v2 sPAPR :class:`~vfiod.spapr.Container` holding the function's PE group,
  charged to a :class:`~vfiod.spapr.Client` (one QEMU process; shared by all sessions of it).
* Each RAM file (deduped by ``(st_dev, st_ino)``, one fd and one mmap per client and file) gets
  a host address range of its own, registered in every PHB's ``HostMemory`` that needs it and
  preregistered with the container (``register_memory``). Preregistration charges the client's
  locked memory once per file, however many sessions, functions or windows map it; the other
  containers of the client only take a reference. The charge goes when the last session of the
  client using that file closes. Table bytes of every window are charged too (kernel v2 rules).
* A DMA_MAP is one ``Window.map_pages`` batch call (C fast path underneath) in the window that
  holds the IOVA, TCE permissions exactly from the DMA_MAP flags (READ -> R, WRITE -> W; unlike
  PowerNV's MAP_DMA, W is not promoted to R|W). Windows use 4 KiB IOMMU pages, so every
  4 KiB-aligned map QEMU sends works (a pseries guest's 64 KiB or 16 MiB TCEs arrive as maps of
  that size, which are simply 16 or 4096 entries).
* Window policy (per PHB, chosen by the caller):

  - ``power8``: the layout of a pseries guest. The 32-bit window at ``dma32_start``
    (``dma32_size``, 2 GiB on PHB3) exists from the start; the 64-bit window at
    ``dma64_start`` (2^59) is created on the first map inside it and grows (a power of two,
    at least 2 GiB) when a later map ends beyond it. Anything else is ENXIO.
  - ``flat``: one window at ``dma32_start`` (0) covering what the client maps, grown the same
    way up to 2^54 (the 4 KiB-page geometry limit): a q35 guest without a guest IOMMU, whose
    QEMU maps guest RAM at its physical addresses.

  Table storage is sparse (4 KiB per 2 MiB of IOVA actually mapped) whatever the window size;
  growing a window keeps its leaves, so it costs O(leaves), not O(window).
* Errors (error reply with errno, nothing changed): EINVAL for bad flags, a zero, wrapping or
  misaligned range, a map without an fd or beyond its file, a map crossing a window's end;
  ENXIO for an IOVA in no window (or past the policy's limit); EACCES for a writable map of a
  read-only file; ENOMEM when the registration or a window's table would pass the client's
  memlock limit; ENOSPC past ``max_mappings`` / ``max_backings``.
* DMA_UNMAP of a range that was never mapped succeeds (as the kernel's sPAPR driver does: a
  pseries guest clears its whole default window at boot, 262,144 such 4 KiB unmaps). Live maps
  are kept in a ``SortedDict`` (sortedcontainers, a dependency of trio): insert, remove and
  "what overlaps [a, b)" are O(log n), so tens of thousands of live 4 KiB maps stay cheap, and an
  unmap that hits nothing costs one bisect and never touches the tables.

Device DMA (``read``/``write``) is ``Pe.translate`` followed by ``pread``/``pwrite`` on the
file; zero-copy DMA (``iovecs``) is one ``Pe.translate_sg`` of a whole scatter-gather list, lent
as memoryviews of the files' mmaps for the kernel's ``preadv``/``pwritev`` and released when the
``with`` block ends. Either way a read needs R, a write W, and a translation fault anywhere (no
window, invalid TCE, permission, frozen DMA) freezes the PE (EEH) before any byte moves; a
client file that shrank freezes it too (short pread/pwrite, or EFAULT from the kernel during
zero-copy I/O). Python never reads or writes the client's mmap itself, so a client that
truncates its file gets a DMA fault, not a SIGBUS in the daemon.

``access_blocked(region)`` tells the session when MMIO (BARs, ROM, VGA) of a frozen PE must read
all-ones and drop stores, and when config space is blocked (during an EEH reset).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sortedcontainers import SortedDict

from vfiod import spapr
from vfiod.pci.constants import REGION_CONFIG
from vfiod.pci.dma import DmaFault, IovecLease

DMA_READ = 1  #: DMA_MAP flag: the device may read this memory
DMA_WRITE = 2  #: DMA_MAP flag: the device may write this memory
POLICIES = ("power8", "flat")

PAGE_SHIFT = spapr.SPAPR_TCE_PAGE_SHIFT  #: IOMMU page of every window PeDma creates (4 KiB)
PAGE_SIZE = 1 << PAGE_SHIFT
MIN_WINDOW = 1 << 31  #: smallest lazily created / grown window (2 GiB: 8 MiB of table charge)
MAX_WINDOW = 1 << 54  #: largest 4 KiB-page window the PHB3 table geometry allows
HOST_ALIGN = 1 << 24  #: host addresses of RAM files are 16 MiB aligned
HOST_BASE = 1 << 44  #: first host address handed out (far above test/hypercall memory)
_IOVA_LIMIT = 1 << 64
_PAGE_MASK = PAGE_SIZE - 1


# -- shared state: per client (files, host addresses) and per PHB (HostMemory regions) ---------


@dataclass(eq=False)
class ClientFile:
    """One RAM file of one client: one fd, one mmap, one host address range, one charge."""

    key: tuple[int, int]
    fd: int
    size: int  # bytes of the file when first seen (what may be mapped)
    reg_size: int  # size rounded up to the client's page (what is preregistered/charged)
    vaddr: int  # host address of file offset 0
    writable: bool
    mm: mmap.mmap | None
    refs: int = 0  # PeDma objects holding it

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # a zero-copy view still exists; the mapping goes with it
            self.mm = None
        _close_quietly(self.fd)


@dataclass(eq=False)
class _PhbRegion:
    region: spapr.MemoryRegion
    file: ClientFile
    refs: int = 0


@dataclass(eq=False)
class _PhbSpace:
    """The RAM files one PHB's ``HostMemory`` holds for PeDma, and buffer -> file lookup."""

    regions: dict[int, _PhbRegion] = field(default_factory=dict)  # by vaddr
    by_buffer: dict[int, ClientFile] = field(default_factory=dict)  # id(region.buffer)


_client_files: weakref.WeakKeyDictionary[spapr.Client, dict[tuple[int, int], ClientFile]] = (
    weakref.WeakKeyDictionary()
)
_phb_spaces: weakref.WeakKeyDictionary[spapr.Phb, _PhbSpace] = weakref.WeakKeyDictionary()
_next_vaddr = HOST_BASE


def _alloc_vaddr(size: int) -> int:
    """Process-wide bump allocator: one client's file has the same host address on every PHB
    (so it is registered, and charged, once), and no two files ever overlap."""
    global _next_vaddr
    vaddr = _next_vaddr
    _next_vaddr = vaddr + -(-size // HOST_ALIGN) * HOST_ALIGN + HOST_ALIGN  # + a guard gap
    if _next_vaddr > _IOVA_LIMIT:
        raise OSError(errno.ENOMEM, "host address space exhausted")
    return vaddr


@dataclass(eq=False)
class Mapping:
    """One live DMA_MAP range (kept for unmap, splitting and ``len``)."""

    iova: int
    size: int
    file: ClientFile
    offset: int
    prot: int

    @property
    def end(self) -> int:
        return self.iova + self.size


class PeDma:
    """The DMA view of one vfio-user session, through one PE of a PHB (see module docstring)."""

    def __init__(
        self,
        phb: spapr.Phb,
        pe: spapr.Pe,
        client: spapr.Client,
        policy: str = "power8",
        *,
        max_mappings: int = 1 << 20,
        max_backings: int = 64,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown window policy {policy!r} (one of {POLICIES})")
        if pe.phb is not phb:
            raise ValueError("PE belongs to another PHB")
        if PAGE_SHIFT not in phb.page_shifts:
            raise ValueError("the PHB does not support 4 KiB IOMMU pages")
        self.phb = phb
        self.pe = pe
        self.client = client
        self.policy = policy
        self.max_mappings = max_mappings
        self.max_backings = max_backings
        self._maps = SortedDict()  # iova -> Mapping, non-overlapping
        self._files: dict[tuple[int, int], ClientFile] = {}
        self._space = _phb_spaces.setdefault(phb, _PhbSpace())
        self._client_files = _client_files.setdefault(client, {})
        self.maps_total = 0
        self.unmaps_total = 0
        self.closed = False
        self.container = spapr.Container(spapr.VFIO_SPAPR_TCE_v2_IOMMU, client)
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

    def __repr__(self) -> str:
        return (
            f"PeDma(phb={self.phb.index}, pe={self.pe.number}, policy={self.policy}, "
            f"maps={len(self._maps)}, files={len(self._files)})"
        )

    # -- DMA_MAP / DMA_UNMAP ---------------------------------------------------------------

    def map(self, iova: int, size: int, offset: int, prot: int, fd: int | None) -> None:
        """Apply one DMA_MAP. Takes ownership of ``fd`` whatever happens."""
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
                self._remove_range(iova, iova + size, clear=True)
                self.maps_total += 1
                return
            if len(self._maps) >= self.max_mappings:
                raise OSError(errno.ENOSPC, f"more than {self.max_mappings} live DMA mappings")
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
        try:
            window = self._ensure(slot, need)
            window.map_pages(iova, (file.vaddr + offset, size >> PAGE_SHIFT), prot)
        except BaseException:
            if fresh:
                self._drop(file)
            raise
        self._remove_range(iova, iova + size, clear=False)  # map_pages overwrote the TCEs
        self._maps[iova] = Mapping(iova, size, file, offset, prot)
        self.maps_total += 1

    def unmap(self, iova: int, size: int) -> int:
        """Apply one DMA_UNMAP; returns the bytes that were mapped there (0 is fine)."""
        self._check_open()
        if size <= 0 or iova < 0 or iova + size > _IOVA_LIMIT:
            raise OSError(errno.EINVAL, f"bad DMA range iova={iova:#x} size={size:#x}")
        if (iova | size) & _PAGE_MASK:
            raise OSError(errno.EINVAL, "iova and size must be 4 KiB aligned")
        self.unmaps_total += 1
        return self._remove_range(iova, iova + size, clear=True)

    def unmap_all(self) -> None:
        """DMA_UNMAP with UNMAP_ALL: every TCE invalid; registrations stay (client alive)."""
        self._check_open()
        self.unmaps_total += 1
        self._maps.clear()
        for w in self.container.windows:
            if w is not None:
                w.clear()

    def close(self) -> None:
        """The client is gone: free windows, drop registrations and files, thaw the PE."""
        if self.closed:
            return
        self.closed = True
        self._maps.clear()
        self.container.close()  # clears and uncharges tables, drops prereg references
        for file in list(self._files.values()):
            self._release_file(file)
        self._files.clear()
        eeh = self.pe.eeh  # the next client finds the function as a fresh open would
        eeh.reset_asserted = False
        eeh.config_blocked = False
        eeh.thaw()

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def backing_count(self) -> int:
        return len(self._files)

    def mappings(self) -> Iterator[Mapping]:
        return iter(self._maps.values())

    def window(self, slot: int) -> spapr.Window | None:
        return self.container.windows[slot] if slot < len(self.container.windows) else None

    # -- EEH: what the session asks before MMIO and config accesses -------------------------

    @property
    def mmio_frozen(self) -> bool:
        """MMIO of the PE is stopped (frozen, or a reset is asserted): loads read all-ones."""
        return not self.pe.eeh.mmio_enabled

    @property
    def config_blocked(self) -> bool:
        """Config space is blocked (during an EEH hot/fundamental reset)."""
        return self.pe.eeh.config_blocked

    def access_blocked(self, region: int) -> bool:
        """True if a REGION_READ must return all-ones and a REGION_WRITE be dropped."""
        if region == REGION_CONFIG:
            return self.config_blocked
        return self.mmio_frozen

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
        pieces = self._translate(iova, length, write=False)
        chunks = []
        for file, off, n in pieces:
            data = os.pread(file.fd, n, off)
            if len(data) != n:
                raise self._fault(iova, length, False, "client RAM file shrank")
            chunks.append(data)
        return b"".join(chunks)

    def write(self, iova: int, data: bytes) -> None:
        length = len(data)
        pieces = self._translate(iova, length, write=True)
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
        """Zero-copy DMA (``vfiod.pci.dma.ZeroCopyDma``): the whole scatter-gather list goes
        through the PE in one ``Pe.translate_sg`` call (the C translation, one call per window
        the list touches), then each host piece becomes a memoryview of its client file's mmap.

        ``write`` means the device writes guest memory (needs W); else it reads it (needs R).
        Any fault freezes the PE and raises DmaFault before a view exists, so nothing moves.
        The views are only valid inside the lease's ``with`` block; an EFAULT from the kernel
        (the client truncated its file) leaving the block freezes the PE and becomes DmaFault.
        """
        try:
            host = self.pe.translate_sg(pieces, write)  # freezes the PE on a fault
        except spapr.DmaFault as f:
            raise DmaFault(f.iova, f.length, write, f.reason) from None
        by_buffer = self._space.by_buffer
        for buf, _, _ in host:
            if id(buf) not in by_buffer:
                raise self._sg_fault(pieces, write, "TCE points at memory of no client file")
        views: list[memoryview] = []
        try:
            for buf, off, n in host:
                v = buf[off : off + n]
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

    def _sg_fault(self, pieces: Sequence[tuple[int, int]], write: bool, reason: str) -> DmaFault:
        iova = pieces[0][0] if pieces else 0
        return self._fault(iova, sum(n for _, n in pieces), write, reason)

    def _translate(self, iova: int, length: int, write: bool) -> list[tuple[ClientFile, int, int]]:
        try:
            pieces = self.pe.translate(iova, length, write)  # freezes the PE on a fault
        except spapr.DmaFault as f:
            raise DmaFault(f.iova, f.length, write, f.reason) from None
        out = []
        by_buffer = self._space.by_buffer
        for buf, off, n in pieces:
            file = by_buffer.get(id(buf))
            if file is None:
                raise self._fault(iova, length, write, "TCE points at memory of no client file")
            out.append((file, off, n))
        return out

    def _fault(self, iova: int, length: int, write: bool, reason: str) -> DmaFault:
        self.pe.freeze()
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
            if spapr.get_table_size(PAGE_SHIFT, size, levels, self.phb.host_page_shift):
                return levels
        raise OSError(errno.EINVAL, f"no table geometry for a {size:#x} window")

    def _create(self, slot: int, size: int, levels: int | None = None) -> spapr.Window:
        levels = self._levels(size) if levels is None else levels
        self.container.create_window(PAGE_SHIFT, size, levels)
        w = self.container.windows[slot]
        assert w is not None, "the container placed the window in another slot"
        return w

    def _ensure(self, slot: int, need: int) -> spapr.Window:
        """The window of ``slot``, created or grown to ``need`` bytes (leaves kept)."""
        w = self.container.windows[slot]
        if w is not None and w.size >= need:
            return w
        if w is None:
            return self._create(slot, need)
        leaves = dict(w.table.leaves)  # remove_window clears the dict, not the leaves
        old_size, old_levels = w.size, w.levels
        self.container.remove_window(w.start)
        try:
            new = self._create(slot, need)
        except OSError:
            new = self._create(slot, old_size, old_levels)  # we just gave its charge back
            _adopt_leaves(new, leaves)
            raise
        _adopt_leaves(new, leaves)
        return new

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
            file = self._client_files.get(key)
            if file is not None:
                _close_quietly(fd)
                self._check_fits(file, need, prot)
            else:
                if need > st_size:
                    raise OSError(errno.EINVAL, f"DMA_MAP beyond its file ({st_size:#x} bytes)")
                file = _open_file(fd, key, st_size, self.client.page_size)
                fd = -1  # the file owns it now
                try:
                    self._check_fits(file, need, prot)
                except BaseException:
                    file.close()
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
                file.close()
            raise
        try:
            self._space_add(file)
        except BaseException:
            self.container.unregister_memory(file.vaddr, file.reg_size)
            if not shared:
                file.close()
            raise
        file.refs += 1
        self._client_files[key] = file
        self._files[key] = file
        return file, True

    @staticmethod
    def _check_fits(file: ClientFile, need: int, prot: int) -> None:
        if need > file.size:
            raise OSError(errno.EINVAL, f"DMA_MAP beyond its file ({file.size:#x} bytes)")
        if prot & DMA_WRITE and not file.writable:
            raise OSError(errno.EACCES, "DMA_MAP asks for write access to a read-only file")

    def _space_add(self, file: ClientFile) -> None:
        entry = self._space.regions.get(file.vaddr)
        if entry is None:
            assert file.mm is not None
            try:
                region = self.phb.memory.add(file.vaddr, file.size, file.mm)
            except ValueError as exc:
                raise OSError(errno.EBUSY, f"host address range taken: {exc}") from None
            entry = _PhbRegion(region, file)
            self._space.regions[file.vaddr] = entry
            self._space.by_buffer[id(region.buffer)] = file
        entry.refs += 1

    def _space_remove(self, file: ClientFile) -> None:
        entry = self._space.regions.get(file.vaddr)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            del self._space.regions[file.vaddr]
            self._space.by_buffer.pop(id(entry.region.buffer), None)
            self.phb.memory.remove(file.vaddr)
            try:
                entry.region.buffer.release()  # so the file's mmap can close
            except BufferError:
                pass  # a view of it is still exported; the mmap goes when that view does

    def _drop(self, file: ClientFile) -> None:
        """Undo ``_acquire`` of a fresh file after a failed map (nothing maps it here)."""
        self._files.pop(file.key, None)
        try:
            self.container.unregister_memory(file.vaddr, file.reg_size)
        except OSError:
            pass  # still mapped elsewhere in the client: its charge stays with those
        self._release_file(file)

    def _release_file(self, file: ClientFile) -> None:
        self._space_remove(file)
        file.refs -= 1
        if file.refs <= 0:
            if self._client_files.get(file.key) is file:
                del self._client_files[file.key]
            file.close()

    # -- live map bookkeeping ----------------------------------------------------------------

    def _remove_range(self, start: int, end: int, clear: bool) -> int:
        """Remove [start, end) from every mapping it touches (splitting partial overlaps) and,
        with ``clear``, invalidate the TCEs of what was removed. Nothing mapped: one bisect."""
        maps = self._maps
        hit: list[Mapping] = []
        index = maps.bisect_left(start)  # first mapping starting at or after start
        count = len(maps)
        if index > 0:
            m = maps.peekitem(index - 1 if index < count else -1)[1]
            if m.end > start:
                hit.append(m)
        if index < count and maps.peekitem(index)[0] < end:
            hit.extend(maps[k] for k in maps.irange(start, end, inclusive=(True, False)))
        if not hit:
            return 0
        removed = 0
        spans: list[list[int]] = []  # merged [lo, hi) ranges whose TCEs must be cleared
        for m in hit:
            del maps[m.iova]
            lo, hi = max(m.iova, start), min(m.end, end)
            removed += hi - lo
            if m.iova < lo:
                maps[m.iova] = Mapping(m.iova, lo - m.iova, m.file, m.offset, m.prot)
            if hi < m.end:
                maps[hi] = Mapping(hi, m.end - hi, m.file, m.offset + (hi - m.iova), m.prot)
            if spans and spans[-1][1] == lo:
                spans[-1][1] = hi
            else:
                spans.append([lo, hi])
        if clear:
            for lo, hi in spans:
                w = self.pe.window_for(lo)
                if w is not None:  # a mapping always lies inside one window
                    w.clear_pages(lo, (hi - lo) >> PAGE_SHIFT)
        return removed

    def _check_open(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "DMA view closed")


def _adopt_leaves(window: spapr.Window, leaves: dict[int, object]) -> None:
    """Give a re-created window (same start and page size) the old window's table leaves."""
    table = window.table
    table.leaves.update(leaves)
    table.generation += 1


def _open_file(fd: int, key: tuple[int, int], size: int, page_size: int) -> ClientFile:
    writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    # HostMemory wants a writable buffer; a read-only file gets a private (copy-on-write)
    # mapping that nobody writes. Python never reads or writes either mapping.
    access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY
    mm = mmap.mmap(fd, size, access=access)
    reg_size = -(-size // page_size) * page_size
    try:
        vaddr = _alloc_vaddr(reg_size)
    except BaseException:
        mm.close()
        raise
    return ClientFile(key, fd, size, reg_size, vaddr, writable, mm)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
