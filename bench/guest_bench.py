"""Guest-side NVMe throughput: a Linux guest's dd with direct I/O on a vfiod VF, against QEMU's
own in-process emulated NVMe in the same guest, in the same run (the upper bound here).

Guests run under TCG on these machines (their /dev/kvm cannot run Debian kernels), so absolute
figures say little; the ratio vfiod / in-process is what to compare. For pseries, the DDW path
(one 64-bit window mapping all RAM) against the 32-bit window path (one synchronous DMA_MAP and
DMA_UNMAP per 4 KiB TCE, `-global spapr-pci-host-bridge.ddw=off`).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import trio

from vfiod import config
from vfiod.daemon import Daemon
from vfiod.qemu import run_guest

NS_SIZE = 512 << 20

# Sequential 1 MiB writes and reads, then 4 KiB reads, all with O_DIRECT. Debian's busybox dd
# prints no rate, so the guest times each run with /proc/uptime (10 ms resolution; runs are sized
# to last seconds) and prints MB/s.
DD_SCRIPT = r"""
dev=$(ls /dev/nvme*n1 2>/dev/null | head -n 1)
[ -b "$dev" ] || { echo "@@VFIOD error=no-nvme-disk"; exit 1; }
RATE='BEGIN { d = z - a; if (d < 0.01) d = 0.01; printf "%.1fM", b / 1048576 / d }'
run() {  # NAME BYTES dd-args...
  name=$1; bytes=$2; shift 2
  t0=$(cut -d' ' -f1 /proc/uptime)
  dd "$@" 2>/dev/null || echo "@@VFIOD error=$name"
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "@@VFIOD $name=$(awk -v b=$bytes -v a=$t0 -v z=$t1 "$RATE")"
}
run seq_write_1m $((@MIB@ * 1048576)) if=/dev/zero of=$dev bs=1M count=@MIB@ oflag=direct
run seq_read_1m $((@MIB@ * 1048576)) if=$dev of=/dev/null bs=1M count=@MIB@ iflag=direct
run read_4k $((@SMALL@ * 4096)) if=$dev of=/dev/null bs=4k count=@SMALL@ iflag=direct
"""

_UNITS = {"k": 1e-3, "M": 1.0, "G": 1e3}


def _script(mib: int, small: int) -> str:
    return DD_SCRIPT.replace("@MIB@", str(mib)).replace("@SMALL@", str(small))


def _mb_per_s(text: str | None) -> float | None:
    if not text:
        return None
    m = re.fullmatch(r"([0-9.]+)([kMG])", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def _figures(markers: dict[str, str]) -> dict[str, float | None]:
    return {k: _mb_per_s(markers.get(k)) for k in ("seq_write_1m", "seq_read_1m", "read_4k")}


async def _vfiod_guest(arch: str, policy: str, mib: int, small: int,
                       extra: tuple[str, ...] = ()) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vfiod-guest-bench-") as tmpdir:
        tmp = Path(tmpdir)
        parsed = config.parse(
            f'[[phb]]\nindex = 0\nwindow_policy = "{policy}"\n'
            f'[[function]]\nname = "nvme0"\npersonality = "nvme"\n'
            f'backing = "{tmp / "pf.img"}"\nsize = "{NS_SIZE}"\ntotalvfs = 1\nnumvfs = 1\n',
            "bench",
        )
        daemon = Daemon(config.Config(tmp, parsed.functions, phbs=parsed.phbs))
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            vf = daemon.host.slot("nvme0-vf0")
            res = await run_guest(arch, _script(mib, small),
                                  [str(vf.endpoint.path)], memory_mb=1024, timeout=1800,
                                  extra_args=extra)
            nursery.cancel_scope.cancel()
    res.check()
    return {"mb_per_s": _figures(res.markers), "guest_seconds": round(res.duration, 1)}


async def _qemu_nvme_guest(arch: str, mib: int, small: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vfiod-guest-bench-") as tmpdir:
        disk = Path(tmpdir) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(NS_SIZE)
        # the same page-cache-backed file as vfiod's namespace, so the two are comparable
        extra = ("-drive", f"file={disk},if=none,id=d0,format=raw,cache=writeback",
                 "-device", "nvme,drive=d0,serial=qemu-inprocess")
        res = await run_guest(arch, _script(mib, small), [],
                              memory_mb=1024, timeout=1800, extra_args=extra)
    res.check()
    return {"mb_per_s": _figures(res.markers), "guest_seconds": round(res.duration, 1)}


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in a["mb_per_s"].items():
        other = b["mb_per_s"].get(key)
        out[key] = round(value / other, 3) if value and other else None
    return out


async def _run(mib: int, small: int, pseries: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"note": __doc__.split("\n\n")[1].replace("\n", " ")}
    vfiod_x86 = await _vfiod_guest("x86_64", "flat", mib, small)
    qemu_x86 = await _qemu_nvme_guest("x86_64", mib, small)
    results["x86_64"] = {
        "vfiod_vf": vfiod_x86,
        "qemu_inprocess_nvme": qemu_x86,
        "vfiod_over_inprocess": _ratio(vfiod_x86, qemu_x86),
        "targets": "seq read >= 1050 MB/s and >= 0.8x of in-process (on real hardware/KVM)",
    }
    if pseries:
        ddw = await _vfiod_guest("ppc64le", "power8", mib, small)
        per_tce = await _vfiod_guest("ppc64le", "power8", max(1, mib // 8), max(1, small // 8),
                                     ("-global", "spapr-pci-host-bridge.ddw=off"))
        results["ppc64le"] = {
            "ddw_64bit_window": ddw,
            "tce32_per_tce": per_tce,
            "ddw_over_per_tce": _ratio(ddw, per_tce),
            "target": "DDW >= 5x the per-TCE path",
        }
    return results


def run(mib: int = 64, small: int = 2000, pseries: bool = True) -> dict[str, Any]:
    return trio.run(_run, mib, small, pseries)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(pseries="--no-pseries" not in sys.argv), indent=2))
