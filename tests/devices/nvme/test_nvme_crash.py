"""Acknowledged NVMe writes survive a daemon crash, and the function comes back on its socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from nvme_remote import RemoteNvme

from vfiod import client


async def start(cfg: Path, tmp: Path) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "vfiod", "--config", str(cfg), "--socket-dir", str(tmp),
         "--state-dir", str(tmp / "state")],
        stdout=subprocess.DEVNULL,
    )


async def with_live_client(path: Path, body: Callable[[client.Client], Awaitable[None]]) -> None:
    """Run ``body`` once a live daemon answers on ``path`` (a dead daemon's socket file may
    linger, and the previous session may still be closing: both refuse, then we retry)."""
    with trio.fail_after(60):
        while True:
            entered = False
            try:
                async with client.connect(path) as dev:
                    entered = True
                    await body(dev)
                    return
            except OSError:
                if entered:
                    raise
                await trio.sleep(0.05)


async def test_acknowledged_writes_survive_a_crash(tmp_path: Path) -> None:
    cfg = tmp_path / "vfiod.toml"
    ns = tmp_path / "ns.img"
    cfg.write_text(f'[[function]]\nname = "nvme0"\npersonality = "nvme"\nbacking = "{ns}"\n'
                   'size = "4M"\n')
    sock = tmp_path / "nvme0.sock"
    fua_data, plain_data = os.urandom(4096), os.urandom(8192)
    proc = await start(cfg, tmp_path)

    async def write_then_crash(dev: client.Client) -> None:
        nvme = RemoteNvme(dev)
        await nvme.start()
        assert await nvme.write(8, fua_data, fua=True) == 0  # acknowledged, FUA
        assert await nvme.write(64, plain_data) == 0  # acknowledged, volatile cache
        proc.kill()  # crash while the client is attached
        await proc.wait()
        nvme.close()

    try:
        await with_live_client(sock, write_then_crash)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert os.pread(os.open(ns, os.O_RDONLY), 4096, 8 * 512) == fua_data
    proc = await start(cfg, tmp_path)

    async def read_back(dev: client.Client) -> None:
        nvme = RemoteNvme(dev)
        await nvme.start()
        assert await nvme.read(8, 4096) == (0, fua_data)
        assert await nvme.read(64, 8192) == (0, plain_data)
        nvme.close()

    try:
        await with_live_client(sock, read_back)
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            await proc.wait()
    assert proc.returncode == 0
