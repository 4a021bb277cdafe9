"""Session-level fuzzer: hostile vfio-user clients against a live daemon's sockets.

It speaks only bytes and fds over the sockets, never to session internals, so it keeps fuzzing
whatever implementation the session has (the pure-Python dispatch or a C fast path). Every
message is random but shaped like the protocol often enough to get past the framing: all
commands (and unknown ones), random flags including the reply and error bits, bodies that are
well formed, mutated or junk, sizes that lie, fds of every kind (memfds, eventfds, pipes,
directories, sockets including the connection itself) on any message and in any number, sends
cut into pieces, pipelined bursts, reconnects, hang-ups half-way through a message and
intruders on a function that is in use.

Meanwhile a bystander (a separate process, as another tenant would be) keeps doing checked
work on another function: register round trips and DMA through its own guest memory. At the
end the daemon's fds, locked memory and RSS are compared with before the fuzz, and its log is
searched for session failures (a bug hit by a client is logged with a traceback).

    python tests/hostile/session_fuzz.py --messages 1000000 --json out.json
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):  # run as a script: the repository root for vfiod and bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_proc import DaemonProc  # noqa: E402

from vfiod import client  # noqa: E402
from vfiod.client import from_little, little  # noqa: E402
from vfiod.devices import testdev as td  # noqa: E402

# vfio-user is host-endian on the wire ("=": native order, standard sizes).
HDR = struct.Struct("=HHIII")
REPLY, NO_REPLY, ERROR = 0x1, 0x10, 0x20
PAGE = 4096
#: Commands a client may send, and the ones it may not (server requests, unsupported, unknown).
CLIENT_COMMANDS = (1, 2, 3, 4, 5, 7, 8, 9, 10, 13, 15, 16)
OTHER_COMMANDS = (0, 6, 11, 12, 14, 17, 18, 19, 20, 0x7FFF, 0xFFFF)
#: testdev region indexes: BARs 0-5, ROM 6, config 7, VGA 8; 9+ do not exist.
REGIONS = (0, 0, 0, 2, 4, 7, 7, 7, 1, 3, 5, 6, 8, 9, 200)
REG_OFFSETS = (0x0, 0x4, 0x8, 0xC, 0x10, 0x14, 0x18, 0x20, 0x28, 0x30, 0x34, 0x38, 0x3C, 0x40)


@dataclass
class FuzzStats:
    messages: int = 0  # sent (the report's `messages` counts those the daemon handled)
    bytes: int = 0
    fds_sent: int = 0
    connections: int = 0
    closed_by_daemon: int = 0
    hang_ups_mid_message: int = 0
    drain_timeouts: int = 0  # a half-closed connection the daemon never finished: a hang
    stalled: bool = False  # the daemon stopped handling messages for a minute
    replies: int = 0
    error_replies: int = 0
    bad_replies: int = 0  # replies that break the framing rules: a daemon bug
    bad_reply_examples: list[str] = field(default_factory=list)
    answered: dict[str, int] = field(default_factory=dict)  # "command:ok" / "command:errno"
    intruders: int = 0
    intruders_admitted: int = 0  # a second client let in on a busy function: a daemon bug


class FdPool:
    """fds of many kinds to attach to messages; each send passes copies, ours stay open."""

    def __init__(self, tmp: Path) -> None:
        self.memfds = []
        for size in (64 << 10, 1 << 20, 4 << 20):
            fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.memfds.append((fd, size))
        self.eventfds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(4)]
        r, w = os.pipe()
        a, b = socket.socketpair()
        self._sockets = (a, b)
        ro = tmp / "read-only"
        ro.write_bytes(b"\0" * PAGE)
        self.others = [
            r, w,
            os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC),
            os.open(str(tmp), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
            os.open(str(ro), os.O_RDONLY | os.O_CLOEXEC),
            os.open(str(ro), os.O_PATH | os.O_CLOEXEC),
            a.fileno(),
        ]

    def any(self, rng: random.Random) -> int:
        k = rng.random()
        if k < 0.4:
            return rng.choice(self.memfds)[0]
        if k < 0.75:
            return rng.choice(self.eventfds)
        return rng.choice(self.others)

    def close(self) -> None:
        for fd, _ in self.memfds:
            os.close(fd)
        for fd in self.eventfds + self.others[:-1]:
            os.close(fd)
        for s in self._sockets:
            s.close()


class Generator:
    """One random message at a time: (bytes, fds to attach)."""

    def __init__(self, rng: random.Random, pool: FdPool) -> None:
        self.rng = rng
        self.pool = pool
        self.sock_fd = -1  # the connection's own fd, sent over itself now and then
        self.sent_self = False
        self.queue: list[tuple[int, bytes, list[int]]] = []  # (command, body, fds) to come
        self.mapped: list[tuple[int, int]] = [(0x40000000, PAGE)]  # iovas we tried to map

    def dma_program(self) -> None:
        """Queue the writes that make testdev DMA: bus master on, source, destination, length
        and a command, mostly at addresses this connection mapped (or unmapped since, or
        never): the DMA paths, faults and EEH freezes of the session's DMA space."""
        r = self.rng

        def address() -> int:
            if r.random() < 0.8:
                iova, size = r.choice(self.mapped)
                return iova + r.randrange(0, size)
            return self.iova()

        def write(region: int, offset: int, value: int, size: int) -> None:
            body = struct.pack("=QII", offset, region, size) + little(value, size)
            self.queue.append((10, body, []))

        write(7, 0x04, r.choice([0x6, 0x6, 0x2, 0x0]), 2)
        write(0, td.REG_DMA_SRC, address(), 8)
        write(0, td.REG_DMA_DST, address(), 8)
        write(0, td.REG_DMA_LEN, r.choice([1, 64, 4096, 65536, r.getrandbits(20)]), 4)
        write(0, td.REG_DMA_PATTERN, r.getrandbits(32), 4)
        write(0, td.REG_DMA_CMD, r.choice([1, 2, 3, 3, 4, 4, 0, 9]), 4)
        self.queue.append((9, struct.pack("=QII", td.REG_DMA_STATUS, 0, 4), []))

    def version_body(self) -> bytes:
        r = self.rng
        k = r.random()
        if k < 0.7:
            caps: Any = {"capabilities": {"max_msg_fds": r.choice([0, 1, 16, 253, 1 << 20]),
                                          "max_data_xfer_size": r.choice([0, 4096, 1 << 20,
                                                                          1 << 40]),
                                          "migration": {"pgsize": 4096,
                                                        "max_bitmap_size": 1 << 28}}}
            if r.random() < 0.2:
                caps = {"capabilities": r.choice([[], "x", 7, None, {"max_msg_fds": "lots"}])}
            text = json.dumps(caps).encode() + b"\0"
        elif k < 0.85:
            text = b"{" * r.randint(0, 64)
        else:
            text = r.randbytes(r.randint(0, 200))
        return struct.pack("=HH", r.choice([0, 0, 0, 1, 0xFFFF]), r.choice([0, 0, 1, 9])) + text

    def iova(self) -> int:
        r = self.rng
        if r.random() < 0.85:
            return r.randrange(0, 1 << 36, PAGE)
        return r.getrandbits(64)

    def dma_map(self) -> tuple[bytes, list[int]]:
        r = self.rng
        fds: list[int] = []
        if r.random() < 0.7:
            fd, size = r.choice(self.pool.memfds)
            offset = r.randrange(0, size, PAGE)
            length = r.randrange(PAGE, size - offset + PAGE, PAGE)
            fds.append(fd)
            iova = self.iova()
            self.mapped.append((iova, length))
            if len(self.mapped) > 64:
                del self.mapped[1:33]
            flags = r.choice([1, 2, 3, 3, 3, 0, r.getrandbits(32)])
            return struct.pack("=IIQQQ", 32, flags, offset, iova, length), fds
        else:
            offset = r.choice([0, PAGE, r.getrandbits(64)])
            length = r.choice([PAGE, 1 << 20, r.getrandbits(64), 0])
            if r.random() < 0.5:
                fds.append(self.pool.any(r))
        if r.random() < 0.1:
            length = r.getrandbits(32)
        flags = r.choice([1, 2, 3, 3, 3, 0, r.getrandbits(32)])
        return struct.pack("=IIQQQ", 32, flags, offset, self.iova(), length), fds

    def region_access(self, write: bool) -> bytes:
        r = self.rng
        region = r.choice(REGIONS)
        if region == 0:
            offset = r.choice(REG_OFFSETS) if r.random() < 0.8 else r.randrange(0, 0x2000)
        elif region == 7:
            offset = r.randrange(0, 0x1100)
        else:
            offset = r.choice([0, r.randrange(0, 0x20000), r.getrandbits(64)])
        count = r.choice([1, 2, 4, 4, 4, 8, 3, 0, r.randrange(0, 4097)])
        if r.random() < 0.01:
            count = r.choice([1 << 20, (1 << 20) + 1, 0xFFFFFFFF])
        head = struct.pack("=QII", offset, region, count)
        if not write:
            return head
        if region == 0 and offset == td.REG_DMA_CMD and count == 4:
            data = little(r.choice([1, 2, 3, 4, 0, 99]), 4)  # start the DMA engine
        else:
            data = r.randbytes(min(count, 4096))
        return head + data

    def set_irqs(self) -> tuple[bytes, list[int]]:
        r = self.rng
        data = r.choice([1, 2, 4, 4, 4, 0, 7])
        action = r.choice([8, 16, 32, 32, 32, 0, 24])
        count = r.choice([0, 1, 2, 8, r.randrange(0, 40)])
        nfds = min(count, r.choice([0, 1, 2, 8])) if data == 4 else r.choice([0, 0, 1])
        fds = [r.choice(self.pool.eventfds) if r.random() < 0.9 else self.pool.any(r)
               for _ in range(nfds)]
        index = r.choice([0, 1, 2, 2, 2, 3, 4, 5, 9])
        start = r.choice([0, 0, 1, 7, r.getrandbits(32)])
        return struct.pack("=IIIII", 20, data | action, index, start, count), fds

    def write_multi(self) -> bytes:
        r = self.rng
        n = r.choice([0, 1, 2, 5, 65, r.getrandbits(64)])
        entries = b"".join(
            struct.pack("=QII", r.choice(REG_OFFSETS), r.choice([0, 7, 9]),
                        r.choice([1, 2, 4, 8, 9])) + r.randbytes(8)
            for _ in range(min(n, 8) if n < 100 else r.randrange(0, 4))
        )
        return struct.pack("=Q", n) + entries

    def body(self, command: int) -> tuple[bytes, list[int]]:
        r = self.rng
        if command == 1:
            return self.version_body(), []
        if command == 2:
            return self.dma_map()
        if command == 3:
            flags = r.choice([0, 0, 0, 2, 1, 4])
            iova, size = (0, 0) if flags == 2 and r.random() < 0.7 else (
                self.iova(), r.choice([PAGE, 1 << 20, r.getrandbits(40) & ~0xFFF]))
            return struct.pack("=IIQQ", 24, flags, iova, size), []
        if command in (4, 7):
            tail = (0, 0) if command == 4 else (r.choice([0, 1, 2, 3, 4, 5, 9]), 0)
            return struct.pack("=IIII", 16, 0, *tail), []
        if command == 5:
            argsz = r.choice([32, 32, 64, 256, 1024, 16, 0, 1 << 20])
            return struct.pack("=IIIIQQ", argsz, 0, r.choice(REGIONS), 0, 0, 0), []
        if command == 8:
            return self.set_irqs()
        if command in (9, 10, 11, 12):
            return self.region_access(command in (10, 12)), []
        if command == 13:
            return b"", []
        if command == 15:
            return self.write_multi(), []
        if command == 16:
            return struct.pack("=II", r.choice([8, 16, 24]), r.getrandbits(32)) + r.randbytes(
                r.choice([0, 8, 16])), []
        return r.randbytes(r.choice([0, 4, 16, 32, 100])), []

    def message(self, msg_id: int, wild: bool = True) -> tuple[bytes, list[int]]:
        """A random message. A tame one never ends the session (no reply bit, an honest size,
        no more fds than a receive has room for), so sessions live long enough to reach deep
        states; a wild one may."""
        r = self.rng
        if not self.queue and r.random() < 0.01:
            self.dma_program()
        if self.queue:
            command, body, fds = self.queue.pop(0)
            return HDR.pack(msg_id, command, 16 + len(body), 0, 0) + body, fds
        k = r.random()
        if k < 0.9:
            command = r.choice(CLIENT_COMMANDS)
        elif k < 0.97:
            command = r.choice(OTHER_COMMANDS)
        else:
            command = r.getrandbits(16)
        body, fds = self.body(command)
        if r.random() < 0.04:  # mutate a well-formed body
            b = bytearray(body)
            for _ in range(r.randint(1, 4)):
                if b and r.random() < 0.6:
                    b[r.randrange(len(b))] = r.getrandbits(8)
                elif r.random() < 0.5:
                    del b[r.randrange(len(b) + 1):]
                else:
                    b += r.randbytes(r.randint(1, 16))
            body = bytes(b)
        f = r.random()
        if f < 0.85:
            flags = 0
        elif f < 0.93:
            flags = NO_REPLY
        elif f < 0.95:
            flags = ERROR | r.choice([0, NO_REPLY])
        elif f < 0.97:
            flags = r.randrange(2, 16) | r.choice([0, NO_REPLY, ERROR])
        elif f < 0.98:
            flags = r.getrandbits(32) & ~0xF | r.choice([0, 2, 7, 15])
        elif wild and f < 0.99:
            flags = REPLY | r.choice([0, ERROR, NO_REPLY])
        else:
            flags = r.getrandbits(32) if wild else 0
        size = 16 + len(body)
        if wild and r.random() < 0.01:  # a lying size: the stream goes out of step or breaks
            size = r.choice([0, 8, 15, size - 1, size + 1, size + r.randint(2, 64),
                             (1 << 20) + 4096, r.getrandbits(32)])
        error = 0 if r.random() < 0.97 else r.getrandbits(32)
        k = r.random()
        if k < 0.02:
            fds = fds + [self.pool.any(r) for _ in range(r.randint(1, 3))]
        elif k < 0.022:
            fds = [self.pool.any(r) for _ in range(r.randint(17, 30))]  # over max_msg_fds
        elif k < 0.0225 and wild:
            fds = [self.pool.any(r) for _ in range(r.randint(65, 120))]  # over the kernel room
        elif k < 0.0235 and self.sock_fd >= 0:
            fds = fds + [self.sock_fd]  # the connection, sent over itself
            self.sent_self = True
        return HDR.pack(msg_id, command, size & 0xFFFFFFFF, flags, error) + body, fds


