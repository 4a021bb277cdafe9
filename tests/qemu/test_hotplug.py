"""Hot-unplug and crash recovery against real QEMU 11.1.3 (x86 q35 guests, TCG).

* A guest's NVMe VF is removed (``device_del``, DEVICE_DELETED) and added again (``device_add``
  on a pcie-root-port) 20 times, with checked I/O on every attachment: the guest writes this
  round's pattern at its own offset, reads it back, reads the previous round's back too, and the
  host finds every round's bytes in the VF's backing file. QEMU must stay alive throughout: a
  function with an MSI-X capability makes QEMU 11.1.3 abort a second after device_del
  (docs/qemu-quirks.md), which is why vfiod's NVMe function offers MSI. Each device_add is sent
  the moment DEVICE_DELETED arrives: QEMU closed the previous connection just before.
* A QEMU is SIGKILLed while its guest writes to the VF, and a new QEMU started at once on the
  same VF socket attaches and does checked I/O; the daemon serves throughout.

Each round's device gets its own subsystem device id (``x-pci-sub-device-id``, a QEMU
property), so the guest can tell the new attachment from the one just removed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from vfiod import client, config
from vfiod.daemon import Daemon
from vfiod.qemu import QemuNotProvisioned, guest_image, run_guest, vfio_user_device
from vfiod.qemu.live import LiveGuest, MarkerStream, live_guest, pcie_root_port
from vfiod.qemu.qmp import QmpError
from vfiod.server.endpoint import Endpoint

NS_SIZE = 16 << 20
CHUNK = 64 << 10
CYCLES = 20
ATTACH_TIMEOUT = 180.0

# $1: the subsystem device id of the attachment to wait for. Prints "<pci address> <blockdev>"
# once the nvme driver has bound it and its namespace's block device exists.
FIND_DEVICE = r"""
find_dev() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat $d/subsystem_device 2>/dev/null)" = "$1" ] || continue
        [ "$(cat $d/class 2>/dev/null)" = "0x010802" ] || continue
        for b in $d/nvme/nvme*/nvme*n1; do
            [ -e "$b" ] && [ -b "/dev/${b##*/}" ] && { echo "${d##*/} ${b##*/}"; return 0; }
        done
    done
    return 1
}
wait_dev() {
    t=0
    until found=$(find_dev "$1"); do
        t=$((t + 1))
        [ $t -gt 1500 ] && return 1
        sleep 0.1
    done
    echo "$found"
}
md5() { md5sum < "$1" | cut -d' ' -f1; }
put() { dd if="$1" of="$2" bs=CHUNK seek="$3" count=1 oflag=direct 2>/dev/null; }  # file dev n
get() { dd if="$1" of="$2" bs=CHUNK skip="$3" count=1 iflag=direct 2>/dev/null; }  # dev file n
""".replace("CHUNK", str(CHUNK))

HOTPLUG_GUEST = FIND_DEVICE + rf"""
echo "@@VFIOD ready=1"
i=0
while [ $i -lt {CYCLES} ]; do
    sub=$(printf 0x%04x $((i + 1)))
    found=$(wait_dev $sub) || {{ echo "@@VFIOD error=no-device-$i"; exit 1; }}
    set -- $found
    dev=/dev/$2
    put /p$i $dev $i || echo "@@VFIOD error=write-$i"
    get $dev /back $i || echo "@@VFIOD error=read-$i"
    prev=none
    if [ $i -gt 0 ]; then
        get $dev /prev $((i - 1)) || echo "@@VFIOD error=read-prev-$i"
        prev=$(md5 /prev)
    fi
    msi=$(grep nvme /proc/interrupts | grep -c MSI)
    echo "@@VFIOD io=$i addr=$1 wrote=$(md5 /p$i) read=$(md5 /back) prev=$prev msi=$msi"
    last=$1
    i=$((i + 1))
