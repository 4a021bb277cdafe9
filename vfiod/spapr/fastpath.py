"""TCE storage and hot loops, twice: C through cffi (``vfiod._fast``) and a plain-Python twin.

Both implementations offer the same operations and must give the same results; the twin is the
reference the hypothesis tests compare against, and the fallback when the C module is missing.
``VFIOD_NO_CFFI=1`` in the environment forces the twin.

A *store* is the storage of one TCE table: sparse 512-entry leaves (4 KiB each), allocated on
the first non-zero write within an optional leaf budget, a count of valid entries kept as
entries change (so "TCEs in use" costs nothing to read), and all-or-nothing writes: every leaf
a write needs exists before the first entry changes. Writes return how many of the entries
they overwrote were valid, and raise OSError (ERANGE outside the table, ENOSPC past the
budget, ENOMEM) with nothing changed. The C store is what the session fast path and the NVMe
data mover translate through, in place.
"""

from __future__ import annotations

import errno
import os
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from .constants import U64_MASK
from .memory import HostMemory

LEAF_SHIFT = 9
LEAF_ENTRIES = 1 << LEAF_SHIFT  # 512 entries = 4 KiB = one H_PUT_TCE_INDIRECT list
_LEAF_MASK = LEAF_ENTRIES - 1
_ZERO_LEAF = bytes(8 * LEAF_ENTRIES)
MAX_LEAF_ID = 1 << (9 * 4)  # the C radix has four 9-bit directory levels
ABI_VERSION = 5

#: A translated piece before buffers are attached: (region index, offset in region, length).
RawPiece = tuple[int, int, int]


class TranslateFault(Exception):
    """Translation stopped: ``iova`` is where, ``index`` is which scatter-gather element."""

    def __init__(self, iova: int, index: int) -> None:
        super().__init__(f"fault at {iova:#x} (element {index})")
        self.iova = iova
        self.index = index


class TceStore(Protocol):
    """The storage of one TCE table (see the module docstring)."""

    @property
    def nb_entries(self) -> int: ...

    @property
    def valid(self) -> int: ...

    @property
    def leaf_count(self) -> int: ...

    max_leaves: int  # allocation budget, 0 = unlimited

    def get(self, idx: int) -> int: ...

    def fill(self, idx: int, n: int, value: int) -> int: ...

    def fill_linear(self, idx: int, n: int, first: int, step: int) -> int: ...

    def write(self, idx: int, src: Sequence[int], n: int, or_bits: int = 0) -> int: ...

    def write_be(self, idx: int, data: bytes, n: int) -> int: ...

    def clear(self) -> None: ...

    def resize(self, nb_entries: int) -> None: ...

    def leaves(self) -> Iterator[tuple[int, Sequence[int]]]: ...


_C_ERRORS = {
    errno.ERANGE: "TCE range outside the table",
    errno.ENOSPC: "TCE table leaf budget exhausted",
    errno.ENOMEM: "out of memory for TCE table leaves",
}


def _errno(rc: int, what: str) -> OSError:
    code = -rc
    return OSError(code, _C_ERRORS.get(code, f"{what}: {os.strerror(code)}"))


def _valid(v: int) -> int:
    return 1 if v & 3 else 0


def _tce_ok(v: int, shift: int, mem: HostMemory | None) -> bool:
    if v & 3 == 0:
        return True  # grants nothing: any poison value is allowed
    addr = v & ~3
    mask = (1 << shift) - 1
    if addr & mask:
        return False
    if mem is None:
        return True
    return mem.contains(addr, mask + 1)