class Worker:
    """One hostile client at a time on one function, reconnecting until the fuzz has had enough."""

    def __init__(self, path: Path, busy_path: Path, rng: random.Random, pool: FdPool,
                 stats: FuzzStats, enough: trio.Event) -> None:
        self.path = path
        self.busy_path = busy_path  # a function another tenant holds: intruders must be refused
        self.rng = rng
        self.gen = Generator(rng, pool)
        self.stats = stats
        self.enough = enough  # set once the daemon has handled the messages asked for

    async def run(self) -> None:
        while not self.enough.is_set():
            if self.rng.random() < 0.03:
                await self.intrude()
            await self.connection()

    async def connection(self) -> None:
        r = self.rng
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(str(self.path))
        except OSError:
            sock.close()
            await trio.sleep(0.01)
            return
        self.stats.connections += 1
        self.gen.sock_fd = sock.fileno()
        self.gen.sent_self = False
        wild = r.random() < 0.15
        n = int(r.expovariate(1 / 1500)) + 1
        end = r.random()
        try:
            async with trio.open_nursery() as nursery:
                done = trio.Event()
                nursery.start_soon(self.read, sock, done)
                try:
                    if r.random() < 0.95:
                        await self.send(sock, self.version(), [])
                    await self.messages(sock, n, wild)
                    if self.gen.sent_self:
                        # Our socket is in flight to the daemon: hanging up now would leave it
                        # alive there (and the function taken) for as long as we live.
                        end = 1.0
                    if end < 0.05:  # hang up half-way through a message
                        data, fds = self.gen.message(0)
                        await self.send(sock, data[: r.randrange(1, max(2, len(data)))], fds)
                        self.stats.hang_ups_mid_message += 1
                    elif end < 0.15:  # hang up with requests unanswered
                        pass
                    else:
                        if end < 0.2:  # something fatal last
                            await self.send(sock, HDR.pack(1, 4, 16, REPLY, 0), [])
                        sock.shutdown(socket.SHUT_WR)  # read what is left, then EOF
                        with trio.move_on_after(60) as waited:
                            await done.wait()
                        if waited.cancelled_caught:
                            self.stats.drain_timeouts += 1
                except (BrokenPipeError, ConnectionResetError):
                    self.stats.closed_by_daemon += 1
                nursery.cancel_scope.cancel()
        finally:
            self.gen.sock_fd = -1
            sock.close()

    def version(self) -> bytes:
        caps = json.dumps({"capabilities": {"max_msg_fds": 16,
                                            "max_data_xfer_size": 1 << 20}}).encode() + b"\0"
        body = struct.pack("=HH", 0, 0) + caps
        return HDR.pack(0, 1, 16 + len(body), 0, 0) + body

    async def messages(self, sock: trio.socket.SocketType, n: int, wild: bool) -> None:
        r = self.rng
        batch: list[bytes] = []
        for _ in range(n):
            if self.enough.is_set():
                break
            data, fds = self.gen.message(r.getrandbits(16), wild)
            self.stats.messages += 1
            if fds:
                if batch:
                    await self.send(sock, b"".join(batch), [])
                    batch = []
                await self.send(sock, data, fds)
            else:
                batch.append(data)
                if len(batch) >= r.choice([1, 1, 4, 32]):
                    await self.send(sock, b"".join(batch), [])
                    batch = []
        if batch:
            await self.send(sock, b"".join(batch), [])

    async def send(self, sock: trio.socket.SocketType, data: bytes, fds: list[int]) -> None:
        r = self.rng
        self.stats.bytes += len(data)
        self.stats.fds_sent += len(fds)
        view = memoryview(data)
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            n = await sock.sendmsg([view[: r.choice([len(view), 1, 16, 17])] or view[:1]], anc)
            view = view[n:]
        while view:
            cut = len(view) if r.random() < 0.95 else r.randint(1, len(view))
            n = await sock.send(view[:cut])
            view = view[n:]
            if cut < len(view) + n:
                await trio.sleep(0)  # a partial send: let the daemon see the piece

    async def read(self, sock: trio.socket.SocketType, done: trio.Event) -> None:
        """Take every reply off the socket (the daemon must never block on us), close the fds
        that come with them, and check the framing of what the daemon says."""
        buf = b""
        room = socket.CMSG_SPACE(64 * 4)
        try:
            while True:
                data, anc, _, _ = await sock.recvmsg(1 << 20, room)
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                            os.close(fd)
                if not data:
                    break
                buf += data
                while len(buf) >= 16:
                    msg_id, command, size, flags, error = HDR.unpack_from(buf)
                    problem = None
                    if size < 16 or size > (1 << 20) + 4096:
                        problem = f"reply size {size}"
                    elif flags & 0xF != REPLY or flags & ~(0xF | ERROR):
                        problem = f"reply flags {flags:#x}"
                    elif flags & ERROR and (size != 16 or error == 0):
                        problem = f"error reply size {size} errno {error}"
                    if problem is not None:
                        self.bad_reply(f"{problem} (id {msg_id}, command {command})")
                        return
                    if len(buf) < size:
                        break
                    self.stats.replies += 1
                    self.stats.error_replies += bool(flags & ERROR)
                    name = str(command) if command <= 20 else "other"
                    key = f"{name}:{error if flags & ERROR else 'ok'}"
                    self.stats.answered[key] = self.stats.answered.get(key, 0) + 1
                    buf = buf[size:]
        except OSError:
            pass
        finally:
            done.set()

    def bad_reply(self, what: str) -> None:
        self.stats.bad_replies += 1
        if len(self.stats.bad_reply_examples) < 10:
            self.stats.bad_reply_examples.append(what)

    async def intrude(self) -> None:
        """Knock on a function someone else holds: the answer must be EBUSY (or, with the
        refusals at their bound, a plain close), never a VERSION reply."""
        self.stats.intruders += 1
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(str(self.busy_path))
            await sock.send(self.version())
            with trio.move_on_after(5):
                head = b""
                while len(head) < 16:
                    chunk = await sock.recv(16 - len(head))
                    if not chunk:
                        return
                    head += chunk
                _, _, _, flags, _ = HDR.unpack(head)
                if not flags & ERROR:
                    self.stats.intruders_admitted += 1
        except OSError:
            pass
        finally:
            sock.close()


