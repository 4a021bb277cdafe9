"""The daemon out of fds: it keeps serving the clients it has, and lets new ones in once fds
are free again (before, EMFILE from accept() took the whole daemon down)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from daemon_proc import DaemonProc

from vfiod import client
from vfiod.client import from_little, little
from vfiod.devices import testdev as td


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path, {"a": {}, "b": {}, "c": {}})
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


async def checked_work(dev: client.Client, rounds: int) -> None:
    for i in range(rounds):
        await dev.region_write(0, td.REG_SCRATCH, little(0x5A000000 + i, 4))
        assert from_little(await dev.region_read(0, td.REG_SCRATCH, 4)) == 0x5A000000 + i


def first_free_fd(daemon: DaemonProc) -> int:
    used = daemon.fd_numbers()
    n = 0
    while n in used:
        n += 1
    return n


async def test_out_of_fds_the_daemon_waits_and_serves_on(daemon: DaemonProc) -> None:
    async with client.connect(daemon.sock("b")) as b, client.connect(daemon.sock("a")) as a:
        await checked_work(b, 5)
        # tenant a holds a few guest-RAM files in the daemon
        rams = [a.guest_memory(1 << 20) for _ in range(4)]
        for i, ram in enumerate(rams):
            await a.dma_map_memory(ram, iova=i << 20)
        original = first_free_fd(daemon)
        # every fd number below the limit is taken: the next accept() fails with EMFILE
        daemon.limit_fds(first_free_fd(daemon))
        results: list[str] = []

        async def newcomer(name: str) -> None:
            async with client.connect(daemon.sock(name)) as dev:
                await checked_work(dev, 3)
                results.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(newcomer, "c")
            for _ in range(5):  # more connections pile up in a's backlog; it must survive
                await trio.sleep(0.2)
                assert daemon.alive(), daemon.log()
                await checked_work(b, 20)  # the attached client works throughout
            assert results == []  # c is still waiting in the backlog
            assert "accept failed" in daemon.log()
            # tenant a goes away: its fds are free, c gets in
            await a.aclose()
            for ram in rams:
                ram.close()
        assert results == ["c"]
        await checked_work(b, 5)
        assert daemon.alive()
        assert "accepting again" in daemon.log()
        daemon.limit_fds(max(original + 64, 1024))
    assert daemon.stop() == 0


async def test_a_flood_of_connections_costs_a_bounded_number_of_fds(daemon: DaemonProc) -> None:
    async with client.connect(daemon.sock("a")) as a:
        await checked_work(a, 5)  # whatever a session sets up on first use is there
        before = daemon.fds()
        socks = []
        for _ in range(200):  # connect and say nothing: each is refused (a is busy)
            s = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await s.connect(str(daemon.sock("a")))
            socks.append(s)
        await trio.sleep(0.3)
        # the bounded refusals hold at most a handful; the rest were closed unanswered
        assert daemon.fds() <= before + 8, daemon.fd_kinds()
        for s in socks:
            s.close()
        await checked_work(a, 5)
        with trio.fail_after(5):
            while daemon.fds() != before:
                await trio.sleep(0.05)
