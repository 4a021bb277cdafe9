from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nvme_helpers import Host

from vfiod.devices.nvme import NvmeController

NS_BYTES = 4 << 20  # 8192 LBAs of 512 bytes


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return tmp_path / "disk.img"


@pytest.fixture
def ctrl(disk: Path, request: pytest.FixtureRequest) -> Iterator[NvmeController]:
    """MSI (the default); parametrize indirectly with True for the MSI-X layout."""
    c = NvmeController(disk, NS_BYTES, io_queues=4, msix=getattr(request, "param", False))
    yield c
    c.close()


@pytest.fixture
def host(ctrl: NvmeController) -> Host:
    h = Host(ctrl)
    h.enable()
    return h


@pytest.fixture
def ioq(host: Host) -> Host:
    """Enabled controller with I/O queue pair 1 (64 entries, vector 1)."""
    host.create_io_queue(1)
    return host
