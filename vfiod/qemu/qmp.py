"""Minimal trio QMP client: commands (prelaunch device_add + cont for pseries, hotplug) and
waiting for events (DEVICE_DELETED)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

__all__ = ["QmpClient", "QmpError"]


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
