"""BAR / ROM regions: Python-handled register windows and memfd-backed shared memory.

A region is a flat byte range. Parts of it can be *windows* served by Python handlers
(registers, the MSI-X table and PBA, doorbells); the rest is either shared memory (a memfd the
server mmaps and offers to QEMU with a sparse-mmap list that leaves the windows out) or, for a
pure register BAR, reads-as-zero / writes-ignored.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

from vfiod.pci.config import einval
from vfiod.pci.constants import (
    REGION_FLAG_CAPS,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
)

#: Windows in a mmapped region are kept on their own pages of this size, so the sparse-mmap
#: areas never cover a handler (ppc64 hosts commonly use 64 KiB pages).
HOLE_ALIGN = max(4096, mmap.PAGESIZE)


@dataclass
class RegionInfo:
    """What DEVICE_GET_REGION_INFO reports for one index.

    ``fd`` stays owned by the function: the session passes it via SCM_RIGHTS (which duplicates
    it) and must not close it. ``sparse_areas`` are (offset, size) pairs relative to the region
    start; the session encodes them as the SPARSE_MMAP capability. ``msix_mappable`` asks for
    the MSIX_MAPPABLE cap and ``region_type`` (type, subtype) for the TYPE cap.
    """

    index: int
    flags: int
    size: int
    offset: int = 0
    fd: int | None = None
    sparse_areas: list[tuple[int, int]] = field(default_factory=list)
    msix_mappable: bool = False
    region_type: tuple[int, int] | None = None

    @property
    def has_caps(self) -> bool:
        return bool(self.sparse_areas or self.msix_mappable or self.region_type)


@dataclass(frozen=True, eq=False)
class FastRange:
    """Bytes of a region the session may serve itself, without calling the function.

    The session's C fast path (cffi_build/vfu.h) reads (and for ``"config"`` and ``"ram"``
    writes) ``data`` in place, while the function keeps it current: ``"config"`` is config
    space with per-byte write masks, where a write touching a ``hooked`` byte still goes to the
    function; ``"ro"`` is read-only bytes (writes go to the function); ``"ram"`` is plain memory.
    ``data`` must never be resized (same-length slice assignment is fine).

    ``"hook"`` is ``hook_size`` bytes whose writes a C function of the function's handles:
    ``hook`` (a cffi pointer to ``int (*)(void *ctx, uint64_t offset, const uint8_t *data,
    uint32_t count)``, offset relative to the range) with ``hook_ctx``, run by the fast path
    itself; it returns 0 when it did the write completely, or nonzero having done nothing the
    function's ``region_write`` would not redo, and the write goes to the function as usual.
    Reads of a hook range go to the function. ``data`` is unused (empty).
    """

    region: int
    offset: int
    data: bytearray
    kind: str = "ro"  # "config" | "ro" | "ram" | "hook"
    wmask: bytearray | None = None
    w1cmask: bytearray | None = None
    hooked: bytearray | None = None
    hook: Any = None
    hook_ctx: Any = None
    hook_size: int = 0

    @property
    def size(self) -> int:
        return self.hook_size if self.kind == "hook" else len(self.data)


@runtime_checkable
class RegisterHandler(Protocol):
    """Register-file handler: naturally aligned accesses of 1, 2, 4 or 8 bytes as integers."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@runtime_checkable
class BytesHandler(Protocol):
    """Byte-level handler: any length, offsets relative to its window."""

    def read_bytes(self, offset: int, count: int) -> bytes: ...

    def write_bytes(self, offset: int, data: bytes) -> None: ...


Handler = RegisterHandler | BytesHandler


