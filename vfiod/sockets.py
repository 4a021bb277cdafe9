"""Listening UNIX sockets with the right owner and mode from the first moment they exist.

A socket is bound under a temporary name, given its mode and owner, then renamed into place,
so it is never reachable at its real path with the umask's permissions (guest A's QEMU user
must not be able to open guest B's VF even for an instant). A live socket of another process
is never taken over; a stale one (its daemon died) is replaced.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import trio


async def bind_listener(
    path: Path,
    *,
    mode: int = 0o600,
    uid: int = -1,
    gid: int = -1,
    backlog: int = 16,
) -> tuple[trio.socket.SocketType, int]:
    """Listen on ``path``; returns the socket and its inode (see ``unlink_if_ours``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    await _check_not_served(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    unlink_quietly(tmp)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(tmp))
        if uid != -1 or gid != -1:
            os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        ino = path.stat().st_ino
        sock.listen(backlog)
    except BaseException:
        sock.close()
        unlink_quietly(tmp)
        raise
    return sock, ino


def unlink_if_ours(path: Path, ino: int | None) -> None:
    """Remove the socket file, unless another daemon has replaced it since."""
    try:
        if ino is not None and path.stat().st_ino == ino:
            path.unlink()
    except FileNotFoundError:
        pass


async def _check_not_served(path: Path) -> None:
    """Refuse to take over a path that is not a socket, or a socket a live process serves."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: replaced by the rename in bind_listener
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is served by another process")


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class SocketAccess:
    """Who may open a function's socket: file owner/group/mode, and optionally an allow-list
    of peer uids checked with SO_PEERCRED on every connection."""

    mode: int = 0o600
    uid: int = -1  # -1: the daemon's own
    gid: int = -1
    allowed_uids: frozenset[int] | None = None  # None: whoever the file mode lets in

    def admits(self, uid: int) -> bool:
        return self.allowed_uids is None or uid in self.allowed_uids
