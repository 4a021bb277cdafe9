"""The commands `vfiod` prints at start: one guest per VF, ready to paste.

A VF on a "flat" PHB gets an x86_64 q35 guest with the device on QEMU's command line; a VF on a
"power8" PHB gets a ppc64le pseries guest through vfiod-qemu (the QEMU 11.1 prelaunch
workaround). Both boot the provisioned guest image (`make guest-images`): its kernel has the nvme
driver and its init loads it, so the console shows the VF being probed and its namespace read,
then the guest powers off and QEMU exits 0.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .cmdline import qemu_command_line
from .locate import QemuNotProvisioned

__all__ = ["BootTarget", "boot_command", "format_multiline", "launcher_argv"]

#: Guest RAM of the printed commands (MiB).
MEMORY_MB = 1024


@dataclass(frozen=True)
class BootTarget:
    name: str
    socket: Path
    window_policy: str  # "flat" -> x86_64 q35, "power8" -> ppc64le pseries


def launcher_argv() -> list[str]:
    """How to run vfiod-qemu from this installation (the venv's script when there is one)."""
    beside = Path(sys.executable).parent / "vfiod-qemu"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("vfiod-qemu")
    return [found] if found else [sys.executable, "-m", "vfiod.qemu.launcher"]


def boot_command(target: BootTarget) -> tuple[str, list[str]]:
    """(title, argv) of the command that boots a guest on `target`.

    Raises QemuNotProvisioned when QEMU or the guest image for its architecture is missing."""
    if target.window_policy == "flat":
        argv = qemu_command_line("x86_64", [target.socket], memory_mb=MEMORY_MB, accel="tcg")
        return f"{target.name}: x86_64 q35 guest", argv
    qemu = qemu_command_line("ppc64le", [], memory_mb=MEMORY_MB, accel="tcg")
    argv = [*launcher_argv(), "--socket", str(target.socket), "--", *qemu]
    return (f"{target.name}: ppc64le pseries guest (vfiod-qemu adds the device over QMP in "
            "prelaunch, then eeh=off and cont)"), argv


def format_multiline(argv: Sequence[str], width: int = 96) -> str:
    """Shell-quoted, an option and its value kept together, lines continued with a backslash."""
    words: list[str] = []
    i = 0
    while i < len(argv):
        word = shlex.quote(argv[i])
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            word += " " + shlex.quote(argv[i + 1])
            i += 1
        words.append(word)
        i += 1
    lines: list[str] = []
    line = ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "    " + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return " \\\n".join(lines)


def boot_commands(targets: Sequence[BootTarget]) -> list[tuple[str, str]]:
    """(title, printable command) per target; a hint instead when QEMU is not provisioned."""
    out: list[tuple[str, str]] = []
    for target in targets:
        try:
            title, argv = boot_command(target)
        except (QemuNotProvisioned, OSError) as exc:  # the announcement never stops vfiod
            return [("no QEMU with vfio-user-pci or no guest image yet",
                     f"# {exc}\n# (`make run` provisions both; or attach your own QEMU >= 10.1)")]
        out.append((title, format_multiline(argv)))
    return out
