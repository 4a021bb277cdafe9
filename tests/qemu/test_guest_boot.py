"""Smoke test of the real-QEMU harness (vfiod.qemu): boot the x86_64 guest, run a script."""

from __future__ import annotations

import pytest

from vfiod.qemu import (
    PCI_DUMP,
    GuestImage,
    QemuNotProvisioned,
    guest_image,
    parse_console,
    parse_pci_dump,
    qemu_binary,
    run_guest,
    section,
)


@pytest.fixture
def x86_image() -> GuestImage:
    """The provisioned x86_64 image; a clear failure (never a skip) when it is missing."""
    try:
        qemu_binary("x86_64")
        return guest_image("x86_64")
    except QemuNotProvisioned as e:
        missing = str(e)
    pytest.fail(missing, pytrace=False)


def test_parse_console() -> None:
    text = (
        "[    1.0] kernel noise\n@@VFIOD a=1 b=two\nnoise @@VFIOD exit=3\r\n"
        "@@BEGIN sec one\nx: 1\n\n@@END sec one\n@@BEGIN empty\n@@END empty\n"
    )
    markers, lines, sections = parse_console(text.replace("\r", ""))
    assert markers == {"a": "1", "b": "two", "exit": "3"}
    assert lines == ["a=1 b=two", "exit=3"]
    assert sections == {"sec one": "x: 1\n\n", "empty": ""}


@pytest.mark.qemu
async def test_x86_guest_boots_and_runs_script(x86_image: GuestImage) -> None:
    img = x86_image
    script = (
        'echo "@@VFIOD hello=world"\n'
        'echo "@@VFIOD uname=$(uname -r)"\n'
        + section("cmdline", "cat /proc/cmdline")
        + PCI_DUMP
    )
    res = await run_guest("x86_64", script, [], memory_mb=512, timeout=300)
    res.check()
    assert res.returncode == 0, res.tail()
    assert res.markers["hello"] == "world"
    assert res.markers["uname"] == img.kernel_release
    assert res.markers["kernel"] == img.kernel_release
    # /init loaded the image's modules (nvme and its dependencies) without error.
    assert "nvme" in img.modules
    assert res.markers["modules"] == ",".join(img.modules), res.tail()
    assert "console=ttyS0" in res.sections["cmdline"]

    devices = parse_pci_dump(res)
    host_bridge = devices["0000:00:00.0"]
    assert (host_bridge.vendor, host_bridge.device) == (0x8086, 0x29C0)  # q35 MCH
    assert host_bridge.class_code == 0x060000
    assert len(host_bridge.config) >= 256
    ahci = devices["0000:00:1f.2"]  # ICH9 AHCI: BAR5 assigned, MSI capability
    assert ahci.class_code >> 8 == 0x0106
    assert ahci.bar_size(5) > 0
    assert ahci.capability(0x05) is not None
    assert not ahci.has_msix