class PyTceStore:
    """Reference store: a dict of ``array('Q')`` leaves, one entry at a time."""

    def __init__(self, nb_entries: int, max_leaves: int = 0) -> None:
        self._nb = nb_entries
        self.max_leaves = max_leaves
        self._leaves: dict[int, array[int]] = {}
        self._valid = 0

    @property
    def nb_entries(self) -> int:
        return self._nb

    @property
    def valid(self) -> int:
        return self._valid

    @property
    def leaf_count(self) -> int:
        return len(self._leaves)

    def get(self, idx: int) -> int:
        leaf = self._leaves.get(idx >> LEAF_SHIFT)
        return 0 if leaf is None else leaf[idx & _LEAF_MASK]

    def _check(self, idx: int, n: int) -> None:
        if n and (idx < 0 or idx >= self._nb or n > self._nb - idx):
            raise OSError(errno.ERANGE, "TCE range outside the table")

    def _prepare(self, idx: int, n: int) -> None:
        self._check(idx, n)
        if not n:
            return
        lids = range(idx >> LEAF_SHIFT, ((idx + n - 1) >> LEAF_SHIFT) + 1)
        missing = [lid for lid in lids if lid not in self._leaves]
        if self.max_leaves and len(self._leaves) + len(missing) > self.max_leaves:
            raise OSError(errno.ENOSPC, "TCE table leaf budget exhausted")
        for lid in missing:
            self._leaves[lid] = array("Q", _ZERO_LEAF)

    def _put(self, idx: int, value: int) -> int:
        leaf = self._leaves[idx >> LEAF_SHIFT]
        old = leaf[idx & _LEAF_MASK]
        self._valid += _valid(value) - _valid(old)
        leaf[idx & _LEAF_MASK] = value
        return _valid(old)

    def fill(self, idx: int, n: int, value: int) -> int:
        value &= U64_MASK
        if value:
            self._prepare(idx, n)
        else:
            self._check(idx, n)
        was = 0
        for i in range(idx, idx + n):
            if (i >> LEAF_SHIFT) in self._leaves:  # clearing never allocates
                was += self._put(i, value)
        return was

    def fill_linear(self, idx: int, n: int, first: int, step: int) -> int:
        self._prepare(idx, n)
        return sum(self._put(idx + i, (first + i * step) & U64_MASK) for i in range(n))

    def write(self, idx: int, src: Sequence[int], n: int, or_bits: int = 0) -> int:
        self._prepare(idx, n)
        return sum(self._put(idx + i, (src[i] | or_bits) & U64_MASK) for i in range(n))

    def write_be(self, idx: int, data: bytes, n: int) -> int:
        self._prepare(idx, n)
        return sum(
            self._put(idx + i, int.from_bytes(data[8 * i : 8 * i + 8], "big")) for i in range(n)
        )

    def clear(self) -> None:
        self._leaves.clear()
        self._valid = 0

    def resize(self, nb_entries: int) -> None:
        if nb_entries < self._nb or (nb_entries - 1) >> LEAF_SHIFT >= MAX_LEAF_ID:
            raise OSError(errno.ERANGE, "a table only grows, within the radix")
        self._nb = nb_entries

    def leaves(self) -> Iterator[tuple[int, Sequence[int]]]:
        for lid in sorted(self._leaves):
            yield lid, self._leaves[lid]


class PyFastPath:
    """Reference implementation: one entry at a time, easy to read."""

    name = "python"

    def new_store(self, nb_entries: int, max_leaves: int = 0) -> TceStore:
        return PyTceStore(nb_entries, max_leaves)

    def validate_be(self, data: bytes, n: int, page_shift: int, mem: HostMemory | None) -> int:
        """Index of the first unacceptable entry of a big-endian list, or -1."""
        for i in range(n):
            v = int.from_bytes(data[8 * i : 8 * i + 8], "big")
            if not _tce_ok(v, page_shift, mem):
                return i
        return -1

    def validate(self, src: Sequence[int], n: int, page_shift: int, mem: HostMemory | None) -> int:
        """Index of the first unacceptable entry of a host-order list, or -1."""
        for i in range(n):
            if not _tce_ok(src[i], page_shift, mem):
                return i
        return -1

    def translate(
        self,
        store: TceStore,
        bus_offset: int,
        page_shift: int,
        sg: Sequence[tuple[int, int]],
        write: bool,
        mem: HostMemory,
    ) -> list[RawPiece]:
        """Pieces for a scatter-gather list through one window; TranslateFault on any problem."""
        pgsize = 1 << page_shift
        pgmask = pgsize - 1
        need = 2 if write else 1
        nb = store.nb_entries
        ends = mem.ends
        starts = mem.starts
        out: list[list[int]] = []
        for s, (iova, length) in enumerate(sg):
            while length:
                idx = (iova - bus_offset) >> page_shift
                if iova < bus_offset or idx >= nb:
                    raise TranslateFault(iova, s)
                tce = store.get(idx)
                if not tce & need:
                    raise TranslateFault(iova, s)
                chunk = min(length, pgsize - (iova & pgmask))
                pa = (tce & ~pgmask & U64_MASK) | (iova & pgmask)
                r = mem.region_index(pa)
                if r < 0 or pa + chunk > ends[r]:
                    raise TranslateFault(iova, s)
                off = pa - starts[r]
                if out and out[-1][0] == r and out[-1][1] + out[-1][2] == off:
                    out[-1][2] += chunk
                else:
                    out.append([r, off, chunk])
                iova += chunk
                length -= chunk
        return [(p[0], p[1], p[2]) for p in out]


