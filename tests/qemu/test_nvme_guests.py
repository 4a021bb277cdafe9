"""Real Linux guests drive vfiod NVMe functions through vfio-user and the PE translation.

Two x86_64 guests run at the same time, each attached to its own VF of one NVMe PF; each
writes its own pattern with direct I/O and reads it back; then every function's backing file
must hold exactly its own guest's bytes (isolation, byte for byte) and the PF's stays empty.
Once with shadow doorbells (Linux configures them as soon as OACS bit 8 is set: its I/O
queues then ring the MMIO doorbells only when EventIdx asks for it) and once without
(``shadow_doorbells = false``: every doorbell is an MMIO write, a vfio-user message). Every
I/O command goes through the C data mover's workers, its doorbell through the session fast
path's hook (checked from the controller's counters), so every byte checked here took that path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from vfiod import config
from vfiod.daemon import Daemon
from vfiod.devices.nvme import NvmeController
from vfiod.devices.nvme import constants as K
from vfiod.qemu import GuestResult, QemuNotProvisioned, guest_image, run_guest

PATTERN_BYTES = 4 << 20
NS_SIZE = 64 << 20

PARALLEL_AT = 8 << 20  # a second copy of the pattern's first half, written by 8 dd at once
PARALLEL_BYTES = 2 << 20

# Sequential 1 MiB direct I/O (one command in flight), then the pattern's first 2 MiB again at
# 8 MiB by 8 concurrent dd of 4 KiB blocks (many commands in flight and per doorbell batch; the
# 1024-entry I/O CQ wraps), read back the same way.
GUEST_IO = r"""
dev=/dev/nvme0n1
[ -b $dev ] || { echo "@@VFIOD error=no-nvme-disk"; exit 1; }
echo "@@VFIOD model=$(cat /sys/class/nvme/nvme0/model | tr -d ' ')"
dd if=/pattern of=$dev bs=1M count=4 oflag=direct 2>/dev/null || echo "@@VFIOD error=write"
dd if=$dev of=/back bs=1M count=4 iflag=direct 2>/dev/null || echo "@@VFIOD error=read"
echo "@@VFIOD wrote=$(md5sum < /pattern | cut -d' ' -f1) read=$(md5sum < /back | cut -d' ' -f1)"
echo "@@VFIOD msi=$(grep nvme /proc/interrupts | grep -c MSI)"
for i in 0 1 2 3 4 5 6 7; do
  dd if=/pattern of=$dev bs=4k skip=$((i * 64)) seek=$((2048 + i * 64)) count=64 \
     oflag=direct 2>/dev/null || echo "@@VFIOD error=parallel-write" &
done
wait
for i in 0 1 2 3 4 5 6 7; do
  dd if=$dev of=/back$i bs=4k skip=$((2048 + i * 64)) count=64 iflag=direct 2>/dev/null \
     || echo "@@VFIOD error=parallel-read" &