# -- the bystander (another tenant, in a process of its own) -----------------------------------

async def bystander(path: Path, out: Path) -> None:
    """Checked work until SIGTERM: scratch register round trips and DMA copies through our own
    guest memory; the tally goes to ``out`` as JSON."""
    tally: dict[str, Any] = {"ops": 0, "dma_ops": 0, "errors": [], "max_latency_s": 0.0}
    rng = random.Random(1)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop)
            try:
                async with client.connect(path) as dev:
                    ram = dev.guest_memory(1 << 20)
                    await dev.dma_map_memory(ram, iova=0x40000000)
                    cmd = from_little(await dev.config_read(0x04, 2))
                    await dev.config_write(0x04, little(cmd | 0x6, 2))
                    out.write_text("ready")
                    while True:
                        t0 = time.monotonic()
                        value = rng.getrandbits(32)
                        await dev.region_write(0, td.REG_SCRATCH, little(value, 4))
                        got = from_little(await dev.region_read(0, td.REG_SCRATCH, 4))
                        if got != value:
                            tally["errors"].append(f"scratch {got:#x} != {value:#x}")
                        if tally["ops"] % 8 == 0:
                            payload = rng.randbytes(64)
                            ram.write(0x1000, payload)
                            for reg, val, size in [(td.REG_DMA_SRC, 0x40001000, 8),
                                                   (td.REG_DMA_DST, 0x40080000, 8),
                                                   (td.REG_DMA_LEN, 64, 4),
                                                   (td.REG_DMA_CMD, td.CMD_HOST_TO_HOST, 4)]:
                                await dev.region_write(0, reg, little(val, size))
                            status = from_little(await dev.region_read(0, td.REG_DMA_STATUS, 4))
                            if status != td.STATUS_DONE or ram.read(0x80000, 64) != payload:
                                tally["errors"].append(f"DMA status {status:#x}")
                            tally["dma_ops"] += 1
                        tally["ops"] += 1
                        tally["max_latency_s"] = max(tally["max_latency_s"],
                                                     time.monotonic() - t0)
            except Exception as exc:  # reported, not hidden: any error fails the fuzz
                tally["errors"].append(f"{type(exc).__name__}: {exc}")
                nursery.cancel_scope.cancel()
    out.write_text(json.dumps(tally))


