"""The C common case of DMA_MAP/DMA_UNMAP (cffi_build/pe_dma.c) against the Python PeDma.

The C functions either do a map or unmap completely or answer "too hard" having touched nothing
(then the Python PeDma does it). Random sequences applied both ways must give the same results,
the same TCEs, counters, charges and open fds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiod import spapr
from vfiod.spapr.fastpath import cffi_impl
from vfiod.spapr.pe_dma import ClientMemory, PeDma

C = cffi_impl()
assert C is not None, "vfiod._fast is not built: run `make venv` (pip install builds it)"
FFI, LIB = C.ffi, C.lib

MiB, GiB = 1 << 20, 1 << 30
DMA64 = spapr.DMA64_WINDOW_START
PAGE = 0x1000


class Files:
    """Guest RAM files and the fds a QEMU would send (a new fd number each time)."""

    def __init__(self) -> None:
        self.rw = os.memfd_create("ram-rw", os.MFD_CLOEXEC)
        os.ftruncate(self.rw, 4 * MiB)
        self.other = os.memfd_create("ram-other", os.MFD_CLOEXEC)
        os.ftruncate(self.other, 1 * MiB)
        self.ro = os.open(f"/proc/self/fd/{self.rw}", os.O_RDONLY | os.O_CLOEXEC)

    def fd(self, kind: str) -> int | None:
        if kind == "none":
            return None
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return r
        return os.dup({"rw": self.rw, "other": self.other, "ro": self.ro}[kind])

    def close(self) -> None:
        for fd in (self.rw, self.other, self.ro):
            os.close(fd)


@pytest.fixture
def files() -> Iterator[Files]:
    f = Files()
    yield f
    f.close()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


iova_st = st.one_of(
    st.integers(0, 64).map(lambda p: p * PAGE),  # low in the 32-bit window (mostly)
    st.integers(0, 64).map(lambda p: p * PAGE),
    st.integers(0, 64).map(lambda p: p * PAGE),
    st.integers(0, 16).map(lambda p: 2 * GiB - p * PAGE),  # at the 32-bit window's end
    st.integers(0, 64).map(lambda p: DMA64 + p * PAGE),  # the 64-bit window
    st.integers(0, 8).map(lambda p: DMA64 + p * GiB),  # far into it: grows it
    st.integers(0, (1 << 64) - 1),  # anything
)
size_st = st.one_of(st.integers(1, 8).map(lambda p: p * PAGE), st.integers(1, 8).map(
    lambda p: p * PAGE), st.integers(0, 1 << 22))
offset_st = st.one_of(st.integers(0, 1100).map(lambda p: p * PAGE), st.integers(0, 1 << 23))
op_st = st.one_of(
    st.tuples(st.just("map"), iova_st, size_st, offset_st, st.sampled_from([0, 1, 2, 3, 3, 3, 4]),
              st.sampled_from(["rw", "rw", "rw", "other", "ro", "pipe", "none"])),
    st.tuples(st.just("unmap"), iova_st, size_st),
    st.tuples(st.just("unmap_all")),
)  # fmt: skip


def apply(dma: PeDma, files: Files, op: tuple[object, ...], fast: bool) -> object:
    """One operation; with ``fast`` the C common case first, Python when it is too hard."""
    try:
        if op[0] == "map":
            _, iova, size, offset, prot, kind = op
            fd = files.fd(str(kind))
            if fast and fd is not None:
                rc = LIB.vfiod_pe_dma_map(dma.c_view, iova % (1 << 64), size, offset, prot, fd)
                if rc == LIB.VFIOD_DMA_DONE:
                    return ("fast", None)
            dma.map(int(iova), int(size), int(offset), int(prot), fd)  # type: ignore[call-overload]
            return ("ok", None)
        if op[0] == "unmap":
            _, iova, size = op
            if fast:
                rc = LIB.vfiod_pe_dma_unmap(dma.c_view, iova, size)
                if rc == LIB.VFIOD_DMA_DONE:
                    return ("fast", None)
            dma.unmap(int(iova), int(size))  # type: ignore[call-overload]
            return ("ok", None)
        dma.unmap_all()
        return ("ok", None)
    except OSError as e:
        return ("error", e.errno)


def state(dma: PeDma) -> tuple[object, ...]:
    windows = [
        None if w is None else (w.start, w.size, list(w.table.items()), w.tces_in_use)
        for w in dma.container.windows
    ]
    return (windows, dma.maps_total, dma.unmaps_total, dma.client.locked_bytes,
            dma.backing_count, dma.mapped_bytes)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(op_st, max_size=25))
def test_c_common_case_matches_python(ops: list[tuple[object, ...]]) -> None:
    files = Files()
    try:
        before = fd_count()
        dmas = []
        for _ in range(2):
            phb = spapr.Phb(index=0)
            dmas.append(PeDma(phb, phb.new_pe(), ClientMemory(spapr.Client(memlock_limit=GiB))))
        for op in ops:
            ref = apply(dmas[0], files, op, fast=False)
            got = apply(dmas[1], files, op, fast=True)
            if got[0] == "fast":
                got = ("ok", None)
            assert got == ref, op
            assert state(dmas[1]) == state(dmas[0]), op
        for d in dmas:
            d.close()
        assert fd_count() == before  # every fd was closed exactly once, either way
    finally:
        files.close()


def test_c_handles_the_hot_cases_itself(files: Files) -> None:
    """A known file, an existing window, aligned: C does it (no Python), including unmaps of
    never-mapped ranges; a new file or a window to create is left to Python."""
    phb = spapr.Phb(index=0)
    dma = PeDma(phb, phb.new_pe(), ClientMemory(spapr.Client()))
    view = dma.c_view
    fd = files.fd("rw")
    assert fd is not None
    assert LIB.vfiod_pe_dma_map(view, 0, PAGE, 0, 3, fd) == LIB.VFIOD_DMA_TOO_HARD  # new file
    dma.map(0, PAGE, 0, 3, fd)  # Python registers it
    before = fd_count()
    for i in range(1, 100):
        fd = files.fd("rw")
        assert LIB.vfiod_pe_dma_map(view, i * PAGE, PAGE, i * PAGE, 3, fd) == LIB.VFIOD_DMA_DONE
    assert fd_count() == before  # C closed each duplicate fd
    w = dma.window(0)
    assert w is not None and w.tces_in_use == 100 and dma.maps_total == 100
    for i in range(262_144 // 64):  # a slice of the boot-time clear
        assert LIB.vfiod_pe_dma_unmap(view, (1 << 28) + i * PAGE, PAGE) == LIB.VFIOD_DMA_DONE
    assert w.tces_in_use == 100
    assert LIB.vfiod_pe_dma_unmap(view, 0, 50 * PAGE) == LIB.VFIOD_DMA_DONE
    assert w.tces_in_use == 50 and dma.unmaps_total == 262_144 // 64 + 1
    fd = files.fd("rw")
    assert LIB.vfiod_pe_dma_map(view, DMA64, PAGE, 0, 3, fd) == LIB.VFIOD_DMA_TOO_HARD  # no window
    dma.map(DMA64, PAGE, 0, 3, fd)
    fd = files.fd("rw")
    assert LIB.vfiod_pe_dma_map(view, DMA64 + PAGE, PAGE, 0, 1, fd) == LIB.VFIOD_DMA_DONE
    assert dma.read(DMA64 + PAGE, 4) == b"\0" * 4
    dma.close()
    fd = files.fd("rw")
    assert fd is not None
    assert LIB.vfiod_pe_dma_map(view, 0, PAGE, 0, 3, fd) == LIB.VFIOD_DMA_TOO_HARD  # closed
    os.close(fd)


def test_eeh_mirror_follows_the_pe(files: Files) -> None:
    phb = spapr.Phb(index=0)
    pe = phb.new_pe()
    dma = PeDma(phb, pe, ClientMemory(spapr.Client()))
    eeh = dma.c_view.eeh
    assert (eeh.mmio_enabled, eeh.dma_enabled, eeh.config_blocked) == (1, 1, 0)
    with pytest.raises(spapr.DmaFault):
        dma.read(0, 4)
    assert (eeh.mmio_enabled, eeh.dma_enabled) == (0, 0)
    assert pe.eeh_op(spapr.VFIO_EEH_PE_RESET_HOT) == 0
    assert eeh.config_blocked == 1
    assert pe.eeh_op(spapr.VFIO_EEH_PE_RESET_DEACTIVATE) == 0
    assert (eeh.mmio_enabled, eeh.dma_enabled, eeh.config_blocked) == (1, 1, 0)
    dma.close()
