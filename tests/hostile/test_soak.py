"""A short soak in CI: QEMUs SIGKILLed mid-I/O on one NVMe VF while a guest on the other VF
does checked I/O (`make soak` does it 100 times and records the figures)."""

from __future__ import annotations

from pathlib import Path

import pytest
from soak import soak

from vfiod.qemu import QemuNotProvisioned, guest_image


@pytest.mark.qemu
async def test_qemus_killed_mid_io_leave_nothing_behind(tmp_path: Path) -> None:
    try:
        guest_image("x86_64")
    except QemuNotProvisioned as exc:
        pytest.fail(str(exc), pytrace=False)
    report = await soak(tmp_path, kills=3, bystander_seconds=20)
    summary = report.summary()
    assert report.problems == [], summary
    assert report.kills == 3
    assert report.final == {**report.final, "fds": report.baseline["fds"],
                            "locked_bytes": report.baseline["locked_bytes"]}, summary
    assert summary["bystander_rounds"] > 0 and summary["bystander_bad"] == 0, summary
    # every kill: the dead QEMU's session and account were gone within seconds
    assert all(s.released_s < 10 for s in report.samples), summary