class DwordRegisters:
    """A register file made of 32-bit registers: 1/2-byte accesses act on their bytes of the
    dword, 8-byte accesses are two dwords (low first). Subclasses implement ``_read32`` and
    ``_write32(reg, value, mask)`` (``mask``: the bits the access actually writes)."""

    def read(self, offset: int, size: int) -> int:
        if size == 8:
            return self.read(offset, 4) | (self.read(offset + 4, 4) << 32)
        base = offset & ~3
        shift = (offset & 3) * 8
        return (self._read32(base) >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.write(offset, 4, value & 0xFFFFFFFF)
            self.write(offset + 4, 4, value >> 32)
            return
        base = offset & ~3
        shift = (offset & 3) * 8
        mask = ((1 << (8 * size)) - 1) << shift
        self._write32(base, (value << shift) & mask, mask)

    def _read32(self, reg: int) -> int:
        raise NotImplementedError

    def _write32(self, reg: int, value: int, mask: int) -> None:
        raise NotImplementedError


@dataclass
class Window:
    """A handler mapped at ``offset..offset+size`` inside a region."""

    offset: int
    size: int
    handler: Handler
    #: Decided once here: a runtime Protocol isinstance costs ~15 us, too much per MMIO access.
    byte_level: bool = field(init=False)
    end: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "byte_level", isinstance(self.handler, BytesHandler))
        object.__setattr__(self, "end", self.offset + self.size)


def _chunk(pos: int, remaining: int) -> int:
    """Largest naturally aligned access (<= 8) starting at ``pos`` that fits ``remaining``."""
    for size in (8, 4, 2, 1):
        if size <= remaining and pos % size == 0:
            return size
    return 1


