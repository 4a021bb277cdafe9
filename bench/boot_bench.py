"""pseries boot time with one vfiod NVMe VF attached, against the same boot without any device.

Early in boot a pseries guest clears its whole default DMA window through H_STUFF_TCE, which
QEMU turns into one synchronous 4 KiB DMA_UNMAP per TCE (262,144 for the 1 GiB window) sent
from the vCPU thread: every microsecond vfiod spends per message stops the guest. Issue 11's
target: (boot with the VF - boot without a device) <= 3.0x the boot without a device.

The guests are the provisioned ppc64le image with the stock QEMU (TCG here), the VF sits on a
POWER8 PHB with the default DDW (``vfiod.qemu.run_guest`` does the prelaunch device_add
workaround), and vfiod runs as its own process (``python -m vfiod`` on a small TOML config), so
its CPU time over the boot comes from /proc and its message counts from its metrics.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import trio

from bench.message_bench import vfiod_daemon
from bench.stdclient import cpu_sample
from vfiod.control.client import ControlClient
from vfiod.qemu import run_guest

#: Run by the guest's init: the guest's own uptime when its first user-space script runs.
PLAIN_SCRIPT = 'echo "@@VFIOD uptime=$(cut -d" " -f1 /proc/uptime)"\n'
#: The same, once the VF's namespace is a block device (the boot is done when it is usable).
VF_SCRIPT = r"""
i=0
while ! ls /dev/nvme*n1 >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -gt 60 ] && { echo "@@VFIOD error=no-nvme-disk"; exit 1; }
  sleep 1
done
echo "@@VFIOD uptime=$(cut -d" " -f1 /proc/uptime)"
"""

CONFIG = """\
memlock_limit = "64G"

[[phb]]
index = 0
window_policy = "power8"

[[function]]
name = "nvme0"
personality = "nvme"
phb = 0
backing = "{backing}"
size = "64M"
totalvfs = 1
numvfs = 1
"""
VF = "nvme0-vf0"
_METRIC = re.compile(r'^(vfiod_function_\w+)\{function="([^"]+)"\} (\S+)$', re.M)


def _guest_uptime(markers: dict[str, str]) -> float | None:
    try:
        return float(markers["uptime"])
    except (KeyError, ValueError):
        return None


def _boot_plain(timeout: float) -> dict[str, Any]:
    res = trio.run(lambda: run_guest("ppc64le", PLAIN_SCRIPT, [], timeout=timeout))
    res.check()
    return {"seconds": res.duration, "guest_uptime_s": _guest_uptime(res.markers)}


def _function_metrics(control: Path, function: str) -> dict[str, float]:
    with ControlClient(control) as c:
        text = c.call("metrics")
    return {name.removeprefix("vfiod_function_"): float(value)
            for name, fn, value in _METRIC.findall(text) if fn == function}


def _boot_with_vf(timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vfiod-boot-bench-") as tmpdir:
        tmp = Path(tmpdir)
        config = CONFIG.format(backing=tmp / "nvme0.img")
        with vfiod_daemon(tmp, config, VF) as (pid, sock):
            before = cpu_sample(pid)
            res = trio.run(lambda: run_guest("ppc64le", VF_SCRIPT, [sock], timeout=timeout))
            cpu = cpu_sample(pid) - before
            metrics = _function_metrics(sock.parent / "control.sock", VF)
    res.check()
    messages = metrics.get("messages_total", 0.0)
    return {
        "seconds": res.duration,
        "guest_uptime_s": _guest_uptime(res.markers),
        "daemon_cpu_s": cpu.sched_ns / 1e9,
        "daemon_user_s": cpu.user_s,
        "daemon_sys_s": cpu.sys_s,
        "messages": messages,
        "dma_maps": metrics.get("dma_maps_total"),
        "dma_unmaps": metrics.get("dma_unmaps_total"),
        "daemon_cpu_us_per_message": cpu.sched_ns / 1e3 / messages if messages else None,
    }


def run(rounds: int = 2, timeout: float = 900.0) -> dict[str, Any]:
    """Boot each way ``rounds`` times (alternating); the fastest boot of each counts."""
    plain: list[dict[str, Any]] = []
    with_vf: list[dict[str, Any]] = []
    for _ in range(rounds):
        plain.append(_boot_plain(timeout))
        with_vf.append(_boot_with_vf(timeout))
    best_plain = min(plain, key=lambda r: r["seconds"])
    best_vf = min(with_vf, key=lambda r: r["seconds"])
    difference = best_vf["seconds"] - best_plain["seconds"]
    messages = best_vf["messages"]
    return {
        "note": " ".join(__doc__.split("\n\n")[0].split()),
        "without_device": best_plain,
        "with_vfiod_vf": best_vf,
        "difference_s": difference,
        "difference_over_without": difference / best_plain["seconds"],
        # what each message costs the guest, of which the daemon's CPU is one part (the rest:
        # QEMU's own send/wait/reply path and the wakeups of both processes)
        "difference_us_per_message": difference / messages * 1e6 if messages else None,
        "target": "difference_over_without <= 3.0",
        "runs": {"without_device": plain, "with_vfiod_vf": with_vf},
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(rounds=1 if "--quick" in sys.argv else 2), indent=2))