# -- the run ----------------------------------------------------------------------------------

@dataclass
class FuzzReport:
    messages: int
    seed: int
    workers: int
    wall_s: float
    daemon_cpu_s: float
    crashes: int
    crash_lines: list[str]
    daemon_alive: bool
    exit_status: int | None
    fds_before: int
    fds_after: int
    leaked_fds: int
    fd_kinds_after: dict[str, int]
    rss_before: int
    rss_peak_seen: int
    rss_after: int
    memlock_before: list[dict[str, Any]]
    memlock_after: list[dict[str, Any]]
    bystander: dict[str, Any]
    stats: dict[str, Any]
    daemon_counters: dict[str, float]

    def problems(self, rss_slack: int) -> list[str]:
        out = []
        if self.crashes:
            out.append(f"{self.crashes} session failures: {self.crash_lines[:3]}")
        if not self.daemon_alive or self.exit_status not in (0, None):
            out.append(f"daemon died or exited {self.exit_status}")
        if self.leaked_fds:
            out.append(f"{self.leaked_fds} fds leaked: {self.fd_kinds_after}")
        if self.memlock_after != self.memlock_before:
            out.append(f"locked memory {self.memlock_before} -> {self.memlock_after}")
        if self.rss_after - self.rss_before > rss_slack:
            out.append(f"RSS grew {self.rss_before} -> {self.rss_after}")
        if self.bystander.get("errors") or not self.bystander.get("ops"):
            out.append(f"bystander: {self.bystander}")
        if self.stats["bad_replies"]:
            out.append(f"malformed replies: {self.stats['bad_reply_examples']}")
        if self.stats["stalled"]:
            out.append("the daemon stopped handling messages for a minute")
        if self.stats["drain_timeouts"]:
            out.append(f"{self.stats['drain_timeouts']} connections never drained")
        if self.stats["intruders_admitted"]:
            out.append(f"{self.stats['intruders_admitted']} intruders admitted")
        return out


