"""Hostile peers: raw bytes on a live socket. Each gets an error reply or, where the stream
cannot be resynchronised, a closed connection; the daemon keeps serving everyone else and
leaks no fd."""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiod import client
from vfiod.client import from_little
from vfiod.devices import testdev as td
from vfiod.server.endpoint import Endpoint

# vfio-user is host-endian on the wire ("=": native order, standard sizes); PCI config space
# and device registers stay little-endian (from_little, to_bytes(..., "little")).
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


async def test_each_recoverable_mistake_gets_its_errno(endpoint: Endpoint) -> None:
    raw = await Raw.open(endpoint.path)
    cases = [
        (msg(1, 99), errno.ENOSYS),  # unknown command
        (msg(2, 9, struct.pack("=QII", 0, 0, 4) + b"xx"), errno.EINVAL),  # size disagrees
        (msg(3, 9, struct.pack("=QII", 0, 30, 4)), errno.EINVAL),  # no such region
        (msg(4, 9, struct.pack("=QII", 1 << 40, 0, 4)), errno.EINVAL),  # offset out of range
        (msg(5, 9, struct.pack("=QII", 0, 0, 2 << 20)), errno.E2BIG),  # over max_data_xfer
        (msg(6, 4, struct.pack("=IIII", 4, 0, 0, 0)), errno.EINVAL),  # argsz too small
        (msg(7, 1, struct.pack("=HH", 0, 0) + b"{}\0"), errno.EINVAL),  # VERSION again
    ]
    for data, want in cases:
        await raw.send(data)
        msg_id = HDR.unpack(data[:16])[0]
        assert await raw.expect_error(msg_id) == want, msg_id
    # a reply where a request was expected: the peer is out of step, the session ends
    await raw.send(msg(8, 4, flags=REPLY))
    await raw.expect_eof()
    raw.close()
    await still_serves(endpoint)


async def test_fds_on_a_command_that_takes_none_are_refused_and_closed(endpoint: Endpoint) -> None:
    raw = await Raw.open(endpoint.path)
    r, w = os.pipe()
    before = open_fd_count()
    await raw.send(msg(1, 9, struct.pack("=QII", 0, 7, 4)), [r, w])
    assert await raw.expect_error(1) == errno.EINVAL
    os.close(r)
    os.close(w)
    # the daemon's copies are closed: writing to the pipe now fails (no reader left anywhere)
    raw.close()
    await still_serves(endpoint)
    assert open_fd_count() <= before


async def test_too_many_fds_are_refused(endpoint: Endpoint) -> None:
    raw = await Raw.open(endpoint.path)
    fds = [os.eventfd(0) for _ in range(20)]
    body = struct.pack("=IIIII", 20, 4 | 32, 2, 0, 20)
    await raw.send(msg(1, 8, body), fds)
    assert await raw.expect_error(1) == errno.EINVAL
    for fd in fds:
        os.close(fd)
    raw.close()
    await still_serves(endpoint)


async def test_posted_write_errors_are_not_answered(endpoint: Endpoint) -> None:
    raw = await Raw.open(endpoint.path)
    await raw.send(msg(1, 10, struct.pack("=QII", 0, 42, 4) + b"abcd", flags=NO_REPLY))
    await raw.send(msg(2, 9, struct.pack("=QII", 0, 7, 2)))
    with trio.fail_after(5):
        mid, _, size, flags, _ = await raw.header()
    assert mid == 2 and flags == REPLY  # the answer to 2 comes first: 1 was never answered
    await raw.read(size - 16)
    raw.close()


async def test_unsynchronisable_streams_are_closed(endpoint: Endpoint) -> None:
    for bad in [msg(1, 9, size=8), msg(1, 10, size=64 << 20)]:
        raw = await Raw.open(endpoint.path)
        await raw.send(bad)
        await raw.expect_eof()
        raw.close()
        await still_serves(endpoint)


async def test_other_clients_keep_working_while_one_misbehaves(
    two_endpoints: tuple[Endpoint, Endpoint],
) -> None:
    a, b = two_endpoints
    async with client.connect(b.path) as good:
        raw = await Raw.open(a.path)
        await raw.send(b"\xff" * 4096)
        await raw.expect_eof()
        raw.close()
        for i in range(10):
            await good.region_write(0, td.REG_SCRATCH, i.to_bytes(4, "little"))
            assert from_little(await good.region_read(0, td.REG_SCRATCH, 4)) == i


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(junk=st.binary(min_size=1, max_size=2048), negotiate=st.booleans())
def test_random_bytes_never_take_the_daemon_down(
    tmp_path_factory: pytest.TempPathFactory, junk: bytes, negotiate: bool
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.sock"

    async def main() -> None:
        ep = Endpoint("f", path, td.TestDevice())
        async with trio.open_nursery() as nursery:
            await nursery.start(ep.serve)
            raw = await Raw.open(path, negotiate=negotiate)
            try:
                await raw.send(junk)
            except OSError:
                pass
            with trio.move_on_after(0.2):
                try:
                    while await raw.sock.recv(65536):
                        pass
                except OSError:
                    pass
            raw.close()
            await still_serves(ep)
            nursery.cancel_scope.cancel()
        ep.function.close()

    trio.run(main)
