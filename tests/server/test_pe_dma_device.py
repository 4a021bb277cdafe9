"""Device DMA through a PeDma's C view (what the NVMe data mover uses from its threads) against
the Python PeDma: the same bytes wherever Python succeeds, TOO_HARD (nothing read or written)
wherever Python faults, for random maps (scattered pages, read-only and write-only TCEs, both
windows), sealed and unsealed RAM files, a frozen PE and a closed view."""

from __future__ import annotations

import fcntl
import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiod import spapr
from vfiod.pci.dma import DmaFault
from vfiod.spapr.fastpath import CffiFastPath
from vfiod.spapr.pe_dma import ClientMemory, PeDma

PAGE = 4096
DMA64 = spapr.DMA64_WINDOW_START
PAGES = 64
TOO_HARD = 1


def ram(sealed: bool) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealed else 0)
    fd = os.memfd_create("pe-dma-device", flags)
    os.ftruncate(fd, PAGES * PAGE)
    os.pwrite(fd, random.Random(1).randbytes(PAGES * PAGE), 0)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class View:
    def __init__(self, sealed: bool, seed: int) -> None:
        self.phb = spapr.Phb(index=0)
        assert isinstance(self.phb.impl, CffiFastPath)
        self.ffi, self.lib = self.phb.impl.ffi, self.phb.impl.lib
        self.pe = self.phb.new_pe()
        self.dma = PeDma(self.phb, self.pe, ClientMemory(spapr.Client()))
        self.memfd = ram(sealed)
        rnd = random.Random(seed)
        # 32-bit window: 24 scattered pages with mixed permissions; 64-bit: 8 pages RW
        for i in range(24):
            prot = rnd.choice([1, 2, 3, 3, 3])
            self.dma.map(i * PAGE, PAGE, rnd.randrange(PAGES) * PAGE, prot, os.dup(self.memfd))
        self.dma.map(DMA64, 8 * PAGE, 8 * PAGE, 3, os.dup(self.memfd))

    def c_read(self, iova: int, n: int) -> bytes | None:
        buf = self.ffi.new("uint8_t[]", n)
        self.lib.vfiod_pe_dma_lock(self.dma.c_view)
        try:
            rc = self.lib.vfiod_pe_dma_read(self.dma.c_view, iova, buf, n)
        finally:
            self.lib.vfiod_pe_dma_unlock(self.dma.c_view)
        return None if rc == TOO_HARD else bytes(self.ffi.buffer(buf, n))

    def c_write(self, iova: int, data: bytes) -> bool:
        self.lib.vfiod_pe_dma_lock(self.dma.c_view)
        try:
            return bool(self.lib.vfiod_pe_dma_write(self.dma.c_view, iova, data, len(data)) == 0)
        finally:
            self.lib.vfiod_pe_dma_unlock(self.dma.c_view)

    def c_iovecs(self, iova: int, n: int, write: bool) -> list[tuple[int, int]] | None:
        pieces = self.ffi.new("struct vfiod_dma_piece[]", 16)
        iov = self.ffi.new("struct iovec[]", 16)
        c = self.dma.c_view
        got = self.lib.vfiod_pe_dma_pieces(c, iova, n, int(write), pieces, 0, 16)
        if got < 0:
            return None
        assert self.lib.vfiod_pe_dma_iovecs(c, pieces, got, iov) == got
        return [(int(self.ffi.cast("uintptr_t", iov[i].iov_base)), int(iov[i].iov_len))
                for i in range(got)]  # fmt: skip

    def snapshot(self) -> bytes:
        return os.pread(self.memfd, PAGES * PAGE, 0)

    def close(self) -> None:
        self.dma.close()
        os.close(self.memfd)


@pytest.fixture(params=[False, True], ids=["unsealed", "sealed"])
def view(request: pytest.FixtureRequest) -> Iterator[View]:
    v = View(request.param, seed=5)
    yield v
    v.close()


