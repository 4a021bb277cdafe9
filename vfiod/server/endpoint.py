"""One function's vfio-user socket: listen, accept one client at a time, refuse the rest.

A PCI function can belong to one guest at a time, exactly as a VFIO device fd is exclusive; a
second connection is told EBUSY and closed, and the first one does not notice.

A client that reconnects at once (a restarted QEMU, a fast device_del/device_add) is the next
client, not a second one: its connection can be accepted before the old session has read its
predecessor's EOF. So a connection that finds a session whose peer has already hung up waits
for that session to finish its cleanup (reset, DMA teardown) and is then admitted.
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

#: Refusals answered at once per function; past this a connection is closed unanswered, so a
#: flood of connections costs a bounded number of fds and tasks.
MAX_REFUSALS = 4
#: Back-off after a failed accept() (EMFILE and the like), doubling up to the maximum: the
#: connection waits in the listen backlog until fds are free again.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
#: How long a new connection waits for the session of a peer that has already hung up to finish
#: its cleanup before it is refused with EBUSY after all (normally it takes milliseconds).
HANDOVER_GRACE = 2.0


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
        self.accept_errors_total = 0
        self.messages_total = 0  # of finished sessions
        self.errors_total = 0
        self.dma_maps_total = 0
        self.dma_unmaps_total = 0
        self._session_factory = session_factory or _plain_session
        self.access = access or SocketAccess()
        self._ino: int | None = None
        self._free = trio.Event()  # set while no session holds the function
        self._free.set()
        self._refusing = 0  # refusal tasks running

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock = await self._accept(listener)
                    await self._admit(Channel(sock), nursery)
        finally:
            listener.close()
            unlink_if_ours(self.path, self._ino)

    async def _accept(self, listener: trio.socket.SocketType) -> trio.socket.SocketType:
        """The next connection. accept() errors (EMFILE when a tenant has used up the fds, and
        the like) are waited out with a growing pause: the clients already attached keep their
        functions, and whoever is waiting in the backlog gets in once fds are free again."""
        backoff = ACCEPT_BACKOFF_MIN
        failures = 0
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                failures += 1
                self.accept_errors_total += 1
                if failures == 1:
                    log.warning("function %s: accept failed (%s); retrying until it works",
                                self.name, exc, extra={"function": self.name})
                await trio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            if failures:
                log.warning("function %s: accepting again after %d failed attempts",
                            self.name, failures, extra={"function": self.name})
            return sock

    async def _admit(self, channel: Channel, nursery: trio.Nursery) -> None:
        """Start a session for a new connection, or refuse it.

        Who is asking comes first: a peer that may not use the function is told EPERM whether
        or not the function is in use, so a stranger cannot learn that it is.
        """
        try:
            peer = channel.peer()
        except OSError:
            channel.close()  # gone before we could ask who it was
            return
        if not self.access.admits(peer.uid):
            log.warning(
                "function %s: refused pid %d uid %d (not in allowed_uids)",
                self.name, peer.pid, peer.uid,
                extra={"function": self.name, "client": peer.pid, "uid": peer.uid},
            )
            self._refuse(channel, nursery, errno.EPERM)
            return
        try:
            busy = self.session is not None and not await self._previous_client_gone()
        except BaseException:  # cancelled while waiting: the daemon is stopping
            channel.close()
            raise
        if busy:
            self._refuse(channel, nursery, errno.EBUSY)
            return
        try:
            session = self._session_factory(self.function, channel, self.name, peer)
        except Exception as exc:
            # e.g. no room for the client's accounting: this client only is turned away
            log.exception("function %s: cannot start a session for pid %d",
                          self.name, peer.pid, extra={"function": self.name})
            self._refuse(channel, nursery, getattr(exc, "errno", None) or errno.EIO)
            return
        self.session = session
        self._free = trio.Event()
        nursery.start_soon(self._run_session, session)

    def _refuse(self, channel: Channel, nursery: trio.Nursery, err: int) -> None:
        """Tell a connection ``err`` in the background, or, with MAX_REFUSALS already under
        way, just close it (the peer sees EOF instead of an errno)."""
        self.refused_total += 1
        if self._refusing >= MAX_REFUSALS:
            channel.close()
            return
        self._refusing += 1
        nursery.start_soon(self._run_refusal, channel, err)

    async def _run_refusal(self, channel: Channel, err: int) -> None:
        try:
            await refuse(channel, self.name, err)
        finally:
            self._refusing -= 1

    async def _previous_client_gone(self) -> bool:
        """True once the function is free for a new connection that found a session.

        A live peer keeps its function (the newcomer is told EBUSY). A peer that has hung up is
        gone even if its session has not read the EOF yet: wait (bounded) for that session to
        close, so the next client finds the function reset, as after any detach.
        """
        session = self.session
        assert session is not None
        if not session.channel.peer_gone():
            return False
        log.debug("function %s: previous client hung up; waiting for its session to end",
                  self.name, extra=session.log_context)
        with trio.move_on_after(HANDOVER_GRACE):
            await self._free.wait()
        return self.session is None

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
            self._free.set()
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
