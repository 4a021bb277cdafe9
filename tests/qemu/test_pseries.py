"""A ppc64le pseries guest (TCG) drives a vfiod NVMe function through the PE's TCE windows.

QEMU 11.1 aborts when vfio-user-pci is on a pseries command line, so run_guest starts the
machine paused and adds the device over QMP in prelaunch (lab.md). The daemon's PHB uses the
"power8" window policy: the 32-bit window at 0 and the 64-bit window at 0x0800000000000000.

* DDW on (QEMU's default): the nvme driver asks for a dynamic DMA window, gets the 64-bit window
  and maps all guest RAM into it once (16 MiB TCEs), so I/O needs no further DMA_MAP.
* DDW off: the guest stays in its 32-bit window, every 4 KiB TCE it puts is one synchronous
  DMA_MAP (and one DMA_UNMAP when freed).

In both, the guest writes a pattern with O_DIRECT, reads it back, and the namespace's backing
file must hold exactly the pattern; the DDW run goes once with shadow doorbells (whose buffers
and EventIdx the controller reaches through the TCE windows like any DMA) and once without.
Most DMA_MAP/DMA_UNMAPs never reach Python (the session's C fast path does them on the PE's
tables), so the test looks at what they did: the session's DMA view is snapshotted when the
guest goes (its windows, every valid TCE, its counters), to check where the guest's mappings
landed. The summary line (pytest -s) has the counts, including the boot-time clear of the
guest's default window (262,144 4 KiB DMA_UNMAPs of never-mapped ranges, answered with
success).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from test_nvme_guests import check_doorbells

from vfiod import config
from vfiod.daemon import Daemon
from vfiod.devices.nvme import NvmeController
from vfiod.qemu import GuestResult, QemuNotProvisioned, guest_image, qemu_binary, run_guest
from vfiod.server.session import Session
from vfiod.spapr import PeDma

PATTERN_BYTES = 4 << 20
NS_SIZE = 64 << 20
MEMORY_MB = 1024
DMA64_START = 0x0800000000000000
GUEST_TIMEOUT = 600.0

GUEST_IO = r"""
dev=/dev/nvme0n1
[ -b $dev ] || { echo "@@VFIOD error=no-nvme-disk"; dmesg | tail -n 40; exit 1; }
direct=$(dmesg | sed -n 's/.*nvme .*direct mapping: \([01]\).*/\1/p' | tail -n 1)
echo "@@VFIOD direct=${direct:-none}"
echo "@@BEGIN dma"
dmesg | grep -E 'pe-dma-window|direct mapping' || true
echo "@@END dma"
cs() { tr -d . < /proc/uptime | cut -d' ' -f1; }  # guest uptime in centiseconds
t0=$(cs)
dd if=/pattern of=$dev bs=1M count=4 oflag=direct 2>/dev/null || echo "@@VFIOD error=write"
t1=$(cs)
dd if=$dev of=/back bs=1M count=4 iflag=direct 2>/dev/null || echo "@@VFIOD error=read"
t2=$(cs)
echo "@@VFIOD write_cs=$((t1 - t0)) read_cs=$((t2 - t1))"
echo "@@VFIOD wrote=$(md5sum < /pattern | cut -d' ' -f1) read=$(md5sum < /back | cut -d' ' -f1)"
echo "@@VFIOD msi=$(grep nvme /proc/interrupts | grep -c MSI)"
"""


@pytest.fixture
def provisioned() -> None:
    """QEMU and the ppc64le image (`make guest-images` builds it); a failure, never a skip."""
    try:
        qemu_binary("ppc64le")
        guest_image("ppc64le")
    except QemuNotProvisioned as exc:
        pytest.fail(str(exc), pytrace=False)


@dataclass
class DmaRecorder:
    """What the guest's DMA_MAP/DMA_UNMAPs did, read off the session's PeDma as it closes."""

    policies: set[str] = field(default_factory=set)
    maps: int = 0
    unmaps: int = 0
    fast_messages: int = 0
    window64: tuple[int, int] | None = None  # (start, size) of slot 1
    tces64: list[tuple[int, int]] = field(default_factory=list)  # (index, TCE) of slot 1
    file_vaddr: int | None = None  # host address of guest RAM's memfd
    tces32: int = 0  # valid TCEs left in the 32-bit window

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_close = PeDma.close
        rec = self

        def close(dma: PeDma) -> None:
            if not dma.closed:
                rec.policies.add(dma.policy)
                rec.maps += dma.maps_total
                rec.unmaps += dma.unmaps_total
                w1 = dma.window(1)
                if w1 is not None:
                    rec.window64 = (w1.start, w1.size)
                    rec.tces64 = list(w1.table.items())
                w0 = dma.window(0)
                rec.tces32 = w0.tces_in_use if w0 is not None else 0
                if dma.files:
                    rec.file_vaddr = dma.files[0].vaddr
            real_close(dma)

        monkeypatch.setattr(PeDma, "close", close)

    def summary(self) -> str:
        win = f"{self.window64[0]:#x}+{self.window64[1]:#x}" if self.window64 else "none"
        return (f"{self.maps} DMA_MAPs, {self.unmaps} DMA_UNMAPs ({self.fast_messages} "
                f"messages by the fast path); 64-bit window {win} with {len(self.tces64)} TCEs")


def power8_config(tmp_path: Path, shadow: bool = True) -> config.Config:
    text = (
        '[[phb]]\nindex = 0\nwindow_policy = "power8"\n'
        f'[[function]]\nname = "nvme0"\npersonality = "nvme"\n'
        f'backing = "{tmp_path / "nvme0.img"}"\nsize = "{NS_SIZE}"\n'
        f"shadow_doorbells = {str(shadow).lower()}\n"
    )
    parsed = config.parse(text, "test")
    return config.Config(tmp_path, parsed.functions, phbs=parsed.phbs)


async def run_pseries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra_args: list[str], label: str,
    shadow: bool = True,
) -> tuple[GuestResult, DmaRecorder]:  # fmt: skip
    """Boot the pseries guest on one nvme function, check the data end to end."""
    rec = DmaRecorder()
    rec.install(monkeypatch)
    daemon = Daemon(power8_config(tmp_path, shadow))
    ep = daemon.endpoints[0]
    real_run = Session.run

    async def run(session: Session) -> None:
        try:
            await real_run(session)
        finally:
            rec.fast_messages += session.fast_messages

    monkeypatch.setattr(Session, "run", run)
    pattern = os.urandom(PATTERN_BYTES)
    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        res = await run_guest(
            "ppc64le", GUEST_IO, [str(ep.path)], memory_mb=MEMORY_MB, timeout=GUEST_TIMEOUT,
            files={"/pattern": pattern}, extra_args=extra_args,
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    elapsed = time.monotonic() - t0
    print(f"\npseries {label}: guest {res.duration:.1f} s (test {elapsed:.1f} s); {rec.summary()}")
    dd = f"dd write {res.markers.get('write_cs')} cs, read {res.markers.get('read_cs')} cs"
    print(f"  {dd} (guest clock, {PATTERN_BYTES >> 20} MiB each)")

    res.check()
    assert "error" not in res.markers, res.tail()
    digest = hashlib.md5(pattern).hexdigest()
    assert res.markers["wrote"] == digest and res.markers["read"] == digest, res.tail()
    assert int(res.markers["msi"]) >= 1, "the nvme driver is not on MSI (pSeries-PCI-MSI)"
    data = (tmp_path / "nvme0.img").read_bytes()
    assert len(data) == NS_SIZE
    assert data[:PATTERN_BYTES] == pattern, "backing file differs from the guest's pattern"
    assert data[PATTERN_BYTES:].count(0) == NS_SIZE - PATTERN_BYTES, "stray writes"
    assert ep.sessions_total == 1 and ep.errors_total == 0, res.tail()
    function = daemon.host.slots[0].function
    assert isinstance(function, NvmeController)
    check_doorbells(function, shadow)
    assert not daemon.host.clients  # the client's locked memory was released
    assert rec.policies == {"power8"}
    return res, rec


@pytest.mark.qemu
@pytest.mark.parametrize("shadow", [True, False], ids=["shadow-doorbells", "mmio-doorbells"])
async def test_pseries_ddw_maps_all_ram_in_the_64bit_window(
    provisioned: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shadow: bool
) -> None:
    label = f"DDW, shadow doorbells {'on' if shadow else 'off'}"
    res, rec = await run_pseries(tmp_path, monkeypatch, [], label, shadow)
    # The guest created a DDW: our 64-bit window at 2^59 exists and holds all of guest RAM,
    # direct-mapped (bus address 2^59 + x is guest physical x = memfd offset x): every 4 KiB
    # entry of the first MEMORY_MB points at the same offset of guest RAM's memfd, R|W.
    assert res.markers.get("direct") == "1", res.sections.get("dma")
    assert rec.window64 is not None and rec.window64[0] == DMA64_START, rec.summary()
    assert rec.window64[1] >= MEMORY_MB << 20
    assert rec.file_vaddr is not None
    pages = (MEMORY_MB << 20) >> 12
    assert rec.tces64 == [(i, (rec.file_vaddr + (i << 12)) | 3) for i in range(pages)]
    assert rec.maps >= (MEMORY_MB << 20) >> 24, rec.summary()  # at least one per 16 MiB TCE
    assert rec.fast_messages > rec.unmaps // 2, rec.summary()  # the boot clear went through C


@pytest.mark.qemu
async def test_pseries_32bit_window_maps_per_tce(
    provisioned: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ["-global", "spapr-pci-host-bridge.ddw=off"]
    res, rec = await run_pseries(tmp_path, monkeypatch, extra, "32-bit window (ddw=off)")
    assert res.markers.get("direct") == "0", res.sections.get("dma")
    assert rec.window64 is None, rec.summary()
    # One synchronous 4 KiB DMA_MAP per guest TCE (all inside the 32-bit window: there is no
    # other, and none failed), at least one per page of the pattern for the write and again for
    # the read, nearly all of them by the fast path.
    assert rec.maps >= 2 * PATTERN_BYTES // 4096, rec.summary()
    assert rec.fast_messages >= rec.maps, rec.summary()
