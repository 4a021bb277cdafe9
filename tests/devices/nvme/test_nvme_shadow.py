"""Shadow doorbells (Doorbell Buffer Config, OACS bit 8) and EventIdx, driven the way Linux's
nvme driver drives them: I/O queues write their shadow slot and ring the MMIO doorbell only
when the new value passes the controller's EventIdx; the admin queue stays on MMIO. The buffers
are guest memory behind the DMA view: a buffer that does not translate fails the command, one
that vanishes later is controller fatal status."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from eventfds import count
from nvme_helpers import PAGE, FakeDma, GuestRam, Host, efd, need_event

from vfiod import config
from vfiod.devices.nvme import Command, NvmeController
from vfiod.devices.nvme import constants as K
from vfiod.devices.nvme.queues import EVENTIDX_QUIET
from vfiod.host import make_function, vf_config
from vfiod.pci.constants import IRQ_INTX, IRQ_MSIX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD

EVT = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER


@pytest.fixture
def ctrl(disk: Path) -> Iterator[NvmeController]:
    """The MSI-X layout: these tests switch interrupts on through its table's enable bit (MSI
    behaves the same for EventIdx: tests/devices/nvme/test_nvme_io.py covers it)."""
    c = NvmeController(disk, 4 << 20, io_queues=4, msix=True)
    yield c
    c.close()


def enable_msix(h: Host) -> None:
    cap = h.ctrl.msix
    assert cap is not None
    ctl = int.from_bytes(h.ctrl.region_read(7, cap.offset + 2, 2), "little")
    h.ctrl.region_write(7, cap.offset + 2, (ctl | 0x8000).to_bytes(2, "little"))


@pytest.fixture
def sh(ioq: Host) -> Host:
    """I/O queue pair 1 (64 entries) with shadow doorbells configured, MSI-X on."""
    enable_msix(ioq)
    assert ioq.dbbuf().sc == 0
    return ioq


def read_many(h: Host, qid: int, n: int, buf: int) -> list[int]:
    """Submit ``n`` one-block reads one by one, reap each; the cids completed."""
    done = []
    for i in range(n):
        cqe = h.rw(qid, False, i, 1, buf)
        assert cqe.sc == 0
        done.append(cqe.cid)
    return done


# ---- advertising and configuring --------------------------------------------------------------


def test_oacs_bit_8_and_the_option_to_turn_it_off(tmp_path: Path) -> None:
    for shadow in (True, False):
        c = NvmeController(tmp_path / f"{shadow}.img", 1 << 20, shadow_doorbells=shadow)
        try:
            h = Host(c)
            h.enable()
            _, ident = h.identify(K.CNS_CONTROLLER)
            oacs = struct.unpack_from("<H", ident, 256)[0]
            assert oacs == (K.OACS_DBBUF if shadow else 0)
            cqe = h.admin(K.ADM_DBBUF_CONFIG, prp1=h.alloc(), prp2=h.alloc())
            assert cqe.sc == (0 if shadow else K.SC_INVALID_OPCODE)
        finally:
            c.close()


def test_config_file_option_reaches_pf_and_vfs(tmp_path: Path) -> None:
    text = (
        '[[phb]]\nindex = 0\n[[function]]\nname = "nvme0"\npersonality = "nvme"\n'
        f'backing = "{tmp_path / "pf.img"}"\nsize = "1M"\ntotalvfs = 2\nnumvfs = 1\n'
        "shadow_doorbells = false\n"
    )
    pf = config.parse(text, "test").functions[0]
    assert pf.shadow_doorbells is False
    for fc in (pf, vf_config(pf, 0)):
        fn = make_function(fc)
        try:
            assert isinstance(fn, NvmeController) and not fn.identity.oacs & K.OACS_DBBUF
        finally:
            fn.close()
    assert config.parse(text.replace("false", "true"), "t").functions[0].shadow_doorbells
    with pytest.raises(config.ConfigError, match="shadow_doorbells"):
        config.parse(text.replace("false", '"no"'), "test")


def test_config_checks_alignment_and_memory(ioq: Host) -> None:
    good = ioq.alloc()
    assert ioq.dbbuf(good + 8, ioq.alloc()).sc == K.SC_INVALID_FIELD
    assert ioq.dbbuf(good, ioq.alloc() + 0x800).sc == K.SC_INVALID_FIELD
    assert isinstance(ioq.dma, FakeDma)
    hole = ioq.alloc()
    ioq.dma.holes.append((hole, PAGE))
    cqe = ioq.dbbuf(good, hole)
    assert cqe.sc == K.SC_DATA_TRANSFER_ERROR and cqe.dnr
    assert ioq.shadow is None and ioq.ctrl.queues is not None
    assert ioq.ctrl.queues.shadow is None  # nothing changed: doorbells stay MMIO
    assert ioq.rw(1, False, 0, 1, ioq.alloc()).sc == 0


def test_config_publishes_tails_heads_and_eventidx(ioq: Host) -> None:
    buf = ioq.alloc()
    read_many(ioq, 1, 3, buf)  # queue 1 is at tail 3 / head 3 before the config
    dbs, eis = ioq.alloc(), ioq.alloc()
    ioq.dma.poke(eis, b"\xee" * PAGE)  # stale EventIdx values must be overwritten
    assert ioq.dbbuf(dbs, eis).sc == 0
    assert ioq.slot(dbs, 1, False) == 3 and ioq.slot(dbs, 1, True) == 3
    assert ioq.slot(eis, 1, False) == 3
    assert ioq.slot(eis, 1, True) == 3  # INTx (no MSI-X): the controller wants every head
    # The admin queue: its MMIO tail mirrored, the config command itself already fetched.
    assert ioq.slot(dbs, 0, False) == ioq.queues[0].sq_tail


# ---- I/O on shadow doorbells ------------------------------------------------------------------


def test_io_on_shadow_doorbells_rings_sq_once_per_batch_and_cq_only_on_wrap(sh: Host) -> None:
    buf = sh.alloc()
    sh.mmio.clear()
    data = os.urandom(512)
    sh.dma.poke(buf, data)
    assert sh.rw(1, True, 7, 1, buf).sc == 0
    out = sh.alloc()
    assert sh.rw(1, False, 7, 1, out).sc == 0 and sh.dma.peek(out, 512) == data
    n = 130  # two wraps of the 64-entry queues
    read_many(sh, 1, n, buf)
    sq_rings = [m for m in sh.mmio if m == (1, False)]
    cq_rings = [m for m in sh.mmio if m == (1, True)]
    assert len(sq_rings) == n + 2  # the controller is always caught up: each submission rings
    assert len(cq_rings) == 2  # the host's CQ head only rang when it wrapped
    assert sh.ctrl.stats.doorbells[1] < sh.ctrl.stats.doorbells[0] // 10  # and it counts them
    text = "\n".join(f.render() for f in sh.ctrl.metrics("n"))
    assert 'vfiod_nvme_doorbell_writes_total{function="n",queue="cq"}' in text
    assert sh.skipped.count((1, True)) == n + 2 - 2
    dbs, eis = sh.shadow or (0, 0)
    assert sh.slot(eis, 1, True) == EVENTIDX_QUIET
    assert sh.slot(eis, 1, False) == sh.queues[1].sq_tail  # the tail the controller has seen
    assert sh.slot(dbs, 1, False) == sh.queues[1].sq_tail


def test_a_posted_doorbell_behind_the_shadow_tail(sh: Host) -> None:
    """Two submissions while the first doorbell write is still on its way: the second needs
    no doorbell (its EventIdx is behind), and the late doorbell carries an old tail, which the
    controller ignores in favour of the shadow slot: both complete, exactly once."""
    buf = sh.alloc()
    sh.defer_mmio = True
    sh.mmio.clear()
    sh.push(1, Command.pack(K.IO_READ, 501, nsid=1, prp1=buf))
    sh.push(1, Command.pack(K.IO_READ, 502, nsid=1, prp1=buf))
    assert sh.mmio == [(1, False)] and sh.skipped[-1] == (1, False)
    sh.defer_mmio = False
    sh.flush_mmio()
    got = [sh.poll(1), sh.poll(1)]
    assert [c.cid for c in got if c is not None] == [501, 502]
    assert sh.poll(1, ack=False) is None
    # A doorbell even later than that (a stale tail, already passed) changes nothing.
    sh.wr(0x1000 + 8, 1)
    assert sh.poll(1, ack=False) is None and sh.ctrl.sqs[1].head == sh.queues[1].sq_tail


def test_a_submission_written_while_the_batch_runs_is_not_missed(
    sh: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host adds an entry while the controller executes the batch; its EventIdx check
    sees the old value and rings nothing. The controller publishes EventIdx, reads the
    shadow tail again and runs the new entry before it returns."""
    buf = sh.alloc()
    real = sh.ctrl.nvm.execute
    added: list[bool] = []

    def execute(cmd: Command) -> int:
        if cmd.cid == 601 and not added:
            added.append(True)
            sh.push(1, Command.pack(K.IO_READ, 602, nsid=1, prp1=buf))
        return real(cmd)

    monkeypatch.setattr(sh.ctrl.nvm, "execute", execute)
    sh.mmio.clear()
    sh.push(1, Command.pack(K.IO_READ, 601, nsid=1, prp1=buf))
    assert sh.mmio == [(1, False)]  # only the first submission rang
    first, second = sh.poll(1), sh.poll(1)
    assert first is not None and second is not None
    assert (first.cid, second.cid) == (601, 602)


