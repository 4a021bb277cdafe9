"""Stopping the daemon flushes every namespace, acknowledged with FUA/Flush or not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vfiod.devices.nvme import NvmeController


def test_close_flushes_the_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    ctrl = NvmeController(tmp_path / "ns.img", 1 << 20)
    fd = ctrl.store.fd
    ctrl.close()
    assert synced == [fd]
    ctrl.close()  # twice is harmless
    assert synced == [fd]
