"""NVMe zero-copy data path of the Python DataMover: PRP pieces translated through the PE in one
go, data moved with preadv/pwritev between the backing file and the guest's memfd; faults,
truncation, leaks, and equivalence with the copy path. The controllers here keep everything in
Python (``c_mover=False``); the C data mover, which stands in for this path, is held to it by
tests/devices/nvme/test_nvme_c_mover.py."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nvme_helpers import BASE, PAGE, GuestRam, Host

from vfiod.devices.nvme import NvmeController
from vfiod.devices.nvme import constants as K
from vfiod.devices.nvme import controller as nvme_controller
from vfiod.devices.nvme import mover as nvme_mover
from vfiod.pci.dma import DmaFault

GUEST = 8 << 20
NS_BYTES = 4 << 20  # the ``ctrl`` fixture's namespace (not imported: conftest names collide)
_MEM0 = random.Random(100).randbytes(GUEST)  # starting contents for the equivalence test
_DISK0 = random.Random(101).randbytes(NS_BYTES)


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def disk_bytes(ctrl: NvmeController, offset: int, n: int) -> bytes:
    return os.pread(ctrl.store.fd, n, offset)


class Syscalls:
    """Counts preadv/pwritev and copy-path DMA calls; optionally caps bytes per call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cap: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []  # (name, iovec count)
        self.cap = cap
        real_preadv, real_pwritev = os.preadv, os.pwritev

        def wrap(name: str, real: Callable[..., int]) -> Callable[..., int]:
            def call(fd: int, buffers: Any, offset: int) -> int:
                buffers = list(buffers)
                self.calls.append((name, len(buffers)))
                assert len(buffers) <= 1024
                if self.cap is not None:  # a short count: only the first ``cap`` bytes
                    out, left = [], self.cap
                    for b in buffers:
                        if left <= 0:
                            break
                        out.append(memoryview(b)[:left])
                        left -= len(out[-1])
                    try:
                        return real(fd, out, offset)
                    finally:
                        for v in out:
                            v.release()
                return real(fd, buffers, offset)

            return call

        monkeypatch.setattr(os, "preadv", wrap("preadv", real_preadv))
        monkeypatch.setattr(os, "pwritev", wrap("pwritev", real_pwritev))


@pytest.fixture
def ctrl(disk: Path) -> Iterator[NvmeController]:
    """The Python data path (the reference twin of the C data mover)."""
    c = NvmeController(disk, NS_BYTES, io_queues=4, c_mover=False)
    yield c
    c.close()


@pytest.fixture(params=["pe", "plain"])
def guest(request: pytest.FixtureRequest) -> Iterator[GuestRam]:
    g = GuestRam(GUEST, pe=request.param == "pe", scramble=True, seed=7)
    yield g
    g.close()


@pytest.fixture
def pe_guest() -> Iterator[GuestRam]:
    g = GuestRam(GUEST, pe=True, scramble=True, seed=3)
    yield g
    g.close()


def make_host(ctrl: NvmeController, guest: GuestRam) -> Host:
    h = Host(ctrl, guest)
    h.enable()
    h.create_io_queue(1)
    return h


# ---- the fast path is taken, and moves the right bytes ---------------------------------------


