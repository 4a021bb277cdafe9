"""Real Linux guests drive vfiod NVMe functions through vfio-user and the PE translation.

Two x86_64 guests run at the same time, each attached to its own function of one daemon; each
writes its own pattern with direct I/O and reads it back; then every function's backing file
must hold exactly its own guest's bytes (isolation, byte for byte).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from vfiod import config
from vfiod.daemon import Daemon
from vfiod.qemu import GuestResult, QemuNotProvisioned, guest_image, run_guest

PATTERN_BYTES = 4 << 20
NS_SIZE = 64 << 20

GUEST_IO = r"""
dev=/dev/nvme0n1
[ -b $dev ] || { echo "@@VFIOD error=no-nvme-disk"; exit 1; }
echo "@@VFIOD model=$(cat /sys/class/nvme/nvme0/model | tr -d ' ')"
dd if=/pattern of=$dev bs=1M count=4 oflag=direct 2>/dev/null || echo "@@VFIOD error=write"
dd if=$dev of=/back bs=1M count=4 iflag=direct 2>/dev/null || echo "@@VFIOD error=read"
echo "@@VFIOD wrote=$(md5sum < /pattern | cut -d' ' -f1) read=$(md5sum < /back | cut -d' ' -f1)"
"""


@pytest.fixture
def provisioned() -> None:
    try:
        guest_image("x86_64")
    except QemuNotProvisioned as exc:
        pytest.fail(str(exc), pytrace=False)


def nvme_config(tmp_path: Path, names: list[str]) -> config.Config:
    text = '[[phb]]\nindex = 0\nwindow_policy = "flat"\n'
    for name in names:
        text += (
            f'[[function]]\nname = "{name}"\npersonality = "nvme"\n'
            f'backing = "{tmp_path / (name + ".img")}"\nsize = "{NS_SIZE}"\n'
        )
    parsed = config.parse(text, "test")
    return config.Config(tmp_path, parsed.functions, phbs=parsed.phbs)


def check_guest(res: GuestResult, pattern: bytes) -> None:
    res.check()
    assert "error" not in res.markers, res.tail()
    digest = hashlib.md5(pattern).hexdigest()
    assert res.markers["wrote"] == digest and res.markers["read"] == digest, res.tail()


@pytest.mark.qemu
async def test_two_x86_guests_each_on_its_own_function(provisioned: None, tmp_path: Path) -> None:
    names = ["nvme-a", "nvme-b"]
    daemon = Daemon(nvme_config(tmp_path, names))
    patterns = {name: os.urandom(PATTERN_BYTES) for name in names}
    results: dict[str, GuestResult] = {}

    async def guest(name: str, socket: Path) -> None:
        results[name] = await run_guest(
            "x86_64", GUEST_IO, [str(socket)], memory_mb=512, timeout=600,
            files={"/pattern": patterns[name]},
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        async with trio.open_nursery() as guests:
            for ep in daemon.endpoints:
                guests.start_soon(guest, ep.name, ep.path)
        nursery.cancel_scope.cancel()

    for name in names:
        check_guest(results[name], patterns[name])
        data = (tmp_path / f"{name}.img").read_bytes()
        assert len(data) == NS_SIZE
        assert data[:PATTERN_BYTES] == patterns[name], f"{name}: backing file differs"
        assert data[PATTERN_BYTES:].count(0) == NS_SIZE - PATTERN_BYTES, f"{name}: stray writes"
    for ep in daemon.endpoints:
        assert ep.sessions_total == 1 and ep.errors_total == 0
    assert not daemon.host.clients
