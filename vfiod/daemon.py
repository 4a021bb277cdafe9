"""The daemon: build the functions of a config, serve each on its socket, stop cleanly.

Structured concurrency: one nursery for the daemon, one task per endpoint, one nursery per
client session below it. SIGTERM/SIGINT cancel the daemon's scope; every endpoint then closes
its client and removes its socket on the way out.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import trio

from vfiod.config import Config, FunctionConfig
from vfiod.pci.function import PciFunction
from vfiod.server.endpoint import Endpoint

log = logging.getLogger(__name__)


def make_function(fc: FunctionConfig) -> PciFunction:
    if fc.personality == "testdev":
        from vfiod.devices.testdev import TestDevice

        return TestDevice()
    raise ValueError(f"unknown personality {fc.personality!r}")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.endpoints: list[Endpoint] = [
            Endpoint(fc.name, config.socket_path(fc), make_function(fc)) for fc in config.functions
        ]

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        self.config.socket_dir.mkdir(parents=True, exist_ok=True)
        try:
            async with trio.open_nursery() as nursery:
                for endpoint in self.endpoints:
                    await nursery.start(endpoint.serve)
                task_status.started(self)
        finally:
            for endpoint in self.endpoints:
                endpoint.function.close()

    def describe(self) -> list[dict[str, object]]:
        return [
            {"name": ep.name, "socket": str(ep.path), "client": ep.session is not None}
            for ep in self.endpoints
        ]


def qemu_device_arg(socket_path: Path, device_id: str) -> str:
    """The -device argument that attaches one function to a QEMU guest (JSON form)."""
    return json.dumps(
        {
            "driver": "vfio-user-pci",
            "socket": {"type": "unix", "path": str(socket_path)},
            "id": device_id,
        },
        separators=(",", ":"),
    )


async def serve_until_signalled(
    config: Config, announce: Callable[[Daemon], None] | None = None
) -> None:
    """Run the daemon until SIGTERM or SIGINT, then shut down cleanly."""
    daemon = Daemon(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            if announce is not None:
                announce(daemon)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
