"""PRP walking: turn PRP1/PRP2 (and PRP lists) into a list of (iova, length) pieces.

The piece list is built completely before any data moves, so a malformed or unmapped PRP list
fails the command without touching guest memory or the backing store. Physically adjacent
pieces are merged, which keeps the later scatter-gather fast path short.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from vfiod.devices.nvme.constants import SC_INVALID_FIELD, SC_INVALID_PRP_OFFSET

Piece = tuple[int, int]


class NvmeStatus(Exception):
    """Ends a command with ``status`` ((SCT << 8) | SC); DNR is added by the controller."""

    def __init__(self, status: int, lba: int = 0) -> None:
        super().__init__(f"NVMe status {status:#05x}")
        self.status = status
        self.lba = lba


def _append(pieces: list[Piece], iova: int, length: int) -> None:
    if pieces:
        last_iova, last_len = pieces[-1]
        if last_iova + last_len == iova:
            pieces[-1] = (last_iova, last_len + length)
            return
    pieces.append((iova, length))


def prp_pieces(
    prp1: int,
    prp2: int,
    length: int,
    page_size: int,
    read: Callable[[int, int], bytes],
) -> list[Piece]:
    """Pieces covering ``length`` bytes; ``read`` fetches PRP list entries (may raise DmaFault).

    Raises :class:`NvmeStatus` for offsets the specification forbids (PRP1 not dword aligned,
    PRP2 / list entries not page aligned, a list pointer not qword aligned) and for list chains
    that do not advance.
    """
    if length <= 0:
        return []
    mask = page_size - 1
    if prp1 & 0x3:
        raise NvmeStatus(SC_INVALID_PRP_OFFSET)
    first = min(length, page_size - (prp1 & mask))
    pieces: list[Piece] = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return pieces
    if remaining <= page_size:
        if prp2 & mask:
            raise NvmeStatus(SC_INVALID_PRP_OFFSET)
        _append(pieces, prp2, remaining)
        return pieces
    if prp2 & 0x7:
        raise NvmeStatus(SC_INVALID_PRP_OFFSET)
    needed = (remaining + mask) // page_size
    list_addr = prp2
    hops = 0
    while needed:
        hops += 1
        if hops > needed + 2:
            raise NvmeStatus(SC_INVALID_FIELD)  # chain of pointer-only list pages
        avail = (page_size - (list_addr & mask)) // 8
        chained = needed > avail
        take = avail if chained else needed
        entries = struct.unpack(f"<{take}Q", read(list_addr, take * 8))
        data = entries[:-1] if chained else entries
        for entry in data:
            if entry & mask:
                raise NvmeStatus(SC_INVALID_PRP_OFFSET)
            size = min(page_size, remaining)
            _append(pieces, entry, size)
            remaining -= size
        needed -= len(data)
        if chained:
            list_addr = entries[-1]
            if list_addr & 0x7:
                raise NvmeStatus(SC_INVALID_PRP_OFFSET)
    return pieces
