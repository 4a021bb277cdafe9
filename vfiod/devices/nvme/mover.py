"""The NVMe data mover: a command's data between guest memory and the namespace or controller.

Every transfer is a list of (iova, length) pieces (:meth:`DataMover.pieces` walks PRP1/PRP2 and
PRP lists first, so a bad list fails before anything moves), and every piece is translated
before any byte moves: a fault anywhere leaves guest memory and the namespace untouched.

* Zero-copy views (``iovecs``, :class:`vfiod.pci.dma.ZeroCopyDma`; PeDma and DmaMapTable): one
  translation of the whole list (through the PE: one C scatter-gather call, a fault freezes the
  PE) lends memoryviews of guest RAM, and the kernel moves the bytes: ``preadv``/``pwritev``
  between the backing store and guest RAM (at most ``IOV_MAX`` iovecs a call, short counts
  resumed), or, for data the controller makes or consumes (Identify, log pages, features, DSM
  ranges) and with ``zero_copy`` off, through a bounce file (a memfd) on the same lease. Python
  never indexes the lent memory, so a client that truncates its RAM file makes EFAULT (a
  DmaFault), not a SIGBUS. A read that ends early (a backing file that shrank) fills the rest
  with zeros through the same lease.
* Views with only ``read``/``write`` (test doubles): every piece is read first (a fault there
  moves nothing); a write into guest memory that still faults puts back what it had written.

DmaFault means the command ends with Data Transfer Error; OSError from the backing store is a
media error for the command set to report.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Protocol

from vfiod.devices.nvme.backing import BackingStore
from vfiod.devices.nvme.prp import Piece, prp_pieces
from vfiod.pci.dma import IOV_MAX, DmaFault, DmaSpace, IovecLease, zero_copy

#: bounce file bytes kept between transfers (larger ones give their pages back afterwards)
BOUNCE_KEEP = 64 << 10


class DmaPort(Protocol):
    """What the mover needs of its PCI function: the current DMA view and bus mastering."""

    @property
    def dma(self) -> DmaSpace: ...

    @property
    def bus_master(self) -> bool: ...

    def dma_read(self, iova: int, length: int) -> bytes: ...

    def dma_write(self, iova: int, data: bytes) -> None: ...


class DataMover:
    """Moves one controller's command data (see the module docstring)."""

    def __init__(self, port: DmaPort, store: BackingStore) -> None:
        self._port = port
        self.store = store
        #: host memory page size (CC.MPS), set by the controller when it is enabled
        self.page_size = 4096
        #: move namespace data with preadv/pwritev straight into guest RAM when the view offers
        #: ``iovecs`` (False: through the bounce file, as a copy path to compare against)
        self.zero_copy = True
        self._bounce = -1

    def close(self) -> None:
        """Let go of the bounce file (made again on first use)."""
        if self._bounce >= 0:
            os.close(self._bounce)
            self._bounce = -1

    # ---- PRPs ----------------------------------------------------------------------------------

    def pieces(self, prp1: int, prp2: int, length: int) -> list[Piece]:
        """The (iova, length) pieces of a PRP1/PRP2 data pointer (PRP list reads may raise
        DmaFault, bad offsets NvmeStatus)."""
        return prp_pieces(prp1, prp2, length, self.page_size, self._port.dma_read)

    # ---- namespace data ------------------------------------------------------------------------

    def transfer(self, pieces: list[Piece], to_guest: bool, offset: int) -> None:
        """Move ``sum(lengths)`` bytes between the backing store at ``offset`` and guest memory
        along ``pieces``; ``to_guest`` for a Read. Raises DmaFault (nothing moved, or guest
        memory vanished mid-transfer) or OSError from the store."""
        total = sum(n for _, n in pieces)
        lease = self._lease(pieces, to_guest)
        if lease is None:
            if to_guest:
                self._put(pieces, self.store.read(offset, total))
            else:
                self.store.write(offset, self._get(pieces))
            return
        with lease as views:
            if not self.zero_copy:
                if to_guest:
                    self._bounce_in(views, self.store.read(offset, total))
                else:
                    self.store.write(offset, self._bounce_out(views, total))
                return
            done, total = _vectored_io(self.store.fd, views, offset, to_guest)
            if done < total:  # read past the end of a backing file that shrank: zeros
                rest, made = _views_after(views, done)
                try:
                    self._bounce_in(rest, bytes(total - done))
                finally:
                    for v in made:
                        v.release()

    # ---- controller data -----------------------------------------------------------------------

    def to_guest(self, pieces: list[Piece], data: bytes) -> None:
        """Controller -> host data (Identify, log pages, features) along ``pieces``."""
        lease = self._lease(pieces, True)
        if lease is None:
            self._put(pieces, data)
            return
        with lease as views:
            self._bounce_in(views, data)

    def from_guest(self, pieces: list[Piece]) -> bytes:
        """Host -> controller data (DSM ranges, Set Features Timestamp)."""
        lease = self._lease(pieces, False)
        if lease is None:
            return self._get(pieces)
        with lease as views:
            return self._bounce_out(views, sum(n for _, n in pieces))

    def check(self, pieces: list[Piece], write: bool) -> None:
        """Translate ``pieces`` for a later device ``write`` (or read) and move nothing; raises
        DmaFault (and freezes the PE, as any faulting DMA does)."""
        lease = self._lease(pieces, write)
        if lease is None:
            for iova, n in pieces:
                self._port.dma_read(iova, n)
            return
        lease.release()

    # ---- helpers -------------------------------------------------------------------------------

    def _lease(self, pieces: list[Piece], to_guest: bool) -> IovecLease | None:
        """Translate every piece (zero-copy views), or None for a read/write-only view."""
        iovecs = zero_copy(self._port.dma)
        if iovecs is None:
            return None
        if not self._port.bus_master:
            iova = pieces[0][0] if pieces else 0
            raise DmaFault(iova, sum(n for _, n in pieces), to_guest, "bus master disabled")
        return iovecs(pieces, to_guest)

    def _put(self, pieces: list[Piece], data: bytes) -> None:
        """``data`` into guest memory through a read/write-only view: every piece is read
        first; if a write faults after all, the pieces written before it get their bytes back."""
        port = self._port
        if len(pieces) == 1:
            port.dma_write(pieces[0][0], data)  # one access: all or nothing in every view
            return
        saved = [port.dma_read(iova, n) for iova, n in pieces]
        pos = 0
        for i, (iova, n) in enumerate(pieces):
            try:
                port.dma_write(iova, data[pos : pos + n])
            except DmaFault:
                for (back_iova, _), old in zip(pieces[:i], saved, strict=False):
                    port.dma_write(back_iova, old)
                raise
            pos += n

    def _get(self, pieces: list[Piece]) -> bytes:
        port = self._port
        if len(pieces) == 1:
            return port.dma_read(*pieces[0])
        return b"".join([port.dma_read(iova, n) for iova, n in pieces])

    def _bounce_fd(self) -> int:
        if self._bounce < 0:
            self._bounce = os.memfd_create("vfiod-nvme-bounce", os.MFD_CLOEXEC)
        return self._bounce

    def _bounce_in(self, views: list[memoryview], data: bytes) -> None:
        """``data`` into lent guest memory, copied by the kernel (pwrite to the bounce file,
        then preadv into the views): EFAULT, never SIGBUS, if guest memory vanished."""
        fd = self._bounce_fd()
        _write_all(fd, data)
        try:
            done, total = _vectored_io(fd, views, 0, True)
            if done < total:
                raise OSError(errno.EIO, "bounce file shorter than its data")
        finally:
            self._trim(len(data))

    def _bounce_out(self, views: list[memoryview], total: int) -> bytes:
        fd = self._bounce_fd()
        try:
            _vectored_io(fd, views, 0, False)
            data = os.pread(fd, total, 0)
        finally:
            self._trim(total)
        if len(data) != total:
            raise OSError(errno.EIO, "bounce file shorter than its data")
        return data

    def _trim(self, used: int) -> None:
        if used > BOUNCE_KEEP:
            os.ftruncate(self._bounce, 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], done)
        if n <= 0:
            raise OSError(errno.EIO, "short write to the bounce file")
        done += n