def test_full_cq_stalls_and_the_shadow_head_resumes_it(sh: Host) -> None:
    """A 4-entry CQ under 16-entry SQ: 8 commands rung at once. The controller stalls with
    EventIdx at the head it knows, so the host's next head update rings; everything
    completes in order."""
    q = 2
    sh.create_io_queue(q, depth=16)
    hq = sh.queues[q]
    sh.admin(0x00, cdw10=q)
    sh.admin(0x04, cdw10=q)
    cq_base, sq_base = sh.alloc(), sh.alloc()
    assert sh.admin(0x05, prp1=cq_base, cdw10=q | (3 << 16), cdw11=0x3 | (q << 16)).sc == 0
    assert sh.admin(0x01, prp1=sq_base, cdw10=q | (15 << 16), cdw11=0x1 | (q << 16)).sc == 0
    hq.sq_base, hq.cq_base, hq.depth, hq.cq_depth = sq_base, cq_base, 16, 4
    hq.sq_tail = hq.cq_head = 0
    hq.phase = 1
    dbs, eis = sh.shadow or (0, 0)
    assert sh.slot(dbs, q, False) == 0 and sh.slot(eis, q, False) == 0  # fresh slots
    buf = sh.alloc()
    for i in range(8):
        sh.push(q, Command.pack(K.IO_READ, 700 + i, nsid=1, prp1=buf), ring=False)
    sh.ring(q)
    assert sh.ctrl.cqs[q].tail == 3
    assert sh.slot(eis, q, True) == 0  # stalled: wants to hear of any head update
    got = []
    while len(got) < 8:
        cqe = sh.poll(q)
        assert cqe is not None, got
        got.append(cqe.cid)
    assert got == list(range(700, 708))
    assert sh.slot(eis, q, True) == EVENTIDX_QUIET  # nothing waits any more


