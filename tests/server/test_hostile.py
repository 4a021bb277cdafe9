"""Hostile peers: raw bytes on a live socket. Each gets an error reply or, where the stream
cannot be resynchronised, a closed connection; the daemon keeps serving everyone else and
leaks no fd."""

from __future__ import annotations

import errno
import os
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raw_peer import HDR, NO_REPLY, REPLY, Raw, msg, open_fd_count, still_serves

from vfiod import client
from vfiod.client import from_little
from vfiod.devices import testdev as td
from vfiod.server.endpoint import Endpoint


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
