"""One function's vfio-user socket: listen, accept one client at a time, refuse the rest.

A PCI function can belong to one guest at a time, exactly as a VFIO device fd is exclusive; a
second connection is told EBUSY and closed, and the first one does not notice.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path

import trio

from vfiod.pci.function import PciFunction
from vfiod.server.session import Session, refuse
from vfiod.sockets import SocketAccess, bind_listener, unlink_if_ours
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
        access: SocketAccess | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.function = function
        self.session: Session | None = None
        self.sessions_total = 0
        self.refused_total = 0
        self.messages_total = 0  # of finished sessions
        self.errors_total = 0
        self.dma_maps_total = 0
        self.dma_unmaps_total = 0
        self._session_factory = session_factory or _plain_session
        self.access = access or SocketAccess()
        self._ino: int | None = None

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
                    if not self.access.admits(peer.uid):
                        self.refused_total += 1
                        log.warning(
                            "function %s: refused pid %d uid %d (not in allowed_uids)",
                            self.name, peer.pid, peer.uid,
                            extra={"function": self.name, "client": peer.pid, "uid": peer.uid},
                        )
                        nursery.start_soon(refuse, channel, self.name, errno.EPERM)
                        continue
                    self.session = self._session_factory(self.function, channel, self.name, peer)
                    nursery.start_soon(self._run_session, self.session)
        finally:
            listener.close()
            unlink_if_ours(self.path, self._ino)

    async def _run_session(self, session: Session) -> None:
        self.sessions_total += 1
        peer = session.peer
        context = {"function": self.name, "client": peer.pid if peer else None,
                   "uid": peer.uid if peer else None}
        log.info("function %s: client connected", self.name, extra=context)
        try:
            await session.run()
        except Exception:
            # A bug met by one client must not take the function away from the next one.
            log.exception("function %s: session failed", self.name, extra=context)
        finally:
            self.session = None
            self.messages_total += session.messages
            self.errors_total += session.errors
            self.dma_maps_total += session.dma.maps_total
            self.dma_unmaps_total += session.dma.unmaps_total
            log.info(
                "function %s: client gone after %d messages (%d refused)",
                self.name,
                session.messages,
                session.errors,
                extra=context,
            )

    async def _bind(self) -> trio.socket.SocketType:
        sock, self._ino = await bind_listener(
            self.path, mode=self.access.mode, uid=self.access.uid, gid=self.access.gid
        )
        return sock


def _plain_session(function: PciFunction, channel: Channel, name: str, peer: Peer) -> Session:
    """A session whose DMA goes straight to the client's RAM files (no platform)."""
    return Session(function, channel, name, peer=peer)
