"""Every fd a peer sends is closed exactly once, whatever becomes of its message.

The endpoint runs in this process, so /proc/self/fd counts the daemon's fds: each case sends
eventfds, closes its own copies, hangs up, and the count must come back exactly (a leak raises
it; a second close of a reused number would lower it). A close that finds the fd already gone
is a double close and fails the test on its own.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from raw_peer import ERROR, NO_REPLY, REPLY, Raw, encode, msg, open_fd_count, version_msg

from vfiod import client
from vfiod.devices import testdev as td
from vfiod.protocol import (
    DeviceReset,
    DeviceSetIrqs,
    DmaMap,
    DmaUnmap,
    IrqIndex,
    RegionRead,
    SetIrqsFlag,
)
from vfiod.server import session as session_module
from vfiod.server.endpoint import Endpoint
from vfiod.sockets import SocketAccess

TRIGGER = int(SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER)

#: One step of a case: bytes and how many fresh fds ride with them (one sendmsg).
Step = tuple[bytes, int]


@pytest.fixture(autouse=True)
def no_double_close(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """os.close of an fd that is not open means something closed it twice."""
    bad: list[int] = []
    real_close = os.close

    def close(fd: int) -> None:
        try:
            real_close(fd)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                bad.append(fd)
            raise

    monkeypatch.setattr(os, "close", close)
    yield bad
    assert not bad, f"fds closed twice: {bad}"


async def fds_settle_at(count: int, timeout: float = 5.0) -> None:
    with trio.move_on_after(timeout):
        while open_fd_count() != count:
            await trio.sleep(0.01)
    assert open_fd_count() == count


async def play(raw: Raw, steps: list[Step]) -> None:
    """Send each step with its fds, closing our copies; the daemon's are then its alone."""
    for data, nfds in steps:
        fds = [os.eventfd(0) for _ in range(nfds)]
        try:
            await raw.send(data, fds)
        except OSError:
            pass  # the daemon hung up already: what it got, it must close
        finally:
            for fd in fds:
                os.close(fd)


async def hang_up(raw: Raw) -> None:
    with trio.move_on_after(0.5):
        try:
            while await raw.sock.recv(65536):
                pass
        except OSError:
            pass
    raw.close()


REPLY_TO_NOTHING = msg(1, 4, b"\0" * 16, flags=REPLY)
DMA_MAP = encode(DmaMap(3, 0, 0, 4096, None), 2)
SET_IRQS = encode(DeviceSetIrqs(TRIGGER, int(IrqIndex.MSIX), 0, 2), 3)

