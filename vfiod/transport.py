"""trio UNIX-socket I/O with SCM_RIGHTS, shared by the server and the client.

The protocol layer is sans-I/O; this module is the only place that moves its bytes and file
descriptors over a socket. Sends are serialised with a lock so that a message and its fds are
never interleaved with another task's message.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import trio

#: Bytes asked for per recvmsg; a whole REGION_WRITE of max_data_xfer_size arrives in a few calls.
RECV_CHUNK = 256 * 1024
#: Ancillary room for this many fds per recvmsg. More than any legal message carries, so a
#: peer that sends too many is seen (and refused) instead of silently truncated.
RECV_MAX_FDS = 64


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, from the kernel (SO_PEERCRED), not from anything it said."""

    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("3i")


class Channel:
    """One connected vfio-user stream socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._send_lock = trio.Lock()
        self.fds_truncated = False

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> Channel:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def peer(self) -> Peer:
        pid, uid, gid = _UCRED.unpack(
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        return Peer(pid, uid, gid)

    async def receive(self) -> tuple[bytes, list[int]]:
        """Receive one chunk and the fds that came with it; ``b""`` means EOF."""
        data, ancdata, msg_flags, _ = await self.sock.recvmsg(
            RECV_CHUNK,
            socket.CMSG_SPACE(RECV_MAX_FDS * 4),
            socket.MSG_CMSG_CLOEXEC,
        )
        fds = _fds_from_ancdata(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            # The kernel dropped (and closed) what did not fit: remember it so the caller can
            # treat the stream as hostile.
            self.fds_truncated = True
        return data, fds

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one whole message; its fds travel with its first bytes."""
        view = memoryview(data)
        async with self._send_lock:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = await self.sock.sendmsg([view], anc)
                view = view[sent:]
            while view:
                sent = await self.sock.send(view)
                view = view[sent:]

    def close(self) -> None:
        self.sock.close()


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds


def close_fds(fds: Sequence[int]) -> None:
    """Close fds we own, ignoring ones already gone (we never want a close to raise here)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