def _views_after(
    views: Sequence[memoryview], skip: int
) -> tuple[list[memoryview], list[memoryview]]:
    """The part of ``views`` after its first ``skip`` bytes, and the slices made for it (the
    caller releases those)."""
    out: list[memoryview] = []
    made: list[memoryview] = []
    for v in views:
        if skip >= v.nbytes:
            skip -= v.nbytes
            continue
        if skip:
            rest = v[skip:]
            made.append(rest)
            out.append(rest)
            skip = 0
        else:
            out.append(v)
    return out, made


def _vectored_io(fd: int, views: list[memoryview], offset: int, to_guest: bool) -> tuple[int, int]:
    """preadv (``to_guest``) or pwritev ``views`` at ``offset`` of ``fd``; at most IOV_MAX
    iovecs a call, short counts resumed. Returns (bytes moved, bytes asked): a read stops early
    only at end of file. Slices made here for a resumed view are released here."""
    op = os.preadv if to_guest else os.pwritev
    total = sum(v.nbytes for v in views)
    done = 0
    i, n = 0, len(views)
    if n <= IOV_MAX:  # the common case: one call moves everything
        got = op(fd, views, offset)
        if got == total:
            return total, total
        if got == 0 and to_guest:
            return 0, total
    else:
        got = 0
    slices: list[memoryview] = []
    try:
        cur = views if got == 0 else list(views)
        while True:
            # consume ``got`` bytes from the front of cur[i:]
            done += got
            while got and i < n:
                size = cur[i].nbytes
                if got >= size:
                    got -= size
                    i += 1
                else:
                    rest = cur[i][got:]
                    slices.append(rest)
                    if cur is views:
                        cur = list(views)
                    cur[i] = rest
                    got = 0
            if i >= n:
                return done, total
            got = op(fd, cur[i : i + IOV_MAX], offset + done)
            if got == 0:
                if to_guest:
                    return done, total  # end of file
                raise OSError(errno.EIO, "short write to the backing store")
    finally:
        for v in slices:
            v.release()


__all__ = ["DataMover", "DmaPort"]
