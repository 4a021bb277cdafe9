"""NVMe I/O path: PRPs, read/write/flush/FUA/write zeroes/DSM, range checks, DMA faults,
phase tags, interrupts (MSI, MSI-X and INTx on real eventfds), persistence."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from conftest import NS_BYTES
from eventfds import count
from nvme_helpers import PAGE, FakeDma, Host, efd

from vfiod.devices.nvme import Command, NvmeController
from vfiod.devices.nvme import constants as K
from vfiod.devices.nvme.prp import NvmeStatus, prp_pieces
from vfiod.pci.constants import (
    IRQ_INTX,
    IRQ_MSI,
    IRQ_MSIX,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
)

EVT = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(n))


def disk_bytes(ctrl: NvmeController, offset: int, n: int) -> bytes:
    return os.pread(ctrl.store.fd, n, offset)


# ---- PRP walking (unit) ----------------------------------------------------------------------


def test_prp_pieces_rules() -> None:
    mem: dict[int, bytes] = {}

    def read(addr: int, n: int) -> bytes:
        return b"".join(mem.get(addr + i, b"\0") for i in range(n))

    def put_list(addr: int, entries: list[int]) -> None:
        raw = struct.pack(f"<{len(entries)}Q", *entries)
        for i, b in enumerate(raw):
            mem[addr + i] = bytes([b])

    assert prp_pieces(0x1000, 0, 0, PAGE, read) == []
    assert prp_pieces(0x1010, 0, 0x100, PAGE, read) == [(0x1010, 0x100)]
    assert prp_pieces(0x1800, 0x5000, 0x1000, PAGE, read) == [(0x1800, 0x800), (0x5000, 0x800)]
    # Adjacent pages merge.
    assert prp_pieces(0x1800, 0x2000, 0x1000, PAGE, read) == [(0x1800, 0x1000)]
    with pytest.raises(NvmeStatus):
        prp_pieces(0x1002, 0, 8, PAGE, read)  # not dword aligned
    with pytest.raises(NvmeStatus):
        prp_pieces(0x1000, 0x5008, 0x2000, PAGE, read)  # PRP2 data pointer with offset
    # A list chained over a page boundary: list starts 2 entries before the page end.
    put_list(0x9FF0, [0xA000_0000, 0xB000])  # data, then pointer to next list
    put_list(0xB000, [0xC000_0000, 0xD000_0000])
    got = prp_pieces(0x7000, 0x9FF0, 4 * PAGE, PAGE, read)
    assert got == [(0x7000, PAGE), (0xA000_0000, PAGE), (0xC000_0000, PAGE), (0xD000_0000, PAGE)]
    put_list(0x20000, [0x30000 + 0x10])
    with pytest.raises(NvmeStatus):
        prp_pieces(0x7000, 0x20000, 2 * PAGE + 1, PAGE, read)  # list entry with an offset
    # A chain of pointer-only list pages that never advances is refused.
    put_list(0x40FF8, [0x40FF8])
    with pytest.raises(NvmeStatus):
        prp_pieces(0x7000, 0x40FF8, 3 * PAGE, PAGE, read)


# ---- read / write -----------------------------------------------------------------------------


def test_write_read_prp1_only(ioq: Host) -> None:
    buf = ioq.alloc()
    data = pattern(PAGE)
    ioq.dma.poke(buf, data)
    cqe = ioq.rw(1, True, 8, 8, buf)
    assert cqe.sc == 0 and cqe.sqid == 1 and cqe.sqhd == 1
    assert disk_bytes(ioq.ctrl, 8 * 512, PAGE) == data
    out = ioq.alloc()
    assert ioq.rw(1, False, 8, 8, out).sc == 0
    assert ioq.dma.peek(out, PAGE) == data
    # Sub-page transfer at an offset inside the page.
    assert ioq.rw(1, False, 9, 1, out + 0x200 + 0x10).sc == 0
    assert ioq.dma.peek(out + 0x210, 512) == data[512:1024]


def test_write_read_prp1_prp2(ioq: Host) -> None:
    a, b = ioq.alloc(), ioq.alloc(2)
    data = pattern(PAGE, seed=2)
    ioq.dma.poke(a + 0xA00, data[:0x600])
    ioq.dma.poke(b + PAGE, data[0x600:])
    assert ioq.rw(1, True, 100, 8, a + 0xA00, b + PAGE).sc == 0
    assert disk_bytes(ioq.ctrl, 100 * 512, PAGE) == data
    c, d = ioq.alloc(), ioq.alloc()
    assert ioq.rw(1, False, 100, 8, c, d).sc == 0  # page-aligned 4 KiB: PRP2 unused
    assert ioq.dma.peek(c, PAGE) == data
    assert ioq.rw(1, False, 100, 4, c + 0xE00, d).sc == 0  # 2 KiB split 512 / 1536
    assert ioq.dma.peek(c + 0xE00, 0x200) + ioq.dma.peek(d, 0x600) == data[:0x800]


def test_write_read_prp_list_several_pages(ioq: Host) -> None:
    n = 6
    pages = [ioq.alloc() for _ in range(n)]
    data = pattern(n * PAGE - 0x400, seed=3)
    first = pages[0] + 0x400
    ioq.dma.poke(first, data[: PAGE - 0x400])
    rest = data[PAGE - 0x400 :]
    # The list names the remaining pages in reverse address order (not contiguous).
    order = list(reversed(pages[1:]))
    for i, p in enumerate(order):
        ioq.dma.poke(p, rest[i * PAGE : (i + 1) * PAGE])
    lst = ioq.prp_list(order)
    nlb = len(data) // 512
    assert ioq.rw(1, True, 1000, nlb, first, lst).sc == 0
    assert disk_bytes(ioq.ctrl, 1000 * 512, len(data)) == data
    # Read back through a different list into fresh pages.
    outs = [ioq.alloc() for _ in range(n)]
    lst2 = ioq.prp_list(outs[1:])
    assert ioq.rw(1, False, 1000, nlb, outs[0] + 0x400, lst2).sc == 0
    got = ioq.dma.peek(outs[0] + 0x400, PAGE - 0x400) + b"".join(
        ioq.dma.peek(p, PAGE) for p in outs[1:]
    )
    assert got == data


def test_max_transfer_one_list_with_offset_and_chain(ioq: Host) -> None:
    """1 MiB (MDTS) with the PRP list starting near a page end, so it chains."""
    nbytes = 1 << 20
    pages = [ioq.alloc() for _ in range(nbytes // PAGE)]
    data = pattern(nbytes, seed=4)
    for i, p in enumerate(pages):
        ioq.dma.poke(p, data[i * PAGE : (i + 1) * PAGE])
    list1, list2 = ioq.alloc(), ioq.alloc()
    entries = pages[1:]
    in_first = 3  # list starts 4 entries before the end: 3 data + 1 pointer
    start = list1 + PAGE - 8 * (in_first + 1)
    ioq.prp_list(entries[:in_first] + [list2], start)
    ioq.prp_list(entries[in_first:], list2)
    assert ioq.rw(1, True, 0, nbytes // 512, pages[0], start).sc == 0
    assert disk_bytes(ioq.ctrl, 0, nbytes) == data
    cqe = ioq.rw(1, True, 0, nbytes // 512 + 1, pages[0], start)
    assert cqe.sc == K.SC_INVALID_FIELD  # beyond MDTS


def test_lba_out_of_range(ioq: Host) -> None:
    buf = ioq.alloc()
    last = NS_BYTES // 512 - 1
    assert ioq.rw(1, True, last, 1, buf).sc == 0
    for slba, nlb in ((last, 2), (last + 1, 1), (1 << 40, 1)):
        cqe = ioq.rw(1, False, slba, nlb, buf)
        assert cqe.sc == K.SC_LBA_RANGE and cqe.dnr
    assert ioq.rw(1, True, 0, 1, buf, nsid=2).sc == K.SC_INVALID_NS
    assert ioq.rw(1, True, 0, 1, buf, nsid=0).sc == K.SC_INVALID_NS
    assert ioq.submit(1, 0x05, nsid=1).sc == K.SC_INVALID_OPCODE  # Compare


def test_flush_and_fua_fdatasync(ioq: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: syncs.append(fd))
    buf = ioq.alloc()
    assert ioq.rw(1, True, 0, 1, buf).sc == 0
    assert syncs == []
    assert ioq.rw(1, True, 0, 1, buf, fua=True).sc == 0
    assert syncs == [ioq.ctrl.store.fd]
    assert ioq.submit(1, K.IO_FLUSH, nsid=1).sc == 0
    assert ioq.submit(1, K.IO_FLUSH, nsid=0xFFFFFFFF).sc == 0
    assert len(syncs) == 3
    assert ioq.submit(1, K.IO_FLUSH, nsid=5).sc == K.SC_INVALID_NS
    assert ioq.rw(1, False, 0, 1, buf, fua=True).sc == 0  # FUA read: no sync needed
    assert len(syncs) == 3


def test_io_error_from_store(ioq: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr(ioq.ctrl.store, "write", boom)
    cqe = ioq.rw(1, True, 0, 1, ioq.alloc())
    assert cqe.sc == K.SC_WRITE_FAULT and cqe.dnr
    monkeypatch.setattr(ioq.ctrl.store, "read", boom)
    assert ioq.rw(1, False, 0, 1, ioq.alloc()).sc == K.SC_UNRECOVERED_READ


def test_write_zeroes_and_deallocate(ioq: Host) -> None:
    buf = ioq.alloc()
    ioq.dma.poke(buf, b"\xaa" * PAGE)
    for lba in range(0, 32, 8):
        assert ioq.rw(1, True, lba, 8, buf).sc == 0
    cqe = ioq.submit(1, K.IO_WRITE_ZEROES, nsid=1, cdw10=2, cdw12=3)
    assert cqe.sc == 0
    assert disk_bytes(ioq.ctrl, 0, 32 * 512) == b"\xaa" * 1024 + bytes(2048) + b"\xaa" * 13312
    cqe = ioq.submit(1, K.IO_WRITE_ZEROES, nsid=1, cdw10=8, cdw12=7 | (1 << 25))  # DEAC
    assert cqe.sc == 0 and disk_bytes(ioq.ctrl, 8 * 512, 8 * 512) == bytes(4096)
    cqe = ioq.submit(1, K.IO_WRITE_ZEROES, nsid=1, cdw10=NS_BYTES // 512 - 1, cdw12=1)
    assert cqe.sc == K.SC_LBA_RANGE
    # Dataset Management, deallocate two ranges (reads back as zeros: DLFEAT says so).
    ranges = ioq.alloc()
    ioq.dma.poke(ranges, struct.pack("<IIQIIQ", 0, 2, 16, 0, 4, 24))
    cqe = ioq.submit(1, K.IO_DSM, nsid=1, prp1=ranges, cdw10=1, cdw11=0x4)
    assert cqe.sc == 0
    disk = disk_bytes(ioq.ctrl, 0, 32 * 512)
    assert disk[16 * 512 : 18 * 512] == bytes(1024) and disk[24 * 512 : 28 * 512] == bytes(2048)
    assert disk[18 * 512 : 24 * 512] == b"\xaa" * 3072
    ioq.dma.poke(ranges, struct.pack("<IIQ", 0, 2, NS_BYTES // 512 - 1))
    cqe = ioq.submit(1, K.IO_DSM, nsid=1, prp1=ranges, cdw10=0, cdw11=0x4)
    assert cqe.sc == K.SC_LBA_RANGE
    cqe = ioq.submit(1, K.IO_DSM, nsid=1, prp1=ranges, cdw10=0, cdw11=0x1)  # hints only
    assert cqe.sc == 0


# ---- DMA faults -------------------------------------------------------------------------------


def test_dma_fault_on_prp_list_touches_nothing(ctrl: NvmeController) -> None:
    dma = FakeDma()
    h = Host(ctrl, dma)
    h.enable()
    h.create_io_queue(1)
    data_pages = [h.alloc() for _ in range(4)]
    lst = h.alloc()
    h.prp_list(data_pages[1:], lst)
    ctrl.store.write(0, pattern(4 * PAGE, seed=9))
    sentinel = b"\x5a" * PAGE
    for p in data_pages:
        dma.poke(p, sentinel)
    dma.holes.append((lst, PAGE))
    cqe = h.rw(1, False, 0, 32, data_pages[0], lst)
    assert cqe.sc == K.SC_DATA_TRANSFER_ERROR and cqe.dnr
    assert all(dma.peek(p, PAGE) == sentinel for p in data_pages)  # guest memory untouched
    # Write whose data page faults: the backing store keeps its old contents.
    before = disk_bytes(ctrl, 0, 4 * PAGE)
    dma.holes = [(data_pages[2], PAGE)]
    cqe = h.rw(1, True, 0, 32, data_pages[0], h.prp_list(data_pages[1:]))
    assert cqe.sc == K.SC_DATA_TRANSFER_ERROR
    assert disk_bytes(ctrl, 0, 4 * PAGE) == before
    # The controller carries on.
    dma.holes = []
    assert h.rw(1, False, 0, 8, data_pages[0]).sc == 0
    assert h.rd(0x1C) == 1


def test_bus_master_off_is_a_dma_fault(ioq: Host) -> None:
    ioq.ctrl.region_write(7, 0x04, struct.pack("<H", 0x2))  # MEM only
    ioq.push(1, Command.pack(K.IO_READ, 77, nsid=1, prp1=ioq.alloc()))
    # Even the SQ fetch faults: controller fatal status, no completion.
    assert ioq.rd(0x1C) & 0x2
    assert ioq.poll(1, ack=False) is None


# ---- queue mechanics --------------------------------------------------------------------------


def test_phase_tag_wraps_with_the_queue(ioq: Host) -> None:
    ioq.create_io_queue(2, depth=4)
    buf = ioq.alloc()
    phases = []
    for i in range(11):
        cqe = ioq.rw(2, False, i, 1, buf)
        assert cqe.sc == 0 and cqe.sqhd == (i + 1) % 4
        phases.append(cqe.phase)
    assert phases == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]


def test_batch_submission_and_full_cq_stalls(ioq: Host) -> None:
    """8 commands rung at once on a 4-entry CQ: 3 complete, the rest wait for CQ space."""
    q = 3
    ioq.create_io_queue(q, depth=16)
    ctrl = ioq.ctrl
    cq = ctrl.cqs[q]
    # Replace the CQ with a 4-entry one through the admin path.
    ioq.admin(0x00, cdw10=q)
    ioq.admin(0x04, cdw10=q)
    cq_base, sq_base = ioq.alloc(), ioq.alloc()
    assert ioq.admin(0x05, prp1=cq_base, cdw10=q | (3 << 16), cdw11=0x3 | (q << 16)).sc == 0
    assert ioq.admin(0x01, prp1=sq_base, cdw10=q | (15 << 16), cdw11=0x1 | (q << 16)).sc == 0
    hq = ioq.queues[q]
    hq.sq_base, hq.cq_base, hq.depth, hq.cq_depth = sq_base, cq_base, 16, 4
    hq.sq_tail = hq.cq_head = 0
    hq.phase = 1
    buf = ioq.alloc()
    for i in range(8):
        ioq.push(q, Command.pack(K.IO_READ, 100 + i, nsid=1, prp1=buf), ring=False)
    ioq.ring(q)
    assert ctrl.sqs[q].head == 3 and ctrl.cqs[q].tail == 3
    got = []
    while len(got) < 8:
        cqe = ioq.poll(q)  # each head doorbell frees a slot and resumes the SQ
        assert cqe is not None, got
        got.append(cqe.cid)
    assert got == list(range(100, 108))
    assert cq is not ctrl.cqs[q]


def test_invalid_doorbells_are_ignored(ioq: Host) -> None:
    ioq.wr(0x1000 + 8 * 9, 1)  # no such SQ
    ioq.wr(0x1000 + 8 * 1, 64)  # tail beyond the queue
    ioq.wr(0x1000 + 8 * 1 + 4, 99)  # head beyond the CQ
    ioq.ctrl.region_write(0, 0x1000 + 8, b"\x01")  # byte write
    assert ioq.rd(0x1C) == 1
    assert ioq.rw(1, False, 0, 1, ioq.alloc()).sc == 0


# ---- interrupts -------------------------------------------------------------------------------


@pytest.mark.parametrize("ctrl", [True], indirect=True)
def test_msix_vectors_on_eventfds(ioq: Host) -> None:
    ctrl = ioq.ctrl
    assert ctrl.msix is not None
    ctrl.region_write(7, ctrl.msix.offset + 2, struct.pack("<H", 0x8000))
    originals = [efd() for _ in range(5)]
    ours = [os.dup(fd) for fd in originals]
    ctrl.set_irqs(IRQ_MSIX, EVT, 0, 5, originals)
    ioq.create_io_queue(2)  # admin completions raise vector 0
    assert count(ours[0]) >= 1
    buf = ioq.alloc()
    assert ioq.rw(1, False, 0, 1, buf).sc == 0
    assert ioq.rw(2, False, 0, 1, buf).sc == 0
    assert ioq.rw(2, False, 0, 1, buf).sc == 0
    assert [count(fd) for fd in ours] == [0, 1, 2, 0, 0]
    # One interrupt per doorbell batch, not per command.
    for i in range(5):
        ioq.push(1, Command.pack(K.IO_READ, 200 + i, nsid=1, prp1=buf), ring=False)
    ioq.ring(1)
    assert count(ours[1]) == 1
    # A CQ created without IEN raises nothing.
    ioq.create_io_queue(3, ien=False)
    count(ours[0])
    assert ioq.rw(3, False, 0, 1, buf).sc == 0
    assert [count(fd) for fd in ours] == [0, 0, 0, 0, 0]
    for fd in ours:
        os.close(fd)


def test_msi_vectors_on_eventfds_with_intms_masking(ioq: Host) -> None:
    ctrl = ioq.ctrl
    assert ctrl.msi is not None and ctrl.msix is None
    flags = ctrl.msi.offset + 2
    ctrl.region_write(7, flags, struct.pack("<H", 0x80 | (3 << 1) | 0x1 | (3 << 4)))  # 8 granted
    originals = [efd() for _ in range(8)]
    ours = [os.dup(fd) for fd in originals]
    ctrl.set_irqs(IRQ_MSI, EVT, 0, 8, originals)
    ioq.create_io_queue(2)  # admin completions raise vector 0
    assert count(ours[0]) >= 1
    buf = ioq.alloc()
    assert ioq.rw(1, False, 0, 1, buf).sc == 0
    assert ioq.rw(2, False, 0, 1, buf).sc == 0
    assert [count(fd) for fd in ours] == [0, 1, 1, 0, 0, 0, 0, 0]
    # INTMS masks vector 1: the completion is owed, INTMC raises it while the CQ holds it.
    ioq.wr(0x0C, 1 << 1)
    ioq.push(1, Command.pack(K.IO_READ, 400, nsid=1, prp1=buf))
    assert count(ours[1]) == 0
    ioq.wr(0x10, 1 << 1)
    assert count(ours[1]) == 1
    assert ioq.poll(1) is not None
    ioq.wr(0x0C, 1 << 1)
    ioq.wr(0x10, 1 << 1)  # nothing left in the CQ: nothing owed
    assert count(ours[1]) == 0
    # Software granted only 2 of the 8 vectors: vector 2 folds onto granted vector 0.
    ctrl.region_write(7, flags, struct.pack("<H", 0x80 | (3 << 1) | 0x1 | (1 << 4)))
    assert ctrl.msi.granted == 2
    assert ioq.rw(2, False, 0, 1, buf).sc == 0
    assert [count(fd) for fd in ours] == [1, 0, 0, 0, 0, 0, 0, 0]
    for fd in ours:
        os.close(fd)


def test_intx_level_follows_cq_state(ioq: Host) -> None:
    ctrl = ioq.ctrl
    original = efd()
    ours = os.dup(original)
    ctrl.set_irqs(IRQ_INTX, EVT, 0, 1, [original])
    buf = ioq.alloc()
    ioq.push(1, Command.pack(K.IO_READ, 300, nsid=1, prp1=buf))
    assert count(ours) == 1 and ctrl.irq.intx_level
    cqe = ioq.poll(1, ack=False)
    assert cqe is not None and cqe.cid == 300
    assert ctrl.irq.intx_level  # host has not moved the CQ head yet
    ioq.wr(0x1000 + 8 * 1 + 4, ioq.queues[1].cq_head)
    assert not ctrl.irq.intx_level  # caught up: deasserted
    # INTMS masks the pin; INTMC re-asserts while entries are pending.
    ctrl.irq.intx_unmask()
    ioq.wr(K.REG_INTMS, 1)
    assert ioq.rd(K.REG_INTMS) == 1
    ioq.push(1, Command.pack(K.IO_READ, 301, nsid=1, prp1=buf))
    assert count(ours) == 0 and not ctrl.irq.intx_level
    ioq.wr(K.REG_INTMC, 1)
    assert ioq.rd(K.REG_INTMS) == 0
    assert ctrl.irq.intx_level and count(ours) == 1
    assert ioq.poll(1) is not None
    assert not ctrl.irq.intx_level
    os.close(ours)


# ---- persistence ------------------------------------------------------------------------------


def test_data_persists_across_controllers(disk: Path) -> None:
    c1 = NvmeController(disk, NS_BYTES)
    h1 = Host(c1)
    h1.enable()
    h1.create_io_queue(1)
    buf = h1.alloc()
    data = pattern(PAGE, seed=7)
    h1.dma.poke(buf, data)
    assert h1.rw(1, True, 4000, 8, buf).sc == 0
    h1.wr(0x14, h1.cc(shn=1))
    c1.close()
    assert disk.stat().st_size == NS_BYTES
    c2 = NvmeController(disk)  # size from the file
    assert c2.nsze == NS_BYTES // 512
    h2 = Host(c2)
    h2.enable()
    h2.create_io_queue(1)
    out = h2.alloc()
    assert h2.rw(1, False, 4000, 8, out).sc == 0
    assert h2.dma.peek(out, PAGE) == data
    c2.close()


def test_backing_created_sparse(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    c = NvmeController(path, 1 << 30)
    st = path.stat()
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20
    c.close()
    with pytest.raises(ValueError):
        NvmeController(tmp_path / "missing.img")  # no size to create it with
    with pytest.raises(ValueError):
        NvmeController(path, block_size=1024)