def small_cq_pair(h: Host, q: int) -> None:
    """Queue pair ``q``: a 16-entry SQ on a 4-entry CQ (vector q)."""
    h.create_io_queue(q, depth=4)
    hq = h.queues[q]
    h.admin(0x00, cdw10=q)
    sq_base = h.alloc()
    assert h.admin(0x01, prp1=sq_base, cdw10=q | (15 << 16), cdw11=0x1 | (q << 16)).sc == 0
    hq.sq_base, hq.depth, hq.sq_tail = sq_base, 16, 0


def test_host_consuming_right_after_the_controller_looked_still_rings(
    sh: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller finds the CQ full and reads the shadow head; the host consumes right
    after that read. The controller announced the head it knew before reading, so the host's
    update passes EventIdx and rings (a posted write, delivered after the batch)."""
    q = 2
    small_cq_pair(sh, q)
    engine = sh.ctrl.queues
    assert engine is not None
    real = engine._read_slot
    consumed: list[int] = []

    def read_slot(base: int, qid: int, cq: bool) -> int | None:
        value = real(base, qid, cq)
        if cq and qid == q and not consumed:
            sh.defer_mmio = True
            while (cqe := sh.poll(q)) is not None:
                consumed.append(cqe.cid)
            sh.defer_mmio = False
        return value

    monkeypatch.setattr(engine, "_read_slot", read_slot)
    buf = sh.alloc()
    for i in range(8):
        sh.push(q, Command.pack(K.IO_READ, 750 + i, nsid=1, prp1=buf), ring=False)
    sh.ring(q)
    assert consumed == [750, 751, 752] and sh.pending_mmio  # the head update rang
    sh.flush_mmio()
    while (cqe := sh.poll(q)) is not None:
        consumed.append(cqe.cid)
    assert consumed == list(range(750, 758))


def test_cq_head_read_from_the_shadow_when_the_cq_looks_full(sh: Host) -> None:
    """With EVENTIDX_QUIET the host consumes without ringing; when the controller thinks the
    CQ is full it reads the shadow head instead of stalling."""
    buf = sh.alloc()
    sh.mmio.clear()
    for i in range(63):  # fill the 64-entry CQ up to its last free slot, consuming as we go
        assert sh.rw(1, False, i, 1, buf).sc == 0
    assert (1, True) not in sh.mmio
    assert sh.ctrl.cqs[1].head == 0  # the controller never heard of the consumption...
    assert sh.rw(1, False, 0, 1, buf).sc == 0  # ...but the 64th completion still went out


def test_intx_needs_every_cq_head_update(ioq: Host) -> None:
    """INTx is a level: the controller must hear of every head update to drop it, so its CQ
    EventIdx follows the head and the host rings each time."""
    fd = efd()
    ioq.ctrl.set_irqs(IRQ_INTX, EVT, 0, 1, [fd])
    assert ioq.dbbuf().sc == 0
    buf = ioq.alloc()
    ioq.mmio.clear()
    for i in range(5):
        assert ioq.rw(1, False, i, 1, buf).sc == 0
        assert not ioq.ctrl.irq.intx_level
    assert ioq.mmio.count((1, True)) == 5
    assert count(fd) >= 1
    dbs, eis = ioq.shadow or (0, 0)
    assert ioq.slot(eis, 1, True) == ioq.queues[1].cq_head


def test_switching_to_msix_quiets_the_cq_eventidx(ioq: Host) -> None:
    assert ioq.dbbuf().sc == 0
    _, eis = ioq.shadow or (0, 0)
    buf = ioq.alloc()
    assert ioq.rw(1, False, 0, 1, buf).sc == 0
    assert ioq.slot(eis, 1, True) == ioq.queues[1].cq_head
    fds = [efd() for _ in range(2)]
    ioq.ctrl.set_irqs(IRQ_MSIX, EVT, 0, 2, fds)
    enable_msix(ioq)
    assert ioq.rw(1, False, 0, 1, buf).sc == 0
    assert ioq.slot(eis, 1, True) == EVENTIDX_QUIET
    assert count(fds[1]) == 1


def test_admin_queue_stays_on_mmio(sh: Host) -> None:
    """Linux never writes the admin queue's shadow slots: its MMIO doorbells keep working and
    are mirrored into the slots, so a later shadow read does not go back in time."""
    dbs, _ = sh.shadow or (0, 0)
    for _ in range(40):  # wraps the 32-entry admin queue
        cqe, _ident = sh.identify(K.CNS_CONTROLLER)
        assert cqe.sc == 0
    assert sh.slot(dbs, 0, False) == sh.queues[0].sq_tail
    assert sh.slot(dbs, 0, True) == sh.queues[0].cq_head


def test_a_host_that_shadows_the_admin_queue_too(ioq: Host) -> None:
    enable_msix(ioq)
    assert ioq.dbbuf().sc == 0
    ioq.shadow_admin = True
    for _ in range(40):
        assert ioq.identify(K.CNS_CONTROLLER)[0].sc == 0
    assert ioq.rw(1, False, 0, 1, ioq.alloc()).sc == 0


def test_queue_created_after_config_gets_fresh_slots(sh: Host) -> None:
    dbs, eis = sh.shadow or (0, 0)
    sh.dma.poke(dbs + 8 * 3, struct.pack("<II", 41, 42))  # stale values of an earlier life
    sh.dma.poke(eis + 8 * 3, struct.pack("<II", 43, 44))
    sh.create_io_queue(3)
    assert sh.slot(dbs, 3, False) == 0 and sh.slot(dbs, 3, True) == 0
    assert sh.slot(eis, 3, False) == 0 and sh.slot(eis, 3, True) == EVENTIDX_QUIET
    assert read_many(sh, 3, 3, sh.alloc()) == [c for c in range(sh.cid - 2, sh.cid + 1)]


def test_controller_reset_forgets_the_buffers(sh: Host) -> None:
    dbs, _ = sh.shadow or (0, 0)
    sh.wr(0x14, sh.cc(en=False))
    sh.enable()
    sh.create_io_queue(1)
    sh.dma.poke(dbs + 8, struct.pack("<I", 9))  # garbage in the old slot: ignored now
    assert sh.rw(1, False, 0, 1, sh.alloc()).sc == 0
    assert sh.ctrl.sqs[1].head == 1


# ---- faults -----------------------------------------------------------------------------------


def test_shadow_buffer_fault_is_controller_fatal(sh: Host) -> None:
    assert isinstance(sh.dma, FakeDma)
    dbs, _ = sh.shadow or (0, 0)
    sh.dma.holes.append((dbs, PAGE))
    sh.push(1, Command.pack(K.IO_READ, 801, nsid=1, prp1=sh.alloc()), ring=False)
    sh.wr(0x1000 + 8, sh.queues[1].sq_tail)
    assert sh.rd(0x1C) & 0x2  # CFS: the controller cannot know the queue's tail
    assert sh.poll(1, ack=False) is None
    sh.wr(0x14, sh.cc(en=False))
    assert sh.rd(0x1C) & 0x3 == 0  # a reset recovers


def test_eventidx_buffer_fault_is_controller_fatal(sh: Host) -> None:
    assert isinstance(sh.dma, FakeDma)
    _, eis = sh.shadow or (0, 0)
    sh.dma.readonly.append((eis, PAGE))
    sh.push(1, Command.pack(K.IO_READ, 802, nsid=1, prp1=sh.alloc()))
    assert sh.rd(0x1C) & 0x2


@pytest.fixture
def pe_host(ctrl: NvmeController) -> Iterator[tuple[Host, GuestRam]]:
    g = GuestRam(8 << 20, pe=True, scramble=True, seed=4)
    h = Host(ctrl, g)
    h.enable()
    h.create_io_queue(1)
    yield h, g
    g.close()


def test_through_the_pe_io_and_a_vanished_buffer(pe_host: tuple[Host, GuestRam]) -> None:
    h, g = pe_host
    enable_msix(h)
    assert h.dbbuf().sc == 0
    data = os.urandom(4096)
    buf = h.alloc()
    g.poke(buf, data)
    assert h.rw(1, True, 16, 8, buf).sc == 0
    out = h.alloc()
    assert h.rw(1, False, 16, 8, out).sc == 0 and g.peek(out, 4096) == data
    assert os.pread(h.ctrl.store.fd, 4096, 16 * 512) == data
    assert h.skipped.count((1, True)) == 2  # CQ heads went through the shadow only
    _, eis = h.shadow or (0, 0)
    g.view.unmap(eis, PAGE)  # the guest tears the EventIdx page out of its TCE table
    h.push(1, Command.pack(K.IO_READ, 803, nsid=1, prp1=buf))
    assert g.pe is not None and g.pe.frozen  # the PE froze on the EventIdx write
    assert h.rd(0x1C) & 0x2


def test_config_with_an_unmapped_buffer_through_the_pe(pe_host: tuple[Host, GuestRam]) -> None:
    h, g = pe_host
    hole = h.alloc()
    g.view.unmap(hole, PAGE)
    h.push(0, Command.pack(K.ADM_DBBUF_CONFIG, 900, prp1=h.alloc(), prp2=hole))
    assert g.pe is not None and g.pe.frozen
    last = h.ctrl.errors[-1]
    assert last.cid == 900 and last.status & 0x7FF == K.SC_DATA_TRANSFER_ERROR
    assert h.ctrl.queues is not None and h.ctrl.queues.shadow is None


def test_need_event_matches_linux() -> None:
    assert need_event(5, 6, 5)  # caught up: ring
    assert not need_event(5, 7, 6)  # the controller has not seen 6 yet: it will read 7 too
    assert need_event(0, 1, 0) and not need_event(EVENTIDX_QUIET, 10, 3)
    assert need_event(EVENTIDX_QUIET, 2, 60)  # a wrapping head passes the quiet value
