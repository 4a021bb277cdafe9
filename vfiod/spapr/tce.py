"""TCE tables: sparse storage, and the size arithmetic the kernel charges for them.

Storage (``fastpath``): 512-entry leaves (4 KiB each), allocated on the first non-zero write;
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

from .constants import HOST_PAGE_SHIFT, MAX_LEVELS, TCE_ADDR_BITS_LIMIT, TCE_ENTRY_SIZE
from .fastpath import LEAF_ENTRIES, LEAF_SHIFT, FastPath, TceStore, default_impl
from .memory import HostMemory


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
    """One window's TCEs: a store of the window's implementation (see ``fastpath``).

    Entries are host-order u64; the store is sparse (a missing leaf reads as zeros, clearing
    never allocates) and counts its valid entries as they change.
    """

    __slots__ = ("impl", "store")

    def __init__(self, nb_entries: int, impl: FastPath | None = None, max_leaves: int = 0) -> None:
        self.impl: FastPath = impl or default_impl()
        self.store: TceStore = self.impl.new_store(nb_entries, max_leaves)

    @property
    def nb_entries(self) -> int:
        return self.store.nb_entries

    # -- single entries --
    def get(self, idx: int) -> int:
        return self.store.get(idx)

    def set(self, idx: int, value: int) -> None:
        self.store.fill(idx, 1, value)

    # -- batches (no validation here: callers validate first); each returns how many of the
    # entries it overwrote were valid, and raises OSError with nothing changed --
    def write_be(self, idx: int, data: bytes, n: int) -> int:
        """Store n big-endian entries from ``data``."""
        return self.store.write_be(idx, data, n)

    def write_be_checked(
        self, idx: int, data: bytes, n: int, page_shift: int, mem: HostMemory | None
    ) -> int:
        """Validate n big-endian entries, write them only if all are good (-1), else return
        the first bad index (nothing written)."""
        bad = self.impl.validate_be(data, n, page_shift, mem)
        if bad < 0:
            self.store.write_be(idx, data, n)
        return bad

    def write(self, idx: int, src: Sequence[int], n: int, or_bits: int = 0) -> int:
        """Store n host-order entries, each OR'ed with ``or_bits``."""
        return self.store.write(idx, src, n, or_bits)

    def fill(self, idx: int, n: int, value: int) -> int:
        """Store ``value`` in n entries; zero never allocates leaves."""
        return self.store.fill(idx, n, value)

    def fill_linear(self, idx: int, n: int, first: int, step: int) -> int:
        """Entry idx+i = first + i*step: maps a physically contiguous range."""
        return self.store.fill_linear(idx, n, first, step)

    def clear_all(self) -> None:
        """Drop every leaf (all entries invalid)."""
        self.store.clear()

    def grow(self, nb_entries: int) -> None:
        """Address more entries (a window grown in place keeps what it holds)."""
        self.store.resize(nb_entries)

    def take_store(self) -> TceStore:
        """Hand the entries over (to a re-created window); this table is left empty."""
        store = self.store
        self.store = self.impl.new_store(store.nb_entries)
        return store

    def adopt(self, store: TceStore) -> None:
        """Take over ``store`` (from ``take_store``); the current entries are dropped."""
        self.store.clear()
        store.resize(max(store.nb_entries, self.store.nb_entries))
        self.store = store

    # -- inspection --
    @property
    def valid_count(self) -> int:
        """Entries granting TCE_READ or TCE_WRITE: kept as entries change, O(1) to read."""
        return self.store.valid

    @property
    def allocated_bytes(self) -> int:
        """Memory used by leaves: proportional to what was ever written non-zero."""
        return self.store.leaf_count * LEAF_ENTRIES * TCE_ENTRY_SIZE

    def items(self) -> Iterator[tuple[int, int]]:
        """(index, value) of every non-zero entry, in index order."""
        for lid, leaf in self.store.leaves():
            base = lid << LEAF_SHIFT
            for off, v in enumerate(leaf):
                if v:
                    yield base + off, int(v)

    def to_be_bytes(self, idx: int, n: int) -> bytes:
        """n entries in the big-endian hardware format."""
        return b"".join(self.get(idx + i).to_bytes(8, "big") for i in range(n))
