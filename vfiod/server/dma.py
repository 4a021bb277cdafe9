"""A client's DMA mappings: IOVA ranges -> the client's RAM files.

QEMU sends the fd of the RAM file with every DMA_MAP, each time as a new fd number. A backing
file is identified by (st_dev, st_ino), mapped once, and every duplicate fd is closed at once,
so a guest with 500,000 live 4 KiB maps holds one fd and one mmap per RAM file.

Mappings are kept as a sorted, non-overlapping list searched with bisect: map over an existing
range replaces it, unmap of a range that was never mapped succeeds (the kernel's sPAPR driver
does the same, and a pseries guest clears its whole default window at boot).

Small device accesses use pread/pwrite on the backing fd rather than touching the mmap from
Python: a hostile client that truncates its RAM file then gets a short count (a DMA fault), not a
SIGBUS that would kill the daemon. The mmap is there for zero-copy bulk I/O: ``iovecs`` lends
memoryviews of it for preadv/pwritev into or out of guest RAM, where the kernel reports such a
truncation as EFAULT (which the lease turns into a DMA fault).
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vfiod.spapr.dma import DmaFault, IovecLease

DMA_READ = 1  #: the device may read this memory (guest -> device)
DMA_WRITE = 2  #: the device may write this memory (device -> guest)
_IOVA_LIMIT = 1 << 64


class DmaView(Protocol):
    """What a session needs of its client's DMA state, and all it asks of it: ``DmaMapTable``
    (no platform) or ``vfiod.spapr.PeDma`` (through the function's PE). It is also the DMA
    space the session hands the function (``read``/``write``, optionally ``iovecs``)."""

    maps_total: int  #: DMA_MAPs applied
    unmaps_total: int  #: DMA_UNMAPs applied
    #: the C view of this state (``struct vfiod_pe_dma``) the session fast path maps and
    #: unmaps through, or None: then DMA messages are always handled by the session
    c_view: Any

    def map(self, iova: int, size: int, offset: int, prot: int, fd: int | None) -> None: ...

    def unmap(self, iova: int, size: int) -> int: ...

    def unmap_all(self) -> None: ...

    def close(self) -> None: ...

    def read(self, iova: int, length: int) -> bytes: ...

    def write(self, iova: int, data: bytes) -> None: ...

    @property
    def mapped_bytes(self) -> int: ...

    @property
    def backing_count(self) -> int: ...

    def access_blocked(self, region: int) -> bool:
        """True if a REGION_READ must read all-ones and a REGION_WRITE be dropped (EEH)."""
        ...

    def device_reset(self) -> None:
        """The client reset the device (DEVICE_RESET): what that means for its DMA."""
        ...


@dataclass(eq=False)
class Backing:
    """One RAM file of the client, mapped once."""

    key: tuple[int, int]
    fd: int
    size: int
    writable: bool
    mm: mmap.mmap | None
    refs: int = 0

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                # A zero-copy user still holds a view; the mapping goes when the view does.
                pass
            self.mm = None
        os.close(self.fd)


@dataclass(eq=False)
class Mapping:
    iova: int
    size: int
    backing: Backing | None
    offset: int
    prot: int

    @property
    def end(self) -> int:
        return self.iova + self.size


class DmaMapTable:
    """The DMA_MAP/DMA_UNMAP state of one vfio-user client, usable as a ``DmaSpace``."""

    def __init__(self, max_mappings: int = 1 << 20, max_backings: int = 64) -> None:
        self.max_mappings = max_mappings
        self.max_backings = max_backings
        self._starts: list[int] = []
        self._maps: list[Mapping] = []
        self._backings: dict[tuple[int, int], Backing] = {}
        self.c_view: Any = None  # no C view: the session handles every DMA message itself
        self.maps_total = 0
        self.unmaps_total = 0

    # -- DMA_MAP / DMA_UNMAP -------------------------------------------------------------

    def map(self, iova: int, size: int, offset: int, prot: int, fd: int | None) -> None:
        """Apply one DMA_MAP. Takes ownership of ``fd`` whatever happens."""
        try:
            if prot & ~(DMA_READ | DMA_WRITE):
                raise OSError(errno.EINVAL, f"unknown DMA_MAP flags {prot:#x}")
            if size == 0 or iova + size > _IOVA_LIMIT:
                raise OSError(errno.EINVAL, f"bad DMA range iova={iova:#x} size={size:#x}")
            if fd is None and offset:
                raise OSError(errno.EINVAL, "offset given without an fd")
            if len(self._maps) >= self.max_mappings:
                raise OSError(errno.ENOSPC, f"more than {self.max_mappings} live DMA mappings")
            backing = self._backing_for(fd, offset, size, prot) if fd is not None else None
        except BaseException:
            if fd is not None:
                _close_quietly(fd)
            raise
        if backing is not None:
            backing.refs += 1  # before the removal below, which may drop the old last reference
        self._remove_range(iova, iova + size)
        index = bisect.bisect_left(self._starts, iova)
        self._starts.insert(index, iova)
        self._maps.insert(index, Mapping(iova, size, backing, offset, prot))
        self.maps_total += 1

    def unmap(self, iova: int, size: int) -> int:
        """Apply one DMA_UNMAP; returns how many bytes were really mapped there."""
        if size == 0 or iova + size > _IOVA_LIMIT:
            raise OSError(errno.EINVAL, f"bad DMA range iova={iova:#x} size={size:#x}")
        self.unmaps_total += 1
        return self._remove_range(iova, iova + size)

    def unmap_all(self) -> None:
        self.unmaps_total += 1
        self._remove_range(0, _IOVA_LIMIT)

    def close(self) -> None:
        self._remove_range(0, _IOVA_LIMIT)
        for backing in list(self._backings.values()):
            backing.close()
        self._backings.clear()

    # -- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def mapped_bytes(self) -> int:
        return sum(m.size for m in self._maps)

    @property
    def backing_count(self) -> int:
        return len(self._backings)

    def access_blocked(self, region: int) -> bool:
        return False  # no platform, no EEH: accesses always reach the function

    def device_reset(self) -> None:
        return None  # nothing to recover: the map table is the client's, it stays

    def mappings(self) -> Iterator[Mapping]:
        return iter(self._maps)

    def pieces(self, iova: int, length: int, write: bool) -> list[tuple[Mapping, int, int]]:
        """Split an access into (mapping, offset into it, length); DmaFault if any byte is not
        mapped with the needed permission or has no RAM file behind it."""
        need = DMA_WRITE if write else DMA_READ
        out: list[tuple[Mapping, int, int]] = []
        pos, end = iova, iova + length
        if length < 0 or end > _IOVA_LIMIT:
            raise DmaFault(iova, length, write, "access outside the IOVA space")
        index = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if index < 0 or index >= len(self._maps):
                raise DmaFault(pos, end - pos, write, "not mapped")
            m = self._maps[index]
            if not m.iova <= pos < m.end:
                raise DmaFault(pos, end - pos, write, "not mapped")
            if not m.prot & need:
                raise DmaFault(pos, end - pos, write, "mapped without permission")
            if m.backing is None:
                raise DmaFault(pos, end - pos, write, "mapped without an fd (no shared RAM)")
            take = min(end, m.end) - pos
            out.append((m, pos - m.iova, take))
            pos += take
            index += 1
        return out

    # -- DmaSpace ------------------------------------------------------------------------

    def read(self, iova: int, length: int) -> bytes:
        chunks = []
        for m, delta, n in self.pieces(iova, length, write=False):
            assert m.backing is not None
            data = os.pread(m.backing.fd, n, m.offset + delta)
            if len(data) != n:
                raise DmaFault(m.iova + delta, n, False, "client RAM file shrank")
            chunks.append(data)
        return b"".join(chunks)

    def write(self, iova: int, data: bytes) -> None:
        view = memoryview(data)
        for m, delta, n in self.pieces(iova, len(data), write=True):
            assert m.backing is not None
            done = os.pwrite(m.backing.fd, view[:n], m.offset + delta)
            if done != n:
                raise DmaFault(m.iova + delta, n, True, "client RAM file shrank")
            view = view[n:]

    def iovecs(self, pieces: Sequence[tuple[int, int]], write: bool) -> IovecLease:
        """Zero-copy DMA (``vfiod.pci.dma.ZeroCopyDma``): every piece is checked first
        (DmaFault before anything is lent), then host-contiguous parts of the same RAM file are
        merged and lent as memoryviews of its mmap, valid inside the lease's ``with`` block."""
        host: list[tuple[Backing, int, int]] = []  # (RAM file, file offset, length), merged
        for iova, length in pieces:
            if length == 0:
                continue
            for m, delta, n in self.pieces(iova, length, write):
                assert m.backing is not None  # pieces() faults on fd-less mappings
                off = m.offset + delta
                if host:
                    b, o, ln = host[-1]
                    if b is m.backing and o + ln == off:
                        host[-1] = (b, o, ln + n)
                        continue
                host.append((m.backing, off, n))
        bases: dict[int, memoryview] = {}
        views: list[memoryview] = []
        try:
            for backing, off, n in host:
                base = bases.get(id(backing))
                if base is None:
                    if backing.mm is None:
                        raise DmaFault(pieces[0][0], n, write, "RAM file not mapped")
                    base = bases[id(backing)] = memoryview(backing.mm)
                v = base[off : off + n]
                views.append(v)
                if v.nbytes != n:
                    raise DmaFault(pieces[0][0], n, write, "piece beyond its RAM file")
        except BaseException:
            for v in views:
                v.release()
            for v in bases.values():
                v.release()
            raise

        def on_efault(exc: OSError) -> DmaFault:
            iova = pieces[0][0] if pieces else 0
            return DmaFault(iova, sum(n for _, n in pieces), write, "client RAM file shrank")

        return IovecLease(views, list(bases.values()), on_efault)

    # -- internals -----------------------------------------------------------------------

    def _backing_for(self, fd: int, offset: int, size: int, prot: int) -> Backing:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "DMA_MAP fd is not a regular file or memfd")
        key = (st.st_dev, st.st_ino)
        backing = self._backings.get(key)
        if backing is None:
            if len(self._backings) >= self.max_backings:
                raise OSError(errno.ENOSPC, f"more than {self.max_backings} distinct RAM files")
            backing = self._open_backing(fd, key, st.st_size)
            self._backings[key] = backing
        else:
            os.close(fd)  # the same file again: keep the first fd, drop the duplicate
        if offset + size > backing.size:
            self._release(backing)
            raise OSError(
                errno.EINVAL,
                f"DMA_MAP offset {offset:#x}+{size:#x} beyond its file ({backing.size:#x} bytes)",
            )
        if prot & DMA_WRITE and not backing.writable:
            self._release(backing)
            raise OSError(errno.EACCES, "DMA_MAP asks for write access to a read-only file")
        return backing

    def _open_backing(self, fd: int, key: tuple[int, int], size: int) -> Backing:
        accmode = _fd_access_mode(fd)
        writable = accmode == os.O_RDWR
        mm: mmap.mmap | None = None
        if size:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        return Backing(key=key, fd=fd, size=size, writable=writable, mm=mm)

    def _release(self, backing: Backing) -> None:
        if backing.refs == 0 and self._backings.get(backing.key) is backing:
            del self._backings[backing.key]
            backing.close()

    def _remove_range(self, start: int, end: int) -> int:
        """Remove [start, end) from every mapping it touches, splitting partial overlaps."""
        index = max(bisect.bisect_right(self._starts, start) - 1, 0)
        removed = 0
        keep: list[Mapping] = []
        first = index
        while index < len(self._maps) and self._maps[index].iova < end:
            m = self._maps[index]
            if m.end <= start:
                first = index + 1
                index += 1
                continue
            lo, hi = max(m.iova, start), min(m.end, end)
            removed += hi - lo
            if m.iova < lo:
                keep.append(Mapping(m.iova, lo - m.iova, m.backing, m.offset, m.prot))
            if hi < m.end:
                keep.append(Mapping(hi, m.end - hi, m.backing, m.offset + (hi - m.iova), m.prot))
            index += 1
        if index == first and not keep:
            return 0
        dropped = self._maps[first:index]
        self._maps[first:index] = keep
        self._starts[first:index] = [m.iova for m in keep]
        for m in keep:
            if m.backing is not None:
                m.backing.refs += 1
        for m in dropped:
            if m.backing is not None:
                m.backing.refs -= 1
                self._release(m.backing)
        return removed


def _fd_access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