def address(v: View, m: memoryview) -> tuple[int, int]:
    buf = v.ffi.from_buffer(m)
    try:
        return int(v.ffi.cast("uintptr_t", buf)), m.nbytes
    finally:
        v.ffi.release(buf)


def thaw(pe: spapr.Pe) -> None:
    pe.eeh.thaw()


addr_st = st.one_of(
    st.integers(0, 26 * PAGE),
    st.integers(DMA64 - 16, DMA64 + 9 * PAGE),
    st.integers(0, (1 << 64) - 1),
)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 3), sealed=st.booleans(),
       ops=st.lists(st.tuples(st.booleans(), addr_st, st.integers(1, 3 * PAGE)), max_size=12))
def test_c_device_dma_matches_python(seed: int, sealed: bool,
                                     ops: list[tuple[bool, int, int]]) -> None:  # fmt: skip
    v = View(sealed, seed)
    try:
        rnd = random.Random(seed)
        for write, iova, n in ops:
            before = v.snapshot()
            if write:
                data = rnd.randbytes(n)
                ok_c = v.c_write(iova, data)
                after_c = v.snapshot()
                os.pwrite(v.memfd, before, 0)
                try:
                    v.dma.write(iova, data)
                    ok_py = True
                except DmaFault:
                    ok_py = False
                    thaw(v.pe)
                assert ok_c == ok_py, (hex(iova), n)
                assert after_c == v.snapshot()  # same bytes written, or none at all
            else:
                got = v.c_read(iova, n)
                assert v.snapshot() == before
                try:
                    ref = v.dma.read(iova, n)
                except DmaFault:
                    ref = None
                    thaw(v.pe)
                assert got == ref, (hex(iova), n)
            # zero-copy pieces: the same host memory as the Python lease
            for w in (False, True):
                mine = v.c_iovecs(iova, n, w)
                try:
                    with v.dma.iovecs([(iova, n)], w) as views:
                        theirs_i = [address(v, m) for m in views]
                except DmaFault:
                    theirs_i = None
                    thaw(v.pe)
                if mine is not None and theirs_i is not None:
                    # Python merges within a window; C the same: identical runs
                    assert mine == theirs_i
                else:
                    assert mine is None and theirs_i is None, (hex(iova), n, w)
    finally:
        v.close()


def test_frozen_pe_closed_view_and_eeh(view: View) -> None:
    assert view.c_read(0, 16) is not None or view.c_read(PAGE, 16) is not None
    view.pe.freeze()
    assert view.c_read(DMA64, 16) is None
    assert not view.c_write(DMA64, b"x" * 16)
    assert view.pe.fault_count == 0  # C never counts or freezes: Python decides
    view.pe.eeh.thaw()
    assert view.c_read(DMA64, 16) == view.dma.read(DMA64, 16)
    view.dma.close()
    assert view.c_read(DMA64, 16) is None


def test_a_shrunk_unsealed_file_is_too_hard(view: View) -> None:
    data = b"\xaa" * 64
    assert view.c_write(DMA64, data)
    assert view.dma.read(DMA64, 64) == data
    sealed = bool(view.dma.c_view.files[0].sealed)
    if sealed:
        with pytest.raises(OSError):
            os.ftruncate(view.memfd, 0)  # the seal holds: memcpy is safe
        return
    os.ftruncate(view.memfd, 4 * PAGE)  # DMA64 is at file page 8: gone
    before = os.fstat(view.memfd).st_size
    assert view.c_read(DMA64, 64) is None
    assert not view.c_write(DMA64, data)
    assert os.fstat(view.memfd).st_size == before  # never grown back by a pwrite


def test_sealed_is_only_a_sealed_memfd(tmp_path: object) -> None:
    lib = CffiFastPath().lib
    for sealed in (False, True):
        fd = ram(sealed)
        try:
            assert bool(lib.vfiod_dma_file_sealed(fd)) == sealed
        finally:
            os.close(fd)
    fd = os.memfd_create("grow-only", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    assert not lib.vfiod_dma_file_sealed(fd)
    os.close(fd)
