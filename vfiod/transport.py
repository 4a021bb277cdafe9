"""trio UNIX-socket I/O with SCM_RIGHTS, shared by the server and the client.

The protocol layer is sans-I/O; this module is the only place that moves its bytes and file
descriptors over a socket. Sends are serialised with a lock so that a message and its fds are
never interleaved with another task's message.

Per-message cost matters here (a pseries guest makes one synchronous round trip per 4 KiB TCE),
so both directions talk to the non-blocking stdlib socket under the trio socket directly:

* receive() sleeps in ``wait_readable`` *first* and then calls recvmsg_into once: trio's own
  recvmsg tries first, which for a request/reply peer nearly always costs a failed syscall and
  a BlockingIOError before it sleeps anyway. It reads into one preallocated buffer instead of
  allocating RECV_CHUNK bytes per call. ``wait_readable`` is its checkpoint (one per chunk).
* send() writes at once when the lock is free and the socket takes the bytes, without trio's
  scheduler round trip after the syscall; only a send that would block (or finds the lock
  held) goes through trio. It honours cancellation but is not a scheduling point: callers
  alternate sends with receives, which are.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import trio

#: Bytes asked for per recvmsg; a whole REGION_WRITE of max_data_xfer_size arrives in a few calls.
RECV_CHUNK = 256 * 1024
#: A send that makes no progress for this long checks that the peer process still exists.
SEND_STALL_CHECK = 5.0
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
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag's & runs Python code
#: poll() bits that mean the other end is gone (an AF_UNIX stream raises POLLHUP once the
#: peer's socket is released, which closes both directions).
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


class Channel:
    """One connected vfio-user stream socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._send_lock = trio.Lock()
        self.fds_truncated = False
        # The stdlib socket trio wraps (already non-blocking); trio has no public accessor.
        # Without it (another trio), everything goes through the trio socket's methods.
        raw = getattr(sock, "_sock", None)
        self._raw: socket.socket | None = raw if isinstance(raw, socket.socket) else None
        self._rbuf = bytearray(RECV_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._ancsize = socket.CMSG_SPACE(RECV_MAX_FDS * 4)

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
        raw = self._raw
        if raw is None:
            data, ancdata, msg_flags, _ = await self.sock.recvmsg(
                RECV_CHUNK, self._ancsize, socket.MSG_CMSG_CLOEXEC
            )
        else:
            if raw.fileno() < 0:
                raise OSError(errno.EBADF, "receive on a closed channel")
            while True:
                await trio.lowlevel.wait_readable(raw)
                try:
                    n, ancdata, msg_flags, _ = raw.recvmsg_into(
                        [self._rview], self._ancsize, socket.MSG_CMSG_CLOEXEC
                    )
                except BlockingIOError:  # woken spuriously: sleep again
                    continue
                break
            data = bytes(self._rview[:n]) if n else b""
        fds = _fds_from_ancdata(ancdata) if ancdata else []
        if msg_flags & _MSG_CTRUNC:
            # The kernel dropped (and closed) what did not fit: remember it so the caller can
            # treat the stream as hostile.
            self.fds_truncated = True
        return data, fds

    def peer_gone(self) -> bool:
        """Whether the peer has closed its end for good (its socket is released: a hang-up is
        pending on ours), whatever data it left unread. A peer that only shut down its writing
        half is still there: it may read our replies."""
        fd = self.sock.fileno()
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return any(ev & _GONE for _, ev in poller.poll(0))

    async def wait_readable(self) -> None:
        """Sleep until a receive() would not block (data, EOF or an error is pending)."""
        await trio.lowlevel.wait_readable(self.sock if self._raw is None else self._raw)

    async def wait_writable(self) -> None:
        """Sleep until the socket has room for more bytes; BrokenPipeError if the peer process
        is gone meanwhile (see ``_wait_writable``)."""
        await self._wait_writable()

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one whole message (or several, concatenated); fds travel with the first byte."""
        raw = self._raw
        if raw is not None:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                self._send_lock.acquire_nowait()
            except trio.WouldBlock:
                pass
            else:
                try:
                    try:
                        if fds:
                            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", fds).tobytes())]
                            sent = raw.sendmsg([data], anc)
                        else:
                            sent = raw.send(data)
                    except BlockingIOError:
                        sent = -1  # nothing went: the trio path below does it all
                    if sent == len(data):
                        return
                    if sent >= 0:  # partial: the fds went with the first part
                        await self._send_all(memoryview(data)[sent:], ())
                    else:
                        await self._send_all(memoryview(data), fds)
                finally:
                    self._send_lock.release()
                return
        async with self._send_lock:
            await self._send_all(memoryview(data), fds)

    async def _send_all(self, view: memoryview, fds: Sequence[int]) -> None:
        """The trio path (lock held): fds with the first sendmsg, the rest as it drains."""
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            await self._wait_writable()
            sent = await self.sock.sendmsg([view], anc)
            view = view[sent:]
        while view:
            await self._wait_writable()
            sent = await self.sock.send(view)
            view = view[sent:]

    async def _wait_writable(self) -> None:
        """Sleep until the socket takes bytes again; fail if the peer process has gone.

        A socket can outlive its process: a peer that sends its own end over the connection
        and exits leaves that end alive in our receive queue, which we do not read while we
        wait for it to read our replies. Nothing would ever end that wait.
        """
        while True:
            with trio.move_on_after(SEND_STALL_CHECK):
                await trio.lowlevel.wait_writable(self.sock if self._raw is None else self._raw)
                return
            if self._peer_process_gone():
                raise BrokenPipeError(
                    errno.EPIPE, "the peer process is gone; its socket lives on only in flight"
                )

    def _peer_process_gone(self) -> bool:
        try:
            pid = self.peer().pid
        except OSError:
            return True
        if pid <= 0:
            return False  # in a pid namespace we cannot see: no way to tell
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # it exists (another user's)
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False

    def close(self) -> None:
        self.sock.close()


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (what VFIO, too, insists on for interrupts).

    Anything else kept as an interrupt fd could pin what the peer meant to let go: its own
    connection passed back to us would keep that connection from ever reaching EOF, and its
    function held for good. All anonymous inodes share one inode, so fstat() cannot tell an
    eventfd from an epoll or io_uring fd; the /proc link can.
    """
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        pass
    try:  # no /proc: at least an anonymous inode (no socket, pipe or file)
        return stat.S_IFMT(os.fstat(fd).st_mode) == 0
    except OSError:
        return False


def close_fds(fds: Sequence[int]) -> None:
    """Close fds we own, ignoring ones already gone (we never want a close to raise here)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
