"""A guest the caller drives while it runs: console markers as they arrive, QMP, SIGKILL (trio).

:func:`~vfiod.qemu.guest.run_guest` boots a guest, runs its script to the end and returns. Hotplug
and crash tests have to act in the middle: add or remove a device over QMP when the guest says
it is ready, kill QEMU while the guest does I/O. :func:`live_guest` starts the same provisioned
guest with a QMP socket and hands back a :class:`LiveGuest` whose markers (``@@VFIOD key=value``
lines, see guest.py) can be awaited one by one; leaving the context kills QEMU if it still runs.

    async with live_guest("x86_64", script, extra_args=pcie_root_port("rp0")) as guest:
        await guest.wait_marker("ready", "1")
        await guest.qmp.execute("device_add", {...})
        await guest.wait_marker("io", "0")
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .cmdline import qemu_command_line
from .guest import GuestError, build_initrd_overlay
from .locate import guest_image, normalize_arch
from .qmp import QmpClient

__all__ = ["LiveGuest", "MarkerStream", "live_guest", "marker_fields", "pcie_root_port"]

_MARKER = "@@VFIOD "


def pcie_root_port(port_id: str, chassis: int = 1) -> list[str]:
    """q35 arguments for a hotplug-capable PCIe root port to device_add onto (``bus``)."""
    return ["-device", f"pcie-root-port,id={port_id},bus=pcie.0,chassis={chassis}"]


def marker_fields(payload: str) -> dict[str, str]:
    """key=value tokens of one marker line's payload."""
    fields: dict[str, str] = {}
    for tok in payload.split():
        key, sep, value = tok.partition("=")
        if sep:
            fields[key] = value
    return fields


class MarkerStream:
    """Console bytes in, in any chunking; the fields of each complete @@VFIOD line out."""

    def __init__(self) -> None:
        self._line = bytearray()

    def feed(self, chunk: bytes | bytearray) -> list[dict[str, str]]:
        self._line += chunk
        *complete, rest = bytes(self._line).split(b"\n")
        self._line = bytearray(rest)
        found = []
        for raw in complete:
            line = raw.decode(errors="replace")
            pos = line.find(_MARKER)
            if pos >= 0:
                found.append(marker_fields(line[pos + len(_MARKER):]))
        return found


class LiveGuest:
    """A running QEMU: its console so far, the marker lines seen, its QMP client."""

    def __init__(self, proc: trio.Process, command: list[str]) -> None:
        self.proc = proc
        self.command = command
        self._qmp: QmpClient | None = None
        self.console = bytearray()
        self.stderr = bytearray()
        self.markers: list[dict[str, str]] = []  # one dict per @@VFIOD line, in order
        self._stream = MarkerStream()
        self._changed = trio.Event()

    # ---- state -------------------------------------------------------------------------------

    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None:
            raise RuntimeError("QMP is not connected yet")
        return self._qmp

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def tail(self, lines: int = 40) -> str:
        """The last console lines and QEMU's stderr: what to show when something failed."""
        text = self.console.decode(errors="replace").replace("\r", "")
        out = "\n".join(text.splitlines()[-lines:])
        err = self.stderr.decode(errors="replace").strip()
        if err:
            out += "\n--- qemu stderr ---\n" + "\n".join(err.splitlines()[-20:])
        return out

    # ---- waiting -----------------------------------------------------------------------------

    async def wait_marker(
        self, key: str, value: str | None = None, timeout: float = 120.0
    ) -> dict[str, str]:
        """Fields of the first marker line with ``key`` (equal to ``value`` if given).

        Raises GuestError (with the console tail) on timeout, when QEMU exits first, or when the
        guest prints a marker with an ``error`` key.
        """
        with trio.move_on_after(timeout):
            while True:
                for fields in self.markers:
                    if "error" in fields:
                        raise GuestError(f"guest reported error={fields['error']}\n{self.tail()}")
                    if key in fields and (value is None or fields[key] == value):
                        return fields
                if not self.alive:
                    raise GuestError(
                        f"QEMU exited ({self.returncode}) before {key}={value}\n{self.tail()}"
                    )
                await self._changed.wait()
        raise GuestError(f"no marker {key}={value} within {timeout:.0f} s\n{self.tail()}")

    async def wait_exit(self, timeout: float = 60.0) -> int:
        with trio.fail_after(timeout):
            return await self.proc.wait()

    def kill(self) -> None:
        """SIGKILL QEMU (the provisioning wrapper execs in place: this PID is QEMU's)."""
        if self.alive:
            self.proc.kill()

    # ---- plumbing ----------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _pump_console(self, stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            self.console += chunk
            self.markers += self._stream.feed(chunk)
            self._notify()

    async def _pump_stderr(self, stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            self.stderr += chunk

    async def _watch_exit(self) -> None:
        await self.proc.wait()
        self._notify()


@asynccontextmanager
async def live_guest(
    arch: str = "x86_64",
    script: str = "",
    vfio_user_sockets: Sequence[str | Path] = (),
    *,
    memory_mb: int = 512,
    smp: int = 1,
    accel: str | None = None,
    kernel_args: str = "",
    files: Mapping[str, bytes | str] | None = None,
    extra_args: Sequence[str] = (),
) -> AsyncIterator[LiveGuest]:
    """Boot the provisioned guest running ``script`` (as run_guest does) with a QMP socket.

    q35 only: ``vfio_user_sockets`` go on the command line (vfu0, vfu1, ...), more devices can
    be added over ``guest.qmp``. Leaving the context kills QEMU if it is still running.
    """
    arch = normalize_arch(arch)
    if arch != "x86_64":
        raise ValueError("live_guest drives q35 guests (pseries needs the prelaunch dance)")
    img = guest_image(arch)
    if accel is None:
        from .accel import select_accel

        accel = await select_accel(arch)
    tmp = Path(tempfile.mkdtemp(prefix="vfiod-live-"))
    try:
        initrd = tmp / "initrd.img"
        base = img.initrd.read_bytes()
        initrd.write_bytes(base + b"\0" * (-len(base) % 4) + build_initrd_overlay(script, files))
        qmp_path = tmp / "qmp.sock"
        cmd = qemu_command_line(
            arch, vfio_user_sockets, memory_mb=memory_mb, smp=smp, accel=accel,
            kernel=img.kernel, initrd=initrd, kernel_args=kernel_args, qmp_socket=qmp_path,
            extra_args=extra_args,
        )  # fmt: skip
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "LC_ALL": "C"},
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        guest = LiveGuest(proc, cmd)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guest._pump_console, proc.stdout)
                nursery.start_soon(guest._pump_stderr, proc.stderr)
                nursery.start_soon(guest._watch_exit)
                try:
                    guest._qmp = await QmpClient.connect(qmp_path)
                    yield guest
                finally:
                    guest.kill()
                    if guest._qmp is not None:
                        with trio.CancelScope(shield=True):
                            await guest._qmp.aclose()
        finally:
            guest.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
