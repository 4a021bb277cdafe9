"""NVMe doorbells in the session fast path (a FastRange hook: ``vfiod_nvme_doorbell_hook``)
against the Python session that handles each doorbell write through region_write.

The same generated conversation goes to an NVMe function behind a PE in four sessions: all
Python (no fast path, no C data mover: the reference), the C data mover behind region_write,
and the doorbell hook run by the engine inside the session's task, and in its thread from the
first message. The client speaks one message at a time, writing guest RAM (SQ entries, shadow
doorbell slots) between them as a driver would, and rings I/O and admin doorbells, valid and
invalid, with and without shadow doorbells, while pages are unmapped and bus mastering switched
off. The replies must be the same bytes, and the function must end in the same state: guest
RAM, namespace, queues, statistics, error log, interrupts, EEH. The commands run inline here
(``workers = 0``, so that the order is the same every time); test_nvme_async.py and the guest
tests cover the hook with the workers.
"""

from __future__ import annotations

import array
import hashlib
import os
import random
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiod import spapr
from vfiod.devices.nvme import Command, NvmeController
from vfiod.server import engine as fastpath
from vfiod.server.session import Session
from vfiod.spapr import ClientMemory, PeDma
from vfiod.transport import Channel

assert fastpath.available(), "vfiod._fast is not built (make venv) or VFIOD_NO_FASTPATH is set"

HDR = struct.Struct("=HHIII")
RAM = 4 << 20
ASQ, ACQ, IOSQ, IOCQ, DBS, EIS = (0x1000 * i for i in range(1, 7))
LISTS = 0x8000
DATA = 0x10000  # 64 data pages
DEPTH = 16
#: How each function runs: (session fast path, its thread streak, C data mover). The reference
#: is all Python; "c" has the C mover behind region_write; "task" and "thread" ring doorbells
#: through the hook, in the session's task or the engine's thread from the first message.
MODES = {"reference": (False, 1 << 30, False), "c": (False, 1 << 30, True),
         "task": (True, 1 << 30, True), "thread": (True, 0, True)}  # fmt: skip
_RAM0 = random.Random(3).randbytes(RAM)


def msg(msg_id: int, command: int, body: bytes = b"", flags: int = 0) -> bytes:
    return HDR.pack(msg_id, command, 16 + len(body), flags, 0) + body


def region_write(msg_id: int, region: int, offset: int, data: bytes) -> bytes:
    return msg(msg_id, 10, struct.pack("=QII", offset, region, len(data)) + data)


def region_read(msg_id: int, region: int, offset: int, count: int) -> bytes:
    return msg(msg_id, 9, struct.pack("=QII", offset, region, count))


@dataclass
class Op:
    what: str  # sq | cq | admin | read | junk | unmap | bm | intms
    value: int = 0
    extra: int = 0


def io_entry(rnd: random.Random, cid: int, good: bool) -> bytes:
    kinds = ["read"] * 5 + ["write"] * 4 + ([] if good else ["flush", "bad", "unknown", "range"])
    kind = rnd.choice(kinds)
    op = {"read": 2, "write": 1, "flush": 0, "bad": 2, "unknown": 0x7F, "range": 2}[kind]
    pages = rnd.choice([1, 1, 2, 5])
    first = rnd.randrange(0, 64 - pages)
    prp1 = DATA + first * 0x1000 + rnd.choice([0, 0, 0x200])
    nlb = pages * 8 - (1 if prp1 & 0xFFF else 0)
    prp2 = 0
    if pages == 2:
        prp2 = DATA + (first + 1) * 0x1000
    elif pages > 2:
        prp2 = LISTS + (cid % 8) * 0x100
    slba = rnd.randrange(0, 4000) if kind != "range" else 4090
    return Command.pack(op, cid, nsid=7 if kind == "bad" else 1, prp1=prp1, prp2=prp2,
                        cdw10=slba, cdw12=nlb - 1)  # fmt: skip


def prepare_ram(ram_fd: int, shadow: bool, seed: int) -> None:
    """Guest RAM before the conversation: admin commands, every I/O SQ entry, PRP lists (a
    negative seed: only commands the C mover does itself)."""
    os.pwrite(ram_fd, _RAM0, 0)
    os.pwrite(ram_fd, bytes(0x8000), 0)  # queues and shadow buffers start zeroed
    rnd = random.Random(seed)
    admin = [
        Command.pack(0x05, 1, prp1=IOCQ, cdw10=1 | ((DEPTH - 1) << 16), cdw11=3 | (1 << 16)),
        Command.pack(0x01, 2, prp1=IOSQ, cdw10=1 | ((DEPTH - 1) << 16), cdw11=1 | (1 << 16)),
    ]
    if shadow:
        admin.append(Command.pack(0x7C, 3, prp1=DBS, prp2=EIS))
    for i, e in enumerate(admin):
        os.pwrite(ram_fd, e, ASQ + 64 * i)
    for i in range(DEPTH):
        os.pwrite(ram_fd, io_entry(rnd, 100 + i, seed < 0), IOSQ + 64 * i)
    for k in range(8):  # PRP lists: four data pages each
        pages = [DATA + ((k * 7 + j * 3) % 64) * 0x1000 for j in range(4)]
        os.pwrite(ram_fd, struct.pack("<4Q", *pages), LISTS + k * 0x100)