class Region:
    """Base region: windows over a backing that reads as zero and ignores writes."""

    def __init__(self, size: int, *, readable: bool = True, writable: bool = True) -> None:
        if size < 0:
            raise ValueError("negative region size")
        self.size = size
        self.readable = readable
        self.writable = writable
        self.windows: list[Window] = []

    # ---- layout ---------------------------------------------------------------------------

    def map(self, offset: int, size: int, handler: Handler) -> Window:
        """Serve ``offset..offset+size`` with ``handler``; windows must not overlap."""
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise ValueError("window outside the region")
        for w in self.windows:
            if offset < w.end and w.offset < offset + size:
                raise ValueError("overlapping windows")
        win = Window(offset, size, handler)
        self.windows.append(win)
        self.windows.sort(key=lambda w: w.offset)
        return win

    @property
    def flags(self) -> int:
        if self.size == 0:
            return 0
        return (REGION_FLAG_READ if self.readable else 0) | (
            REGION_FLAG_WRITE if self.writable else 0
        )

    def info(self, index: int) -> RegionInfo:
        return RegionInfo(index=index, flags=self.flags, size=self.size)

    # ---- access -----------------------------------------------------------------------------

    def _check(self, offset: int, count: int) -> None:
        if self.size == 0:
            raise einval("region is absent")
        if offset < 0 or count < 0 or offset + count > self.size:
            raise einval(f"region access {offset:#x}+{count} out of range")

    def _find(self, pos: int) -> tuple[Window | None, int]:
        """Window containing ``pos`` (or None) and where the current stretch ends."""
        for w in self.windows:
            if w.offset <= pos < w.end:
                return w, w.end
            if w.offset > pos:
                return None, w.offset
        return None, self.size

    def read(self, offset: int, count: int) -> bytes:
        self._check(offset, count)
        if not self.readable:
            raise einval("region is not readable")
        out = bytearray()
        pos, end = offset, offset + count
        while pos < end:
            win, stop = self._find(pos)
            n = min(end, stop) - pos
            if win is None:
                out += self._backing_read(pos, n)
            elif win.byte_level:
                data = cast(BytesHandler, win.handler).read_bytes(pos - win.offset, n)
                if len(data) != n:
                    raise einval("handler returned a short read")
                out += data
            else:
                stop_pos = pos + n
                while pos < stop_pos:
                    size = _chunk(pos - win.offset, stop_pos - pos)
                    value = cast(RegisterHandler, win.handler).read(pos - win.offset, size)
                    out += (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                    pos += size
                continue
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        if not self.writable:
            raise einval("region is not writable")
        pos, end = offset, offset + len(data)
        while pos < end:
            win, stop = self._find(pos)
            n = min(end, stop) - pos
            piece = data[pos - offset : pos - offset + n]
            if win is None:
                self._backing_write(pos, piece)
            elif win.byte_level:
                cast(BytesHandler, win.handler).write_bytes(pos - win.offset, piece)
            else:
                i = 0
                while i < n:
                    size = _chunk(pos + i - win.offset, n - i)
                    value = int.from_bytes(piece[i : i + size], "little")
                    cast(RegisterHandler, win.handler).write(pos + i - win.offset, size, value)
                    i += size
            pos += n

    def _backing_read(self, offset: int, count: int) -> bytes:
        return bytes(count)

    def _backing_write(self, offset: int, data: bytes) -> None:
        return None

    # ---- lifecycle --------------------------------------------------------------------------

    def reset(self) -> None:
        """Reset handlers that know how (duck-typed ``reset()``)."""
        for w in self.windows:
            reset = getattr(w.handler, "reset", None)
            if callable(reset):
                reset()

    def close(self) -> None:
        return None


class AbsentRegion(Region):
    """Size-0 region: BAR not implemented (also the upper half of a 64-bit BAR)."""

    def __init__(self) -> None:
        super().__init__(0)


class MemoryRegion(Region):
    """Region backed by a memfd shared with QEMU; windows are carved out of the mmap areas.

    The server keeps its own mapping (:attr:`mem`) to see what the guest wrote and to DMA into
    the buffer; QEMU maps the same fd at the sparse areas, so only windows (MSI-X, doorbells)
    generate messages.
    """

    def __init__(self, size: int, name: str = "vfiod-bar") -> None:
        if size <= 0 or size % HOLE_ALIGN:
            raise ValueError(f"memory region size must be a positive multiple of {HOLE_ALIGN}")
        super().__init__(size)
        self.fd: int | None = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mem: mmap.mmap = mmap.mmap(
                self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self.fd)
            raise

    def map(self, offset: int, size: int, handler: Handler) -> Window:
        if offset % HOLE_ALIGN or size % HOLE_ALIGN:
            raise ValueError(f"windows in a mmapped region must be {HOLE_ALIGN}-byte pages")
        return super().map(offset, size, handler)

    def sparse_areas(self) -> list[tuple[int, int]]:
        """Plain-memory stretches: the region minus all windows."""
        areas: list[tuple[int, int]] = []
        pos = 0
        for w in self.windows:
            if w.offset > pos:
                areas.append((pos, w.offset - pos))
            pos = max(pos, w.end)
        if pos < self.size:
            areas.append((pos, self.size - pos))
        return areas

    def info(self, index: int) -> RegionInfo:
        areas = self.sparse_areas()
        flags = self.flags
        if areas and self.fd is not None:
            flags |= REGION_FLAG_MMAP | REGION_FLAG_CAPS
            return RegionInfo(
                index=index, flags=flags, size=self.size, offset=0, fd=self.fd, sparse_areas=areas
            )
        return RegionInfo(index=index, flags=flags, size=self.size)

    def _backing_read(self, offset: int, count: int) -> bytes:
        return self.mem[offset : offset + count]

    def _backing_write(self, offset: int, data: bytes) -> None:
        self.mem[offset : offset + len(data)] = data

    def reset(self) -> None:
        """Zero the shared memory (device buffer contents do not survive FLR)."""
        super().reset()
        if not self.mem.closed:
            self.mem[:] = bytes(self.size)

    def close(self) -> None:
        if not self.mem.closed:
            self.mem.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RomRegion(Region):
    """Read-only expansion ROM image, padded to a power of two (read as one REGION_READ)."""

    def __init__(self, image: bytes) -> None:
        size = 2048
        while size < len(image):
            size <<= 1
        super().__init__(size, readable=True, writable=False)
        self.image = bytes(image) + b"\xff" * (size - len(image))

    def _backing_read(self, offset: int, count: int) -> bytes:
        return self.image[offset : offset + count]
