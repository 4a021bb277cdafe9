"""The daemon as a process: start, announce, serve, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vfiod import client
from vfiod.client import from_little
from vfiod.devices import testdev as td


async def start_daemon(*args: str, state: Path | None = None) -> trio.Process:
    """The daemon as a process; its state directory is the test's, never the machine's."""
    if "--state-dir" not in args:
        socket_dir = Path(args[args.index("--socket-dir") + 1]) if "--socket-dir" in args else None
        state = state or (socket_dir / "state" if socket_dir else Path("/nonexistent"))
        args = (*args, "--state-dir", str(state))
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "vfiod", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def wait_for(path: Path, timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while not path.exists():
            await trio.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serves_then_stops_cleanly(tmp_path: Path, signum: int) -> None:
    proc = await start_daemon("--socket-dir", str(tmp_path))
    sock = tmp_path / "test0.sock"
    try:
        await wait_for(sock)
        async with client.connect(sock) as dev:
            assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
            proc.send_signal(signum)
            with trio.fail_after(10):
                await proc.wait()
            with pytest.raises(ConnectionError):
                await dev.config_read(0, 2)  # the client was closed, not left hanging
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert not sock.exists()
    assert proc.stdout is not None
    out = (await proc.stdout.receive_some(65536)).decode()
    assert str(sock) in out and "vfio-user-pci" in out


async def test_refuses_to_steal_a_live_socket(tmp_path: Path) -> None:
    first = await start_daemon("--socket-dir", str(tmp_path))
    try:
        await wait_for(tmp_path / "test0.sock")
        second = await start_daemon("--socket-dir", str(tmp_path))
        with trio.fail_after(60):
            await second.wait()
        assert second.returncode == 1
        async with client.connect(tmp_path / "test0.sock") as dev:  # the first is untouched
            assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
    finally:
        first.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await first.wait()


async def test_stale_socket_of_a_dead_daemon_is_replaced(tmp_path: Path) -> None:
    proc = await start_daemon("--socket-dir", str(tmp_path))
    await wait_for(tmp_path / "test0.sock")
    proc.kill()  # no chance to clean up
    await proc.wait()
    assert (tmp_path / "test0.sock").exists()
    proc = await start_daemon("--socket-dir", str(tmp_path))
    try:
        with trio.fail_after(60):
            while True:
                try:
                    async with client.connect(tmp_path / "test0.sock") as dev:
                        assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
                    break
                except OSError:
                    await trio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await proc.wait()


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'socket_dir = "relative"\nbogus = 1\n'
        '[[function]]\nname = "a"\npersonality = "nope"\n'
        '[[function]]\nname = "has space"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "vfiod", "--check-config", str(bad)],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 1
    for needle in ["socket_dir", "bogus", "function[0].personality", "function[1].name"]:
        assert needle in out.stderr
    assert out.stderr.count(str(bad)) == 4


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('socket_dir = "/tmp/x"\n[[function]]\nname = "vf0"\npersonality = "testdev"\n')
    out = subprocess.run(
        [sys.executable, "-m", "vfiod", "--check-config", str(good)],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr


def test_daemon_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[function]]\n")
    out = subprocess.run(
        [sys.executable, "-m", "vfiod", "--config", str(bad), "--socket-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 1
    assert "refusing to start" in out.stderr
    assert list(tmp_path.glob("*.sock")) == []


def test_help_describes_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vfiod", "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0
    for option in ["--config", "--check-config", "--socket-dir", "--log-level"]:
        assert option in out.stdout


async def test_example_config_serves_pfs_and_vfs(tmp_path: Path) -> None:
    """examples/nvme-sriov.toml as shipped, with only the socket directory moved."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "examples" / "nvme-sriov.toml").read_text()
    cfg = tmp_path / "example.toml"
    cfg.write_text(text.replace("/var/tmp/vfiod-example", str(tmp_path / "ns")))
    proc = await start_daemon("--config", str(cfg), "--socket-dir", str(tmp_path))
    try:
        for name in ["nvme0", "nvme0-vf3", "nvme1-vf0", "control"]:
            await wait_for(tmp_path / f"{name}.sock")
        out = await trio.run_process(
            [sys.executable, "-m", "vfiod.control.cli", "--socket",
             str(tmp_path / "control.sock"), "--json", "list"],
            capture_stdout=True,
        )
        import json

        inv = json.loads(out.stdout)
        assert {p["index"]: p["window_policy"] for p in inv["phbs"]} == {0: "flat", 1: "power8"}
        assert sum(f["kind"] == "vf" for f in inv["functions"]) == 5
        async with client.connect(tmp_path / "nvme0-vf2.sock") as dev:
            assert from_little(await dev.config_read(0x0A, 2)) == 0x0108  # NVMe class
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await proc.wait()
    assert proc.returncode == 0
    assert list(tmp_path.glob("*.sock")) == []


