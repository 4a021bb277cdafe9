"""The examples a user runs by hand keep working."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent


async def test_script_function_example(tmp_path: Path) -> None:
    daemon = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vfiod", "--socket-dir", str(tmp_path),
         "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(15):
            while not (tmp_path / "test0.sock").exists():
                await trio.sleep(0.02)
        out = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / "script_function.py"),
             str(tmp_path / "test0.sock")],
            capture_stdout=True,
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        await daemon.wait()
    text = out.stdout.decode()
    assert "vendor 0x7e57" in text
    assert "copied: b'hello from the guest'" in text
    assert "fired 1 time(s)" in text
