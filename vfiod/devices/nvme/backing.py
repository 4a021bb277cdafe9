"""The namespace's backing store: a regular file (created sparse) or a block device.

All I/O is positioned (pread/pwrite, no shared file offset). Durability: writes land in the
host page cache, so an acknowledged write survives a daemon crash; :meth:`flush` (fdatasync)
makes it survive host power loss, which is what NVMe Flush and FUA promise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20

_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BackingStore:
    """Positioned I/O on a file or block device of a fixed size in bytes."""

    def __init__(self, path: str | os.PathLike[str], size: int | None = None) -> None:
        self.path = os.fspath(path)
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if size is None:
                raise ValueError(f"{self.path}: missing, and no size given to create it") from None
            st = None
            flags |= os.O_CREAT | os.O_EXCL
        self.fd = os.open(self.path, flags, 0o600)
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if self.is_block:
                actual = os.lseek(self.fd, 0, os.SEEK_END)
                if size is not None and size > actual:
                    raise ValueError(f"{self.path}: block device has {actual} bytes < {size}")
                self.size = actual if size is None else size
            elif stat.S_ISREG(st.st_mode):
                if size is None:
                    size = st.st_size
                if st.st_size < size:
                    os.ftruncate(self.fd, size)  # sparse extension, existing data kept
                self.size = size
            else:
                raise ValueError(f"{self.path}: not a regular file or block device")
            if self.size <= 0:
                raise ValueError(f"{self.path}: empty backing store")
        except BaseException:
            os.close(self.fd)
            raise
        #: deallocated ranges read back as zeros (hole punching works on regular files)
        self.deallocate_zeroes = not self.is_block
        self.syncs = 0

    # ---- I/O ---------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        out = os.pread(self.fd, length, offset)
        if len(out) == length:
            return out
        buf = bytearray(out)
        while len(buf) < length:
            chunk = os.pread(self.fd, length - len(buf), offset + len(buf))
            if not chunk:  # beyond EOF of a file that shrank under us: zeros, as a hole
                buf += bytes(length - len(buf))
                break
            buf += chunk
        return bytes(buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            n = os.pwrite(self.fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n

    def write_zeroes(self, offset: int, length: int) -> None:
        if not self.is_block:
            try:
                _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError:
                pass
        zero = bytes(min(length, _ZERO_CHUNK))
        pos = 0
        while pos < length:
            n = min(len(zero), length - pos)
            self.write(offset + pos, zero[:n] if n < len(zero) else zero)
            pos += n

    def deallocate(self, offset: int, length: int) -> None:
        """Best effort; on a regular file the range must read as zeros afterwards."""
        if self.deallocate_zeroes:
            self.write_zeroes(offset, length)
            return
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            pass  # advisory: a block device without discard keeps its data

    def flush(self) -> None:
        os.fdatasync(self.fd)
        self.syncs += 1

    def close(self) -> None:
        """Flush, then close: a daemon that stops (SIGTERM) leaves every write on stable
        storage, acknowledged with FUA/Flush or not."""
        if self.fd >= 0:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:  # e.g. EIO from the device: report, but still close
                logging.getLogger(__name__).error("namespace flush on close failed: %s", exc)
            os.close(self.fd)
            self.fd = -1
