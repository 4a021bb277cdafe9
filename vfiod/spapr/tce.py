"""TCE tables: sparse storage, and the size arithmetic the kernel charges for them.

Storage: a directory (dict) of 512-entry leaves (4 KiB each), allocated on first non-zero write;
a missing leaf reads as zeros and clearing never allocates. A window of 1 TiB in 4 KiB pages
(2^28 entries, 2 GiB if flat) therefore costs 4 KiB per 2 MiB of IOVA actually mapped.
Entries are kept in **host byte order** (H_GET_TCE returns them as stored); the big-endian
form of hardware tables and guest lists is produced/consumed at the edges (``to_be_bytes``,
``write_be``).

The accounted size (``get_table_size``) follows the PowerNV multi-level geometry instead,
because that is what locked memory is charged for, whatever the emulation stores.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .constants import HOST_PAGE_SHIFT, MAX_LEVELS, TCE_ADDR_BITS_LIMIT, TCE_ENTRY_SIZE
from .fastpath import LEAF_ENTRIES, LEAF_SHIFT, FastPath, default_impl

if TYPE_CHECKING:
    from .memory import HostMemory

_LEAF_MASK = LEAF_ENTRIES - 1


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def flat_table_size(window_size: int, page_shift: int) -> int:
    """Bytes of a one-level table: one 8-byte TCE per IOMMU page (64 GiB @ 64K = 8 MiB)."""
    return (window_size >> page_shift) * TCE_ENTRY_SIZE


def level_geometry(
    page_shift: int, window_size: int, levels: int, host_page_shift: int = HOST_PAGE_SHIFT
) -> int:
    """log2 of the bytes of one level table (PowerNV), or 0 if the geometry is refused.

    Refused: levels outside 1..5, window not a power of two or smaller than a page, or a
    table needing TCE address bits >= 55 (hardware reserves them).
    """
    if not 1 <= levels <= MAX_LEVELS or not _is_pow2(window_size):
        return 0
    window_shift = window_size.bit_length() - 1
    if window_shift < page_shift:
        return 0
    entries_shift = window_shift - page_shift
    per_level = -(-entries_shift // levels)  # ceil
    level_shift = max(per_level + 3, host_page_shift)
    if (level_shift - 3) * levels + page_shift >= TCE_ADDR_BITS_LIMIT:
        return 0
    return level_shift


def get_table_size(
    page_shift: int, window_size: int, levels: int, host_page_shift: int = HOST_PAGE_SHIFT
) -> int:
    """Bytes the kernel accounts for a window (PowerNV get_table_size), 0 if refused.

    Walk from the leaf level up, each level's tables rounded to whole level-sized blocks;
    doubled because the kernel keeps a userspace-address shadow next to the hardware table.
    64 GiB @ 64K: 1 level -> 2 x 8 MiB; 2 levels -> 2 x (8 MiB + 64 KiB).
    """
    level_shift = level_geometry(page_shift, window_size, levels, host_page_shift)
    if not level_shift:
        return 0
    direct = 1 << level_shift
    entries_shift = window_size.bit_length() - 1 - page_shift
    level_bytes = max(1 << 12, 1 << (entries_shift + 3))
    total = 0
    for _ in range(levels):
        total += -(-level_bytes // direct) * direct
        level_bytes = max(level_bytes // direct * TCE_ENTRY_SIZE, direct)
    return 2 * total


def kvm_tce_pages(nb_entries: int, page_size: int = 1 << HOST_PAGE_SHIFT) -> int:
    """Host pages of KVM's flat in-kernel table for one LIOBN (ceil(8N / PAGE_SIZE))."""
    return -(-nb_entries * TCE_ENTRY_SIZE // page_size)


def qemu_guess_levels(
    page_shift: int, window_size: int, host_page_shift: int = HOST_PAGE_SHIFT
) -> int:
    """Levels QEMU asks for first: ceil(bits of table bytes / (host page bits + 8))."""
    entries = window_size >> page_shift
    bits_total = (entries * TCE_ENTRY_SIZE).bit_length() - 1
    per_level = host_page_shift + 8
    return max(1, -(-bits_total // per_level))


class TceTable:
    """Sparse TCE storage for ``nb_entries`` entries (see module docstring)."""

    __slots__ = ("nb_entries", "impl", "leaves", "generation", "fast_cache")

    def __init__(self, nb_entries: int, impl: FastPath | None = None) -> None:
        self.nb_entries = nb_entries
        self.impl: FastPath = impl or default_impl()
        self.leaves: dict[int, Any] = {}
        self.generation = 0  # bumped when the set of leaves changes (C index cache)
        self.fast_cache: Any = None

    # -- single entries --
    def get(self, idx: int) -> int:
        leaf = self.leaves.get(idx >> LEAF_SHIFT)
        return 0 if leaf is None else int(leaf[idx & _LEAF_MASK])

    def set(self, idx: int, value: int) -> None:
        leaf = self._leaf(idx >> LEAF_SHIFT, value != 0)
        if leaf is not None:
            leaf[idx & _LEAF_MASK] = value

    def _leaf(self, lid: int, alloc: bool) -> Any:
        leaf = self.leaves.get(lid)
        if leaf is None and alloc:
            leaf = self.impl.new_leaf()
            self.leaves[lid] = leaf
            self.generation += 1
        return leaf

    def runs(self, idx: int, n: int) -> Iterator[tuple[int, int, int, int]]:
        """Split [idx, idx+n) into per-leaf runs: (leaf id, offset in leaf, count, done so far)."""
        done = 0
        while done < n:
            i = idx + done
            off = i & _LEAF_MASK
            count = min(n - done, LEAF_ENTRIES - off)
            yield i >> LEAF_SHIFT, off, count, done
            done += count

    # -- batches (no validation here: callers validate first) --
    def write_be(self, idx: int, data: bytes, n: int) -> None:
        """Store n big-endian entries from ``data``."""
        impl = self.impl
        for lid, off, count, done in self.runs(idx, n):
            impl.copy_be(self._leaf(lid, True), off, data, done, count)

    def write_be_checked(
        self, idx: int, data: bytes, n: int, page_shift: int, mem: HostMemory | None
    ) -> int:
        """Validate n big-endian entries, write them only if all are good (-1), else return
        the first bad index. One C call when the batch spans at most two leaves."""
        off = idx & _LEAF_MASK
        if off + n > 2 * LEAF_ENTRIES:
            bad = self.impl.validate_be(data, n, page_shift, mem)
            if bad < 0:
                self.write_be(idx, data, n)
            return bad
        lid = idx >> LEAF_SHIFT
        leaf0 = self._leaf(lid, True)
        n0 = min(n, LEAF_ENTRIES - off)
        leaf1 = self._leaf(lid + 1, True) if n > n0 else leaf0
        return self.impl.put_batch_be(leaf0, off, n0, leaf1, data, n, page_shift, mem)

    def write(self, idx: int, src: Sequence[int], n: int, or_bits: int = 0) -> None:
        """Store n host-order entries, each OR'ed with ``or_bits``."""
        impl = self.impl
        for lid, off, count, done in self.runs(idx, n):
            impl.copy(self._leaf(lid, True), off, src, done, count, or_bits)

    def fill(self, idx: int, n: int, value: int) -> None:
        """Store ``value`` in n entries; zero never allocates leaves."""
        impl = self.impl
        for lid, off, count, _ in self.runs(idx, n):
            leaf = self._leaf(lid, value != 0)
            if leaf is not None:
                impl.fill(leaf, off, count, value)

    def fill_linear(self, idx: int, n: int, first: int, step: int) -> None:
        """Entry idx+i = first + i*step: maps a physically contiguous range."""
        impl = self.impl
        for lid, off, count, done in self.runs(idx, n):
            impl.fill_linear(self._leaf(lid, True), off, count, first + done * step, step)

    def clear_all(self) -> None:
        """Drop every leaf (all entries invalid)."""
        self.leaves.clear()
        self.generation += 1

    # -- inspection --
    @property
    def allocated_bytes(self) -> int:
        """Memory used by leaves: proportional to what was ever written non-zero."""
        return len(self.leaves) * LEAF_ENTRIES * TCE_ENTRY_SIZE

    def items(self) -> Iterator[tuple[int, int]]:
        """(index, value) of every non-zero entry, in index order."""
        for lid in sorted(self.leaves):
            leaf = self.leaves[lid]
            base = lid << LEAF_SHIFT
            for off in range(LEAF_ENTRIES):
                v = leaf[off]
                if v:
                    yield base + off, int(v)

    def to_be_bytes(self, idx: int, n: int) -> bytes:
        """n entries in the big-endian hardware format."""
        return b"".join(self.get(idx + i).to_bytes(8, "big") for i in range(n))
