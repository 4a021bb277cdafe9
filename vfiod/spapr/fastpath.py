"""The TCE hot loops, twice: C through cffi (``vfiod._tce``) and a plain-Python twin.

Both implementations have the same methods and must give the same results; the twin is the
reference the hypothesis tests compare against, and the fallback when the C module is missing.
``VFIOD_NO_CFFI=1`` in the environment forces the twin.

Table leaves belong to the implementation that allocated them (``new_leaf``): an ``array('Q')``
for the twin, a cffi ``uint64_t[512]`` for C. Both index like a list of host-order u64.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .constants import U64_MASK

if TYPE_CHECKING:
    from .memory import HostMemory
    from .tce import TceTable

LEAF_SHIFT = 9
LEAF_ENTRIES = 1 << LEAF_SHIFT  # 512 entries = 4 KiB = one H_PUT_TCE_INDIRECT list
_ZERO_LEAF = bytes(8 * LEAF_ENTRIES)

#: A translated piece before buffers are attached: (region index, offset in region, length).
RawPiece = tuple[int, int, int]


class TranslateFault(Exception):
    """Translation stopped: ``iova`` is where, ``index`` is which scatter-gather element."""

    def __init__(self, iova: int, index: int) -> None:
        super().__init__(f"fault at {iova:#x} (element {index})")
        self.iova = iova
        self.index = index


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


class PyFastPath:
    """Reference implementation: one entry at a time, easy to read."""

    name = "python"

    def new_leaf(self) -> Any:
        return array("Q", _ZERO_LEAF)

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

    def copy_be(self, leaf: Any, off: int, data: bytes, src_off: int, n: int) -> None:
        for i in range(n):
            j = 8 * (src_off + i)
            leaf[off + i] = int.from_bytes(data[j : j + 8], "big")

    def put_batch_be(
        self, leaf0: Any, off0: int, n0: int, leaf1: Any, data: bytes, n: int, page_shift: int,
        mem: HostMemory | None,
    ) -> int:  # fmt: skip
        """Validate all n big-endian entries, then write n0 at leaf0[off0:] and the rest at
        leaf1[0:]; -1 on success, else the first bad index and nothing written."""
        bad = self.validate_be(data, n, page_shift, mem)
        if bad >= 0:
            return bad
        n0 = min(n0, n)
        self.copy_be(leaf0, off0, data, 0, n0)
        self.copy_be(leaf1, 0, data, n0, n - n0)
        return -1

    def copy(
        self, leaf: Any, off: int, src: Sequence[int], src_off: int, n: int, or_bits: int
    ) -> None:
        for i in range(n):
            leaf[off + i] = src[src_off + i] | or_bits

    def fill(self, leaf: Any, off: int, n: int, value: int) -> None:
        for i in range(n):
            leaf[off + i] = value

    def fill_linear(self, leaf: Any, off: int, n: int, first: int, step: int) -> None:
        for i in range(n):
            leaf[off + i] = (first + i * step) & U64_MASK

    def translate(
        self,
        table: TceTable,
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
        nb = table.nb_entries
        starts, ends = mem.starts, mem.ends
        out: list[list[int]] = []
        for s, (iova, length) in enumerate(sg):
            while length:
                idx = (iova - bus_offset) >> page_shift
                if iova < bus_offset or idx >= nb:
                    raise TranslateFault(iova, s)
                tce = table.get(idx)
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


class CffiFastPath:
    """The same operations in C; leaves are cffi arrays so C writes them in place."""

    name = "cffi"

    def __init__(self) -> None:
        from vfiod import _tce  # type: ignore[attr-defined]  # optional C extension

        if not hasattr(_tce.lib, "vfiod_tce_translate") or _tce.lib.vfiod_tce_abi_version() != 3:
            raise ImportError("vfiod._tce is stale: rebuild it (pip install -e . or build_ext)")
        self.ffi = _tce.ffi
        self.lib = _tce.lib
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

    def new_leaf(self) -> Any:
        return self.ffi.new("uint64_t[512]")

    def _regions(self, mem: HostMemory | None) -> tuple[Any, Any, int, int]:
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

    def _src(self, data: Any, src_off: int) -> Any:
        if src_off == 0 and type(data) is bytes:
            return data
        return self.ffi.from_buffer("char[]", data) + 8 * src_off

    def validate_be(self, data: bytes, n: int, page_shift: int, mem: HostMemory | None) -> int:
        rs, re, nr, check = self._regions(mem)
        return int(
            self.lib.vfiod_tce_validate_be(self._src(data, 0), n, page_shift, rs, re, nr, check)
        )

    def validate(self, src: Sequence[int], n: int, page_shift: int, mem: HostMemory | None) -> int:
        rs, re, nr, check = self._regions(mem)
        buf = (
            self.ffi.from_buffer("uint64_t[]", src)
            if isinstance(src, array)
            else self.ffi.new("uint64_t[]", list(src[:n]))
        )
        return int(self.lib.vfiod_tce_validate(buf, n, page_shift, rs, re, nr, check))

    def copy_be(self, leaf: Any, off: int, data: bytes, src_off: int, n: int) -> None:
        self.lib.vfiod_tce_copy_be(leaf + off, self._src(data, src_off), n)

    def put_batch_be(
        self, leaf0: Any, off0: int, n0: int, leaf1: Any, data: bytes, n: int, page_shift: int,
        mem: HostMemory | None,
    ) -> int:  # fmt: skip
        rs, re, nr, check = self._regions(mem)
        return int(
            self.lib.vfiod_tce_put_batch_be(
                leaf0 + off0, n0, leaf1, self._src(data, 0), n, page_shift, rs, re, nr, check
            )
        )

    def copy(
        self, leaf: Any, off: int, src: Sequence[int], src_off: int, n: int, or_bits: int
    ) -> None:
        if isinstance(src, array):
            buf = self.ffi.from_buffer("uint64_t[]", src) + src_off
        else:
            buf = self.ffi.new("uint64_t[]", list(src[src_off : src_off + n]))
        self.lib.vfiod_tce_copy(leaf + off, buf, n, or_bits)

    def fill(self, leaf: Any, off: int, n: int, value: int) -> None:
        self.lib.vfiod_tce_fill(leaf + off, n, value)

    def fill_linear(self, leaf: Any, off: int, n: int, first: int, step: int) -> None:
        self.lib.vfiod_tce_fill_linear(leaf + off, n, first & U64_MASK, step & U64_MASK)

    def _leaf_index(self, table: TceTable) -> tuple[Any, Any, int]:
        cache = table.fast_cache
        if cache is None or cache[0] != table.generation:
            ids = sorted(table.leaves)
            leaves = table.leaves
            ptrs = self.ffi.new("uint64_t *[]", [leaves[i] for i in ids]) if ids else self.ffi.NULL
            ids_c = self.ffi.new("uint64_t[]", ids) if ids else self.ffi.NULL
            cache = (table.generation, ptrs, ids_c, len(ids))
            table.fast_cache = cache
        return cache[1], cache[2], cache[3]

    def translate(
        self,
        table: TceTable,
        bus_offset: int,
        page_shift: int,
        sg: Sequence[tuple[int, int]],
        write: bool,
        mem: HostMemory,
    ) -> list[RawPiece]:
        ffi = self.ffi
        ptrs, ids, nleaves = self._leaf_index(table)
        rs, re, nr, _ = self._regions(mem)
        nsg = len(sg)
        sg_iova = ffi.new("uint64_t[]", [e[0] for e in sg])
        sg_len = ffi.new("uint64_t[]", [e[1] for e in sg])
        while True:
            o_reg, o_off, o_len = self._out
            rc = self.lib.vfiod_tce_translate(
                ptrs, ids, nleaves, LEAF_SHIFT, bus_offset, page_shift, table.nb_entries,
                sg_iova, sg_len, nsg, 1 if write else 0, rs, re, nr,
                o_reg, o_off, o_len, self._out_max, self._fault,
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
    """The C implementation, or None if ``vfiod._tce`` cannot be imported."""
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
