"""The data mover translates every piece of a transfer before any byte moves: a DMA fault
anywhere (a later page, a PRP list entry, the zero fill after a short read, a read-only page)
leaves guest memory and the namespace untouched and ends the command with Data Transfer
Error. Identify, log pages, features, DSM, Read and Write; zero-copy and bounce paths; every
kind of DMA view (a read/write-only view, the plain map table, the PE's TCE translation)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import NS_BYTES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nvme_helpers import BASE, PAGE, FakeDma, GuestRam, Host

from vfiod.devices.nvme import Command, NvmeController
from vfiod.devices.nvme import constants as K
from vfiod.pci.dma import DmaFault

GUEST = 8 << 20


@dataclass
class Rig:
    kind: str  # "fake" (read/write only), "plain" (DmaMapTable), "pe" (PeDma)
    ctrl: NvmeController
    host: Host
    guest: GuestRam | None
    fake: FakeDma | None

    def snapshot(self) -> bytes:
        """Guest memory in IOVA order, the queues' own entries blanked out."""
        if self.fake is not None:
            mem = bytearray(self.fake.mem)
        else:
            assert self.guest is not None
            g = self.guest
            mem = bytearray(b"".join(os.pread(g.memfd, PAGE, p * PAGE) for p in g.pages))
        for q in self.host.queues.values():
            for base, size in ((q.sq_base, q.depth * 64), (q.cq_base, q.cq_depth * 16)):
                mem[base - BASE : base - BASE + size] = bytes(size)
        return bytes(mem)

    def disk(self) -> bytes:
        return os.pread(self.ctrl.store.fd, NS_BYTES, 0)

    def unmap(self, iova: int) -> None:
        if self.fake is not None:
            self.fake.holes.append((iova, PAGE))
        else:
            assert self.guest is not None
            self.guest.view.unmap(iova, PAGE)

    def readonly(self, iova: int) -> None:
        """The device may read this page but not write it."""
        if self.fake is not None:
            self.fake.readonly.append((iova, PAGE))
            return
        g = self.guest
        assert g is not None
        g.view.unmap(iova, PAGE)
        g.view.map(iova, PAGE, g.pages[(iova - BASE) // PAGE] * PAGE, 1, os.dup(g.memfd))

    def poke(self, iova: int, data: bytes) -> None:
        self.host.dma.poke(iova, data)

    def expect_transfer_error(self, qid: int, opcode: int, **fields: int) -> None:
        """Submit; the command must end with Data Transfer Error. Through a PE the fault froze
        the PE, so the completion cannot be posted either: controller fatal status, and the
        error log holds the command's status."""
        cid = self.host.next_cid()
        self.host.push(qid, Command.pack(opcode, cid, **fields))
        last = self.ctrl.errors[-1]
        assert last.cid == cid and last.status & 0x7FF == K.SC_DATA_TRANSFER_ERROR
        if self.kind == "pe":
            assert self.guest is not None and self.guest.pe is not None
            assert self.guest.pe.frozen
            assert self.host.rd(0x1C) & 0x2  # CFS
            return
        cqe = self.host.poll(qid)
        assert cqe is not None and cqe.cid == cid
        assert cqe.sc == K.SC_DATA_TRANSFER_ERROR and cqe.dnr


@pytest.fixture(params=["fake", "plain", "pe"])
def rig(request: pytest.FixtureRequest, ctrl: NvmeController) -> Iterator[Rig]:
    kind = request.param
    if kind == "fake":
        fake = FakeDma(GUEST)
        host = Host(ctrl, fake)
        r = Rig(kind, ctrl, host, None, fake)
    else:
        guest = GuestRam(GUEST, pe=kind == "pe", scramble=True, seed=11)
        host = Host(ctrl, guest)
        r = Rig(kind, ctrl, host, guest, None)
    host.enable()
    host.create_io_queue(1)
    ctrl.store.write(0, random.Random(5).randbytes(64 * PAGE))
    yield r
    if r.guest is not None:
        r.guest.close()


def sentinel_pages(r: Rig, n: int) -> list[int]:
    """``n`` data pages, none adjacent to another (adjacent PRP pieces would merge into one
    access, which every view already does all or nothing)."""
    pages = [r.host.alloc(2) for _ in range(n)]
    for i, p in enumerate(pages):
        r.poke(p, bytes([0xA0 + i]) * PAGE)
    return pages


# ---- controller data (Identify, log pages, features) -------------------------------------------


def test_identify_fault_on_the_second_page_moves_nothing(rig: Rig) -> None:
    a, b = sentinel_pages(rig, 2)
    rig.unmap(b)
    before = rig.snapshot()
    rig.expect_transfer_error(0, K.ADM_IDENTIFY, prp1=a + 0x800, prp2=b, cdw10=K.CNS_CONTROLLER)
    assert rig.snapshot() == before  # the first half did not land either


def test_identify_read_only_second_page_moves_nothing(rig: Rig) -> None:
    a, b = sentinel_pages(rig, 2)
    rig.readonly(b)
    before = rig.snapshot()
    rig.expect_transfer_error(0, K.ADM_IDENTIFY, prp1=a + 0x800, prp2=b, cdw10=K.CNS_CONTROLLER)
    assert rig.snapshot() == before


def test_log_page_fault_on_the_second_page_moves_nothing(rig: Rig) -> None:
    a, b = sentinel_pages(rig, 2)
    rig.unmap(b)
    before = rig.snapshot()
    numd = 1024 // 4 - 1  # the error log: 16 entries of 64 bytes
    rig.expect_transfer_error(0, K.ADM_GET_LOG_PAGE, prp1=a + 0xE00, prp2=b,
                              cdw10=K.LOG_ERROR | (numd << 16))  # fmt: skip
    assert rig.snapshot() == before


def test_timestamp_split_over_two_pages_moves_nothing(rig: Rig) -> None:
    a, b = sentinel_pages(rig, 2)
    rig.unmap(b)
    before = rig.snapshot()
    rig.expect_transfer_error(0, K.ADM_GET_FEATURES, prp1=a + PAGE - 4, prp2=b,
                              cdw10=K.FEAT_TIMESTAMP)  # fmt: skip
    assert rig.snapshot() == before


def test_dsm_ranges_fault_deallocates_nothing(rig: Rig) -> None:
    a, b = sentinel_pages(rig, 2)
    ranges = b"".join((0).to_bytes(4, "little") + (8).to_bytes(4, "little")
                      + (i * 8).to_bytes(8, "little") for i in range(256))  # fmt: skip
    rig.poke(a + 0x800, ranges[:0x800])
    rig.poke(b, ranges[0x800:])
    rig.unmap(b)
    disk = rig.disk()
    rig.expect_transfer_error(1, K.IO_DSM, nsid=1, prp1=a + 0x800, prp2=b, cdw10=255, cdw11=0x4)
    assert rig.disk() == disk


# ---- namespace data ------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_read_fault_on_a_later_data_page_moves_nothing(rig: Rig, zero_copy: bool) -> None:
    rig.ctrl.zero_copy = zero_copy
    pages = sentinel_pages(rig, 4)
    lst = rig.host.prp_list(pages[1:])
    rig.unmap(pages[3])
    before = rig.snapshot()
    rig.expect_transfer_error(1, K.IO_READ, nsid=1, prp1=pages[0], prp2=lst, cdw12=31)
    assert rig.snapshot() == before
    assert rig.ctrl.smart.read_cmds == 0


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_read_into_a_read_only_page_moves_nothing(rig: Rig, zero_copy: bool) -> None:
    rig.ctrl.zero_copy = zero_copy
    pages = sentinel_pages(rig, 4)
    lst = rig.host.prp_list(pages[1:])
    rig.readonly(pages[2])
    before = rig.snapshot()
    rig.expect_transfer_error(1, K.IO_READ, nsid=1, prp1=pages[0], prp2=lst, cdw12=31)
    assert rig.snapshot() == before


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_write_fault_on_a_later_data_page_leaves_the_namespace(rig: Rig, zero_copy: bool) -> None:
    rig.ctrl.zero_copy = zero_copy
    pages = sentinel_pages(rig, 4)
    lst = rig.host.prp_list(pages[1:])
    rig.unmap(pages[3])
    disk = rig.disk()
    rig.expect_transfer_error(1, K.IO_WRITE, nsid=1, prp1=pages[0], prp2=lst, cdw12=31)
    assert rig.disk() == disk
    assert rig.ctrl.smart.write_cmds == 0


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_zero_fill_after_a_short_read_faults_before_the_data_lands(
    rig: Rig, zero_copy: bool
) -> None:
    """The backing file shrank under the namespace: a read crossing its end gets zeros for
    the missing part. The page that would take the zeros is unmapped: the page before it,
    which the file still covers, must not have been written either."""
    rig.ctrl.zero_copy = zero_copy
    a, b = sentinel_pages(rig, 2)
    os.ftruncate(rig.ctrl.store.fd, NS_BYTES - PAGE)
    rig.unmap(b)
    before = rig.snapshot()
    slba = (NS_BYTES - 2 * PAGE) // 512
    rig.expect_transfer_error(1, K.IO_READ, nsid=1, prp1=a, prp2=b, cdw10=slba, cdw12=15)
    assert rig.snapshot() == before


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_zero_fill_after_a_short_read_lands(rig: Rig, zero_copy: bool) -> None:
    rig.ctrl.zero_copy = zero_copy
    a, b = sentinel_pages(rig, 2)
    rig.ctrl.store.write(NS_BYTES - 2 * PAGE, b"\x11" * 2 * PAGE)
    os.ftruncate(rig.ctrl.store.fd, NS_BYTES - 2 * PAGE + 0x200)
    slba = (NS_BYTES - 2 * PAGE) // 512  # the file ends 512 bytes into the transfer
    assert rig.host.rw(1, False, slba, 16, a, b).sc == 0
    assert rig.host.dma.peek(a, PAGE) == b"\x11" * 0x200 + bytes(PAGE - 0x200)
    assert rig.host.dma.peek(b, PAGE) == bytes(PAGE)


def test_controller_data_through_a_zero_copy_view_uses_one_translation(
    ctrl: NvmeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identify over two pages through the PE: one scatter-gather translation, no per-piece
    DMA write."""
    g = GuestRam(GUEST, pe=True, scramble=True, seed=2)
    try:
        h = Host(ctrl, g)
        h.enable()
        calls: list[str] = []
        view = g.view
        real_iovecs, real_write = view.iovecs, view.write

        def iovecs(pieces: list[tuple[int, int]], write: bool) -> object:
            calls.append("iovecs")
            return real_iovecs(pieces, write)

        def write(iova: int, data: bytes) -> None:
            calls.append("write")
            real_write(iova, data)

        monkeypatch.setattr(view, "iovecs", iovecs)
        monkeypatch.setattr(view, "write", write)
        a, b = h.alloc(), h.alloc()
        cqe = h.admin(K.ADM_IDENTIFY, prp1=a + 0x800, prp2=b, cdw10=K.CNS_CONTROLLER)
        assert cqe.sc == 0
        assert calls.count("iovecs") == 1
        assert calls.count("write") == 1  # the completion entry, not the data
        assert g.peek(a + 0x800, 0x800) + g.peek(b, 0x800) == h.identify(1)[1]
    finally:
        g.close()


# ---- any fault, any transfer (property) ------------------------------------------------------

_piece = st.tuples(st.integers(0, 200), st.integers(0, PAGE // 4 - 1), st.integers(1, 2 * PAGE))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    raw=st.lists(_piece, min_size=1, max_size=8),
    victim=st.integers(0, 1000),
    kind=st.sampled_from(["fake", "plain"]),
    op=st.sampled_from(["read", "read-bounce", "write", "write-bounce", "to_guest",
                        "from_guest"]),  # fmt: skip
)
def test_any_fault_in_a_transfer_moves_nothing(
    ctrl: NvmeController, raw: list[tuple[int, int, int]], victim: int, kind: str, op: str
) -> None:
    pieces = [(BASE + page * PAGE + off * 4, n) for page, off, n in raw]
    touched = sorted({(iova + k - BASE) // PAGE for iova, n in pieces for k in (0, n - 1)})
    bad = BASE + touched[victim % len(touched)] * PAGE
    fake: FakeDma | None = None
    guest: GuestRam | None = None
    if kind == "fake":
        fake = FakeDma(GUEST)
        fake.mem[:] = random.Random(victim).randbytes(GUEST)
        fake.holes.append((bad, PAGE))
        ctrl.attach_dma(fake)
    else:
        guest = GuestRam(GUEST, pe=False, scramble=True, seed=victim)
        guest.restore(random.Random(victim).randbytes(GUEST))
        guest.view.unmap(bad, PAGE)
        ctrl.attach_dma(guest.view)
    ctrl.region_write(7, 0x04, b"\x06\x00")
    try:
        os.pwrite(ctrl.store.fd, random.Random(1).randbytes(NS_BYTES), 0)
        mem = bytes(fake.mem) if fake is not None else guest.snapshot()  # type: ignore[union-attr]
        disk = os.pread(ctrl.store.fd, NS_BYTES, 0)
        total = sum(n for _, n in pieces)
        mover = ctrl.mover
        mover.zero_copy = not op.endswith("bounce")
        with pytest.raises(DmaFault):
            if op.startswith("read"):
                mover.transfer(pieces, True, 4096)
            elif op.startswith("write"):
                mover.transfer(pieces, False, 4096)
            elif op == "to_guest":
                mover.to_guest(pieces, random.Random(2).randbytes(total))
            else:
                mover.from_guest(pieces)
        after = bytes(fake.mem) if fake is not None else guest.snapshot()  # type: ignore[union-attr]
        assert after == mem
        assert os.pread(ctrl.store.fd, NS_BYTES, 0) == disk
    finally:
        ctrl.mover.zero_copy = True
        if guest is not None:
            guest.close()
