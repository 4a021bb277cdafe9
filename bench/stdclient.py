"""A blocking vfio-user client on a plain stdlib socket (no trio, no vfiod imports), and the
server-side CPU meter, for measuring servers from the outside.

The same client drives the minimal responder (bench/responder.py) and the vfiod daemon in the
same run, so whatever the client itself costs is on both sides of every ratio. Requests are
packed once up front; a synchronous round trip is one send and (almost always) one recv, the
way QEMU's vCPU thread waits for a DMA_UNMAP reply with the global lock held. Pipelined
requests are sent from the calling thread while a second thread collects the replies, as
QEMU's iothread does for the DMA_MAPs of a memory transaction.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

HEADER = struct.Struct("=HHIII")  # msg_id, command, size, flags, error (host byte order)
VERSION, DMA_MAP, DMA_UNMAP, REGION_READ, REGION_WRITE = 1, 2, 3, 9, 10
FLAG_REPLY, FLAG_NO_REPLY, FLAG_ERROR = 0x1, 0x10, 0x20
_DMA_MAP_BODY = struct.Struct("=IIQQQ")  # argsz, flags, offset, iova, size
_DMA_UNMAP_BODY = struct.Struct("=IIQQ")  # argsz, flags, iova, size
_REGION_HEAD = struct.Struct("=QII")  # offset, region, count
#: What QEMU 11.1 offers (vfio-user.md §2.1).
QEMU_CAPS = (
    b'{"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096, '
    b'"max_dma_maps": 65535, "migration": {"pgsize": 4096, "max_bitmap_size": 268435456}, '
    b'"write_multiple": true}}\0'
)
PAGE = 4096


class ServerError(Exception):
    """The server answered a request with an error reply (or a reply we cannot match)."""


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """One process's CPU so far: user and system seconds (/proc/PID/stat, clock ticks) and the
    scheduler's nanosecond total over all its threads (/proc/PID/task/*/schedstat)."""

    user_s: float
    sys_s: float
    sched_ns: int
    voluntary_switches: int

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.user_s - other.user_s, self.sys_s - other.sys_s,
                         self.sched_ns - other.sched_ns,
                         self.voluntary_switches - other.voluntary_switches)

    def per_message(self, n: int) -> dict[str, float]:
        """CPU microseconds per message (total from schedstat; the user/sys split from stat)."""
        return {
            "cpu_us": self.sched_ns / 1e3 / n,
            "user_us": self.user_s * 1e6 / n,
            "sys_us": self.sys_s * 1e6 / n,
            "wakeups": self.voluntary_switches / n,
        }


def cpu_sample(pid: int) -> CpuSample:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = clock_ticks()
    user, system = int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime (fields 14, 15)
    sched = 0
    switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                sched += int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        switches += int(line.split()[1])
        except (OSError, ValueError):
            pass  # the thread ended meanwhile
    return CpuSample(user, system, sched, switches)


def _header(msg_id: int, command: int, size: int, flags: int = 0) -> bytes:
    return HEADER.pack(msg_id & 0xFFFF, command, size, flags, 0)


def dma_map_msg(msg_id: int, iova: int, size: int, offset: int, prot: int = 3) -> bytes:
    return _header(msg_id, DMA_MAP, 48) + _DMA_MAP_BODY.pack(32, prot, offset, iova, size)


def dma_unmap_msg(msg_id: int, iova: int, size: int) -> bytes:
    return _header(msg_id, DMA_UNMAP, 40) + _DMA_UNMAP_BODY.pack(24, 0, iova, size)


def region_read_msg(msg_id: int, region: int, offset: int, count: int) -> bytes:
    return _header(msg_id, REGION_READ, 32) + _REGION_HEAD.pack(offset, region, count)


