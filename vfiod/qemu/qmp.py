"""Minimal trio QMP client: commands and waiting for events (DEVICE_DELETED), and the pseries
prelaunch workaround built on it (device_add of the vfio-user devices while the machine is
paused, then cont), shared by run_guest and the vfiod-qemu launcher."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

__all__ = ["PRELAUNCH_TIMEOUT", "QmpClient", "QmpError", "add_devices_in_prelaunch", "prelaunch"]


class QmpError(RuntimeError):
    pass


class QmpClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str | Path, timeout: float = 30.0) -> QmpClient:
        """Connect (retrying until QEMU has created the socket) and negotiate capabilities."""
        with trio.fail_after(timeout):
            while True:
                try:
                    stream = await trio.open_unix_socket(str(path))
                    break
                except OSError:
                    await trio.sleep(0.05)
            client = cls(stream)
            greeting = await client._read_message()
            if "QMP" not in greeting:
                raise QmpError(f"unexpected QMP greeting: {greeting}")
            await client.execute("qmp_capabilities")
        return client

    async def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise QmpError("QMP connection closed")
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments is not None:
            req["arguments"] = arguments
        await self._stream.send_all(json.dumps(req).encode() + b"\n")
        while True:
            msg = await self._read_message()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QmpError(f"{command}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    async def wait_event(
        self, name: str, timeout: float = 60.0, **data: Any
    ) -> dict[str, Any]:
        """The first event ``name`` whose data has the given items (one already received while a
        command ran counts); it is removed from ``events``. Raises trio.TooSlowError."""

        def matches(msg: dict[str, Any]) -> bool:
            got = msg.get("data", {})
            return msg.get("event") == name and all(got.get(k) == v for k, v in data.items())

        for i, msg in enumerate(self.events):
            if matches(msg):
                return self.events.pop(i)
        with trio.fail_after(timeout):
            while True:
                msg = await self._read_message()
                if "event" not in msg:
                    continue  # a late reply nobody waits for
                if matches(msg):
                    return msg
                self.events.append(msg)

    async def aclose(self) -> None:
        await self._stream.aclose()


#: Longest the pseries prelaunch (QMP connect, device_add of every device, cont) may take: each
#: device_add makes QEMU connect to the server and read the device's regions and config space.
PRELAUNCH_TIMEOUT = 60.0


async def add_devices_in_prelaunch(qmp_path: str | Path, devices: Sequence[dict[str, Any]],
                                   *, cont: bool = True) -> None:
    """QEMU 11.1's pseries workaround (lab.md): device_add each device while the machine is
    still in prelaunch (-S), then cont; raise QmpError saying which step failed."""
    client = await QmpClient.connect(qmp_path)
    try:
        status = await client.execute("query-status")
        if status.get("status") != "prelaunch":
            raise QmpError(f"machine is {status.get('status')!r}, not in prelaunch")
        for dev in devices:
            try:
                await client.execute("device_add", dict(dev))
            except QmpError as exc:
                where = dev.get("socket", {}).get("path", "")
                raise QmpError(f"{dev.get('id')} ({where}): {exc}") from None
        if not cont:
            return
        await client.execute("cont")
        status = await client.execute("query-status")
        if not status.get("running"):
            raise QmpError(f"cont: machine is {status.get('status')!r}, not running")
    finally:
        await client.aclose()


async def prelaunch(qmp_path: str | Path, devices: Sequence[dict[str, Any]], exited: trio.Event,
                    *, timeout: float = PRELAUNCH_TIMEOUT, cont: bool = True) -> str | None:
    """add_devices_in_prelaunch unless QEMU exits first (`exited` is set when it does).

    None when the devices are in (and the guest running, with `cont`), else why not: the
    caller kills QEMU and shows the reason next to QEMU's own stderr."""
    failure: list[str] = []
    finished = False
    async with trio.open_nursery() as nursery:

        async def watch_exit() -> None:
            await exited.wait()
            await trio.sleep(0.5)  # a QMP error that explains the exit wins
            nursery.cancel_scope.cancel()

        async def add_devices() -> None:
            nonlocal finished
            try:
                with trio.fail_after(timeout):
                    await add_devices_in_prelaunch(qmp_path, devices, cont=cont)
                finished = True
            except trio.TooSlowError:
                failure.append(f"QMP prelaunch (device_add, cont) took more than {timeout:.0f} s")
            except (OSError, QmpError, ValueError) as exc:
                failure.append(f"QMP prelaunch failed: {exc}")
                await trio.sleep(0.2)  # let QEMU's own complaint reach stderr
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_exit)
        nursery.start_soon(add_devices)
    if failure:
        return failure[0]
    if not finished:
        return "QEMU exited before the vfio-user devices were added (see its stderr)"
    return None