def _memlock_view(accounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(({k: a.get(k) for k in ("pid", "locked_bytes", "functions")}
                   for a in accounts), key=lambda a: str(a.get("pid")))


async def fuzz(directory: Path, messages: int, seed: int, workers: int = 2,
               progress: Callable[[str], None] | None = None) -> FuzzReport:
    names = [f"fuzz{i}" for i in range(workers)]
    daemon = DaemonProc(directory, {n: {} for n in [*names, "bystander"]}, log_level="WARNING")
    tally = directory / "bystander.json"
    by = None
    pool = FdPool(directory)
    try:
        daemon.wait_ready()
        by = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--bystander", str(daemon.sock("bystander")),
             "--tally", str(tally)])
        with trio.fail_after(60):
            while not tally.exists():
                await trio.sleep(0.05)
        await trio.sleep(0.2)
        fds_before, rss_before = daemon.fds(), daemon.rss()
        memlock_before = _memlock_view(daemon.memlock())
        stats = FuzzStats()
        rss_peak = rss_before
        t0 = time.monotonic()
        cpu0 = daemon.cpu_seconds()
        enough = trio.Event()

        def handled() -> int:
            return sum(int(daemon.metric("vfiod_function_messages_total", n)) for n in names)

        async with trio.open_nursery() as nursery:
            for i, name in enumerate(names):
                w = Worker(daemon.sock(name), daemon.sock("bystander"),
                           random.Random(seed * 1000 + i), pool, stats, enough)
                nursery.start_soon(w.run)
            last, last_change = -1, time.monotonic()
            while not enough.is_set():
                await trio.sleep(0.5)
                rss_peak = max(rss_peak, daemon.rss())
                done = handled()
                if done != last:
                    last, last_change = done, time.monotonic()
                elif time.monotonic() - last_change > 60:
                    stats.stalled = True
                    enough.set()
                if progress is not None:
                    progress(f"{done} messages handled ({stats.messages} sent), "
                             f"{stats.connections} connections, daemon fds {daemon.fds()}, "
                             f"RSS {daemon.rss() >> 20} MiB")
                if done >= messages or not daemon.alive():
                    enough.set()
        wall = time.monotonic() - t0
        alive = daemon.alive()
        total = handled() if alive else stats.messages
        # every fuzz connection is closed: the daemon must come back to where it was
        with trio.move_on_after(15):
            while alive and daemon.fds() != fds_before:
                await trio.sleep(0.05)
        fds_after = daemon.fds() if alive else -1
        kinds = daemon.fd_kinds() if alive else {}
        rss_after = daemon.rss() if alive else -1
        memlock_after = _memlock_view(daemon.memlock()) if alive else []
        cpu = daemon.cpu_seconds() - cpu0 if alive else -1.0
        counters = {
            m: sum(daemon.metric(f"vfiod_{m}", n) for n in names) if alive else -1.0
            for m in ("function_sessions_total", "function_refused_total",
                      "function_errors_total", "function_dma_maps_total",
                      "function_dma_unmaps_total", "pe_freezes_total",
                      "pe_dma_faults_total")
        }
        by.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await by.wait()
        by_tally = json.loads(tally.read_text())
        status = daemon.stop()
        log = daemon.log()
        crash_lines = [line for line in log.splitlines()
                       if "session failed" in line or "Traceback" in line]
        return FuzzReport(
            messages=total, seed=seed, workers=workers, wall_s=round(wall, 2),
            daemon_cpu_s=round(cpu, 2), crashes=len(crash_lines) + (0 if alive else 1),
            crash_lines=crash_lines[:20], daemon_alive=alive, exit_status=status,
            fds_before=fds_before, fds_after=fds_after, leaked_fds=fds_after - fds_before,
            fd_kinds_after=kinds, rss_before=rss_before, rss_peak_seen=rss_peak,
            rss_after=rss_after, memlock_before=memlock_before, memlock_after=memlock_after,
            bystander=by_tally, stats=asdict(stats), daemon_counters=counters,
        )
    finally:
        pool.close()
        if by is not None and by.returncode is None:
            by.kill()
        daemon.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--workers", type=int, default=2, help="fuzzed functions (one client each)")
    p.add_argument("--rss-slack", type=int, default=16 << 20,
                   help="RSS growth allowed after the fuzz (allocator slack), bytes")
    p.add_argument("--json", type=Path, help="write the report (with machine info) here")
    p.add_argument("--bystander", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tally", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.bystander is not None:
        trio.run(bystander, a.bystander, a.tally)
        return 0
    with tempfile.TemporaryDirectory(prefix="vfiod-fuzz-") as tmp:
        report = trio.run(fuzz, Path(tmp), a.messages, a.seed, a.workers,
                          lambda s: print(s, file=sys.stderr, flush=True))
    problems = report.problems(a.rss_slack)
    result = {"fuzz": asdict(report), "problems": problems}
    if a.json is not None:
        from bench.machine import machine_info

        result["machine"] = machine_info()
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in asdict(report).items()
               if k in ("messages", "seed", "wall_s", "daemon_cpu_s", "crashes", "leaked_fds",
                        "rss_before", "rss_after")}
    print(json.dumps(summary))
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
