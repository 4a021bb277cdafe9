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

from vfiod import sdnotify
from vfiod.config import Config, ConfigError
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
    config: Config,
    announce: Callable[[Daemon], None] | None = None,
    reload_config: Callable[[], Config] | None = None,
) -> None:
    """Run the daemon until SIGTERM or SIGINT, then shut down cleanly; SIGHUP reloads.

    systemd hears about each step (READY=1 once every socket listens, RELOADING=1 and READY=1
    around a reload, STOPPING=1 on the way out); outside systemd those calls do nothing.
    """
    daemon = Daemon(config)
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with trio.open_signal_receiver(*signums) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            if announce is not None:
                announce(daemon)
            sdnotify.notify(ready=True, status=_status(daemon))
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await _reload(daemon, reload_config)
                    continue
                log.info("%s: shutting down", signal.Signals(signum).name)
                sdnotify.notify(stopping=True, status="stopping: closing clients")
                nursery.cancel_scope.cancel()
                break


def _status(daemon: Daemon) -> str:
    attached = sum(ep.session is not None for ep in daemon.endpoints)
    return f"serving {len(daemon.endpoints)} functions, {attached} with a client"


async def _reload(daemon: Daemon, reload_config: Callable[[], Config] | None) -> None:
    """SIGHUP: re-read the configuration; a bad one changes nothing."""
    sdnotify.notify(reloading=True, status="reloading the configuration")
    try:
        if reload_config is None:
            log.info("SIGHUP: no configuration file to reload")
            return
        try:
            new = reload_config()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s: %s", exc.source, problem)
            return
        for line in await daemon.host.reload(new):
            log.info("reload: %s", line)
        daemon.config = new
    finally:
        sdnotify.notify(ready=True, status=_status(daemon))
