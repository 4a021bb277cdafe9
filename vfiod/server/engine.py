"""The session's C fast path (``cffi_build/vfu.c``), as the session uses it.

The engine owns the session's stream while it runs: it reads the socket, handles the hot
synchronous messages (DMA_MAP/DMA_UNMAP through the PE's C DMA view, REGION_READ/REGION_WRITE of
the function's fast ranges, REGION_WRITE of its hook ranges through the function's C hook: the
NVMe doorbells) and writes their replies in order. The first message it does not
handle completely is left untouched and the engine *punts*: the session takes every buffered
byte and fd back (with their attribution: ``take``), feeds them to its sans-I/O connection and
handles them exactly as without the engine. Going the other way, ``feed`` hands the bytes the
connection holds (a partial message) to the engine.

It runs in two ways: ``run(block=False)`` inside the session's task (after trio says the socket
is readable), or ``run(block=True)`` in a thread the session's nursery owns, sleeping in
poll(2) on the socket with the GIL released (cffi releases it for the call). ``wake()`` ends a
blocking run by shutting the socket down: the session calls it when it is cancelled, that is
when it goes away. (A blocking read instead of poll plus a non-blocking one saves a system
call, but measured slower: 12.5 us against 10.5 us a 4-byte REGION_READ round trip.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from vfiod import transport
from vfiod.pci.region import FastRange

try:  # the C module is optional: without it the session does everything itself
    from vfiod import _fast  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _fast = None

PUNT = 1
NEED_DATA = 2
EOF = 3
WANT_WRITE = 5
CTRUNC = 6

_KINDS = {"config": 1, "ro": 2, "ram": 3, "hook": 4}
_MAX_RANGES = 16


def available() -> bool:
    """The C module is built and the fast path is not switched off (VFIOD_NO_FASTPATH=1, or
    VFIOD_NO_CFFI=1 which takes every C hot path away)."""
    for name in ("VFIOD_NO_FASTPATH", "VFIOD_NO_CFFI"):
        if os.environ.get(name, "") not in ("", "0"):
            return False
    return _fast is not None and hasattr(_fast.lib, "vfu_new")


class FastEngine:
    """One session's ``struct vfu_session``; see the module docstring."""

    def __init__(self, sock_fd: int, *, max_xfer: int, max_msg: int, dma_view: Any,
                 ranges: Sequence[FastRange]) -> None:  # fmt: skip
        assert _fast is not None
        self._ffi = ffi = _fast.ffi
        self._lib = lib = _fast.lib
        raw = lib.vfu_new(sock_fd, max_xfer, max_msg)
        if raw == ffi.NULL:
            raise MemoryError("cannot allocate the session fast path")
        self._s = raw
        self._keep: list[Any] = []  # buffers the C side points into
        self.running = False  # a blocking run is under way (in its thread)
        s = raw
        s.stall_ms = max(1, int(transport.SEND_STALL_CHECK * 1000))
        if dma_view is not None:
            s.dma = dma_view
            self._keep.append(dma_view)
        for i, r in enumerate(ranges[:_MAX_RANGES]):
            c = s.ranges[i]
            c.region = r.region
            c.kind = _KINDS[r.kind]
            c.offset = r.offset
            c.size = r.size
            if r.kind == "hook":  # the function's C handler (it keeps its context alive)
                c.hook = ffi.cast("vfu_hook_fn", r.hook)
                c.ctx = r.hook_ctx
                self._keep.append(r.hook_ctx)
                continue
            c.data = self._buffer(r.data)
            if r.kind == "config":
                assert r.wmask is not None and r.w1cmask is not None and r.hooked is not None
                assert len(r.wmask) == len(r.w1cmask) == len(r.hooked) == r.size
                c.wmask = self._buffer(r.wmask)
                c.w1cmask = self._buffer(r.w1cmask)
                c.hooked = self._buffer(r.hooked)
        s.nranges = min(len(ranges), _MAX_RANGES)
        self._fds = ffi.new("int[]", 64)
        self._nfds = ffi.new("uint32_t *")
        self.closed = False

    def _buffer(self, data: bytearray) -> Any:
        buf = self._ffi.from_buffer("uint8_t[]", data)
        self._keep.append(buf)
        return buf

    # -- counters ---------------------------------------------------------------------------

    @property
    def messages(self) -> int:
        """Messages the engine handled itself."""
        return int(self._s.messages)

    @property
    def streak(self) -> int:
        """Messages handled in a row since the last punt."""
        return int(self._s.streak)

    @property
    def sleeps(self) -> int:
        return int(self._s.sleeps)

    @property
    def buffered(self) -> int:
        return int(self._lib.vfu_buffered(self._s))

    # -- the stream ---------------------------------------------------------------------------

    def feed(self, pieces: Sequence[tuple[bytes, Sequence[int]]]) -> None:
        """Take the bytes (and fds, each batch on its piece's last byte) the session holds.
        The engine owns the fds from here on."""
        for data, fds in pieces:
            arr = self._ffi.new("int[]", list(fds)) if fds else self._ffi.NULL
            rc = self._lib.vfu_feed(self._s, data, len(data), arr, len(fds))
            if rc < 0:
                raise OSError(-rc, f"fast path cannot take {len(data)} bytes")

    def take(self) -> list[tuple[bytes, tuple[int, ...]]]:
        """Hand every buffered byte and fd back, cut where fd batches end (so feeding the
        pieces in order attributes each fd to the message it came with)."""
        lib, s = self._lib, self._s
        n = int(lib.vfu_buffered(s))
        if not n and not lib.vfu_mark_count(s):
            return []
        data = bytes(self._ffi.buffer(lib.vfu_data(s), n))
        pieces: list[tuple[bytes, tuple[int, ...]]] = []
        start = 0
        for i in range(int(lib.vfu_mark_count(s))):
            last = int(lib.vfu_mark_end(s, i, self._fds, self._nfds))
            fds = tuple(self._fds[k] for k in range(int(self._nfds[0])))
            pieces.append((data[start : last + 1], fds))
            start = last + 1
        if start < n:
            pieces.append((data[start:], ()))
        lib.vfu_forget(s)
        return pieces

    def run(self, block: bool) -> int:
        """Handle messages until a punt, EOF, no more data (non-blocking), a wake (blocking)
        or an error (OSError, as a socket error would be)."""
        rc = int(self._lib.vfu_run(self._s, 1 if block else 0))
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        return rc

    def flush(self) -> int:
        """Send queued replies without blocking: 0, or WANT_WRITE if the socket is full."""
        rc = int(self._lib.vfu_flush(self._s))
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        return rc

    def wake(self) -> None:
        """End the blocking run under way (it sees EOF): the socket is shut down, so only for a
        session that is going away. Nothing if no run is under way."""
        if self.running and not self.closed:
            self._lib.vfu_wake(self._s)

    def close(self) -> None:
        """Free the engine; fds it still holds are closed (the session normally took them)."""
        if self.closed:
            return
        self.closed = True
        self._lib.vfu_free(self._s)
        self._s = self._ffi.NULL
        self._keep.clear()


def native_byteorder(byteorder: str) -> bool:
    """The engine speaks the host's byte order only (the wire is host-endian in vfio-user)."""
    return byteorder == sys.byteorder


__all__ = ["FastEngine", "available", "native_byteorder", "PUNT", "NEED_DATA", "EOF",
           "WANT_WRITE", "CTRUNC"]
