"""Real QEMU 11.1 attaches a vfiod function and a Linux guest enumerates it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vfiod import config
from vfiod.daemon import Daemon
from vfiod.devices import testdev as td
from vfiod.qemu import PCI_DUMP, QemuNotProvisioned, guest_image, parse_pci_dump, run_guest
from vfiod.spapr import PeDma

PCI_CAP_EXP = 0x10

# Find our function, enable it, and poke its registers through BAR0 with busybox devmem.
MMIO_PROBE = f"""
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = "0x{td.TEST_VENDOR_ID:04x}" ]; then
    echo 1 > $d/enable
    bar0=$(head -n 1 $d/resource | cut -d' ' -f1)
    echo "@@VFIOD id=$(devmem $(printf 0x%x $((bar0 + {td.REG_ID}))) 32)"
    devmem $(printf 0x%x $((bar0 + {td.REG_SCRATCH}))) 32 0x5A5A1234
    echo "@@VFIOD scratch=$(devmem $(printf 0x%x $((bar0 + {td.REG_SCRATCH}))) 32)"
  fi
done
"""


@pytest.fixture
def provisioned() -> None:
    try:
        guest_image("x86_64")
    except QemuNotProvisioned as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.mark.qemu
async def test_x86_guest_enumerates_a_vfiod_function(provisioned: None, tmp_path: Path) -> None:
    """The default configuration: a test function on a flat-window PHB, DMA through its PE."""
    cfg = config.load()
    daemon = Daemon(config.Config(tmp_path, cfg.functions, phbs=cfg.phbs))
    ep = daemon.endpoints[0]
    dma_views: list[object] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)

        async def watch() -> None:  # remember the session's DMA view while QEMU is attached
            while True:
                if ep.session is not None and ep.session.dma not in dma_views:
                    dma_views.append(ep.session.dma)
                await trio.sleep(0.05)

        nursery.start_soon(watch)
        res = await run_guest("x86_64", PCI_DUMP + MMIO_PROBE, [str(ep.path)], memory_mb=512,
                              timeout=300)
        nursery.cancel_scope.cancel()
    res.check()
    devices = parse_pci_dump(res)
    ours = [d for d in devices.values() if d.vendor == td.TEST_VENDOR_ID]
    assert len(ours) == 1, res.describe()
    dev = ours[0]
    assert dev.device == td.TEST_DEVICE_ID
    assert dev.class_code >> 8 == td.TEST_CLASS_CODE >> 8
    # BARs assigned by the guest, with the sizes the function reported
    assert dev.bar(td.REGS_BAR) and dev.bar_size(td.REGS_BAR) == td.REGS_SIZE
    assert dev.bar(td.BUFFER_BAR) and dev.bar_size(td.BUFFER_BAR) == td.BUFFER_SIZE
    assert dev.bar(td.MSIX_BAR) and dev.bar_size(td.MSIX_BAR) == td.MSIX_BAR_SIZE
    # the capability list the guest reads shows MSI-X (and PCI Express)
    assert dev.has_msix
    assert PCI_CAP_EXP in [cap_id for cap_id, _ in dev.capabilities()]
    # MMIO through the guest's own BAR mapping reaches the device's registers
    assert int(res.markers["id"], 16) == td.ID_VALUE, res.tail()
    assert int(res.markers["scratch"], 16) == 0x5A5A1234, res.tail()
    assert ep.sessions_total == 1
    # QEMU's DMA_MAPs of guest RAM became TCEs in the function's PE, and none was refused
    assert any(isinstance(v, PeDma) for v in dma_views)
    assert ep.errors_total == 0
    assert not daemon.host.clients  # the client's locked memory was released
