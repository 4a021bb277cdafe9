"""The control socket: a trio server speaking ``vfiod.control.wire`` to a ``ControlTarget``.

Security model: the socket file is created mode 0600 (owner: the daemon's euid, root in
production) and, independently of the file mode, every connection's peer credentials
(SO_PEERCRED) are checked against ``allowed_uids`` (default: root and the daemon's own euid).
A refused peer gets one ``EPERM`` reply and is closed; the refusal is logged with its uid/pid.

A control client can only hurt itself: each connection is one task with bounded buffers
(``MAX_REQUEST_LINE``), an idle timeout, a send timeout and a cap on concurrent connections;
protocol errors close only that connection, and an exception escaping the target becomes an
``EIO`` reply (logged), never a daemon crash.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vfiod.sockets import bind_listener, unlink_if_ours

from .api import ControlError, ControlTarget
from .wire import (
    MAX_REQUEST_LINE,
    LineSplitter,
    Request,
    WireError,
    decode_request,
    encode_error,
    encode_ok,
)

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


def peer_credentials(sock: Any) -> Peer:
    """SO_PEERCRED of a connected AF_UNIX socket (the credentials at connect time)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


async def dispatch(target: ControlTarget, req: Request) -> Any:
    """Call the target for a validated request; returns the JSON-able result."""
    a = req.args
    result: Any
    if req.op == "inventory":
        result = target.inventory()
    elif req.op == "set_numvfs":
        result = target.set_numvfs(a["pf"], a["numvfs"])
    elif req.op == "pe_info":
        if "function" in a:
            phb, pe = await _resolve_function(target, a["function"])
        else:
            phb, pe = a["phb"], a["pe"]
        result = target.pe_info(phb, pe)
    elif req.op == "eeh":
        extra = {k: v for k, v in a.items() if k not in ("target", "op")}
        result = target.eeh(a["target"], a["op"], **extra)
    elif req.op == "memlock":
        result = target.memlock()
    elif req.op == "metrics":
        result = target.metrics()
    else:  # wire.OPS and this function disagree: a bug, not the peer's fault
        raise ControlError("EINVAL", f"op {req.op!r} is not implemented")
    if inspect.isawaitable(result):
        result = await result
    expected = {"inventory": dict, "memlock": list, "metrics": str}.get(req.op, dict)
    if not isinstance(result, expected):
        raise TypeError(f"{req.op} returned {type(result).__name__}, not {expected.__name__}")
    return result


async def _resolve_function(target: ControlTarget, name: str) -> tuple[int, int]:
    inv = target.inventory()
    if inspect.isawaitable(inv):
        inv = await inv
    for fn in inv.get("functions", []):
        if fn.get("name") == name:
            phb, pe = fn.get("phb"), fn.get("pe")
            if not isinstance(phb, int) or not isinstance(pe, int):
                raise ControlError("ENOENT", f"function {name} has no PE")
            return phb, pe
    raise ControlError("ENOENT", f"no function {name}")


class ControlServer:
    """One listening control socket and its connections."""

    def __init__(
        self,
        target: ControlTarget,
        path: Path,
        *,
        allowed_uids: Iterable[int] | None = None,
        mode: int = 0o600,
        max_connections: int = 32,
        idle_timeout: float = 300.0,
        send_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.path = Path(path)
        self.allowed_uids = frozenset(
            allowed_uids if allowed_uids is not None else {0, os.geteuid()}
        )
        self.mode = mode
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.connections = 0
        self.connections_total = 0
        self.refused_total = 0
        self.requests_total = 0
        self.errors_total = 0
        self._ino: int | None = None

    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        listener = await self._bind()
        log.info("control socket %s (uids %s)", self.path, sorted(self.allowed_uids))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as exc:  # EMFILE and friends: back off, keep serving
                        log.warning("control socket %s: accept failed: %s", self.path, exc)
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._connection, sock)
        finally:
            listener.close()
            self._unlink_own()

    # -- socket file --

    async def _bind(self) -> trio.socket.SocketType:
        sock, self._ino = await bind_listener(self.path, mode=self.mode)
        return sock

    def _unlink_own(self) -> None:
        unlink_if_ours(self.path, self._ino)

    # -- connections --

    async def _send(self, stream: trio.SocketStream, data: bytes) -> None:
        with trio.fail_after(self.send_timeout):
            await stream.send_all(data)

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        try:
            async with stream:
                await self._serve_peer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass  # the peer went away or stopped reading: only its own connection ends
        except Exception:
            log.exception("control socket %s: connection failed", self.path)

    async def _serve_peer(self, stream: trio.SocketStream) -> None:
        try:
            peer = peer_credentials(stream.socket)
        except OSError as exc:
            log.warning("control socket %s: no peer credentials (%s); closing", self.path, exc)
            return
        if peer.uid not in self.allowed_uids:
            self.refused_total += 1
            log.warning("control socket %s: refused %s (not an allowed uid)", self.path, peer)
            await self._send(
                stream,
                encode_error(None, "EPERM", f"uid {peer.uid} may not control this daemon"),
            )
            return
        if self.connections >= self.max_connections:
            self.refused_total += 1
            log.warning("control socket %s: refused %s (too many connections)", self.path, peer)
            await self._send(stream, encode_error(None, "EBUSY", "too many control connections"))
            return
        self.connections += 1
        self.connections_total += 1
        log.debug("control: %s connected", peer)
        try:
            await self._requests(stream, peer)
        finally:
            self.connections -= 1

    async def _requests(self, stream: trio.SocketStream, peer: Peer) -> None:
        splitter = LineSplitter(MAX_REQUEST_LINE)
        while True:
            with trio.move_on_after(self.idle_timeout) as idle:
                data = await stream.receive_some(MAX_REQUEST_LINE)
            if idle.cancelled_caught:
                log.info("control: %s idle for %ss; closing", peer, self.idle_timeout)
                return
            if not data:
                return
            try:
                lines = splitter.feed(data)
            except WireError as exc:
                self.errors_total += 1
                log.warning("control: %s: %s; closing", peer, exc.message)
                await self._send(stream, encode_error(None, exc.code, exc.message))
                return
            for line in lines:
                reply, close = await self._request(line, peer)
                await self._send(stream, reply)
                if close:
                    return

    async def _request(self, line: bytes, peer: Peer) -> tuple[bytes, bool]:
        """One request line -> (reply line, close the connection after it)."""
        self.requests_total += 1
        try:
            req = decode_request(line)
        except WireError as exc:
            self.errors_total += 1
            if exc.fatal:
                log.warning("control: %s: %s; closing", peer, exc.message)
            return encode_error(exc.id, exc.code, exc.message), exc.fatal
        try:
            result = await dispatch(self.target, req)
            return encode_ok(req.id, result), False
        except ControlError as exc:
            self.errors_total += 1
            return encode_error(req.id, exc.code, exc.message), False
        except Exception:
            self.errors_total += 1
            log.exception("control: %s: %s failed", peer, req.op)
            return encode_error(req.id, "EIO", f"internal error in {req.op} (see the log)"), False


async def serve_control(
    target: ControlTarget,
    path: Path,
    *,
    allowed_uids: Iterable[int] | None = None,
    mode: int = 0o600,
    max_connections: int = 32,
    idle_timeout: float = 300.0,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API of ``target`` on ``path`` until cancelled (removes the socket).

    ``await nursery.start(serve_control, target, path)`` returns once the socket accepts.
    """
    server = ControlServer(
        target,
        path,
        allowed_uids=allowed_uids,
        mode=mode,
        max_connections=max_connections,
        idle_timeout=idle_timeout,
    )
    await server.serve(task_status=task_status)


