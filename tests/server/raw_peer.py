"""A raw vfio-user peer for hostile tests: it says in bytes what no well-behaved client would."""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys

import trio

from vfiod import client
from vfiod.client import from_little
from vfiod.devices import testdev as td
from vfiod.protocol import Request
from vfiod.protocol.codec import Codec
from vfiod.server.endpoint import Endpoint

# vfio-user is host-endian on the wire ("=": native order, standard sizes).
HDR = struct.Struct("=HHIII")
REQUEST, REPLY, NO_REPLY, ERROR = 0, 1, 0x10, 0x20


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def msg(
    msg_id: int, command: int, body: bytes = b"", flags: int = REQUEST, size: int | None = None
) -> bytes:
    return HDR.pack(msg_id, command, 16 + len(body) if size is None else size, flags, 0) + body


def version_msg(msg_id: int = 0) -> bytes:
    caps = json.dumps({"capabilities": {"max_msg_fds": 16}}).encode() + b"\0"
    return msg(msg_id, 1, struct.pack("=HH", 0, 0) + caps)


class Raw:
    """A bare socket speaking bytes, to say what no well-behaved client would."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    async def open(cls, path: os.PathLike[str], negotiate: bool = True) -> Raw:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(os.fspath(path))
        raw = cls(sock)
        if negotiate:
            await raw.send(version_msg(0))
            hdr = await raw.header()
            assert hdr[3] & 0xF == REPLY and not hdr[3] & ERROR
            await raw.read(hdr[2] - 16)
        return raw

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            await self.sock.sendmsg([data], anc)
        else:
            await self._send_all(data)

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await self.sock.send(view)
            view = view[n:]

    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def header(self) -> tuple[int, int, int, int, int]:
        return HDR.unpack(await self.read(16))  # type: ignore[return-value]

    async def expect_error(self, msg_id: int) -> int:
        with trio.fail_after(5):
            mid, _, size, flags, err = await self.header()
        assert mid == msg_id and flags == REPLY | ERROR and size == 16, (mid, flags, size)
        return err

    async def expect_eof(self) -> None:
        with trio.fail_after(5):
            while True:
                chunk = await self.sock.recv(65536)
                if not chunk:
                    return

    def close(self) -> None:
        self.sock.close()


async def still_serves(ep: Endpoint) -> None:
    with trio.fail_after(5):
        while ep.session is not None:  # the broken session is being torn down
            await trio.sleep(0.01)
        async with client.connect(ep.path) as dev:
            assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
        while ep.session is not None:  # leave the function free for whoever comes next
            await trio.sleep(0.01)


_CODEC = Codec(sys.byteorder)  # vfio-user is host-endian


def encode(event: Request, msg_id: int, flags: int = REQUEST) -> bytes:
    """A well-formed request's bytes (its fds are not included: send them alongside)."""
    data, _ = _CODEC.encoders["request"][int(event.command)](event, msg_id, flags, 1 << 20, 16)
    return data