done
# Stay up until the host has removed the last attachment, then power off.
t=0
while [ -e /sys/bus/pci/devices/$last ] && [ $t -lt 600 ]; do sleep 0.1; t=$((t + 1)); done
echo "@@VFIOD gone=$last"
"""


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def provisioned() -> None:
    try:
        guest_image("x86_64")
    except QemuNotProvisioned as exc:
        pytest.fail(str(exc), pytrace=False)


def test_marker_stream_across_chunks() -> None:
    """The live harness sees a marker once its line is complete, however the console is cut."""
    stream = MarkerStream()
    assert stream.feed(b"noise\r\n@@VFIOD io=3 wr") == []
    assert stream.feed(b"ote=ab read=ab\r") == []
    assert stream.feed(b"\n\x1b[0m@@VFIOD ready=1\nx @@VFIOD gone=0000:01:00.0\n@@") == [
        {"io": "3", "wrote": "ab", "read": "ab"},
        {"ready": "1"},
        {"gone": "0000:01:00.0"},
    ]
    assert stream.feed(b"VFIOD done=1\n") == [{"done": "1"}]


def one_vf_config(tmp_path: Path) -> config.Config:
    """An NVMe PF with one VF on a flat PHB; the VF's namespace is ``pf-vf0.img``."""
    text = (
        '[[phb]]\nindex = 0\nwindow_policy = "flat"\n'
        f'[[function]]\nname = "nvme0"\npersonality = "nvme"\n'
        f'backing = "{tmp_path / "pf.img"}"\nsize = "{NS_SIZE}"\ntotalvfs = 1\nnumvfs = 1\n'
    )
    parsed = config.parse(text, "test")
    return config.Config(tmp_path, parsed.functions, phbs=parsed.phbs)


async def still_serving(ep: Endpoint) -> None:
    """A fresh client attaches and reads the VF's identity: the daemon kept serving.

    It first lets the last QEMU's session end: a QEMU that has just exited may still hold its
    end of the socket for a few milliseconds (docs/qemu-quirks.md), and a client connecting then
    would rightly find the function taken.
    """
    with trio.fail_after(30):
        while ep.session is not None:
            await trio.sleep(0.01)
        async with client.connect(ep.path) as dev:
            ids = await dev.config_read(0, 4)
    assert ids[:2] == b"\x36\x1b", ids.hex()  # NVMe personality's vendor id 0x1b36


async def unplug(guest: LiveGuest, round_: int) -> None:
    """device_del and wait for DEVICE_DELETED; QEMU must be alive afterwards."""
    try:
        await guest.qmp.execute("device_del", {"id": "vfu"})
        await guest.qmp.wait_event("DEVICE_DELETED", timeout=60, device="vfu")
    except QmpError as exc:
        with trio.move_on_after(10):
            await guest.proc.wait()
        pytest.fail(f"round {round_}: {exc}; QEMU exit {guest.returncode}\n{guest.tail()}")
    assert guest.alive, f"round {round_}: QEMU died ({guest.returncode})\n{guest.tail()}"


