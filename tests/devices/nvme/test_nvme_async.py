"""The C data mover with its workers: commands of a batch in flight at once, completed in any
order, posted and signalled by the worker threads.

Generated bursts of commands (disjoint LBA ranges and buffers within a burst, so any completion
order gives the same bytes) go to a controller whose workers run (its ``background`` in a
nursery) and to the Python reference; after each burst is reaped both must hold the same
namespace and data bytes, the same completions (as a set), counters, error log and EEH state.
CQs smaller than their SQs make the credit of commands in flight stall and resume fetching.
Then the lifecycle: deleting an SQ, resetting the controller and ending the session wait for
commands in flight; vectors the mirror cannot deliver reach the PBA; media errors in a worker.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from eventfds import count
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nvme_helpers import BASE, PAGE, GuestRam, Host, efd

from vfiod.devices.nvme import Command, NvmeController
from vfiod.devices.nvme import constants as K
from vfiod.devices.nvme.queues import c_module
from vfiod.pci.constants import IRQ_MSIX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD

assert c_module() is not None, "vfiod._fast is not built with the NVMe data mover (make venv)"

EVT = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
GUEST = 8 << 20
NS = 4 << 20  # 8192 LBAs
QUEUE_PAGES = 16  # IOVA pages the queues and shadow buffers take first (zeroed)
POOL = 1024  # data pages handed to commands
_MEM0 = random.Random(21).randbytes(GUEST)
_DISK0 = random.Random(22).randbytes(NS)


@dataclass
class Spec:
    kind: str  # "read" | "write" | "flush" | "fua" | "bad-nsid" | "unknown" | "zeroes"
    pages: int  # data pages (the transfer is pages * 4 KiB, less ``short`` sectors)
    short: int


class Side:
    def __init__(self, tmp: Path, name: str, c: bool, shadow: bool, cq_depth: int) -> None:
        path = tmp / f"{name}.img"
        path.write_bytes(_DISK0)
        self.ctrl = NvmeController(path, NS, io_queues=2, msix=True, shadow_doorbells=shadow,
                                   c_mover=c)  # fmt: skip
        self.guest = GuestRam(GUEST, pe=True, sealed=c)
        self.guest.restore(_MEM0)
        self.guest.poke(BASE, bytes(QUEUE_PAGES * PAGE))
        self.host = Host(self.ctrl, self.guest)
        assert self.ctrl.msix is not None
        self.ctrl.region_write(7, self.ctrl.msix.offset + 2, struct.pack("<H", 0x8000))
        originals = [efd() for _ in range(3)]
        self.fds = [os.dup(fd) for fd in originals]
        self.ctrl.set_irqs(IRQ_MSIX, EVT, 0, 3, originals)
        self.host.enable()
        self.host.create_io_queue(1, depth=64, cq_depth=cq_depth)
        if shadow:
            assert self.host.dbbuf().sc == 0
        assert self.host._next <= BASE + QUEUE_PAGES * PAGE
        self.host._next = BASE + QUEUE_PAGES * PAGE
        self.pool = [self.host.alloc() for _ in range(POOL)]
        self.lists = [self.host.alloc() for _ in range(32)]
        self.done: list[tuple[int, int]] = []

    def entry(self, cid: int, spec: Spec, slba: int, first_page: int, i: int) -> bytes:
        ops = {"read": K.IO_READ, "write": K.IO_WRITE, "fua": K.IO_WRITE, "flush": K.IO_FLUSH,
               "bad-nsid": K.IO_READ, "unknown": 0x7E, "zeroes": K.IO_WRITE_ZEROES}  # fmt: skip
        pages = [self.pool[(first_page + k) % POOL] for k in range(spec.pages)]
        nlb = spec.pages * 8 - spec.short
        prp2 = 0
        if spec.pages == 2:
            prp2 = pages[1]
        elif spec.pages > 2:
            prp2 = self.lists[i % len(self.lists)]
            self.guest.poke(prp2, struct.pack(f"<{spec.pages - 1}Q", *pages[1:]))
        cdw12 = (nlb - 1) | ((1 << 30) if spec.kind == "fua" else 0)
        nsid = 7 if spec.kind == "bad-nsid" else 1
        return Command.pack(ops[spec.kind], cid, nsid=nsid, prp1=pages[0], prp2=prp2,
                            cdw10=slba, cdw12=cdw12)  # fmt: skip

    def submit(self, burst: list[Spec], base_cid: int, first_page: int) -> None:
        slba, page = 0, first_page
        for i, spec in enumerate(burst):
            self.host.push(1, self.entry(base_cid + i, spec, slba, page, i), ring=False)
            slba += spec.pages * 8 + 3  # disjoint ranges
            page += spec.pages
        self.host.ring(1)

    async def reap(self, n: int) -> None:
        with trio.fail_after(30):
            got = 0
            while got < n:
                cqe = self.host.poll(1)
                if cqe is None:
                    await trio.sleep(0.0005)
                    continue
                self.done.append((cqe.cid, cqe.sc))
                got += 1

    def state(self) -> tuple[Any, ...]:
        ctrl = self.ctrl
        smart = ctrl.smart
        stats = ctrl.stats
        pe = self.guest.pe
        assert pe is not None
        return (
            Path(ctrl.store.path).read_bytes(),
            self.guest.snapshot()[QUEUE_PAGES * PAGE :],
            sorted(self.done),
            (smart.read_cmds, smart.write_cmds, smart.bytes_read, smart.bytes_written,
             smart.media_errors, smart.error_entries),  # fmt: skip
            sorted(stats.commands.items()),
            sorted(stats.errors.items()),
            sorted((e.sqid, e.cid, e.status, e.lba, e.nsid) for e in ctrl.errors),
            ctrl.store.syncs,
            (pe.eeh_state, pe.fault_count),
            ctrl.csts,
        )

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.guest.close()
        self.ctrl.close()


@asynccontextmanager
async def workers(ctrl: NvmeController) -> AsyncIterator[None]:
    """The controller's background task, as a session runs it, with its workers started."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ctrl.background)
        cm = ctrl._cmover
        assert cm is not None
        with trio.fail_after(10):
            while cm.c.workers < ctrl.workers:
                await trio.sleep(0.001)
        yield
        nursery.cancel_scope.cancel()


