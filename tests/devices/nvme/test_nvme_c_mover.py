"""The C data mover (cffi_build/nvme.c) against the Python queue engine and command sets it
stands in for.

Two controllers, one with the C mover and one without (``c_mover=False``), each with its own
guest RAM behind a real PeDma (same layout, same bytes) and its own namespace file (same
bytes), get the same generated stream of host actions: commands of every kind (reads, writes,
flushes, PRP lists, bad PRPs, unmapped and read-only buffers, out-of-range LBAs, unknown
opcodes, bad fields), doorbells (MMIO or shadow), reaping with and without CQ head doorbells
(full CQs), pages torn out of the TCE table, EEH thaws, INTMS/INTMC, the write cache switched
off, bus mastering off. After every action both must hold the same guest memory (so the same
CQEs), the same namespace bytes, the same queue state, statistics, SMART counters, error log,
interrupts signalled and EEH state. Without workers the C mover runs every command inline, in
the order Python would; the tests of the asynchronous mode are in test_nvme_async.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eventfds import count
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nvme_helpers import BASE, PAGE, GuestRam, Host, efd

from vfiod.devices.nvme import Command, NvmeController
from vfiod.devices.nvme import constants as K
from vfiod.devices.nvme.queues import c_module
from vfiod.pci.constants import (
    IRQ_INTX,
    IRQ_MSI,
    IRQ_MSIX,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
)

assert c_module() is not None, "vfiod._fast is not built with the NVMe data mover (make venv)"

EVT = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
GUEST = 4 << 20
NS = 2 << 20  # 4096 LBAs of 512 bytes
DATA_PAGES = 48
_MEM0 = random.Random(9).randbytes(GUEST)
_DISK0 = random.Random(10).randbytes(NS)


@dataclass
class Setup:
    shadow: bool
    irq: str  # "msix" | "msi" | "intx" | "none"
    policy: str  # PHB DMA fault policy
    sealed: bool
    scramble: bool
    depths: tuple[int, int]


class Rig:
    """One controller with its guest, host driver, data pages and interrupt eventfds."""

    def __init__(self, tmp: Path, name: str, setup: Setup, c: bool) -> None:
        path = tmp / f"{name}.img"
        path.write_bytes(_DISK0)
        self.ctrl = NvmeController(path, NS, io_queues=3, msix=setup.irq == "msix",
                                   shadow_doorbells=setup.shadow, c_mover=c)  # fmt: skip
        self.guest = GuestRam(GUEST, pe=True, scramble=setup.scramble, seed=4,
                              dma_fault=setup.policy, sealed=setup.sealed)  # fmt: skip
        self.guest.restore(_MEM0)
        self.guest.poke(BASE, bytes(16 * PAGE))  # queues and shadow buffers start zeroed
        self.host = Host(self.ctrl, self.guest)
        self.fds: list[int] = []
        self._irqs(setup.irq)
        self.host.enable()
        for qid, depth in zip((1, 2), setup.depths, strict=True):
            self.host.create_io_queue(qid, depth=depth)
        if setup.shadow:
            assert self.host.dbbuf().sc == 0
        self.data = [self.host.alloc() for _ in range(DATA_PAGES)]
        self.lists = [self.host.alloc() for _ in range(4)]
        self.known_head = {1: 0, 2: 0}  # SQ heads the host learned from completions
        self.cqes: list[tuple[int, int, int, int, int]] = []

    def _irqs(self, mode: str) -> None:
        ctrl = self.ctrl
        if mode == "msix":
            assert ctrl.msix is not None
            ctrl.region_write(7, ctrl.msix.offset + 2, struct.pack("<H", 0x8000))
            self._eventfds(IRQ_MSIX, 4)
        elif mode == "msi":
            assert ctrl.msi is not None
            ctrl.region_write(7, ctrl.msi.offset + 2, struct.pack("<H", 0x1 | (2 << 4)))
            self._eventfds(IRQ_MSI, 4)
        elif mode == "intx":
            self._eventfds(IRQ_INTX, 1)

    def _eventfds(self, index: int, n: int) -> None:
        originals = [efd() for _ in range(n)]
        self.fds = [os.dup(fd) for fd in originals]
        self.ctrl.set_irqs(index, EVT, 0, n, originals)

    # -- what must be equal ----------------------------------------------------------------

    def state(self) -> tuple[Any, ...]:
        ctrl = self.ctrl
        stats = ctrl.stats
        smart = ctrl.smart
        queues = ctrl.queues
        qstate = None
        if queues is not None:
            qstate = (
                [(q, s.head, s.tail, s.event_idx) for q, s in sorted(queues.sqs.items())],
                [(q, c.head, c.tail, c.phase, c.event_idx, len(c.overflow))
                 for q, c in sorted(queues.cqs.items())],  # fmt: skip
                queues.halted, queues.intms,
            )  # fmt: skip
        pe = self.guest.pe
        assert pe is not None
        return (
            hashlib.sha256(self.guest.snapshot()).hexdigest(),
            hashlib.sha256(Path(ctrl.store.path).read_bytes()).hexdigest(),
            qstate,
            ctrl.csts,
            sorted(stats.commands.items()),
            sorted(stats.errors.items()),
            tuple(stats.doorbells),
            sum(stats.latency.counts),
            (smart.read_cmds, smart.write_cmds, smart.bytes_read, smart.bytes_written,
             smart.media_errors, smart.error_entries),  # fmt: skip
            [(e.count, e.sqid, e.cid, e.status, e.lba, e.nsid) for e in ctrl.errors],
            ctrl.store.syncs,
            [count(fd) for fd in self.fds],
            (list(ctrl.irq.msix_pending), list(ctrl.irq.msi_pending), ctrl.irq.intx_level),
            (pe.eeh_state, pe.fault_count),
        )

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.guest.close()
        self.ctrl.close()


# ---- actions ----------------------------------------------------------------------------------


@dataclass
class Cmd:
    qid: int
    kind: str
    slba: int
    nlb: int
    buf: int  # data page index
    offset: int  # byte offset into the first page
    fua: bool = False
    nsid: int = 1
    bad: str = ""  # "", "prp1", "prp2", "list-entry", "list-ptr", "flags"


@dataclass
class Act:
    what: str
    qid: int = 1
    n: int = 0
    flag: bool = False
    cmd: Cmd | None = None
    cmds: list[Cmd] = field(default_factory=list)


def build_entry(rig: Rig, cid: int, c: Cmd) -> bytes:
    """The SQ entry for ``c`` on ``rig`` (PRP lists written into its guest memory)."""
    data = rig.data
    kinds = {"read": K.IO_READ, "write": K.IO_WRITE, "flush": K.IO_FLUSH,
             "zeroes": K.IO_WRITE_ZEROES, "dsm": K.IO_DSM, "unknown": 0x7F}  # fmt: skip
    op = kinds[c.kind]
    length = c.nlb * 512
    prp1 = data[c.buf % DATA_PAGES] + c.offset
    prp2 = 0
    first = PAGE - (prp1 % PAGE)
    pages = [data[(c.buf + 1 + i * 3) % DATA_PAGES] for i in range(260)]
    if length > first:
        rest = length - first
        if rest <= PAGE:
            prp2 = pages[0]
        else:
            n = (rest + PAGE - 1) // PAGE
            entries = pages[:n]
            if c.bad == "list-entry":
                entries[n // 2] += 8
            lst = rig.lists[c.buf % len(rig.lists)]
            rig.guest.poke(lst, struct.pack(f"<{n}Q", *entries))
            prp2 = lst + (4 if c.bad == "list-ptr" else 0)
    if c.bad == "prp1":
        prp1 += 2
    if c.bad == "prp2" and prp2:
        prp2 += 16
    cdw12 = (c.nlb - 1) | ((1 << 30) if c.fua else 0)
    flags = 0x40 if c.bad == "flags" else 0
    if c.kind == "dsm":
        cdw10, cdw11, cdw12 = 0, 4, 0
        rig.guest.poke(prp1 - c.offset, struct.pack("<IIQ", 0, c.nlb, c.slba))
        prp1 -= c.offset
    else:
        cdw10, cdw11 = c.slba & 0xFFFFFFFF, c.slba >> 32
    return Command.pack(op, cid, nsid=c.nsid, prp1=prp1, prp2=prp2, cdw10=cdw10,
                        cdw11=cdw11, cdw12=cdw12, flags=flags)  # fmt: skip


def admin(rig: Rig, cid: int, opcode: int, **fields: int) -> None:
    """An admin command whose completion may never come (a halted controller)."""
    h = rig.host
    q = h.queues[0]
    if (q.sq_tail + 1) % q.depth == q.cq_head:  # never more in flight than the queue holds
        return
    h.push(0, Command.pack(opcode, cid, **fields))
    cqe = h.poll(0)
    if cqe is not None:
        rig.cqes.append((cqe.sqid, cqe.cid, cqe.status, cqe.sqhd, cqe.dw0))


def apply(rig: Rig, act: Act, cid: int) -> None:
    h = rig.host
    if act.what == "cmd":
        assert act.cmd is not None
        qid = act.cmd.qid
        q = h.queues[qid]
        if (q.sq_tail + 1) % q.depth == rig.known_head[qid]:
            return  # the host sees its SQ full
        h.push(qid, build_entry(rig, cid, act.cmd), ring=False)
    elif act.what == "ring":
        h.ring(act.qid)
    elif act.what == "burst":  # commands, then one doorbell
        for i, c in enumerate(act.cmds):
            apply(rig, Act("cmd", cmd=Cmd(**{**c.__dict__, "qid": act.qid})), cid + 1000 * i)
        h.ring(act.qid)
    elif act.what in ("reap", "peek"):
        # reap: acknowledge each entry (flag) or once at the end, as a driver's interrupt
        # handler does; peek: consume without telling the controller (its CQ fills up)
        for _ in range(act.n):
            cqe = h.poll(act.qid, ack=act.flag and act.what == "reap")
            if cqe is None:
                break
            rig.known_head[cqe.sqid] = cqe.sqhd
            rig.cqes.append((cqe.sqid, cqe.cid, cqe.status, cqe.sqhd, cqe.dw0))
        if act.what == "reap" and not act.flag:
            h._doorbell(act.qid, True, h.queues[act.qid].cq_head)
    elif act.what == "ack":
        h._doorbell(act.qid, True, h.queues[act.qid].cq_head)
    elif act.what == "unmap":
        rig.guest.view.unmap(rig.data[act.n % DATA_PAGES], PAGE)
    elif act.what == "ro":  # the page becomes read-only for the device
        page = rig.data[act.n % DATA_PAGES]
        i = (page - BASE) // PAGE
        rig.guest.view.map(page, PAGE, rig.guest.pages[i] * PAGE, 1, os.dup(rig.guest.memfd))
    elif act.what == "thaw":
        pe = rig.guest.pe
        assert pe is not None
        pe.eeh.thaw()
    elif act.what == "intms":
        h.wr(K.REG_INTMS if act.flag else K.REG_INTMC, act.n)
    elif act.what == "wce":
        admin(rig, cid, K.ADM_SET_FEATURES, cdw10=K.FEAT_VOLATILE_WC, cdw11=int(act.flag))
    elif act.what == "bm":
        h.ctrl.region_write(7, 0x04, struct.pack("<H", 0x6 if act.flag else 0x2))
    elif act.what == "smart":
        admin(rig, cid, K.ADM_GET_LOG_PAGE, prp1=rig.lists[0],
              cdw10=K.LOG_SMART | (127 << 16))  # fmt: skip
    else:  # pragma: no cover
        raise AssertionError(act.what)


cmd_st = st.builds(
    Cmd,
    qid=st.sampled_from([1, 1, 2]),
    kind=st.sampled_from(["read"] * 8 + ["write"] * 6 + ["flush", "flush", "zeroes", "dsm",
                                                           "unknown"]),
    slba=st.sampled_from([*range(65), *range(65), 4030, 4095, 1 << 40]),
    nlb=st.sampled_from([*range(1, 41), *[1, 8, 16] * 5, 256, 257, 600, 2048]),
    buf=st.integers(0, DATA_PAGES - 1),
    offset=st.sampled_from([0, 0, 0, 0x200, 0x804, 0xFFC]),
    fua=st.sampled_from([False] * 5 + [True]),
    nsid=st.sampled_from([1] * 30 + [0, 2, 0xFFFFFFFF]),
    bad=st.sampled_from([""] * 30 + ["prp1", "prp2", "list-entry", "list-ptr", "flags"]),
)  # fmt: skip


def cmds_st() -> st.SearchStrategy[list[Cmd]]:
    return st.lists(cmd_st, min_size=1, max_size=10)


act_st = st.one_of(
    *[st.builds(Act, what=st.just("burst"), qid=st.sampled_from([1, 1, 2]), cmds=cmds_st())
      for _ in range(4)],
    *[st.builds(Act, what=st.just("reap"), qid=st.sampled_from([1, 1, 2]),
                n=st.integers(1, 40), flag=st.booleans()) for _ in range(3)],
    st.builds(Act, what=st.just("cmd"), cmd=cmd_st),
    st.builds(Act, what=st.just("ring"), qid=st.sampled_from([1, 2])),
    st.builds(Act, what=st.just("peek"), qid=st.sampled_from([1, 2]), n=st.integers(1, 8)),
    st.builds(Act, what=st.just("ack"), qid=st.sampled_from([1, 2])),
    st.builds(Act, what=st.just("unmap"), n=st.integers(0, DATA_PAGES - 1)),
    st.builds(Act, what=st.just("ro"), n=st.integers(0, DATA_PAGES - 1)),
    st.builds(Act, what=st.just("thaw")),
    st.builds(Act, what=st.just("thaw")),
    st.builds(Act, what=st.just("intms"), n=st.sampled_from([1, 2, 6]), flag=st.booleans()),
    st.builds(Act, what=st.just("wce"), flag=st.booleans()),
    st.builds(Act, what=st.just("bm"), flag=st.sampled_from([True, True, False])),
    st.builds(Act, what=st.just("smart")),
)  # fmt: skip

setup_st = st.builds(
    Setup,
    shadow=st.booleans(),
    irq=st.sampled_from(["msix", "msi", "msi", "intx", "none"]),
    policy=st.sampled_from(["freeze", "error", "error"]),
    sealed=st.booleans(),
    scramble=st.booleans(),
    depths=st.tuples(st.sampled_from([4, 8, 64]), st.sampled_from([2, 16])),
)


def run_both(tmp: Path, setup: Setup, acts: list[Act]) -> tuple[Rig, Rig]:
    ref = Rig(tmp, "py", setup, c=False)
    mine = Rig(tmp, "c", setup, c=True)
    assert mine.ctrl.c_mover and not ref.ctrl.c_mover
    try:
        assert mine.state() == ref.state(), "set-up differs"
        for i, act in enumerate(acts):
            cid = 100 + i
            apply(ref, act, cid)
            apply(mine, act, cid)
            assert mine.state() == ref.state(), f"after action {i}: {act}"
        for qid in (1, 2):  # ring and reap whatever is left
            for rig in (ref, mine):
                apply(rig, Act("ring", qid), 0)
                apply(rig, Act("reap", qid, 200, True), 0)
            assert mine.state() == ref.state(), "at the end"
        assert mine.cqes == ref.cqes
    except BaseException:
        ref.close()
        mine.close()
        raise
    return ref, mine


@settings(max_examples=int(os.environ.get("NVME_C_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(setup=setup_st, acts=st.lists(act_st, min_size=4, max_size=40))
def test_generated_streams_match_python(tmp_path: Path, setup: Setup, acts: list[Act]) -> None:
    ref, mine = run_both(tmp_path, setup, acts)
    ref.close()
    mine.close()


# ---- the cases spelled out, and that C really does the work ------------------------------------


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[tuple[Rig, Rig]]:
    setup = Setup(shadow=False, irq="msi", policy="freeze", sealed=True, scramble=True,
                  depths=(64, 16))  # fmt: skip
    ref, mine = Rig(tmp_path, "py", setup, False), Rig(tmp_path, "c", setup, True)
    yield ref, mine
    ref.close()
    mine.close()


def both(rigs: tuple[Rig, Rig], acts: list[Act]) -> None:
    ref, mine = rigs
    for i, act in enumerate(acts):
        apply(ref, act, 500 + i)
        apply(mine, act, 500 + i)
        assert mine.state() == ref.state(), f"after {act}"


def test_c_runs_reads_writes_and_flushes_itself(
    rigs: tuple[Rig, Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, mine = rigs
    python_runs: list[int] = []
    real = type(mine.ctrl.nvm).execute

    def counting(self: Any, cmd: Command) -> int:
        python_runs.append(cmd.opcode)
        return real(self, cmd)

    monkeypatch.setattr(type(mine.ctrl.nvm), "execute", counting)
    acts = [Act("cmd", cmd=Cmd(1, "write", 8 * i, 8 * (i + 1), i, 0)) for i in range(6)]
    acts += [Act("cmd", cmd=Cmd(1, "flush", 0, 1, 0, 0)), Act("ring"), Act("reap", n=10, flag=True)]
    acts += [Act("cmd", cmd=Cmd(1, "read", 8 * i, 8 * (i + 1), 20 + i, 0x200)) for i in range(6)]
    acts += [Act("ring"), Act("reap", n=10, flag=True)]
    both(rigs, acts)
    n_ref = len(python_runs)
    assert n_ref == 13, python_runs  # the reference ran all 13 in Python ...
    python_runs.clear()
    for act in acts:  # ... and now the same on the C rig alone: nothing in Python
        apply(mine, act, 700)
    assert python_runs == []
    assert mine.ctrl.smart.read_cmds == 12 and mine.ctrl.store.syncs >= 2


def test_python_runs_what_c_leaves(rigs: tuple[Rig, Rig]) -> None:
    acts = [Act("cmd", cmd=Cmd(1, "write", 0, 8, 0, 0)),
            Act("cmd", cmd=Cmd(1, "unknown", 0, 1, 0, 0)),
            Act("cmd", cmd=Cmd(1, "read", 4095, 2, 1, 0)),  # LBA range
            Act("cmd", cmd=Cmd(1, "read", 0, 16, 1, 0, bad="list-entry")),
            Act("cmd", cmd=Cmd(1, "zeroes", 0, 8, 0, 0)),
            Act("cmd", cmd=Cmd(1, "read", 0, 8, 2, 0)),
            Act("unmap", n=5),
            Act("cmd", cmd=Cmd(1, "read", 0, 8, 5, 0)),  # faults: freezes the PE
            Act("cmd", cmd=Cmd(1, "read", 0, 8, 6, 0)),
            Act("ring"), Act("reap", n=20, flag=True), Act("thaw"),
            Act("cmd", cmd=Cmd(1, "write", 0, 8, 7, 0, fua=True)),
            Act("ring"), Act("reap", n=20, flag=True)]  # fmt: skip
    both(rigs, acts)
    ref, mine = rigs
    statuses = [st for _, _, st, _, _ in mine.cqes]
    assert statuses[0] == 0 and statuses[1] & 0x7FF == K.SC_INVALID_OPCODE
    assert mine.guest.pe is not None and mine.guest.pe.fault_count == 1


def test_full_cq_stalls_and_resumes(tmp_path: Path) -> None:
    """The host consumes completions without telling the controller: the CQ fills, the SQ
    stalls with entries left, and the CQ head doorbell (or, with shadow doorbells, the head
    the controller finds in its shadow slot) lets it go on."""
    for shadow in (False, True):
        setup = Setup(shadow=shadow, irq="msix", policy="freeze", sealed=False,
                      scramble=False, depths=(4, 2))  # fmt: skip
        ref, mine = Rig(tmp_path, f"p{shadow}", setup, False), Rig(tmp_path, f"c{shadow}",
                                                                    setup, True)
        try:
            for qid, depth in ((1, 4), (2, 2)):
                done = len(mine.cqes)
                read = [Act("cmd", cmd=Cmd(qid, "read", i, 1, i, 0)) for i in range(depth - 1)]
                acts = [*read, Act("ring", qid), Act("peek", qid, n=depth - 1), *read,
                        Act("ring", qid)]  # fmt: skip
                both((ref, mine), acts)
                assert len(mine.cqes) == done + depth - 1
                sq = mine.ctrl.sqs[qid]
                assert sq.head != sq.tail  # stalled on the full CQ
                if shadow:  # the engine asked to hear about the CQ head: EventIdx = head
                    cq = mine.ctrl.cqs[qid]
                    assert cq.event_idx == cq.head
                both((ref, mine), [Act("ack", qid), Act("reap", qid, n=10, flag=True)])
                assert len(mine.cqes) == done + 2 * (depth - 1) and sq.head == sq.tail
        finally:
            ref.close()
            mine.close()


def test_media_errors_from_the_store(rigs: tuple[Rig, Rig]) -> None:
    """The store's fd is swapped for a pipe: reads and writes fail (Python runs them again and
    reports them), fdatasync fails (C reports the flush to Python, which does not retry)."""
    acts_ok = [Act("cmd", cmd=Cmd(1, "write", 0, 8, 0, 0)), Act("ring"), Act("reap", n=5,
                                                                              flag=True)]
    both(rigs, acts_ok)
    pipes = []
    for rig in rigs:
        r, w = os.pipe()
        os.dup2(r, rig.ctrl.store.fd)
        pipes += [r, w]
    acts = [Act("cmd", cmd=Cmd(1, "read", 0, 8, 0, 0)),
            Act("cmd", cmd=Cmd(1, "write", 0, 8, 1, 0)),
            Act("cmd", cmd=Cmd(1, "flush", 0, 1, 0, 0)),
            Act("cmd", cmd=Cmd(1, "write", 0, 8, 1, 0, fua=True)),
            Act("ring"), Act("reap", n=10, flag=True)]  # fmt: skip
    both(rigs, acts)
    ref, mine = rigs
    assert [st & 0x7FF for _, _, st, _, _ in mine.cqes[-4:]] == [
        K.SC_UNRECOVERED_READ, K.SC_WRITE_FAULT, K.SC_WRITE_FAULT, K.SC_WRITE_FAULT]
    assert mine.ctrl.smart.media_errors == 4
    for fd in pipes:
        os.close(fd)


def test_a_truncated_unsealed_guest_is_a_dma_fault(tmp_path: Path) -> None:
    setup = Setup(shadow=False, irq="msix", policy="freeze", sealed=False, scramble=False,
                  depths=(16, 16))  # fmt: skip
    ref, mine = Rig(tmp_path, "p", setup, False), Rig(tmp_path, "c", setup, True)
    try:
        both((ref, mine), [Act("cmd", cmd=Cmd(1, "read", 0, 8, 40, 0))])
        for rig in (ref, mine):  # data page 40 is beyond the new size, the queues are not
            os.ftruncate(rig.guest.memfd, rig.data[20] - BASE)
        both((ref, mine), [Act("ring"), Act("reap", n=4, flag=True)])
        pe = mine.guest.pe
        assert pe is not None and pe.frozen
    finally:
        ref.close()
        mine.close()