class StdClient:
    """One connection to a vfio-user server socket."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        # A blocking socket (Python polls before every call on a socket with a timeout); the
        # kernel's SO_RCVTIMEO/SO_SNDTIMEO still stop a hung server from hanging the bench.
        self.sock.settimeout(None)
        tv = struct.pack("=qq", int(timeout), 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)
        self._next_id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> StdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF
        return self._next_id

    def _reply(self) -> tuple[int, int, int, bytes]:
        """Read one whole reply: (msg_id, flags, error, body)."""
        view, recv_into = self._view, self.sock.recv_into
        got = 0
        while got < 16:
            n = recv_into(view[got:])
            if not n:
                raise ConnectionError("server closed the connection")
            got += n
        msg_id, _, size, flags, error = HEADER.unpack_from(self._buf)
        while got < size:
            n = recv_into(view[got:size])
            if not n:
                raise ConnectionError("server closed the connection")
            got += n
        if got != size:
            raise ServerError(f"{got - size} bytes beyond a {size}-byte reply (not pipelined)")
        return msg_id, flags, error, bytes(view[16:size])

    def call(self, message: bytes, fds: tuple[int, ...] = ()) -> bytes:
        """One synchronous request; returns the reply body, raises ServerError on an error."""
        if fds:
            self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", fds).tobytes())])
        else:
            self.sock.sendall(message)
        msg_id, flags, error, body = self._reply()
        if flags & FLAG_ERROR:
            raise ServerError(f"request {msg_id} failed: errno {error}")
        if msg_id != HEADER.unpack_from(message)[0]:
            raise ServerError(f"reply {msg_id} to request {HEADER.unpack_from(message)[0]}")
        return body

    def version(self) -> None:
        msg = struct.pack("=HH", 0, 0) + QEMU_CAPS
        self.call(_header(self._id(), VERSION, 16 + len(msg)) + msg)

    # -- workloads ---------------------------------------------------------------------------

    def region_read_round_trips(self, region: int, offset: int, n: int,
                                warmup: int = 200) -> list[float]:
        """n synchronous 4-byte REGION_READs; the wall time of each, in seconds."""
        msg = bytearray(region_read_msg(0, region, offset, 4))
        samples: list[float] = []
        send, reply, clock = self.sock.send, self._reply, time.perf_counter
        for i in range(n + warmup):
            struct.pack_into("=H", msg, 0, i & 0xFFFF)
            t0 = clock()
            send(msg)
            _, flags, _, body = reply()
            t1 = clock()
            if flags & FLAG_ERROR or len(body) != 16 + 4:
                raise ServerError(f"REGION_READ reply flags {flags:#x}, {len(body)} bytes")
            if i >= warmup:
                samples.append(t1 - t0)
        return samples

    def unmap_storm(self, n: int, iova: int = 0) -> float:
        """n synchronous 4 KiB DMA_UNMAPs of consecutive (never mapped) pages, one at a time,
        as a pseries guest clears its default window; returns the elapsed seconds."""
        msgs = [dma_unmap_msg(i, iova + (i % 262144) * PAGE, PAGE) for i in range(n)]
        send, reply = self.sock.send, self._reply
        t0 = time.perf_counter()
        for m in msgs:
            send(m)
            if reply()[1] & FLAG_ERROR:
                raise ServerError("DMA_UNMAP refused")
        return time.perf_counter() - t0

    def pipelined(self, messages: list[bytes], fd: int | None = None) -> float:
        """Send every message without waiting (each with ``fd`` attached, if given) while a
        thread reads the replies; returns the seconds from the first send to the last reply."""
        errors: list[str] = []
        expected = len(messages)

        def collect() -> None:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            have = 0
            seen = 0
            try:
                while seen < expected:
                    n = self.sock.recv_into(view[have:])
                    if not n:
                        errors.append("server closed the connection")
                        return
                    have += n
                    pos = 0
                    while have - pos >= 16:
                        _, _, size, flags, error = HEADER.unpack_from(buf, pos)
                        if have - pos < size:
                            break
                        if flags & FLAG_ERROR and not errors:
                            errors.append(f"error reply, errno {error}")
                        pos += size
                        seen += 1
                    buf[: have - pos] = buf[pos:have]
                    have -= pos
            except OSError as exc:
                errors.append(str(exc))

        reader = threading.Thread(target=collect, name="replies")
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
               if fd is not None else [])
        sendmsg = self.sock.sendmsg
        t0 = time.perf_counter()
        reader.start()
        for m in messages:
            sendmsg([m], anc)
        reader.join()
        elapsed = time.perf_counter() - t0
        if errors:
            raise ServerError(errors[0])
        return elapsed
