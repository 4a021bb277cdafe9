"""`make run` (= `python -m vfiod` on the embedded default) shows the mission, and the boot
commands it prints work as printed: the x86 command for a VF on the flat PHB and the pseries
command (through vfiod-qemu) for a VF on the power8 PHB are taken from the daemon's stdout and
run by a shell exactly as a user would paste them. Each guest probes its NVMe VF and reads its
namespace; the VF's NVMe read counter (vfiodctl metrics) proves the I/O went through vfiod."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vfiod.qemu import QemuNotProvisioned, guest_image, qemu_binary


async def start(tmp: Path) -> tuple[trio.Process, str]:
    """The daemon on its default config; returns it and everything it printed at start."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vfiod", "--socket-dir", str(tmp / "run"),
         "--state-dir", str(tmp / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    out = b""
    with trio.fail_after(60):
        while b"Stop with" not in out:
            chunk = await proc.stdout.receive_some(65536)
            assert chunk, out.decode()
            out += chunk
    return proc, out.decode()


def commands(text: str) -> dict[str, str]:
    """VF name -> the command printed under its "# <vf>: ..." title (continuations kept)."""
    found: dict[str, str] = {}
    blocks = re.split(r"^# ", text, flags=re.M)[1:]
    for block in blocks:
        title, _, body = block.partition("\n")
        name = title.split(":", 1)[0]
        lines = []
        for line in body.splitlines():
            if line.startswith("Stop with"):
                break
            lines.append(line)
        found[name] = "\n".join(lines).strip()
    return found


async def stop(proc: trio.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        await proc.wait()


async def test_default_layout_is_announced(tmp_path: Path) -> None:
    proc, text = await start(tmp_path)
    await stop(proc)
    assert proc.returncode == 0
    assert "PHB 0 (window_policy flat)" in text and "PHB 1 (window_policy power8)" in text
    for name in ("test0", "nvme0", "nvme0-vf0", "nvme0-vf1", "nvme1", "nvme1-vf0", "nvme1-vf1"):
        assert f"{tmp_path}/run/{name}.sock" in text, name
    for name in ("nvme0", "nvme0-vf0", "nvme1-vf1"):  # namespaces, sparse, made on first run
        img = tmp_path / "state" / f"{name}.img"
        assert img.stat().st_size == 1 << 30 and img.stat().st_blocks == 0
    # one boot command per VF, or (QEMU not provisioned, e.g. under tools/test-cross.sh) how
    # to get QEMU
    assert "Boot a guest on a VF" in text
    assert sorted(commands(text)) == ["nvme0-vf0", "nvme0-vf1", "nvme1-vf0", "nvme1-vf1"] \
        or "make run` provisions both" in text, text


def nvme_read_bytes(metrics: str, function: str) -> int:
    """vfiod_nvme_read_bytes_total of `function` in Prometheus text."""
    for line in metrics.splitlines():
        if line.startswith("vfiod_nvme_read_bytes_total{") and f'function="{function}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


@pytest.mark.qemu
async def test_printed_boot_commands_work_as_printed(tmp_path: Path) -> None:
    try:
        for arch in ("x86_64", "ppc64le"):
            qemu_binary(arch)
            guest_image(arch)
    except QemuNotProvisioned as exc:
        pytest.fail(str(exc), pytrace=False)
    proc, text = await start(tmp_path)
    cmds = commands(text)
    assert sorted(cmds) == ["nvme0-vf0", "nvme0-vf1", "nvme1-vf0", "nvme1-vf1"], text
    assert "qemu-system-x86_64" in cmds["nvme0-vf0"] and "vfio-user-pci" in cmds["nvme0-vf0"]
    assert "vfiod-qemu" in cmds["nvme1-vf0"] and "qemu-system-ppc64" in cmds["nvme1-vf0"]
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}
    try:
        async def paste(vf: str) -> None:
            with trio.fail_after(600):
                results[vf] = await trio.run_process(
                    ["bash", "-c", cmds[vf]], capture_stdout=True, capture_stderr=True,
                    check=False, stdin=subprocess.DEVNULL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(paste, "nvme0-vf1")  # x86 q35, plain QEMU
            nursery.start_soon(paste, "nvme1-vf0")  # pseries, through vfiod-qemu
        metrics = await trio.run_process(
            [sys.executable, "-m", "vfiod.control.cli", "--socket",
             str(tmp_path / "run" / "control.sock"), "metrics"], capture_stdout=True)
    finally:
        await stop(proc)
    for vf, res in results.items():
        console = res.stdout.decode(errors="replace")
        ctx = f"{vf}: {cmds[vf]}\nrc {res.returncode}\n{console[-3000:]}\n" \
              f"{res.stderr.decode(errors='replace')[-2000:]}"
        assert res.returncode == 0, ctx
        assert "nvme nvme0: 1/0/0 default/read/poll queues" in console, ctx  # the VF probed
        assert "@@VFIOD modules=" in console and "nvme" in console, ctx
    text_metrics = metrics.stdout.decode()
    for vf in results:
        assert nvme_read_bytes(text_metrics, vf) > 0, (vf, text_metrics[-3000:])
