"""PAPR TCE hypercalls, with two personalities.

KVM-strict (default): every check KVM makes, reported as H_PARAMETER (never H_TOO_HARD), ioba
must be page-aligned, whole ranges are checked and lists validated before anything is written.
QEMU-compat (``Phb(qemu_compat=True)``): ioba is masked, TCE values are stored verbatim,
STUFF/INDIRECT stop at the first out-of-range entry leaving earlier ones written, npages=0 fails.
"""

from __future__ import annotations

from typing import Protocol

from .constants import (
    H_PARAMETER,
    H_SUCCESS,
    TCE_INDIRECT_MAX,
    TCE_LIST_ALIGN,
    TCE_RW,
    U64_MASK,
)
from .memory import HostMemory
from .window import Window


class TceHost(Protocol):
    """What the hypercalls need of the PHB (``Phb`` is one; it imports this module)."""

    qemu_compat: bool
    memory: HostMemory

    def window(self, liobn: int) -> Window | None: ...


def _u64(*vals: int) -> bool:
    return all(0 <= v <= U64_MASK for v in vals)


def _compat_fit(w: Window, ioba: int) -> tuple[int, int]:
    """QEMU: masked ioba, index and how many entries fit before the window end."""
    ioba &= ~(w.page_size - 1)
    if ioba < w.bus_offset:
        return ioba, 0
    return ioba, max(0, w.nb_entries - w.index(ioba))


def h_put_tce(phb: TceHost, liobn: int, ioba: int, tce: int) -> int:
    w = phb.window(liobn)
    if w is None or not _u64(ioba, tce):
        return H_PARAMETER
    if phb.qemu_compat:
        ioba, fit = _compat_fit(w, ioba)
        if fit < 1:
            return H_PARAMETER
    elif not w.ioba_ok(ioba, 1) or not w.tce_ok(tce):
        return H_PARAMETER
    w.put(ioba, tce)
    return H_SUCCESS


def h_get_tce(phb: TceHost, liobn: int, ioba: int) -> tuple[int, int]:
    w = phb.window(liobn)
    if w is None or not _u64(ioba):
        return H_PARAMETER, 0
    if phb.qemu_compat:
        ioba, fit = _compat_fit(w, ioba)
        if fit < 1:
            return H_PARAMETER, 0
    elif not w.ioba_ok(ioba, 1):
        return H_PARAMETER, 0
    return H_SUCCESS, w.get(ioba)


def h_stuff_tce(phb: TceHost, liobn: int, ioba: int, tce_value: int, npages: int) -> int:
    w = phb.window(liobn)
    if w is None or not _u64(ioba, tce_value, npages):
        return H_PARAMETER
    if phb.qemu_compat:
        if npages > w.nb_entries or npages == 0:
            return H_PARAMETER
        ioba, fit = _compat_fit(w, ioba)
        n = min(npages, fit)
        if n:
            w.stuff(ioba, n, tce_value)
        return H_SUCCESS if n == npages else H_PARAMETER
    if not w.ioba_ok(ioba, npages) or tce_value & TCE_RW:
        return H_PARAMETER  # KVM only lets the guest clear (or poison) entries
    if npages:
        w.stuff(ioba, npages, tce_value)
    return H_SUCCESS


def _read_list(
    phb: TceHost, tce_list: bytes | bytearray | memoryview | int, nbytes: int
) -> bytes | None:
    """The guest's list as bytes; an int is an address in the host memory map."""
    if isinstance(tce_list, int):
        try:
            buf, off = phb.memory.lookup(tce_list)
        except KeyError:
            return None
        if off + nbytes > len(buf):
            return None
        return bytes(buf[off : off + nbytes])
    if len(tce_list) < nbytes:
        return None
    if type(tce_list) is bytes:
        return tce_list
    return bytes(memoryview(tce_list).cast("B")[:nbytes])


def h_put_tce_indirect(
    phb: TceHost, liobn: int, ioba: int, tce_list: bytes | bytearray | memoryview | int, npages: int
) -> int:
    """Up to 512 big-endian entries. ``tce_list`` is the list itself (bytes) or its address."""
    w = phb.window(liobn)
    if w is None or not (0 <= ioba <= U64_MASK and 0 <= npages <= U64_MASK):
        return H_PARAMETER
    if npages > TCE_INDIRECT_MAX:
        return H_PARAMETER
    if isinstance(tce_list, int) and (tce_list & (TCE_LIST_ALIGN - 1) or not _u64(tce_list)):
        return H_PARAMETER
    if phb.qemu_compat:
        if npages == 0:
            return H_PARAMETER
        ioba, fit = _compat_fit(w, ioba)
        n = min(npages, fit)
        data = _read_list(phb, tce_list, 8 * n)
        if data is None:
            return H_PARAMETER
        if n:
            w.write_be(ioba, data, n)
        return H_SUCCESS if n == npages else H_PARAMETER
    if not w.ioba_ok(ioba, npages):
        return H_PARAMETER
    if npages == 0:
        return H_SUCCESS
    data = _read_list(phb, tce_list, 8 * npages)
    if data is None:
        return H_PARAMETER
    if w.put_be_checked(ioba, data, npages) >= 0:
        return H_PARAMETER  # validation pass first: nothing written
    return H_SUCCESS
