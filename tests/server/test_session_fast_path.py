"""The session's C fast path against the Python session it stands in for.

The same byte streams (valid and malformed: every command, lying sizes, reply and error flags,
fds where none belong, chunked anywhere) go to a session without the fast path, one that runs
it inside its task, and one that runs it in its thread from the first message. The replies must
be the same bytes, and the sessions must end in the same state: TCEs, counters, config space,
EEH state, open fds.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiod import spapr
from vfiod.devices import testdev as td
from vfiod.devices.testdev import TestDevice
from vfiod.server import engine as fastpath
from vfiod.server.session import Session
from vfiod.spapr import ClientMemory, PeDma
from vfiod.transport import Channel

assert fastpath.available(), "vfiod._fast is not built (make venv) or VFIOD_NO_FASTPATH is set"

HDR = struct.Struct("=HHIII")
REPLY, NO_REPLY, ERROR = 0x1, 0x10, 0x20
MiB = 1 << 20
DMA64 = spapr.DMA64_WINDOW_START

#: How each session runs: no fast path; the engine inside the task; the engine in its thread.
MODES = {"python": (False, 1 << 30), "task": (True, 1 << 30), "thread": (True, 0)}


def msg(msg_id: int, command: int, body: bytes = b"", flags: int = 0,
        size: int | None = None) -> bytes:  # fmt: skip
    return HDR.pack(msg_id, command, 16 + len(body) if size is None else size, flags, 0) + body


def version() -> bytes:
    caps = json.dumps({"capabilities": {"max_msg_fds": 16}}).encode() + b"\0"
    return msg(0, 1, struct.pack("=HH", 0, 0) + caps)


def dma_map(msg_id: int, iova: int, size: int, offset: int = 0, prot: int = 3,
            argsz: int = 32) -> bytes:  # fmt: skip
    return msg(msg_id, 2, struct.pack("=IIQQQ", argsz, prot, offset, iova, size))


def dma_unmap(msg_id: int, iova: int, size: int, flags: int = 0, argsz: int = 24) -> bytes:
    return msg(msg_id, 3, struct.pack("=IIQQ", argsz, flags, iova, size))


def region_read(msg_id: int, region: int, offset: int, count: int, flags: int = 0) -> bytes:
    return msg(msg_id, 9, struct.pack("=QII", offset, region, count), flags)


def region_write(msg_id: int, region: int, offset: int, data: bytes, flags: int = 0,
                 count: int | None = None) -> bytes:  # fmt: skip
    n = len(data) if count is None else count
    return msg(msg_id, 10, struct.pack("=QII", offset, region, n) + data, flags)


@dataclass
class Chunk:
    data: bytes
    fds: str = ""  # "" none; "ram" one dup of the RAM memfd; "two": two; "pipe": a pipe end


class Ram:
    def __init__(self) -> None:
        self.memfd = os.memfd_create("fast-path-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, 4 * MiB)

    def fds(self, kind: str) -> list[int]:
        if kind == "ram":
            return [os.dup(self.memfd)]
        if kind == "two":
            return [os.dup(self.memfd), os.dup(self.memfd)]
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return [r]
        return []

    def close(self) -> None:
        os.close(self.memfd)


@pytest.fixture
def ram() -> Iterator[Ram]:
    r = Ram()
    yield r
    r.close()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def run_stream(chunks: list[Chunk], ram: Ram, mode: str) -> tuple[bytes, tuple[object, ...]]:
    """Serve ``chunks`` to a fresh session in ``mode``; its replies and its final state."""
    fast, streak = MODES[mode]
    phb = spapr.Phb(index=0)
    pe = phb.new_pe()
    function = TestDevice()
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dma_views: list[PeDma] = []

    def dma_factory() -> PeDma:
        view = PeDma(phb, pe, ClientMemory(spapr.Client()))
        dma_views.append(view)
        return view

    session = Session(function, Channel(a), "f", dma_factory=dma_factory, fast_path=fast,
                      thread_streak=streak)  # fmt: skip
    replies = bytearray()
    state: tuple[object, ...] = ()

    async def client() -> None:
        try:
            for c in chunks:
                fds = ram.fds(c.fds)
                try:
                    if fds:
                        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", fds).tobytes())]  # fmt: skip
                        await b.sendmsg([c.data], anc)
                    else:
                        view = memoryview(c.data)
                        while view:
                            view = view[await b.send(view):]
                finally:
                    for fd in fds:
                        os.close(fd)  # the kernel holds its own copy in flight
            b.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the session ended the connection: it said why in its replies

    async def reader() -> None:
        while True:
            try:
                data = await b.recv(1 << 16)
            except ConnectionResetError:
                return  # closed with our bytes unread: everything it sent was read first
            if not data:
                return
            replies.extend(data)

    def snapshot() -> None:
        nonlocal state
        view = dma_views[0] if dma_views else None
        windows = []
        if view is not None:
            windows = [None if w is None else (w.start, w.size, list(w.table.items()))
                       for w in view.container.windows]  # fmt: skip
        state = (
            windows,
            (view.maps_total, view.unmaps_total, view.mapped_bytes) if view else None,
            bytes(function.config.data),
            function.region_read(0, td.REG_SCRATCH, 4),
            pe.eeh_state,
            session.messages,
            session.errors,
        )

    real_close = PeDma.close

    def close_and_snapshot(self: PeDma) -> None:  # the state just before the session tears down
        if not state:
            snapshot()
        real_close(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PeDma, "close", close_and_snapshot)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                nursery.start_soon(client)
                nursery.start_soon(reader)
    b.close()
    function.close()
    return bytes(replies), state


async def compare(chunks: list[Chunk], ram: Ram) -> None:
    """Same replies, same state, and the same fds left open (none, once sessions close every
    fd they received: tests/server/test_hostile.py holds them to that)."""
    before = fd_count()
    ref = await run_stream(chunks, ram, "python")
    ref_fds = fd_count() - before
    for mode in ("task", "thread"):
        before = fd_count()
        got = await run_stream(chunks, ram, mode)
        assert got[0] == ref[0], f"replies differ ({mode})"
        assert got[1] == ref[1], f"state differs ({mode})"
        assert fd_count() - before == ref_fds, f"fds differ ({mode})"


# -- streams -------------------------------------------------------------------------------------

PAGE = 0x1000
u32 = st.integers(0, (1 << 32) - 1)
iova_st = st.one_of(st.integers(0, 40).map(lambda p: p * PAGE),
                    st.integers(0, 8).map(lambda p: DMA64 + p * PAGE),
                    st.integers(0, (1 << 64) - 1))  # fmt: skip
size_st = st.one_of(st.integers(1, 4).map(lambda p: p * PAGE), st.integers(0, 1 << 24))


@st.composite
def message(draw: st.DrawFn, msg_id: int) -> Chunk:
    kind = draw(st.sampled_from(["map", "map", "map", "unmap", "unmap", "read", "read",
                                 "write", "write", "info", "reset", "junk"]))  # fmt: skip
    flags = draw(st.sampled_from([0, 0, 0, 0, NO_REPLY, REPLY, ERROR, 0x2]))
    if kind == "map":
        data = dma_map(msg_id, draw(iova_st), draw(size_st),
                       draw(st.integers(0, 1100).map(lambda p: p * PAGE)),
                       draw(st.sampled_from([1, 2, 3, 3, 0, 4])),
                       draw(st.sampled_from([32, 32, 32, 24])))  # fmt: skip
        fds = draw(st.sampled_from(["ram", "ram", "ram", "", "two", "pipe"]))
    elif kind == "unmap":
        data = dma_unmap(msg_id, draw(iova_st), draw(size_st), draw(st.sampled_from([0, 0, 2])),
                         draw(st.sampled_from([24, 24, 32])))  # fmt: skip
        fds = draw(st.sampled_from(["", "", "", "ram"]))
    elif kind == "read":
        region = draw(st.sampled_from([7, 7, 7, 0, 0, 6, 9, 42]))
        data = region_read(msg_id, region, draw(st.integers(0, 4100)),
                           draw(st.sampled_from([1, 2, 4, 8, 64, 4096, 5000, 0])))  # fmt: skip
        fds = draw(st.sampled_from(["", "", "", "ram"]))
    elif kind == "write":
        region = draw(st.sampled_from([7, 7, 7, 0]))
        offset = draw(st.sampled_from([0x04, 0x0C, 0x10, 0x14, 0x30, 0x3C, 0x40, 0x44, 0x80,
                                       0xFFE, 4096, td.REG_SCRATCH]))  # fmt: skip
        payload = draw(st.binary(min_size=0, max_size=8))
        count = draw(st.sampled_from([None, None, None, len(payload) + 1]))
        data = region_write(msg_id, region, offset, payload, count=count)
        fds = ""
    elif kind == "info":
        data = msg(msg_id, 4, struct.pack("=IIII", 16, 0, 0, 0))
        fds = ""
    elif kind == "reset":
        data = msg(msg_id, 13)
        fds = ""
    else:
        data = msg(msg_id, draw(st.integers(0, 40)), draw(st.binary(max_size=24)))
        fds = draw(st.sampled_from(["", "ram"]))
    if flags:
        hdr = HDR.unpack_from(data)
        data = HDR.pack(hdr[0], hdr[1], hdr[2], hdr[3] | flags, 0) + data[16:]
    return Chunk(data, fds)


@st.composite
def stream(draw: st.DrawFn) -> list[Chunk]:
    msgs = [draw(message(i)) for i in range(1, draw(st.integers(1, 30)))]
    # set up a file and some maps first, so the fast path has something to do
    head = [Chunk(version()), Chunk(dma_map(100, 0, 16 * PAGE), "ram")]
    chunks = head + msgs
    if draw(st.booleans()):  # re-cut the byte stream (fds stay with their first byte)
        flat: list[Chunk] = []
        for c in chunks:
            cut = draw(st.integers(0, len(c.data)))
            if c.fds:
                cut = max(cut, 1)
            flat.append(Chunk(c.data[:cut], c.fds))
            if cut < len(c.data):
                flat.append(Chunk(c.data[cut:]))
        chunks = [c for c in flat if c.data]
    return chunks


@settings(max_examples=int(os.environ.get("FP_EXAMPLES", "60")))
@given(stream())
async def test_streams_give_the_same_replies_and_state(chunks: list[Chunk]) -> None:
    r = Ram()
    try:
        await compare(chunks, r)
    finally:
        r.close()


# -- the cases the fast path exists for, spelled out ----------------------------------------------


async def test_storm_of_unmaps_and_maps(ram: Ram) -> None:
    chunks = [Chunk(version()), Chunk(dma_map(1, 0, 64 * PAGE), "ram")]
    for i in range(2, 600):
        if i % 3 == 0:
            chunks.append(Chunk(dma_map(i, (i % 50) * PAGE, PAGE, (i % 64) * PAGE), "ram"))
        else:
            chunks.append(Chunk(dma_unmap(i, (1 << 28) + i * PAGE, PAGE)))
    chunks.append(Chunk(region_read(9999, 7, 0, 4)))
    await compare(chunks, ram)


async def test_config_space_and_frozen_pe(ram: Ram) -> None:
    chunks = [Chunk(version()), Chunk(dma_map(1, 0, PAGE), "ram"),
              Chunk(region_write(2, 7, 0x04, b"\x06\x00")),  # bus master (a hook: punted)
              Chunk(region_write(3, 7, 0x10, b"\xff\xff\xff\xff")),  # BAR sizing (fast)
              Chunk(region_read(4, 7, 0x10, 4)),
              Chunk(region_write(5, 7, 0x3C, b"\x0b")),  # interrupt line
              # a DMA fault freezes the PE: the test device's engine reads an unmapped page
              Chunk(region_write(6, 0, td.REG_DMA_SRC, struct.pack("=Q", 0x100000))),
              Chunk(region_write(7, 0, td.REG_DMA_DST, struct.pack("=Q", 0))),
              Chunk(region_write(8, 0, td.REG_DMA_LEN, struct.pack("=I", 16))),
              Chunk(region_write(9, 0, td.REG_DMA_CMD, struct.pack("=I", td.CMD_HOST_TO_HOST))),
              Chunk(region_read(10, 0, td.REG_ID, 4)),  # all-ones while frozen
              Chunk(region_read(11, 7, 0, 4)),  # config still readable
              Chunk(region_write(12, 0, td.REG_SCRATCH, b"\1\2\3\4")),  # dropped
              Chunk(msg(13, 13)),  # DEVICE_RESET thaws
              Chunk(region_read(14, 0, td.REG_ID, 4))]  # fmt: skip
    await compare(chunks, ram)


async def test_engine_handles_the_hot_messages_itself(ram: Ram) -> None:
    """Not only the same answers: the engine really does the work (no punt per message)."""
    phb = spapr.Phb(index=0)
    pe = phb.new_pe()
    function = TestDevice()
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    session = Session(function, Channel(a), "f", thread_streak=0,
                      dma_factory=lambda: PeDma(phb, pe, ClientMemory(spapr.Client())))

    async def talk() -> None:
        await b.send(version())
        await b.recv(4096)
        fd = os.dup(ram.memfd)
        await b.sendmsg([dma_map(1, 0, PAGE)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 array.array("i", [fd]).tobytes())])
        os.close(fd)
        await b.recv(4096)
        for i in range(2, 2002):  # synchronous, one at a time, like a stopped vCPU
            await b.send(dma_unmap(i, (1 << 28) + i * PAGE, PAGE))
            assert len(await b.recv(4096)) == 16
        b.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await talk()
    assert session.messages == 2002
    assert session.fast_messages == 2000  # all but VERSION and the first map of the file
    function.close()


async def test_cancelling_a_session_wakes_its_engine_thread(ram: Ram) -> None:
    """Daemon shutdown (or a removed VF) cancels the session while its engine thread sleeps in
    poll(2): the thread must wake and end, and the session clean up, at once."""
    phb = spapr.Phb(index=0)
    pe = phb.new_pe()
    function = TestDevice()
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dmas: list[PeDma] = []

    def dma_factory() -> PeDma:
        dmas.append(PeDma(phb, pe, ClientMemory(spapr.Client())))
        return dmas[-1]

    session = Session(function, Channel(a), "f", thread_streak=0, dma_factory=dma_factory)
    threads_before = threading.active_count()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await b.send(version())
            await b.recv(4096)
            await b.send(dma_unmap(1, 0, PAGE))
            assert len(await b.recv(4096)) == 16  # answered by the engine, which now sleeps
            while session.engine is None or session.engine.sleeps == 0:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert dmas[0].closed and session.engine is None
    assert await b.recv(4096) == b""  # the session closed its end
    with trio.fail_after(5):
        while threading.active_count() > threads_before + 1:  # trio keeps idle workers
            await trio.sleep(0.01)
    b.close()
    function.close()