@pytest.mark.qemu
async def test_vf_removed_and_readded_20_times(provisioned: None, tmp_path: Path) -> None:
    daemon = Daemon(one_vf_config(tmp_path))
    vf = next(s for s in daemon.host.slots if s.kind == "vf")
    ep = vf.endpoint
    backing = tmp_path / "pf-vf0.img"
    patterns = [os.urandom(CHUNK) for _ in range(CYCLES)]
    files = {f"/p{i}": patterns[i] for i in range(CYCLES)}
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        async with live_guest(
            "x86_64", HOTPLUG_GUEST, memory_mb=512, files=files, extra_args=pcie_root_port("rp0")
        ) as guest:
            await guest.wait_marker("ready", "1", timeout=ATTACH_TIMEOUT)
            for i in range(CYCLES):
                device = {**vfio_user_device(ep.path, "vfu"), "bus": "rp0",
                          "x-pci-sub-device-id": i + 1}  # fmt: skip
                await guest.qmp.execute("device_add", device)
                io = await guest.wait_marker("io", str(i), timeout=ATTACH_TIMEOUT)
                assert io["wrote"] == io["read"] == md5(patterns[i]), (i, io)
                assert io["prev"] == (md5(patterns[i - 1]) if i else "none"), (i, io)
                assert int(io["msi"]) >= 1, f"round {i}: the nvme driver is not on MSI: {io}"
                data = backing.read_bytes()
                for j in range(i + 1):
                    assert data[j * CHUNK:(j + 1) * CHUNK] == patterns[j], f"round {i}: chunk {j}"
                await unplug(guest, i)
                status = await guest.qmp.execute("query-status")
                # after the last round the guest sees its device gone and powers off at once
                last = i == CYCLES - 1
                assert status["running"] or (last and status["status"] == "shutdown"), status
            await guest.wait_marker("gone", timeout=60)
            assert await guest.wait_exit() == 0, guest.tail()  # the guest powered off cleanly
        assert b"Assertion" not in guest.stderr, guest.tail()
        await still_serving(ep)
        nursery.cancel_scope.cancel()
    assert ep.sessions_total == CYCLES + 1 and ep.errors_total == 0
    data = backing.read_bytes()
    assert data[: CYCLES * CHUNK] == b"".join(patterns)
    assert data[CYCLES * CHUNK:].count(0) == NS_SIZE - CYCLES * CHUNK, "stray writes"
    assert not daemon.host.clients  # every QEMU session released its locked memory


KILLED_GUEST = FIND_DEVICE + r"""
found=$(wait_dev 0x0000) || { echo "@@VFIOD error=no-device"; exit 1; }
set -- $found
echo "@@VFIOD attached=$1"
n=0
while true; do
    put /pattern /dev/$2 $((n % 16))
    n=$((n + 1))
    echo "@@VFIOD writes=$n"
done
"""

RESTARTED_GUEST = FIND_DEVICE + r"""
found=$(wait_dev 0x0000) || { echo "@@VFIOD error=no-device"; exit 1; }
set -- $found
dev=/dev/$2
put /pattern $dev 32 || echo "@@VFIOD error=write"
get $dev /back 32 || echo "@@VFIOD error=read"
get $dev /old 0 || echo "@@VFIOD error=read-old"
echo "@@VFIOD wrote=$(md5 /pattern) read=$(md5 /back) old=$(md5 /old)"
"""


@pytest.mark.qemu
async def test_sigkilled_qemu_restarted_at_once_reattaches(
    provisioned: None, tmp_path: Path
) -> None:
    daemon = Daemon(one_vf_config(tmp_path))
    vf = next(s for s in daemon.host.slots if s.kind == "vf")
    ep = vf.endpoint
    backing = tmp_path / "pf-vf0.img"
    first, second = os.urandom(CHUNK), os.urandom(CHUNK)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        async with live_guest(
            "x86_64", KILLED_GUEST, [ep.path], memory_mb=512, files={"/pattern": first}
        ) as guest:
            await guest.wait_marker("attached", timeout=ATTACH_TIMEOUT)
            await guest.wait_marker("writes", "3", timeout=ATTACH_TIMEOUT)
            guest.kill()  # mid-I/O: the guest writes in a loop
            assert await guest.wait_exit() == -9
        res = await run_guest(
            "x86_64", RESTARTED_GUEST, [ep.path], memory_mb=512, timeout=300,
            files={"/pattern": second},
        )  # fmt: skip
        res.check()
        assert "error" not in res.markers, res.tail()
        assert res.markers["wrote"] == res.markers["read"] == md5(second), res.tail()
        assert res.markers["old"] == md5(first), res.tail()  # the killed guest's writes landed
        await still_serving(ep)
        nursery.cancel_scope.cancel()
    assert ep.sessions_total == 3 and ep.errors_total == 0
    data = backing.read_bytes()
    assert data[32 * CHUNK:33 * CHUNK] == second
    assert data[:CHUNK] == first
    assert not daemon.host.clients
