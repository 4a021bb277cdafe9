"""The server's own MSI-X table and PBA (register handlers mapped into a BAR).

On q35 QEMU emulates the table and guest writes never reach us; on pseries
(``vfio-no-msix-emulation``) table and mask writes land here. So a table mask bit only counts
once the client has actually written that vector's control word: the reset value (masked) of an
untouched entry must not block delivery, or a q35 guest never gets interrupts.
"""

from __future__ import annotations

from collections.abc import Callable

from vfiod.pci.caps import MSIX_ENTRY_SIZE

ENTRY_VECTOR_CTRL = 12
VECTOR_CTRL_MASKBIT = 0x1


class MsixTable:
    """MSI-X table entries (addr lo/hi, data, vector control) as a register handler."""

    def __init__(self, vectors: int, on_mask_change: Callable[[int], None]) -> None:
        self.vectors = vectors
        self.size = vectors * MSIX_ENTRY_SIZE
        self._on_mask_change = on_mask_change
        self.entries = bytearray(self.size)
        self.mask_seen = [False] * vectors
        self.reset()

    def reset(self) -> None:
        """All entries zero and masked (PCI reset state); no mask write seen yet."""
        self.entries[:] = bytes(self.size)
        for v in range(self.vectors):
            self.entries[v * MSIX_ENTRY_SIZE + ENTRY_VECTOR_CTRL] = VECTOR_CTRL_MASKBIT
        self.mask_seen = [False] * self.vectors

    def read(self, offset: int, size: int) -> int:
        if offset >= self.size:
            return 0
        return int.from_bytes(self.entries[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= self.size:
            return
        end = min(offset + size, self.size)
        self.entries[offset:end] = value.to_bytes(size, "little")[: end - offset]
        first = offset // MSIX_ENTRY_SIZE
        last = (end - 1) // MSIX_ENTRY_SIZE
        for v in range(first, last + 1):
            ctrl = v * MSIX_ENTRY_SIZE + ENTRY_VECTOR_CTRL
            if offset < ctrl + 4 and ctrl < end:
                self.mask_seen[v] = True
                self._on_mask_change(v)

    def masked(self, vector: int) -> bool:
        """Masked by the table only if the client wrote a set mask bit for this vector."""
        if not self.mask_seen[vector]:
            return False
        ctrl = self.entries[vector * MSIX_ENTRY_SIZE + ENTRY_VECTOR_CTRL]
        return bool(ctrl & VECTOR_CTRL_MASKBIT)

    def message(self, vector: int) -> tuple[int, int]:
        """(address, data) of a vector, for diagnostics."""
        base = vector * MSIX_ENTRY_SIZE
        addr = int.from_bytes(self.entries[base : base + 8], "little")
        data = int.from_bytes(self.entries[base + 8 : base + 12], "little")
        return addr, data


class MsixPba:
    """Pending-bit array; read-only, bits come from the interrupt controller."""

    def __init__(self, vectors: int, pending: Callable[[int], bool]) -> None:
        self.vectors = vectors
        self.size = ((vectors + 63) // 64) * 8
        self._pending = pending

    def read(self, offset: int, size: int) -> int:
        value = 0
        for bit in range(size * 8):
            v = offset * 8 + bit
            if v < self.vectors and self._pending(v):
                value |= 1 << bit
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """PBA is read-only; writes are dropped as on hardware."""
        return None
