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

from vfiod.config import Config
from vfiod.control.server import serve_control
from vfiod.host import Host, control_socket_path
from vfiod.server.endpoint import Endpoint

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.host = Host(config)

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.host.endpoints

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every function and the control socket until cancelled."""
        self.config.socket_dir.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.host.serve)
            await nursery.start(serve_control, self.host, control_socket_path(self.config))
            task_status.started(self)

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
