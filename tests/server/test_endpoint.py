"""Who gets a function: the next client as soon as the previous one is gone, never a second one
while the first is alive."""

from __future__ import annotations

import errno
import os
import struct
import sys
from pathlib import Path

import pytest
import trio
from raw_peer import Raw, msg

from vfiod import client, transport
from vfiod.client import VfioUserError, from_little, little
from vfiod.devices import testdev as td
from vfiod.pci.function import PciFunction
from vfiod.server import endpoint as endpoint_module
from vfiod.server.endpoint import Endpoint
from vfiod.server.session import Session
from vfiod.sockets import SocketAccess
from vfiod.transport import Channel, Peer


async def test_a_client_that_reconnects_at_once_is_always_accepted(endpoint: Endpoint) -> None:
    for i in range(200):
        # no pause between close and connect: the new connection usually reaches the accept
        # loop before the old session has read the EOF
        async with client.connect(endpoint.path) as dev:
            await dev.region_write(0, td.REG_SCRATCH, little(i, 4))
            assert from_little(await dev.region_read(0, td.REG_SCRATCH, 4)) == i
    assert endpoint.refused_total == 0
    assert endpoint.sessions_total == 200


async def test_the_next_client_finds_the_function_reset_even_when_it_came_at_once(
    endpoint: Endpoint,
) -> None:
    for _ in range(50):
        async with client.connect(endpoint.path) as dev:
            # the previous client left the scratch register set; the reset cleared it
            assert from_little(await dev.region_read(0, td.REG_SCRATCH, 4)) == 0
            await dev.region_write(0, td.REG_SCRATCH, little(0xABCD, 4))
    assert endpoint.refused_total == 0


async def test_a_client_that_hangs_up_with_requests_unanswered_is_replaced(
    endpoint: Endpoint,
) -> None:
    burst = b"".join(msg(i, 9, struct.pack("=QII", 0, 7, 4)) for i in range(1, 40))
    for _ in range(50):
        raw = await Raw.open(endpoint.path)
        await raw.send(burst)  # pipelined reads, then gone before any reply is read
        raw.close()
        async with client.connect(endpoint.path) as dev:
            assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
    assert endpoint.refused_total == 0


async def test_a_live_client_keeps_its_function(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as first:
        await first.region_write(0, td.REG_SCRATCH, little(0x1234, 4))
        for _ in range(20):
            with pytest.raises(VfioUserError) as info:
                async with client.connect(endpoint.path):
                    pass
            assert info.value.errno == errno.EBUSY
        assert from_little(await first.region_read(0, td.REG_SCRATCH, 4)) == 0x1234
    assert endpoint.refused_total == 20


class _StuckSession(Session):
    """A session that never notices its peer left (a stand-in for a wedged cleanup)."""

    async def run(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.channel.close()


async def test_a_session_that_does_not_end_is_waited_for_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoint_module, "HANDOVER_GRACE", 0.2)

    def stuck(function: PciFunction, channel: Channel, name: str, peer: Peer) -> Session:
        return _StuckSession(function, channel, name, peer=peer)

    ep = Endpoint("s", tmp_path / "s.sock", td.TestDevice(), session_factory=stuck)
    async with trio.open_nursery() as nursery:
        await nursery.start(ep.serve)
        first = await Channel.connect(ep.path)
        first.close()
        with trio.fail_after(5):
            while ep.session is None:
                await trio.sleep(0.01)
        with pytest.raises(VfioUserError) as info:
            async with client.connect(ep.path):
                pass
        assert info.value.errno == errno.EBUSY
        nursery.cancel_scope.cancel()
    ep.function.close()


async def test_a_stranger_is_told_eperm_even_when_the_function_is_busy(
    endpoint: Endpoint,
) -> None:
    async with client.connect(endpoint.path) as first:
        # allowed_uids changed (a reload) while a client is attached: we are now a stranger
        endpoint.access = SocketAccess(allowed_uids=frozenset({os.geteuid() + 1}))
        with pytest.raises(VfioUserError) as info:
            async with client.connect(endpoint.path):
                pass
        assert info.value.errno == errno.EPERM  # not EBUSY: in use is none of its business
        assert from_little(await first.config_read(0, 2)) == td.TEST_VENDOR_ID


WEDGE = r"""
import array, json, socket, struct, sys
HDR = struct.Struct("=HHIII")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
caps = json.dumps({"capabilities": {"max_msg_fds": 16}}).encode() + b"\0"
body = struct.pack("=HH", 0, 0) + caps
s.sendall(HDR.pack(0, 1, 16 + len(body), 0, 0) + body)
# 4 KiB config reads whose replies we never read: the daemon ends up waiting to send
reads = b"".join(HDR.pack(i, 9, 32, 0, 0) + struct.pack("=QII", 0, 7, 4096) for i in range(400))
s.settimeout(3)
try:
    s.sendall(reads)
except OSError:
    pass
# our own socket, in flight behind them: it outlives this process
anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]).tobytes())]
s.sendmsg([HDR.pack(1, 13, 16, 0, 0)], anc)
"""


async def test_a_function_wedged_by_a_tenant_that_exited_comes_free(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tenant's socket lives on in the daemon's unread receive queue, so the daemon never
    sees EOF, and its replies fill a buffer nobody reads: once the process is gone, the stalled
    send notices and the session ends."""
    monkeypatch.setattr(transport, "SEND_STALL_CHECK", 0.3)
    await trio.run_process([sys.executable, "-c", WEDGE, str(endpoint.path)])
    with trio.fail_after(10):
        while True:
            try:
                async with client.connect(endpoint.path) as dev:
                    assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
                    break
            except VfioUserError as exc:
                assert exc.errno == errno.EBUSY
                await trio.sleep(0.1)