spec_st = st.builds(
    Spec,
    kind=st.sampled_from(["read"] * 6 + ["write"] * 5 + ["flush", "fua", "bad-nsid", "unknown",
                                                          "zeroes"]),
    pages=st.sampled_from([1, 1, 1, 2, 3, 8, 32, 256]),
    short=st.sampled_from([0, 0, 0, 1, 7]),
)  # fmt: skip


@settings(max_examples=int(os.environ.get("NVME_ASYNC_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bursts=st.lists(st.lists(spec_st, min_size=1, max_size=24), min_size=1, max_size=5),
       shadow=st.booleans(), cq_depth=st.sampled_from([3, 8, 64]))
async def test_bursts_in_flight_match_python(tmp_path: Path, bursts: list[list[Spec]],
                                             shadow: bool, cq_depth: int) -> None:  # fmt: skip
    ref = Side(tmp_path, "py", False, shadow, cq_depth)
    mine = Side(tmp_path, "c", True, shadow, cq_depth)
    try:
        async with workers(mine.ctrl):
            page = 0
            for b, burst in enumerate(bursts):
                for side in (ref, mine):
                    side.submit(burst, 1000 * b, page)
                    await side.reap(len(burst))
                page += sum(s.pages for s in burst)
                assert mine.state() == ref.state(), f"after burst {b}"
        plain = [s for burst in bursts for s in burst if s.kind in ("read", "write", "flush")]
        assert mine.ctrl.async_commands >= len(plain) // 2  # the workers ran them
        assert sum(count(fd) for fd in mine.fds[1:]) >= 1  # and signalled their vector
    finally:
        ref.close()
        mine.close()


# ---- in flight at once -------------------------------------------------------------------------


async def test_two_workers_overlap_and_complete_out_of_order(tmp_path: Path) -> None:
    """A 1 MiB write and a 4 KiB read in one batch: the read completes first (any order the
    spec allows), from the other worker, while the write still runs."""
    side = Side(tmp_path, "c", True, False, 64)
    try:
        async with workers(side.ctrl):
            big = Spec("write", 256, 0)
            small = Spec("read", 1, 0)
            side.submit([big, small], 10, 0)
            await side.reap(2)
        cids = [cid for cid, _ in side.done]
        assert sorted(cids) == [10, 11]
        assert side.ctrl.async_commands == 2
    finally:
        side.close()


async def test_in_flight_commands_finish_before_queue_delete_reset_and_close(
    tmp_path: Path,
) -> None:
    side = Side(tmp_path, "c", True, False, 64)
    try:
        cm = side.ctrl._cmover
        assert cm is not None
        async with workers(side.ctrl):
            side.submit([Spec("write", 128, 0)] * 4, 10, 0)
            # Delete SQ 1 at once: the delete waits for the four writes (they complete first)
            cqe = side.host.admin(K.ADM_DELETE_SQ, cdw10=1)
            assert cqe.sc == 0
            assert cm.c.inflight == 0
            await side.reap(4)
            assert [sc for _, sc in side.done] == [0] * 4
            side.host.create_io_queue(2, depth=64)
            pages = [side.pool[i] for i in range(256)]
            lst = side.host.prp_list(pages[1:])
            for i in range(4):
                side.host.push(2, Command.pack(K.IO_READ, 50 + i, nsid=1, prp1=pages[0],
                                               prp2=lst, cdw10=0, cdw12=2047), ring=False)
            side.host.ring(2)
            side.host.wr(K.REG_CC, side.host.cc(en=False))  # reset: waits, then drops queues
            assert cm.c.inflight == 0 and side.ctrl.queues is None
        assert cm.c.workers == 0  # the nursery ended every worker
    finally:
        side.close()


async def test_vectors_the_mirror_cannot_deliver_reach_the_pba(tmp_path: Path) -> None:
    side = Side(tmp_path, "c", True, False, 64)
    try:
        ctrl = side.ctrl
        assert ctrl.msix is not None
        async with workers(ctrl):
            ctrl.set_irqs(IRQ_MSIX, EVT, 1, 1, [])  # vector 1 loses its eventfd
            side.submit([Spec("read", 1, 0)], 10, 0)
            await side.reap(1)
            with trio.fail_after(5):
                while not ctrl.irq.msix_pending[1]:  # the service task fired it
                    await trio.sleep(0.001)
            fd = efd()
            mine = os.dup(fd)
            ctrl.set_irqs(IRQ_MSIX, EVT, 1, 1, [fd])  # installing an fd delivers it
            assert count(mine) == 1 and not ctrl.irq.msix_pending[1]
            os.close(mine)
    finally:
        side.close()


async def test_media_errors_in_a_worker(tmp_path: Path) -> None:
    side = Side(tmp_path, "c", True, False, 64)
    try:
        async with workers(side.ctrl):
            r, w = os.pipe()
            os.dup2(r, side.ctrl.store.fd)
            side.submit([Spec("read", 2, 0), Spec("write", 1, 0), Spec("flush", 1, 0),
                         Spec("fua", 1, 0)], 10, 0)  # fmt: skip
            await side.reap(4)
            os.close(r)
            os.close(w)
        status = dict(side.done)
        assert status == {10: K.SC_UNRECOVERED_READ, 11: K.SC_WRITE_FAULT,
                          12: K.SC_WRITE_FAULT, 13: K.SC_WRITE_FAULT}  # fmt: skip
        assert side.ctrl.smart.media_errors == 4
        assert len(side.ctrl.errors) == 4
    finally:
        side.close()
