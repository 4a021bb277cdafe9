"""A vfiod daemon as a child process, and what it holds: fds, RSS, locked memory.

Hostile-tenant tests and the fuzz and soak tools count what a tenant leaves behind in the
daemon, so the daemon must be a process of its own (its /proc/PID), started from a config that
names its functions, with its log in a file (a fuzz run logs far more than a pipe holds).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vfiod.control.client import ControlClient

PHB = """\
[[phb]]
index = {index}
window_policy = "flat"
"""

FUNCTION = """\
[[function]]
name = "{name}"
personality = "{personality}"
phb = {phb}
{extra}"""


def write_config(
    directory: Path, functions: dict[str, dict[str, Any]], memlock_limit: str = "8G"
) -> Path:
    """A config with one flat PHB per function (its own PE); ``functions`` maps a name to
    extra keys (``personality``, ``backing``, ``size``)."""
    parts = [f'memlock_limit = "{memlock_limit}"\n']
    for i, (name, keys) in enumerate(functions.items()):
        keys = dict(keys)
        personality = keys.pop("personality", "testdev")
        extra = "".join(
            f"{k} = {v}\n" if isinstance(v, int) else f'{k} = "{v}"\n' for k, v in keys.items()
        )
        parts.append(PHB.format(index=i))
        parts.append(FUNCTION.format(name=name, personality=personality, phb=i, extra=extra))
    path = directory / "vfiod.toml"
    path.write_text("\n".join(parts))
    return path


class DaemonProc:
    """``python -m vfiod`` on a config, in a directory of its own."""

    def __init__(self, directory: Path, functions: dict[str, dict[str, Any]],
                 log_level: str = "INFO") -> None:
        self.dir = directory
        self.socket_dir = directory / "run"
        self.functions = list(functions)
        self.config = write_config(directory, functions)
        self.log_path = directory / "vfiod.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vfiod", "--config", str(self.config),
             "--socket-dir", str(self.socket_dir), "--state-dir", str(directory / "state"),
             "--log-level", log_level],
            stdout=subprocess.DEVNULL, stderr=self._log,
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 60.0, extra: list[str] | None = None) -> None:
        """Wait for every function's socket (and ``extra`` ones: VFs) and the control one."""
        deadline = time.monotonic() + timeout
        names = self.functions + (extra or [])
        wanted = [self.sock(n) for n in names] + [self.socket_dir / "control.sock"]
        while not all(p.exists() for p in wanted):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vfiod exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vfiod did not listen within {timeout} s: {self.log()}")
            time.sleep(0.02)

    def sock(self, name: str) -> Path:
        return self.socket_dir / f"{name}.sock"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fd_numbers(self) -> set[int]:
        return {int(n) for n in os.listdir(f"/proc/{self.pid}/fd")}

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_kinds(self) -> dict[str, int]:
        """What the daemon's fds point at (socket, anon_inode:[eventfd], memfd, file), counted:
        names a leak when there is one."""
        kinds: dict[str, int] = {}
        for n in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{n}")
            except OSError:
                continue
            kind = target.split(":", 1)[0] if ":" in target else "file"
            if target.startswith("/memfd:"):
                kind = "memfd"
            elif target.startswith("anon_inode:"):
                kind = target
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def rss(self) -> int:
        """Resident set size in bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used (clock ticks from /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memlock(self) -> list[dict[str, Any]]:
        """The daemon's locked-memory accounts per client (``vfiodctl memlock``)."""
        with ControlClient(self.socket_dir / "control.sock") as control:
            result: list[dict[str, Any]] = control.call("memlock")
        return result

    def metric(self, name: str, function: str | None = None) -> float:
        """A metric from ``vfiodctl metrics``, summed over the series (of one function)."""
        with ControlClient(self.socket_dir / "control.sock") as control:
            text: str = control.call("metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if function is not None and f'function="{function}"' not in line:
                continue
            total += float(line.rsplit(" ", 1)[1])
        return total

    def limit_fds(self, soft: int) -> None:
        """Lower (or restore) the daemon's RLIMIT_NOFILE soft limit from outside."""
        _, hard = resource.prlimit(self.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (soft, hard))

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status (0 is a clean stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
