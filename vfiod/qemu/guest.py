"""Boot a guest, run a shell script in it, collect the console (trio).

The guest initramfs (tools/build-guest-images.sh) runs /guest.sh if present and powers off. The
script is delivered as a second, appended cpio archive (Linux unpacks concatenated initramfs
archives in order). Protocol on the console, one line each:

    @@VFIOD key=value [key=value ...]   markers (values without spaces); /init itself prints
                                        kernel=, arch=, modules=, script=start and exit=<status>
    @@BEGIN name / @@END name           a section: the lines in between, verbatim
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import cpio
from .cmdline import qemu_command_line, vfio_user_device
from .locate import guest_image, normalize_arch
from .qmp import PRELAUNCH_TIMEOUT, prelaunch

__all__ = [
    "GuestError",
    "GuestResult",
    "build_initrd_overlay",
    "parse_console",
    "run_guest",
    "write_guest_initrd",
]

_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")
_MARKER = "@@VFIOD "


class GuestError(AssertionError):
    """A guest run that did not end as expected; the message carries the console tail."""


@dataclass
class GuestResult:
    console: str                    # serial console, \r and ANSI escapes removed
    stderr: str                     # QEMU's own stderr (errors, vfio-user warnings)
    returncode: int | None          # QEMU's exit status (None if the harness killed it)
    exit_status: int | None         # /guest.sh's exit status (None: the script never finished)
    markers: dict[str, str] = field(default_factory=dict)  # last value of each @@VFIOD key
    marker_lines: list[str] = field(default_factory=list)  # every @@VFIOD line, in order
    sections: dict[str, str] = field(default_factory=dict)  # @@BEGIN name ... @@END name
    timed_out: bool = False
    aborted: str | None = None       # the abort pattern that stopped the run, if any
    error: str | None = None         # a harness step that failed (pseries QMP prelaunch)
    duration: float = 0.0
    command: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.exit_status == 0 and not self.timed_out and self.aborted is None
                and self.error is None)

    def tail(self, lines: int = 60) -> str:
        """The last console lines plus QEMU's stderr: what to show when something failed."""
        text = "\n".join(self.console.splitlines()[-lines:])
        if self.stderr.strip():
            text += "\n--- qemu stderr ---\n" + "\n".join(self.stderr.splitlines()[-20:])
        return text

    def describe(self) -> str:
        state = (self.error if self.error else "timed out" if self.timed_out
                 else f"aborted on {self.aborted!r}" if self.aborted
                 else f"qemu exit {self.returncode}, script exit {self.exit_status}")
        return f"guest {state} after {self.duration:.1f} s"

    def check(self) -> GuestResult:
        """Raise GuestError (with the console tail) unless the script ran and exited 0."""
        if not self.ok:
            raise GuestError(f"{self.describe()}\n{self.tail()}")
        return self


def parse_console(text: str) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """(markers, marker lines, sections) from console text."""
    markers: dict[str, str] = {}
    marker_lines: list[str] = []
    sections: dict[str, str] = {}
    current: str | None = None
    body: list[str] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if current is not None:
            if line.strip() == f"@@END {current}":
                sections[current] = "\n".join(body) + ("\n" if body else "")
                current, body = None, []
            else:
                body.append(line)
            continue
        pos = line.find("@@BEGIN ")
        if pos >= 0 and line[pos + 8:].strip():
            current = line[pos + 8:].strip()
            continue
        pos = line.find(_MARKER)
        if pos >= 0:
            payload = line[pos + len(_MARKER):].strip()
            marker_lines.append(payload)
            for tok in payload.split():
                key, sep, value = tok.partition("=")
                if sep:
                    markers[key] = value
    return markers, marker_lines, sections


def build_initrd_overlay(script: str, files: Mapping[str, bytes | str] | None = None) -> bytes:
    """gzip'ed newc archive with /guest.sh (and `files`, path -> content), to append to the
    image's initrd."""
    entries: list[cpio.CpioEntry] = []
    dirs: set[str] = set()
    items: dict[str, bytes | str] = dict(files or {})
    items["guest.sh"] = script if script.endswith("\n") else script + "\n"
    for name in sorted(items):
        rel = name.lstrip("/")
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                entries.append(cpio.dir_entry(d))
        data = items[name]
        raw = data.encode() if isinstance(data, str) else data
        entries.append(cpio.file_entry(rel, raw, 0o755 if rel.endswith(".sh") else 0o644))
    return cpio.gzip_bytes(cpio.newc_archive(entries))