CASES: dict[str, tuple[bool, list[Step]]] = {
    # messages flagged as replies (the server never asked anything)
    "a reply with fds": (True, [(REPLY_TO_NOTHING, 2)]),
    "replies with fds, pipelined": (True, [(msg(i, 4, flags=REPLY), 2) for i in range(8)]),
    "an error reply with fds": (True, [(msg(1, 4, flags=REPLY | ERROR), 3)]),
    "a reply with fds before negotiation": (False, [(REPLY_TO_NOTHING, 2)]),
    "a no-reply reply with fds": (True, [(msg(1, 2, b"\0" * 32, flags=REPLY | NO_REPLY), 1)]),
    # the session ends with messages (and their fds) still in its receive buffer
    "a reply, then a buffered DMA_MAP with its fd": (True, [(REPLY_TO_NOTHING + DMA_MAP, 1)]),
    "a reply, then buffered messages with fds": (
        True, [(REPLY_TO_NOTHING, 0), (DMA_MAP, 1), (SET_IRQS, 2), (msg(9, 2, size=200), 3)]),
    "half a message with fds, then EOF": (True, [(DMA_MAP[:20], 1)]),
    "a message with fds, then half of the next and EOF": (True, [(DMA_MAP + SET_IRQS[:10], 3)]),
    # broken streams
    "fds with a header size below 16": (True, [(msg(1, 2, size=8), 2)]),
    "fds with a header size over the limit": (True, [(msg(1, 2, size=64 << 20), 2)]),
    "fds, then garbage": (True, [(DMA_MAP, 1), (b"\xff" * 64, 2)]),
    # more fds than allowed
    "20 fds on SET_IRQS (max_msg_fds is 16)": (
        True, [(encode(DeviceSetIrqs(TRIGGER, int(IrqIndex.MSIX), 0, 20), 1), 20)]),
    "100 fds (more than a receive has room for)": (True, [(DMA_MAP, 100)]),
    "2 fds on DMA_MAP": (True, [(DMA_MAP, 2)]),
    "fds on commands that take none": (
        True, [(encode(ev, i), 2) for i, ev in enumerate(
            [DmaUnmap(0, 0, 4096), RegionRead(0, 7, 4), DeviceReset()])]),
    # fds on messages that fail to decode or are refused
    "fds on every command with a malformed body": (
        True, [(msg(i, cmd, b"\x01" * 7), 1) for i, cmd in enumerate(range(0, 21))]),
    "fds on every command before negotiation": (
        False, [(msg(i, cmd, b"\x01" * 40), 1) for i, cmd in enumerate(range(0, 21))]),
    "fds on requests with the ERROR bit or an unknown type": (
        True, [(msg(1, 2, DMA_MAP[16:], flags=ERROR), 1), (msg(2, 2, DMA_MAP[16:], flags=5), 1)]),
    "VERSION with fds": (False, [(version_msg(1), 2)]),
    "DMA_MAP of an eventfd (not a memory file)": (True, [(DMA_MAP, 1)]),
    "DMA_MAP with unknown flags": (True, [(encode(DmaMap(0x80, 0, 0, 4096, None), 1), 1)]),
    "posted DMA_MAP refused": (True, [(encode(DmaMap(3, 0, 1, 4096, None), 1, NO_REPLY), 1)]),
    "SET_IRQS on an index that does not exist": (
        True, [(encode(DeviceSetIrqs(TRIGGER, 9, 0, 2), 1), 2)]),
    "SET_IRQS kept by the function, then EOF": (True, [(SET_IRQS, 2)]),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_fds_of_a_hostile_client_are_closed(endpoint: Endpoint, name: str) -> None:
    negotiate, steps = CASES[name]
    before = open_fd_count()
    raw = await Raw.open(endpoint.path, negotiate=negotiate)
    await play(raw, steps)
    await hang_up(raw)
    await fds_settle_at(before)
    async with client.connect(endpoint.path) as dev:  # and the function still serves
        assert int.from_bytes(await dev.config_read(0, 2), "little") == td.TEST_VENDOR_ID
    await fds_settle_at(before)


REFUSED_CASES: dict[str, list[Step]] = {
    "VERSION and a DMA_MAP with its fd in one chunk": [(version_msg(1) + DMA_MAP, 1)],
    "VERSION, then messages with fds": [(version_msg(1), 0), (DMA_MAP, 1), (SET_IRQS, 2)],
    "a reply with fds instead of VERSION": [(REPLY_TO_NOTHING, 2)],
    "VERSION with fds": [(version_msg(1), 2)],
    "half a message with fds, then silence": [(DMA_MAP[:20], 3)],
    "a broken header with fds": [(msg(1, 2, size=4), 2)],
    "100 fds": [(version_msg(1), 100)],
}


@pytest.mark.parametrize("busy", [True, False], ids=["EBUSY", "EPERM"])
@pytest.mark.parametrize("name", list(REFUSED_CASES))
async def test_fds_of_a_refused_client_are_closed(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, name: str, busy: bool
) -> None:
    monkeypatch.setattr(session_module, "REFUSAL_GRACE", 0.3)
    async with client.connect(endpoint.path) as first:
        if not busy:
            endpoint.access = SocketAccess(allowed_uids=frozenset({os.geteuid() + 1}))
        before = open_fd_count()
        raw = await Raw.open(endpoint.path, negotiate=False)
        # hold on to the connection until the refusal is over (the silent case waits it out)
        await play(raw, REFUSED_CASES[name])
        with trio.move_on_after(2):
            try:
                while await raw.sock.recv(65536):
                    pass
            except OSError:
                pass
        raw.close()
        await fds_settle_at(before)
        assert int.from_bytes(await first.config_read(0, 2), "little") == td.TEST_VENDOR_ID


async def test_fds_buffered_when_the_daemon_stops_are_closed(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    before = open_fd_count()
    ep = Endpoint("s", path, td.TestDevice())
    async with trio.open_nursery() as nursery:
        await nursery.start(ep.serve)
        raw = await Raw.open(path)
        # a message cut short: its fds wait in the session's buffer for the rest
        await play(raw, [(DMA_MAP + SET_IRQS[:20], 3)])
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    raw.close()
    ep.function.close()
    await fds_settle_at(before)



@pytest.mark.parametrize("kind", ["its own connection", "a pipe", "a memfd", "an epoll fd"])
async def test_interrupt_fds_that_are_not_eventfds_are_refused(
    endpoint: Endpoint, kind: str
) -> None:
    """A client's own socket kept as an 'eventfd' would hold its connection open for ever:
    the session would never see EOF and the function would stay taken."""
    before = open_fd_count()
    raw = await Raw.open(endpoint.path)
    if kind == "its own connection":
        fds = [os.dup(raw.sock.fileno())]
    elif kind == "a pipe":
        fds = list(os.pipe())
    elif kind == "a memfd":
        fds = [os.memfd_create("x")]
    else:
        ep = select.epoll()
        fds = [os.dup(ep.fileno())]
        ep.close()
    body = encode(DeviceSetIrqs(TRIGGER, int(IrqIndex.MSIX), 0, len(fds)), 1)
    await raw.send(body, fds)
    assert await raw.expect_error(1) == errno.EINVAL
    for fd in fds:
        os.close(fd)
    raw.close()
    with trio.fail_after(5):  # the function is free again at once
        async with client.connect(endpoint.path) as dev:
            efd = os.eventfd(0)
            await dev.set_irqs(IrqIndex.MSIX, TRIGGER, 0, 1, [efd])  # a real one still works
            os.close(efd)
    await fds_settle_at(before)


def test_is_eventfd_tells_eventfds_from_everything_else() -> None:
    from vfiod.transport import is_eventfd

    efd, (r, w), mfd = os.eventfd(0), os.pipe(), os.memfd_create("x")
    ep = select.epoll()
    try:
        assert is_eventfd(efd)
        assert not any(is_eventfd(fd) for fd in (r, w, mfd, ep.fileno(), 10_000))
    finally:
        for fd in (efd, r, w, mfd):
            os.close(fd)
        ep.close()