done
wait
cat /back0 /back1 /back2 /back3 /back4 /back5 /back6 /back7 > /pback
echo "@@VFIOD pread=$(md5sum < /pback | cut -d' ' -f1)"
"""


@pytest.fixture
def provisioned() -> None:
    try:
        guest_image("x86_64")
    except QemuNotProvisioned as exc:
        pytest.fail(str(exc), pytrace=False)


def nvme_config(tmp_path: Path, numvfs: int, shadow: bool = True) -> config.Config:
    """One NVMe PF whose VFs each get their own namespace file (``pf-vf<n>.img``)."""
    text = (
        '[[phb]]\nindex = 0\nwindow_policy = "flat"\n'
        f'[[function]]\nname = "nvme0"\npersonality = "nvme"\n'
        f'backing = "{tmp_path / "pf.img"}"\nsize = "{NS_SIZE}"\n'
        f"totalvfs = 4\nnumvfs = {numvfs}\nshadow_doorbells = {str(shadow).lower()}\n"
    )
    parsed = config.parse(text, "test")
    return config.Config(tmp_path, parsed.functions, phbs=parsed.phbs)


def check_guest(res: GuestResult, pattern: bytes) -> None:
    res.check()
    assert "error" not in res.markers, res.tail()
    digest = hashlib.md5(pattern).hexdigest()
    assert res.markers["wrote"] == digest and res.markers["read"] == digest, res.tail()
    assert int(res.markers["msi"]) >= 1, "the nvme driver is not on MSI"
    assert res.markers["pread"] == hashlib.md5(pattern[:PARALLEL_BYTES]).hexdigest(), res.tail()


def check_doorbells(ctrl: NvmeController, shadow: bool) -> None:
    """The guest configured shadow doorbells exactly when offered, and then its I/O queues'
    CQ heads (one update per interrupt without shadows) left the MMIO doorbell alone."""
    stats = ctrl.stats
    configs = stats.commands.get(("admin", K.ADM_DBBUF_CONFIG), 0)
    admin = sum(n for (queue, _), n in stats.commands.items() if queue == "admin")
    io = sum(n for (queue, _), n in stats.commands.items() if queue == "io")
    sq_writes, cq_writes = stats.doorbells
    summary = (f"admin {admin}, io {io}, MMIO doorbells: SQ {sq_writes}, CQ {cq_writes}; "
               f"C data mover: {ctrl.async_commands} commands in its workers, "
               f"{ctrl.hooked_doorbells} doorbells in the session fast path")  # fmt: skip
    print(f"\nshadow doorbells {'on' if shadow else 'off'}: {summary}")
    assert io >= 8, summary
    # every I/O command of these guests goes through the C data mover's workers, and most I/O
    # queue doorbells never reach Python (the admin queue's, an SQ and a CQ doorbell per
    # command, always do, as does anything C leaves to Python)
    assert ctrl.async_commands >= io - 8, summary
    assert ctrl.hooked_doorbells >= (sq_writes + cq_writes - 2 * admin) // 2, summary
    if shadow:
        assert configs >= 1, summary
        # the admin queue's (MMIO by design), and one per wrap of a 1024-entry I/O CQ
        assert cq_writes <= admin + io // 1024 + 2, summary
    else:
        assert configs == 0, summary
        assert cq_writes > admin, summary


@pytest.mark.qemu
@pytest.mark.parametrize("shadow", [True, False], ids=["shadow-doorbells", "mmio-doorbells"])
async def test_two_x86_guests_each_on_its_own_vf(
    provisioned: None, tmp_path: Path, shadow: bool
) -> None:
    daemon = Daemon(nvme_config(tmp_path, numvfs=2, shadow=shadow))
    vfs = [slot for slot in daemon.host.slots if slot.kind == "vf"]
    assert [vf.name for vf in vfs] == ["nvme0-vf0", "nvme0-vf1"]
    patterns = {vf.name: os.urandom(PATTERN_BYTES) for vf in vfs}
    results: dict[str, GuestResult] = {}

    async def guest(name: str, socket: Path) -> None:
        results[name] = await run_guest(
            "x86_64", GUEST_IO, [str(socket)], memory_mb=512, timeout=600,
            files={"/pattern": patterns[name]},
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        async with trio.open_nursery() as guests:
            for vf in vfs:
                guests.start_soon(guest, vf.name, vf.endpoint.path)
        nursery.cancel_scope.cancel()

    for n, vf in enumerate(vfs):
        check_guest(results[vf.name], patterns[vf.name])
        data = (tmp_path / f"pf-vf{n}.img").read_bytes()
        assert len(data) == NS_SIZE
        assert data[:PATTERN_BYTES] == patterns[vf.name], f"{vf.name}: backing file differs"
        second = data[PARALLEL_AT : PARALLEL_AT + PARALLEL_BYTES]
        assert second == patterns[vf.name][:PARALLEL_BYTES], f"{vf.name}: parallel writes differ"
        rest = data[PATTERN_BYTES:PARALLEL_AT] + data[PARALLEL_AT + PARALLEL_BYTES :]
        assert rest.count(0) == len(rest), f"{vf.name}: stray writes"
        assert vf.endpoint.sessions_total == 1 and vf.endpoint.errors_total == 0
        assert isinstance(vf.function, NvmeController)
        check_doorbells(vf.function, shadow)
    # the PF's own namespace was never touched
    assert (tmp_path / "pf.img").read_bytes().count(0) == NS_SIZE
    assert not daemon.host.clients