def test_zero_copy_write_and_read_one_mib(
    ctrl: NvmeController, guest: GuestRam, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_host(ctrl, guest)
    sys = Syscalls(monkeypatch)
    pages = [h.alloc() for _ in range(256)]  # scattered memfd pages behind consecutive IOVAs
    data = pattern(256 * PAGE, seed=5)
    for i, p in enumerate(pages):
        guest.poke(p, data[i * PAGE : (i + 1) * PAGE])
    lst = h.prp_list(pages[1:])
    assert h.rw(1, True, 64, 2048, pages[0], lst).sc == 0
    assert disk_bytes(ctrl, 64 * 512, len(data)) == data
    assert sys.calls == [("pwritev", 256)]  # one syscall, one iovec per (scrambled) page
    outs = [h.alloc() for _ in range(256)]
    assert h.rw(1, False, 64, 2048, outs[0], h.prp_list(outs[1:])).sc == 0
    assert b"".join(guest.peek(p, PAGE) for p in outs) == data
    assert sys.calls[-1] == ("preadv", 256)
    assert ctrl.dma is guest.view  # the session's view itself, not a wrapper
    assert ctrl.smart.read_cmds == 1 and ctrl.smart.write_cmds == 1


def test_sub_page_and_unaligned_prp1(ctrl: NvmeController, guest: GuestRam) -> None:
    h = make_host(ctrl, guest)
    a, b = h.alloc(), h.alloc()
    data = pattern(PAGE, seed=11)
    guest.poke(a + 0xA00, data[:0x600])
    guest.poke(b, data[0x600:])
    assert h.rw(1, True, 3, 8, a + 0xA00, b).sc == 0
    assert disk_bytes(ctrl, 3 * 512, PAGE) == data
    c = h.alloc()
    assert h.rw(1, False, 4, 1, c + 0x10).sc == 0  # 512 bytes at a dword offset
    assert guest.peek(c + 0x10, 512) == data[512:1024]


def test_contiguous_guest_memory_is_one_iovec(
    ctrl: NvmeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = GuestRam(GUEST, pe=True, scramble=False)
    try:
        h = make_host(ctrl, g)
        sys = Syscalls(monkeypatch)
        pages = [h.alloc() for _ in range(64)]
        g.poke(pages[0], pattern(64 * PAGE))
        assert h.rw(1, True, 0, 512, pages[0], h.prp_list(pages[1:])).sc == 0
        assert sys.calls == [("pwritev", 1)]  # the C translation merged the 64 pages
        assert disk_bytes(ctrl, 0, 64 * PAGE) == pattern(64 * PAGE)
    finally:
        g.close()


def test_iov_max_chunks_and_short_counts(
    ctrl: NvmeController, guest: GuestRam, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_host(ctrl, guest)
    monkeypatch.setattr(nvme_mover, "IOV_MAX", 5)
    sys = Syscalls(monkeypatch, cap=PAGE * 3 + 100)  # every call stops mid-iovec
    pages = [h.alloc() for _ in range(40)]
    data = pattern(40 * PAGE, seed=2)
    for i, p in enumerate(pages):
        guest.poke(p, data[i * PAGE : (i + 1) * PAGE])
    assert h.rw(1, True, 8, 320, pages[0], h.prp_list(pages[1:])).sc == 0
    assert disk_bytes(ctrl, 8 * 512, len(data)) == data
    assert len(sys.calls) > 8 and all(n <= 5 for _, n in sys.calls)
    outs = [h.alloc() for _ in range(40)]
    assert h.rw(1, False, 8, 320, outs[0], h.prp_list(outs[1:])).sc == 0
    assert b"".join(guest.peek(p, PAGE) for p in outs) == data


def test_read_past_end_of_shrunk_backing_file_gives_zeros(
    ctrl: NvmeController, guest: GuestRam
) -> None:
    h = make_host(ctrl, guest)
    buf = h.alloc(2)
    guest.poke(buf, b"\x77" * 2 * PAGE)
    ctrl.store.write(NS_BYTES - 2 * PAGE, b"\x11" * 2 * PAGE)
    os.ftruncate(ctrl.store.fd, NS_BYTES - PAGE)  # the last page vanished under us
    slba = (NS_BYTES - 2 * PAGE) // 512
    assert h.rw(1, False, slba, 16, buf, buf + PAGE).sc == 0
    assert guest.peek(buf, 2 * PAGE) == b"\x11" * PAGE + bytes(PAGE)


def test_bus_master_off_faults_before_the_fast_path(ctrl: NvmeController) -> None:
    g = GuestRam(GUEST, pe=False)
    try:
        make_host(ctrl, g)
        ctrl.region_write(7, 0x04, b"\x02\x00")
        with pytest.raises(DmaFault, match="bus master"):
            ctrl.mover.transfer([(BASE, PAGE)], True, 0)
    finally:
        g.close()


# ---- faults: nothing moves ---------------------------------------------------------------------


@pytest.mark.parametrize("write_to_guest", [True, False])
def test_fault_in_middle_piece_freezes_pe_and_moves_nothing(
    ctrl: NvmeController, pe_guest: GuestRam, write_to_guest: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    g = pe_guest
    make_host(ctrl, g)
    ctrl.store.write(0, pattern(3 * PAGE, seed=1))
    pieces = [(BASE + 100 * PAGE, PAGE), (BASE + 200 * PAGE, PAGE), (BASE + 300 * PAGE, PAGE)]
    for iova, n in pieces:
        g.poke(iova, b"\xa5" * n)
    g.view.unmap(BASE + 200 * PAGE, PAGE)
    sys = Syscalls(monkeypatch)
    mem_before, disk_before = g.snapshot(), disk_bytes(ctrl, 0, 3 * PAGE)
    assert g.pe is not None and not g.pe.frozen
    with pytest.raises(DmaFault):
        ctrl.mover.transfer(pieces, write_to_guest, 0)
    assert g.pe.frozen
    assert sys.calls == []  # no syscall ran: the whole list was translated first
    assert g.snapshot() == mem_before
    assert disk_bytes(ctrl, 0, 3 * PAGE) == disk_before


def test_permission_is_checked_per_direction(ctrl: NvmeController, pe_guest: GuestRam) -> None:
    g = pe_guest
    make_host(ctrl, g)
    ro = BASE + 500 * PAGE
    g.view.map(ro, PAGE, g.pages[500] * PAGE, 1, os.dup(g.memfd))  # R only
    ctrl.mover.transfer([(ro, PAGE)], False, 0)  # device reads guest memory: fine
    assert g.pe is not None and not g.pe.frozen
    with pytest.raises(DmaFault):
        ctrl.mover.transfer([(ro, PAGE)], True, 0)  # device writes it: needs W
    assert g.pe.frozen


def test_fault_through_the_pe_ends_command_and_freezes(
    ctrl: NvmeController, pe_guest: GuestRam
) -> None:
    g = pe_guest
    h = make_host(ctrl, g)
    pages = [h.alloc() for _ in range(8)]
    lst = h.prp_list(pages[1:])
    for p in pages:
        g.poke(p, b"\x5a" * PAGE)
    g.view.unmap(pages[4], PAGE)
    h.push(1, nvme_controller.Command.pack(K.IO_READ, 9, nsid=1, prp1=pages[0], prp2=lst,
                                           cdw12=63))  # fmt: skip
    assert g.pe is not None and g.pe.frozen
    # The command ended with Data Transfer Error (logged); its completion could not be posted
    # through the frozen PE, so the controller reports fatal status until the guest resets.
    assert ctrl.errors[-1].cid == 9
    assert ctrl.errors[-1].status & 0x7FF == K.SC_DATA_TRANSFER_ERROR
    assert h.rd(0x1C) & 0x2
    assert all(g.peek(p, PAGE) == b"\x5a" * PAGE for p in pages)  # no data moved
    assert ctrl.smart.read_cmds == 0


def test_fault_on_plain_table_completes_with_data_transfer_error(ctrl: NvmeController) -> None:
    g = GuestRam(GUEST, pe=False, scramble=True)
    try:
        h = make_host(ctrl, g)
        pages = [h.alloc() for _ in range(4)]
        lst = h.prp_list(pages[1:])
        ctrl.store.write(0, pattern(4 * PAGE))
        disk_before = disk_bytes(ctrl, 0, 4 * PAGE)
        g.view.unmap(pages[2], PAGE)
        cqe = h.rw(1, True, 0, 32, pages[0], lst)
        assert cqe.sc == K.SC_DATA_TRANSFER_ERROR and cqe.dnr
        assert disk_bytes(ctrl, 0, 4 * PAGE) == disk_before
        assert h.rw(1, False, 0, 8, pages[0]).sc == 0  # the controller carries on
    finally:
        g.close()


@pytest.mark.parametrize("write_to_guest", [True, False])
def test_truncated_client_file_is_a_dma_fault_not_a_crash(
    ctrl: NvmeController, guest: GuestRam, write_to_guest: bool
) -> None:
    h = make_host(ctrl, guest)
    # Data pages whose memfd pages lie in the top half, which the client cuts off.
    top = [i for i in range(guest.npages) if guest.pages[i] >= guest.npages // 2]
    iovas = [BASE + i * PAGE for i in top[-4:]]
    pieces = [(iova, PAGE) for iova in iovas]
    ctrl.store.write(0, pattern(4 * PAGE))
    os.ftruncate(guest.memfd, GUEST // 2)
    with pytest.raises(DmaFault, match="shrank") as info:
        ctrl.mover.transfer(pieces, write_to_guest, 0)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EFAULT
    if guest.pe is not None:
        assert guest.pe.frozen
    assert h.rd(0x1C) == 1  # no crash, no controller fatal status from the transfer itself


def test_truncated_client_file_command_status(ctrl: NvmeController) -> None:
    g = GuestRam(GUEST, pe=False)
    try:
        h = make_host(ctrl, g)
        buf = BASE + GUEST - 4 * PAGE
        os.ftruncate(g.memfd, GUEST // 2)
        assert h.rw(1, False, 0, 8, buf).sc == K.SC_DATA_TRANSFER_ERROR
        assert h.rw(1, True, 0, 8, buf).sc == K.SC_DATA_TRANSFER_ERROR
        assert h.rw(1, True, 0, 8, h.alloc()).sc == 0
    finally:
        g.close()


def test_other_store_errors_keep_their_status(
    ctrl: NvmeController, guest: GuestRam, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_host(ctrl, guest)

    def boom(*args: object) -> int:
        raise OSError(errno.EIO, "EIO")

    monkeypatch.setattr(os, "pwritev", boom)
    monkeypatch.setattr(os, "preadv", boom)
    assert h.rw(1, True, 0, 8, h.alloc()).sc == K.SC_WRITE_FAULT
    assert h.rw(1, False, 0, 8, h.alloc()).sc == K.SC_UNRECOVERED_READ
    if guest.pe is not None:
        assert not guest.pe.frozen


# ---- no leaks -----------------------------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("memfd:nvme-guest" in line for line in f)


def test_views_released_so_close_unmaps(disk: Path) -> None:
    fds = fd_count()
    maps = memfd_mappings()
    ctrl = NvmeController(disk, NS_BYTES, io_queues=2)
    g = GuestRam(GUEST, pe=True, scramble=True)
    h = make_host(ctrl, g)
    pages = [h.alloc() for _ in range(32)]
    assert h.rw(1, True, 0, 256, pages[0], h.prp_list(pages[1:])).sc == 0
    assert h.rw(1, False, 0, 256, pages[0], h.prp_list(pages[1:])).sc == 0
    g.view.unmap(pages[3], PAGE)
    with pytest.raises(DmaFault):  # a fault mid-list (freezes the PE)
        ctrl.mover.transfer([(p, PAGE) for p in pages], True, 0)
    files = list(g.view._files.values())
    mms = [f.mm for f in files]
    assert memfd_mappings() == maps + 1
    g.view.close()  # right after the commands
    assert all(mm is not None and mm.closed for mm in mms)
    assert memfd_mappings() == maps
    g.close()
    ctrl.close()
    assert fd_count() == fds


def test_plain_table_views_released(ctrl: NvmeController) -> None:
    maps = memfd_mappings()
    g = GuestRam(GUEST, pe=False)
    h = make_host(ctrl, g)
    assert h.rw(1, True, 0, 8, h.alloc()).sc == 0
    backing = next(iter(g.view._backings.values()))
    mm = backing.mm
    g.view.close()
    assert mm is not None and mm.closed
    assert memfd_mappings() == maps
    g.close()


# ---- same results as the copy path ------------------------------------------------------------


_piece = st.tuples(st.integers(0, 1000), st.integers(0, PAGE - 1), st.integers(1, 3 * PAGE))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.lists(_piece, min_size=1, max_size=12),
    write_to_guest=st.booleans(),
    file_page=st.integers(0, NS_BYTES // PAGE - 40),
    byte=st.integers(0, 511),
)
def test_zero_copy_matches_copy_path(
    ctrl: NvmeController, guest: GuestRam, raw: list[tuple[int, int, int]],
    write_to_guest: bool, file_page: int, byte: int,
) -> None:  # fmt: skip
    assert ctrl.store.size == NS_BYTES
    ctrl.attach_dma(guest.view)
    ctrl.region_write(7, 0x04, b"\x06\x00")
    pieces = [(BASE + page * PAGE + off, n) for page, off, n in raw]
    file_offset = file_page * PAGE + byte

    def run(zero_copy: bool) -> tuple[bytes, bytes]:
        guest.restore(_MEM0)
        os.pwrite(ctrl.store.fd, _DISK0, 0)
        ctrl.zero_copy = zero_copy
        ctrl.mover.transfer(pieces, write_to_guest, file_offset)
        return guest.snapshot(), disk_bytes(ctrl, 0, NS_BYTES)

    fast = run(True)
    slow = run(False)
    assert fast[0] == slow[0]
    assert fast[1] == slow[1]
