from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from vfiod.devices.testdev import TestDevice
from vfiod.server.endpoint import Endpoint


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[Endpoint]:
    """A test device served on its own socket inside the test's nursery."""
    ep = Endpoint("t0", tmp_path / "t0.sock", TestDevice())
    async with trio.open_nursery() as nursery:
        await nursery.start(ep.serve)
        yield ep
        nursery.cancel_scope.cancel()
    ep.function.close()


@pytest.fixture
async def two_endpoints(tmp_path: Path) -> AsyncIterator[tuple[Endpoint, Endpoint]]:
    eps = (
        Endpoint("a", tmp_path / "a.sock", TestDevice()),
        Endpoint("b", tmp_path / "b.sock", TestDevice()),
    )
    async with trio.open_nursery() as nursery:
        for ep in eps:
            await nursery.start(ep.serve)
        yield eps
        nursery.cancel_scope.cancel()
    for ep in eps:
        ep.function.close()