def write_guest_initrd(arch: str, dest: Path, script: str,
                       files: Mapping[str, bytes | str] | None = None) -> Path:
    """The provisioned initrd for `arch` with `script` as /guest.sh (and `files`) appended, at
    `dest`: what run_guest boots, also usable on a command line of one's own."""
    base = guest_image(arch).initrd.read_bytes()
    # Zero padding to a 4-byte boundary between archives is what the kernel expects.
    dest.write_bytes(base + b"\0" * (-len(base) % 4) + build_initrd_overlay(script, files))
    return dest


async def run_guest(
    arch: str = "x86_64",
    script: str = "",
    vfio_user_sockets: Sequence[str | Path] = (),
    *,
    memory_mb: int = 1024,
    timeout: float = 180.0,
    smp: int = 1,
    accel: str | None = None,
    kernel_args: str = "",
    files: Mapping[str, bytes | str] | None = None,
    extra_args: Sequence[str] = (),
    _abort_patterns: Sequence[str] = (),
) -> GuestResult:
    """Boot the provisioned guest for `arch`, run `script` (busybox sh) as /guest.sh, power off.

    `vfio_user_sockets` are UNIX socket paths of vfio-user servers; each becomes a vfio-user-pci
    device vfu0, vfu1, ... (q35: on the command line; pseries: QMP device_add in prelaunch).
    `accel` None picks KVM only if it demonstrably works (see accel.py), else TCG.
    `timeout` covers the whole run; on expiry QEMU is killed and the result has timed_out=True
    (call .check() to turn any failure into an exception with the console tail).
    pseries prelaunch (QMP connect, device_add, cont; at most PRELAUNCH_TIMEOUT): if it fails,
    or QEMU exits first, QEMU is killed and the result's `error` says which step and why
    (QEMU's own complaint is in `stderr`). Cancelling run_guest kills QEMU.
    pseries guests are booted with eeh=off (see cmdline.kernel_command_line).
    Raises QemuNotProvisioned if QEMU or the images are missing.
    """
    arch = normalize_arch(arch)
    img = guest_image(arch)
    if accel is None:
        from .accel import select_accel

        accel = await select_accel(arch)
    tmp = Path(tempfile.mkdtemp(prefix="vfiod-guest-"))
    try:
        initrd = write_guest_initrd(arch, tmp / "initrd.img", script, files)
        qmp = tmp / "qmp.sock" if (arch == "ppc64le" and vfio_user_sockets) else None
        cmd = qemu_command_line(
            arch, vfio_user_sockets, memory_mb=memory_mb, smp=smp, accel=accel,
            kernel=img.kernel, initrd=initrd, kernel_args=kernel_args, qmp_socket=qmp,
            extra_args=extra_args,
        )  # fmt: skip
        return await _run(cmd, timeout, qmp, vfio_user_sockets, _abort_patterns)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _clean(data: bytes) -> str:
    return _ANSI.sub("", data.decode(errors="replace").replace("\r", ""))


async def _run(
    cmd: list[str],
    timeout: float,
    qmp: Path | None,
    sockets: Sequence[str | Path],
    abort_patterns: Sequence[str],
) -> GuestResult:
    out = bytearray()
    err = bytearray()
    done = trio.Event()
    exited = trio.Event()
    aborted: list[str] = []
    t0 = time.monotonic()
    proc = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None

    async def pump(stream: trio.abc.ReceiveStream, buf: bytearray) -> None:
        async for chunk in stream:
            buf += chunk
            if abort_patterns and not aborted:
                window = bytes(buf[-len(chunk) - 200:])
                for pat in abort_patterns:
                    if pat.encode() in window:
                        aborted.append(pat)
                        done.set()

    async def waiter() -> None:
        await proc.wait()
        exited.set()
        done.set()

    timed_out = killed = False
    error: str | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, proc.stdout, out)
            nursery.start_soon(pump, proc.stderr, err)
            nursery.start_soon(waiter)
            with trio.move_on_after(timeout) as scope:
                if qmp is not None:
                    devices = [vfio_user_device(p, f"vfu{i}") for i, p in enumerate(sockets)]
                    error = await prelaunch(qmp, devices, exited,
                                            timeout=min(timeout, PRELAUNCH_TIMEOUT))
                if error is None:
                    await done.wait()
            timed_out = scope.cancelled_caught
            if proc.returncode is None:
                killed = True
                proc.kill()
    finally:
        if proc.returncode is None:
            killed = True
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    console = _clean(bytes(out))
    markers, lines, sections = parse_console(console)
    status = markers.get("exit")
    return GuestResult(
        console=console,
        stderr=_clean(bytes(err)),
        returncode=None if killed else proc.returncode,
        exit_status=int(status) if status is not None and status.lstrip("-").isdigit() else None,
        markers=markers,
        marker_lines=lines,
        sections=sections,
        timed_out=timed_out,
        aborted=aborted[0] if aborted else None,
        error=error,
        duration=time.monotonic() - t0,
        command=cmd,
    )