async def test_numvfs_survive_a_crash(tmp_path: Path) -> None:
    cfg = tmp_path / "pf.toml"
    cfg.write_text('[[function]]\nname = "pf0"\npersonality = "testdev"\ntotalvfs = 4\n')
    state = tmp_path / "state"
    args = ("--config", str(cfg), "--socket-dir", str(tmp_path), "--state-dir", str(state))
    proc = await start_daemon(*args)
    try:
        await wait_for(tmp_path / "control.sock")
        out = await trio.run_process(
            [sys.executable, "-m", "vfiod.control.cli", "--socket", str(tmp_path / "control.sock"),
             "set-numvfs", "pf0", "3"],
            capture_stdout=True,
        )
        assert out.returncode == 0
        assert (state / "layout.json").exists()
    finally:
        proc.kill()  # a crash: no clean shutdown
        await proc.wait()
    proc = await start_daemon(*args)
    try:
        with trio.fail_after(60):
            while True:  # the dead daemon's socket files are still there until replaced
                try:
                    async with client.connect(tmp_path / "pf0-vf2.sock") as dev:
                        assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
                    break
                except OSError:
                    await trio.sleep(0.05)
        for n in range(3):
            assert (tmp_path / f"pf0-vf{n}.sock").is_socket()
        assert not (tmp_path / "pf0-vf3.sock").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await proc.wait()


async def test_sighup_reload_keeps_attached_clients(tmp_path: Path) -> None:
    cfg = tmp_path / "vfiod.toml"
    fn = '[[function]]\nname = "{}"\npersonality = "testdev"\n'
    cfg.write_text(fn.format("a") + fn.format("b"))
    notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await notify.bind(str(tmp_path / "notify"))
    import os as _os

    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vfiod", "--config", str(cfg), "--socket-dir", str(tmp_path),
         "--state-dir", str(tmp_path / "state")],
        env={**_os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
        stdout=subprocess.DEVNULL,
    )

    async def notification() -> str:
        with trio.fail_after(60):
            return (await notify.recv(4096)).decode()

    try:
        assert "READY=1" in await notification()
        async with client.connect(tmp_path / "a.sock") as dev:
            await dev.region_write(td.REGS_BAR, td.REG_SCRATCH, (0x1234).to_bytes(4, "little"))
            # a: changed while attached (kept); b: removed; c: added with its own socket mode
            cfg.write_text(
                '[[function]]\nname = "a"\npersonality = "nvme"\n'
                f'backing = "{tmp_path / "a.img"}"\nsize = "1M"\n'
                + fn.format("c") + 'socket_mode = "0640"\n'
            )
            proc.send_signal(signal.SIGHUP)
            reloading = await notification()
            assert "RELOADING=1" in reloading and "MONOTONIC_USEC=" in reloading
            assert "READY=1" in await notification()
            assert (tmp_path / "c.sock").is_socket() and not (tmp_path / "b.sock").exists()
            assert (tmp_path / "c.sock").stat().st_mode & 0o777 == 0o640
            scratch = await dev.region_read(td.REGS_BAR, td.REG_SCRATCH, 4)
            assert from_little(scratch) == 0x1234  # the attached client never noticed
            # a bad configuration on reload changes nothing
            cfg.write_text("[[function]]\nname = 'bad name'\n")
            proc.send_signal(signal.SIGHUP)
            assert "RELOADING=1" in await notification()
            assert "READY=1" in await notification()
            assert (tmp_path / "c.sock").is_socket()
            assert from_little(await dev.region_read(td.REGS_BAR, td.REG_SCRATCH, 4)) == 0x1234
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in await notification()
        with trio.fail_after(60):
            await proc.wait()
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()
