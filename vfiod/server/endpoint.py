"""One function's vfio-user socket: listen, accept one client at a time, refuse the rest.

A PCI function can belong to one guest at a time, exactly as a VFIO device fd is exclusive; a
second connection is told EBUSY and closed, and the first one does not notice.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import trio

from vfiod.pci.function import PciFunction
from vfiod.server.session import Session, refuse
from vfiod.transport import Channel, Peer

log = logging.getLogger(__name__)


class Endpoint:
    """A named function served on a UNIX socket path."""

    def __init__(
        self,
        name: str,
        path: Path,
        function: PciFunction,
        session_factory: Callable[[PciFunction, Channel, str, Peer], Session] | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.function = function
        self.session: Session | None = None
        self.sessions_total = 0
        self.refused_total = 0
        self.messages_total = 0  # of finished sessions
        self.errors_total = 0
        self._session_factory = session_factory or _plain_session

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    channel = Channel(sock)
                    if self.session is not None:
                        self.refused_total += 1
                        nursery.start_soon(refuse, channel, self.name)
                        continue
                    try:
                        peer = channel.peer()
                    except OSError:
                        channel.close()  # gone before we could ask who it was
                        continue
                    self.session = self._session_factory(self.function, channel, self.name, peer)
                    nursery.start_soon(self._run_session, self.session)
        finally:
            listener.close()
            _unlink_quietly(self.path)

    async def _run_session(self, session: Session) -> None:
        self.sessions_total += 1
        log.info("function %s: client connected", self.name)
        try:
            await session.run()
        except Exception:
            # A bug met by one client must not take the function away from the next one.
            log.exception("function %s: session failed", self.name)
        finally:
            self.session = None
            self.messages_total += session.messages
            self.errors_total += session.errors
            log.info(
                "function %s: client gone after %d messages (%d refused)",
                self.name,
                session.messages,
                session.errors,
            )

    async def _bind(self) -> trio.socket.SocketType:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await _remove_stale_socket(self.path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(os.fspath(self.path))
            sock.listen(8)
        except BaseException:
            sock.close()
            raise
        return sock


def _plain_session(function: PciFunction, channel: Channel, name: str, peer: Peer) -> Session:
    """A session whose DMA goes straight to the client's RAM files (no platform)."""
    return Session(function, channel, name, peer=peer)


async def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse to steal a live one."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is served by another process")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