class Client:
    """One message at a time, as a driver with a stopped vCPU would speak."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.replies = bytearray()
        self.msg_id = 0

    async def _recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return bytes(out)

    async def call(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            await self.sock.sendmsg([data], anc)
        else:
            view = memoryview(data)
            while view:
                view = view[await self.sock.send(view) :]
        head = await self._recv_exact(16)
        size = HDR.unpack(head)[2]
        self.replies += head + await self._recv_exact(size - 16)

    def next_id(self) -> int:
        self.msg_id += 1
        return self.msg_id


async def converse(function: NvmeController, mode: str, shadow: bool, seed: int,
                   ops: list[Op]) -> tuple[bytes, tuple[Any, ...]]:  # fmt: skip
    fast, streak, _ = MODES[mode]
    phb = spapr.Phb(index=0)
    pe = phb.new_pe()
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ram = os.memfd_create("hook-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, RAM)
    prepare_ram(ram, shadow, seed)
    session = Session(function, Channel(a), "nvme", fast_path=fast, thread_streak=streak,
                      dma_factory=lambda: PeDma(phb, pe, ClientMemory(spapr.Client())))
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
    state: list[tuple[Any, ...]] = []
    real_reset = NvmeController.reset

    def reset_and_snapshot(self: NvmeController) -> None:  # the state before teardown
        if not state:
            state.append(snapshot(self, ram, pe, efds, session))
        real_reset(self)

    client = Client(b)
    assert function.msi is not None
    msi = function.msi.offset
    sq_tail = 0

    async def talk() -> None:
        nonlocal sq_tail
        caps = b'{"capabilities": {"max_msg_fds": 16}}\0'
        await client.call(msg(0, 1, struct.pack("=HH", 0, 0) + caps))
        fd = os.dup(ram)
        await client.call(msg(client.next_id(), 2, struct.pack("=IIQQQ", 32, 3, 0, 0, RAM)),
                          [fd])  # fmt: skip
        os.close(fd)
        await client.call(region_write(client.next_id(), 7, 0x04, b"\x06\x00"))
        await client.call(region_write(client.next_id(), 7, msi + 2,
                                       struct.pack("<H", 0x1 | (2 << 4))))  # fmt: skip
        dups = [os.dup(fd) for fd in efds]
        await client.call(msg(client.next_id(), 8, struct.pack("=IIIII", 20 + 16, 4 | 32, 1, 0,
                                                               4)), dups)  # fmt: skip
        for fd in dups:
            os.close(fd)
        for off, value, size in ((0x24, (DEPTH - 1) | ((DEPTH - 1) << 16), 4), (0x28, ASQ, 8),
                                 (0x30, ACQ, 8), (0x14, 1 | (6 << 16) | (4 << 20), 4)):
            await client.call(region_write(client.next_id(), 0, off, value.to_bytes(size,
                                                                                    "little")))
        await client.call(region_write(client.next_id(), 0, 0x1000,
                                       (3 if shadow else 2).to_bytes(4, "little")))  # fmt: skip
        for op in ops:
            mid = client.next_id()
            if op.what == "sq":
                sq_tail = (sq_tail + op.value) % DEPTH  # wraps (entries are used again)
                if shadow:
                    os.pwrite(ram, sq_tail.to_bytes(4, "little"), DBS + 8)
                await client.call(region_write(mid, 0, 0x1008, sq_tail.to_bytes(4, "little")))
            elif op.what == "cq":
                head = op.value % DEPTH
                if shadow:
                    os.pwrite(ram, head.to_bytes(4, "little"), DBS + 12)
                await client.call(region_write(mid, 0, 0x100C, head.to_bytes(4, "little")))
            elif op.what == "admin":
                await client.call(region_write(mid, 0, 0x1004, op.value.to_bytes(4, "little")))
            elif op.what == "read":
                await client.call(region_read(mid, 0, 0x1C, 4))
            elif op.what == "junk":  # odd sizes, an absent queue, a value beyond the queue
                off, data = [(0x1008, b"\x01\x00"), (0x1048, b"\x01\0\0\0"),
                             (0x1008, b"\xff\0\0\0"), (0x1009, b"\x01\0\0\0"),
                             (0x1008, b"\1\0\0\0\0\0\0\0")][op.value % 5]  # fmt: skip
                await client.call(region_write(mid, 0, off, data))
            elif op.what == "unmap":
                page = DATA + (op.value % 64) * 0x1000
                await client.call(msg(mid, 3, struct.pack("=IIQQ", 24, 0, page, 0x1000)))
            elif op.what == "bm":
                await client.call(region_write(mid, 7, 0x04, b"\x06\x00" if op.value else
                                               b"\x02\x00"))  # fmt: skip
            elif op.what == "intms":
                reg = 0x0C if op.extra else 0x10
                await client.call(region_write(mid, 0, reg, (op.value & 0xF).to_bytes(4,
                                                                                      "little")))
        b.shutdown(socket.SHUT_WR)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NvmeController, "reset", reset_and_snapshot)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                await talk()
    b.close()
    os.close(ram)
    for fd in efds:
        os.close(fd)
    return bytes(client.replies), state[0]


def snapshot(ctrl: NvmeController, ram: int, pe: spapr.Pe, efds: list[int],
             session: Session) -> tuple[Any, ...]:  # fmt: skip
    queues = ctrl.queues
    q = None
    if queues is not None:
        q = ([(i, s.head, s.tail, s.event_idx) for i, s in sorted(queues.sqs.items())],
             [(i, c.head, c.tail, c.phase, c.event_idx) for i, c in sorted(queues.cqs.items())],
             queues.halted, queues.intms)  # fmt: skip
    counts = []
    for fd in efds:
        try:
            counts.append(os.eventfd_read(fd))
        except BlockingIOError:
            counts.append(0)
    stats, smart = ctrl.stats, ctrl.smart
    return (
        hashlib.sha256(os.pread(ram, RAM, 0)).hexdigest(),
        hashlib.sha256(os.pread(ctrl.store.fd, ctrl.store.size, 0)).hexdigest(),
        q, ctrl.csts, sorted(stats.commands.items()), sorted(stats.errors.items()),
        tuple(stats.doorbells),
        (smart.read_cmds, smart.write_cmds, smart.bytes_read, smart.bytes_written,
         smart.error_entries),
        [(e.sqid, e.cid, e.status, e.lba, e.nsid) for e in ctrl.errors],
        counts, list(ctrl.irq.msi_pending), (pe.eeh_state, pe.fault_count),
        session.messages, session.errors,
    )  # fmt: skip


def make(tmp: Path, name: str, c_mover: bool = True) -> NvmeController:
    path = tmp / f"{name}.img"
    path.write_bytes(random.Random(4).randbytes(2 << 20))
    ctrl = NvmeController(path, 2 << 20, io_queues=2, c_mover=c_mover)
    ctrl.workers = 0  # inline: the same order every run
    return ctrl


async def compare(tmp: Path, shadow: bool, seed: int, ops: list[Op]) -> dict[str, int]:
    results = {}
    fast = {}
    for mode, (_, _, c_mover) in MODES.items():
        ctrl = make(tmp, mode, c_mover)
        try:
            results[mode] = await converse(ctrl, mode, shadow, seed, ops)
            fast[mode] = ctrl.stats.doorbells[0]
        finally:
            ctrl.close()
    ref = results["reference"]
    for mode in ("c", "task", "thread"):
        assert results[mode][0] == ref[0], f"replies differ ({mode})"
        assert results[mode][1] == ref[1], f"state differs ({mode})"
    return fast


op_st = st.one_of(
    st.builds(Op, what=st.just("sq"), value=st.integers(1, 6)),
    st.builds(Op, what=st.just("sq"), value=st.integers(1, 6)),
    st.builds(Op, what=st.just("sq"), value=st.integers(1, 6)),
    st.builds(Op, what=st.just("cq"), value=st.integers(0, DEPTH - 1)),
    st.builds(Op, what=st.just("cq"), value=st.integers(0, DEPTH - 1)),
    st.builds(Op, what=st.just("admin"), value=st.integers(0, 2)),
    st.builds(Op, what=st.just("read")),
    st.builds(Op, what=st.just("junk"), value=st.integers(0, 4)),
    st.builds(Op, what=st.just("unmap"), value=st.integers(0, 63)),
    st.builds(Op, what=st.just("bm"), value=st.sampled_from([1, 1, 0])),
    st.builds(Op, what=st.just("intms"), value=st.integers(0, 15), extra=st.integers(0, 1)),
)


@settings(max_examples=int(os.environ.get("HOOK_EXAMPLES", "100")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(shadow=st.booleans(), seed=st.integers(-3, 5), ops=st.lists(op_st, max_size=30))
async def test_doorbell_conversations_match_the_python_session(
    tmp_path: Path, shadow: bool, seed: int, ops: list[Op]
) -> None:
    await compare(tmp_path, shadow, seed, ops)


async def test_the_engine_rings_io_doorbells_itself(tmp_path: Path) -> None:
    """Not only the same answers: in the fast-path sessions the I/O doorbells never reach
    region_write (the C hook counted them), the admin doorbell does."""
    ops = [Op("sq", 3), Op("cq", 3), Op("sq", 5), Op("cq", 8), Op("read")]
    calls: list[int] = []
    real = NvmeController.region_write

    def counting(self: NvmeController, index: int, offset: int, data: bytes) -> None:
        if index == 0 and offset >= 0x1000:
            calls.append(offset)
        real(self, index, offset, data)

    for shadow in (False, True):
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(NvmeController, "region_write", counting)
            ctrl = make(tmp_path, f"t{shadow}")
            try:
                await converse(ctrl, "thread", shadow, -1, ops)
            finally:
                ctrl.close()
        assert calls == [0x1000], calls  # the admin SQ doorbell only
        await compare(tmp_path, shadow, -1, ops)