class CffiTceStore:
    """A C store (``struct vfiod_tce_store``), freed when this object goes."""

    __slots__ = ("ptr", "_lib", "_ffi")

    def __init__(self, impl: CffiFastPath, nb_entries: int, max_leaves: int = 0) -> None:
        self._lib = impl.lib
        self._ffi = impl.ffi
        ptr = self._lib.vfiod_store_new(nb_entries, max_leaves)
        if ptr == self._ffi.NULL:
            raise MemoryError("cannot allocate a TCE store")
        self.ptr = self._ffi.gc(ptr, self._lib.vfiod_store_free)

    @property
    def nb_entries(self) -> int:
        return int(self.ptr.nb_entries)

    @property
    def valid(self) -> int:
        return int(self.ptr.valid)

    @property
    def leaf_count(self) -> int:
        return int(self.ptr.leaves)

    @property
    def max_leaves(self) -> int:
        return int(self.ptr.max_leaves)

    @max_leaves.setter
    def max_leaves(self, value: int) -> None:
        self.ptr.max_leaves = value

    def get(self, idx: int) -> int:
        if idx < 0:
            return 0
        return int(self._lib.vfiod_store_get(self.ptr, idx))

    @staticmethod
    def _done(rc: int, what: str) -> int:
        if rc < 0:
            raise _errno(rc, what)
        return rc

    def fill(self, idx: int, n: int, value: int) -> int:
        if not n:
            return 0
        if idx < 0:
            raise OSError(errno.ERANGE, "TCE range outside the table")
        return self._done(self._lib.vfiod_store_fill(self.ptr, idx, n, value & U64_MASK), "fill")

    def fill_linear(self, idx: int, n: int, first: int, step: int) -> int:
        if not n:
            return 0
        if idx < 0:
            raise OSError(errno.ERANGE, "TCE range outside the table")
        rc = self._lib.vfiod_store_fill_linear(self.ptr, idx, n, first & U64_MASK, step & U64_MASK)
        return self._done(rc, "fill_linear")

    def write(self, idx: int, src: Sequence[int], n: int, or_bits: int = 0) -> int:
        if not n:
            return 0
        if idx < 0:
            raise OSError(errno.ERANGE, "TCE range outside the table")
        if isinstance(src, array) and src.typecode == "Q":
            buf = self._ffi.from_buffer("uint64_t[]", src)
        else:
            buf = self._ffi.new("uint64_t[]", [v & U64_MASK for v in src[:n]])
        rc = self._lib.vfiod_store_write(self.ptr, idx, buf, n, or_bits & U64_MASK)
        return self._done(rc, "write")

    def write_be(self, idx: int, data: bytes, n: int) -> int:
        if not n:
            return 0
        if idx < 0:
            raise OSError(errno.ERANGE, "TCE range outside the table")
        src = data if type(data) is bytes else self._ffi.from_buffer("char[]", data)
        return self._done(self._lib.vfiod_store_write_be(self.ptr, idx, src, n), "write_be")

    def clear(self) -> None:
        self._lib.vfiod_store_clear(self.ptr)

    def resize(self, nb_entries: int) -> None:
        self._done(self._lib.vfiod_store_resize(self.ptr, nb_entries), "resize")

    def leaves(self) -> Iterator[tuple[int, Sequence[int]]]:
        buf = self._ffi.new("uint64_t[]", LEAF_ENTRIES)
        lid = 0
        while True:
            lid = int(self._lib.vfiod_store_next_leaf(self.ptr, lid, buf))
            if lid < 0:
                return
            leaf = array("Q")
            leaf.frombytes(self._ffi.buffer(buf))
            yield lid, leaf
            lid += 1


