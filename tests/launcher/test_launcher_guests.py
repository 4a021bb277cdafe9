"""vfiod-qemu boots real guests with stock QEMU 11.1.3: a pseries guest (device_add in
prelaunch, eeh=off, cont) and an x86 q35 guest, each on its own NVMe VF, each writing a pattern
through the VF that must land in the VF's namespace file; the console passes through the
launcher's stdout and the exit status is QEMU's."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vfiod import config
from vfiod.daemon import Daemon
from vfiod.qemu import QemuNotProvisioned, guest_image, parse_console, qemu_binary
from vfiod.qemu.cmdline import qemu_command_line
from vfiod.qemu.guest import write_guest_initrd

pytestmark = pytest.mark.qemu

PATTERN = hashlib.sha256(b"vfiod-qemu").digest() * (1 << 16)  # 2 MiB
GUEST_IO = r"""
dev=/dev/nvme0n1
[ -b $dev ] || { echo "@@VFIOD error=no-nvme-disk"; exit 1; }
dd if=/pattern of=$dev bs=1M count=2 oflag=direct 2>/dev/null || echo "@@VFIOD error=write"
dd if=$dev of=/back bs=1M count=2 iflag=direct 2>/dev/null || echo "@@VFIOD error=read"
echo "@@VFIOD wrote=$(md5sum < /pattern | cut -d' ' -f1) read=$(md5sum < /back | cut -d' ' -f1)"
"""
LAUNCHER = [sys.executable, "-m", "vfiod.qemu.launcher"]


@pytest.fixture
def provisioned() -> None:
    try:
        for arch in ("x86_64", "ppc64le"):
            qemu_binary(arch)
            guest_image(arch)
    except QemuNotProvisioned as exc:
        pytest.fail(str(exc), pytrace=False)


def layout(tmp: Path) -> config.Config:
    return config.parse(
        f'socket_dir = "{tmp}"\n'
        '[[phb]]\nindex = 0\nwindow_policy = "flat"\n'
        '[[phb]]\nindex = 1\nwindow_policy = "power8"\n'
        '[[function]]\nname = "nvme0"\npersonality = "nvme"\nphb = 0\n'
        'backing = "nvme0.img"\nsize = "64M"\ntotalvfs = 2\nnumvfs = 1\n'
        '[[function]]\nname = "nvme1"\npersonality = "nvme"\nphb = 1\n'
        'backing = "nvme1.img"\nsize = "64M"\ntotalvfs = 2\nnumvfs = 1\n',
        "test", state_dir=tmp / "state")


async def boot(arch: str, vf_socket: Path, tmp: Path) -> tuple[int, str, str]:
    initrd = write_guest_initrd(arch, tmp / f"{arch}-initrd.img", GUEST_IO,
                                {"pattern": PATTERN})
    qemu = qemu_command_line(arch, [], memory_mb=1024, accel="tcg", initrd=initrd,
                             kernel=guest_image(arch).kernel)
    with trio.fail_after(600):
        res = await trio.run_process([*LAUNCHER, "--socket", str(vf_socket), "--", *qemu],
                                     capture_stdout=True, capture_stderr=True, check=False,
                                     stdin=subprocess.DEVNULL)
    return res.returncode, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")


async def test_pseries_and_x86_guests_through_the_launcher(provisioned: None,
                                                           tmp_path: Path) -> None:
    daemon = Daemon(layout(tmp_path))
    results: dict[str, tuple[int, str, str]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)

        async def one(arch: str, vf: str) -> None:
            results[arch] = await boot(arch, tmp_path / f"{vf}.sock", tmp_path)

        async with trio.open_nursery() as guests:
            guests.start_soon(one, "ppc64le", "nvme1-vf0")
            guests.start_soon(one, "x86_64", "nvme0-vf0")
        nursery.cancel_scope.cancel()
    want = hashlib.md5(PATTERN).hexdigest()
    for arch, vf in (("ppc64le", "nvme1-vf0"), ("x86_64", "nvme0-vf0")):
        rc, console, stderr = results[arch]
        markers, _, _ = parse_console(console.replace("\r", ""))
        ctx = f"{arch}: rc {rc}\n{console[-3000:]}\n--- stderr ---\n{stderr[-2000:]}"
        assert rc == 0, ctx  # QEMU's status: the guest powered off
        assert markers.get("exit") == "0", ctx  # the console came through the launcher
        assert markers.get("wrote") == want and markers.get("read") == want, ctx
        assert "error" not in markers, ctx
        with open(tmp_path / "state" / f"{vf}.img", "rb") as f:
            assert f.read(len(PATTERN)) == PATTERN, f"{arch}: the VF's namespace file"
    assert "eeh=off" in results["ppc64le"][1]  # the kernel command line the launcher made


async def test_pseries_prelaunch_failure_is_reported_and_qemu_stopped(provisioned: None,
                                                                      tmp_path: Path) -> None:
    """A socket nobody serves: device_add fails in prelaunch; QEMU is killed, exit status 1."""
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))  # bound, never listening: connect() is refused
    try:
        qemu = qemu_command_line("ppc64le", [], memory_mb=512, accel="tcg")
        with trio.fail_after(180):
            res = await trio.run_process([*LAUNCHER, "--socket", str(dead), "--", *qemu],
                                         capture_stdout=True, capture_stderr=True, check=False,
                                         stdin=subprocess.DEVNULL)
    finally:
        s.close()
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 1, err
    assert "QMP prelaunch failed" in err and "dead" in err, err
    assert "@@VFIOD kernel=" not in res.stdout.decode(errors="replace")  # never booted
    os.unlink(dead)