class CffiFastPath:
    """The same operations in C; stores are C structures the C hot paths use in place."""

    name = "cffi"

    def __init__(self) -> None:
        from vfiod import _fast  # type: ignore[attr-defined]  # optional C extension

        if (not hasattr(_fast.lib, "vfiod_store_new")
                or _fast.lib.vfiod_tce_abi_version() != ABI_VERSION):  # fmt: skip
            raise ImportError("vfiod._fast is stale: rebuild it (pip install -e .)")
        self.ffi = _fast.ffi
        self.lib = _fast.lib
        self._mem_key: tuple[int, int] | None = None
        self._mem_c: tuple[Any, Any, int] = (self.ffi.NULL, self.ffi.NULL, 0)
        self._out_max = 0
        self._out: tuple[Any, Any, Any] = (None, None, None)
        self._fault = self.ffi.new("uint64_t[2]")
        self._grow(64)

    def _grow(self, n: int) -> None:
        new = self.ffi.new
        self._out = (new("uint32_t[]", n), new("uint64_t[]", n), new("uint64_t[]", n))
        self._out_max = n

    def new_store(self, nb_entries: int, max_leaves: int = 0) -> TceStore:
        return CffiTceStore(self, nb_entries, max_leaves)

    def regions(self, mem: HostMemory | None) -> tuple[Any, Any, int, int]:
        """Region bounds as C arrays, copied (HostMemory stays resizable), cached by generation."""
        if mem is None:
            return self.ffi.NULL, self.ffi.NULL, 0, 0
        key = (id(mem), mem.generation)
        if key != self._mem_key:
            n = len(mem.starts)
            if n:
                self._mem_c = (
                    self.ffi.new("uint64_t[]", list(mem.starts)),
                    self.ffi.new("uint64_t[]", list(mem.ends)),
                    n,
                )
            else:
                self._mem_c = (self.ffi.NULL, self.ffi.NULL, 0)
            self._mem_key = key
        rs, re, n = self._mem_c
        return rs, re, n, 1

    def validate_be(self, data: bytes, n: int, page_shift: int, mem: HostMemory | None) -> int:
        rs, re, nr, check = self.regions(mem)
        src = data if type(data) is bytes else self.ffi.from_buffer("char[]", data)
        return int(self.lib.vfiod_tce_validate_be(src, n, page_shift, rs, re, nr, check))

    def validate(self, src: Sequence[int], n: int, page_shift: int, mem: HostMemory | None) -> int:
        rs, re, nr, check = self.regions(mem)
        buf = (
            self.ffi.from_buffer("uint64_t[]", src)
            if isinstance(src, array)
            else self.ffi.new("uint64_t[]", [v & U64_MASK for v in src[:n]])
        )
        return int(self.lib.vfiod_tce_validate(buf, n, page_shift, rs, re, nr, check))

    def translate(
        self,
        store: TceStore,
        bus_offset: int,
        page_shift: int,
        sg: Sequence[tuple[int, int]],
        write: bool,
        mem: HostMemory,
    ) -> list[RawPiece]:
        ffi = self.ffi
        assert isinstance(store, CffiTceStore)
        rs, re, nr, _ = self.regions(mem)
        nsg = len(sg)
        sg_iova = ffi.new("uint64_t[]", [e[0] for e in sg])
        sg_len = ffi.new("uint64_t[]", [e[1] for e in sg])
        while True:
            o_reg, o_off, o_len = self._out
            rc = self.lib.vfiod_tce_translate(
                store.ptr, bus_offset, page_shift, sg_iova, sg_len, nsg, 1 if write else 0,
                rs, re, nr, o_reg, o_off, o_len, self._out_max, self._fault,
            )  # fmt: skip
            if rc == -2:
                self._grow(self._out_max * 4)
                continue
            if rc == -1:
                raise TranslateFault(int(self._fault[0]), int(self._fault[1]))
            return [(o_reg[i], o_off[i], o_len[i]) for i in range(rc)]


FastPath = PyFastPath | CffiFastPath

PYTHON = PyFastPath()
_cffi: CffiFastPath | None = None
_cffi_error: str | None = None


def cffi_impl() -> CffiFastPath | None:
    """The C implementation, or None if ``vfiod._fast`` cannot be imported."""
    global _cffi, _cffi_error
    if _cffi is None and _cffi_error is None:
        try:
            _cffi = CffiFastPath()
        except ImportError as e:  # pragma: no cover - depends on the build
            _cffi_error = str(e)
    return _cffi


def default_impl() -> FastPath:
    """C unless VFIOD_NO_CFFI=1 is set or the extension is missing."""
    if os.environ.get("VFIOD_NO_CFFI", "") not in ("", "0"):
        return PYTHON
    return cffi_impl() or PYTHON
