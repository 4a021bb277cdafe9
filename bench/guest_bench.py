"""Guest-side NVMe throughput: a Linux guest's dd and fio with direct I/O on a vfiod VF, against
QEMU's own in-process emulated NVMe in the same guest, in the same run (the upper bound here).

Guests run under TCG on these machines (their /dev/kvm cannot run Debian kernels), so absolute
figures say little; the ratio vfiod / in-process is what to compare. x86_64: a vfiod VF (shadow
doorbells on, and off) against in-process NVMe. pseries: a vfiod VF through DDW (one 64-bit
window mapping all RAM) against in-process NVMe on pseries, and against the 32-bit window path
(one synchronous DMA_MAP and DMA_UNMAP per 4 KiB TCE, `-global spapr-pci-host-bridge.ddw=off`),
that path once more with the session's C message fast path off (the before of issue 11).
Both NVMe kinds sit on the same kind of page-cache-backed file.
"""

from __future__ import annotations

import json
import os
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
# prints no rate, so the guest times each run with /proc/uptime (10 ms resolution) and prints
# MB/s; a sequential run repeats its dd @REPS@ times so that it moves 1 GiB (a second or more
# where the path is fast: a single 128 MiB dd at 1 GB/s would read 0.13 s, 8 % per tick).
DD_SCRIPT = r"""
dev=$(ls /dev/nvme*n1 2>/dev/null | head -n 1)
[ -b "$dev" ] || { echo "@@VFIOD error=no-nvme-disk"; exit 1; }
RATE='BEGIN { d = z - a; if (d < 0.01) d = 0.01; printf "%.1fM", b / 1048576 / d }'
run() {  # NAME BYTES REPS dd-args...: the dd REPS times in a row, timed as one
  name=$1; bytes=$2; reps=$3; shift 3
  t0=$(cut -d' ' -f1 /proc/uptime)
  i=0
  while [ $i -lt $reps ]; do dd "$@" 2>/dev/null || echo "@@VFIOD error=$name"; i=$((i + 1)); done
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "@@VFIOD $name=$(awk -v b=$((bytes * reps)) -v a=$t0 -v z=$t1 "$RATE")"
}
run seq_write_1m $((@MIB@ * 1048576)) @REPS@ if=/dev/zero of=$dev bs=1M count=@MIB@ oflag=direct
run seq_read_1m $((@MIB@ * 1048576)) @REPS@ if=$dev of=/dev/null bs=1M count=@MIB@ iflag=direct
run read_4k $((@SMALL@ * 4096)) 1 if=$dev of=/dev/null bs=4k count=@SMALL@ iflag=direct
"""

# fio (Debian's, in the guest image when the mirror had it): one job at a time over the first
# @MIB@ MiB (written first, so reads find data), time based, direct I/O through libaio. Each
# job's JSON report goes between @@BEGIN/@@END markers; the host reads bandwidth and IOPS.
FIO_JOBS = {
    "seq_write_1m_qd1": "--rw=write --bs=1M --iodepth=1",
    "seq_read_1m_qd1": "--rw=read --bs=1M --iodepth=1",
    "randread_4k_qd1": "--rw=randread --bs=4k --iodepth=1",
    "randread_4k_qd32": "--rw=randread --bs=4k --iodepth=32",
}
FIO_SCRIPT = r"""
if [ -x /usr/bin/fio ]; then
  for job in @JOBS@; do
    case $job in @CASES@ esac
    echo "@@BEGIN fio-$job"
    fio --name=$job --filename=$dev --size=@MIB@M --ioengine=libaio --direct=1 \
        --runtime=@SECONDS@ --time_based --output-format=json $args \
        || echo "@@VFIOD error=fio-$job"
    echo "@@END fio-$job"
  done
else
  echo "@@VFIOD fio=missing"
fi
"""

_UNITS = {"k": 1e-3, "M": 1.0, "G": 1e3}


def _reps(mib: int, fast: bool = True) -> int:
    """How many times the sequential dd runs: 1 GiB in all on a fast path, once on a slow one
    (the per-TCE path moves tens of MB/s: a single run already lasts a second)."""
    return max(1, 1024 // mib) if fast else 1


def _script(mib: int, small: int, fio_seconds: int, reps: int) -> str:
    cases = " ".join(f"{name}) args='{args}' ;;" for name, args in FIO_JOBS.items())
    fio = (FIO_SCRIPT.replace("@JOBS@", " ".join(FIO_JOBS)).replace("@CASES@", cases)
           .replace("@SECONDS@", str(fio_seconds)))  # fmt: skip
    return ((DD_SCRIPT + fio).replace("@MIB@", str(mib)).replace("@SMALL@", str(small))
            .replace("@REPS@", str(reps)))  # fmt: skip


def _mb_per_s(text: str | None) -> float | None:
    if not text:
        return None
    m = re.fullmatch(r"([0-9.]+)([kMG])", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def _fio(sections: dict[str, str]) -> dict[str, dict[str, float] | None] | None:
    """MB/s and IOPS of each fio job (None for a job whose report did not parse, None for all
    when the image has no fio)."""
    out: dict[str, dict[str, float] | None] = {}
    for name in FIO_JOBS:
        text = sections.get(f"fio-{name}")
        if text is None:
            continue
        try:  # the report, maybe after a warning line on the same console
            report, _ = json.JSONDecoder().raw_decode(text, text.index("{"))
            job = report["jobs"][0]
            side = job["write"] if "write" in name else job["read"]
            out[name] = {"MB_per_s": round(side["bw_bytes"] / 1e6, 1),
                         "iops": round(side["iops"], 1)}
        except (ValueError, KeyError, IndexError):
            out[name] = None
    return out or None


def _figures(res: Any) -> dict[str, Any]:
    res.check()
    keys = ("seq_write_1m", "seq_read_1m", "read_4k")
    return {
        "mb_per_s": {k: _mb_per_s(res.markers.get(k)) for k in keys},
        "fio": _fio(res.sections),
        "errors": res.markers.get("error"),
        "guest_seconds": round(res.duration, 1),
    }


async def _vfiod_guest(arch: str, policy: str, mib: int, small: int, fio_seconds: int,
                       extra: tuple[str, ...] = (), shadow: bool = True,
                       fast_path: bool = True, reps: int = 1) -> dict[str, Any]:  # fmt: skip
    """One guest on a VF of a daemon in this process; ``fast_path=False`` runs every message
    through the trio session (VFIOD_NO_FASTPATH=1: vfiod before issue 11's C message path)."""
    saved = os.environ.get("VFIOD_NO_FASTPATH")
    if not fast_path:
        os.environ["VFIOD_NO_FASTPATH"] = "1"
    try:
        return await _vfiod_guest_run(arch, policy, mib, small, fio_seconds, extra, shadow, reps)
    finally:
        if saved is None:
            os.environ.pop("VFIOD_NO_FASTPATH", None)
        else:
            os.environ["VFIOD_NO_FASTPATH"] = saved


async def _vfiod_guest_run(arch: str, policy: str, mib: int, small: int, fio_seconds: int,
                           extra: tuple[str, ...], shadow: bool, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vfiod-guest-bench-") as tmpdir:
        tmp = Path(tmpdir)
        parsed = config.parse(
            f'[[phb]]\nindex = 0\nwindow_policy = "{policy}"\n'
            f'[[function]]\nname = "nvme0"\npersonality = "nvme"\n'
            f'backing = "{tmp / "pf.img"}"\nsize = "{NS_SIZE}"\ntotalvfs = 1\nnumvfs = 1\n'
            f"shadow_doorbells = {str(shadow).lower()}\n",
            "bench",
        )
        daemon = Daemon(config.Config(tmp, parsed.functions, phbs=parsed.phbs))
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            vf = daemon.host.slot("nvme0-vf0")
            res = await run_guest(arch, _script(mib, small, fio_seconds, reps),
                                  [str(vf.endpoint.path)], memory_mb=1024, timeout=1800,
                                  extra_args=extra)
            nursery.cancel_scope.cancel()
    return _figures(res)


async def _qemu_nvme_guest(arch: str, mib: int, small: int, fio_seconds: int,
                           reps: int) -> dict[str, Any]:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vfiod-guest-bench-") as tmpdir:
        disk = Path(tmpdir) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(NS_SIZE)
        # the same page-cache-backed file as vfiod's namespace, so the two are comparable
        extra = ("-drive", f"file={disk},if=none,id=d0,format=raw,cache=writeback",
                 "-device", "nvme,drive=d0,serial=qemu-inprocess")
        res = await run_guest(arch, _script(mib, small, fio_seconds, reps), [],
                              memory_mb=1024, timeout=1800, extra_args=extra)
    return _figures(res)


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """a / b for every dd figure (MB/s) and fio job (MB/s, so IOPS alike)."""
    out: dict[str, float | None] = {}
    for key, value in a["mb_per_s"].items():
        other = b["mb_per_s"].get(key)
        out[key] = round(value / other, 3) if value and other else None
    fa, fb = a.get("fio") or {}, b.get("fio") or {}
    for key in FIO_JOBS:
        x, y = fa.get(key), fb.get(key)
        out[f"fio_{key}"] = round(x["MB_per_s"] / y["MB_per_s"], 3) if x and y else None
    return out


async def _run(mib: int, small: int, pseries: bool, fio_seconds: int) -> dict[str, Any]:
    results: dict[str, Any] = {"note": __doc__.split("\n\n")[1].replace("\n", " ")}
    reps = _reps(mib)
    vfiod_x86 = await _vfiod_guest("x86_64", "flat", mib, small, fio_seconds, reps=reps)
    mmio_x86 = await _vfiod_guest("x86_64", "flat", mib, small, fio_seconds, shadow=False,
                                  reps=reps)
    qemu_x86 = await _qemu_nvme_guest("x86_64", mib, small, fio_seconds, reps)
    results["x86_64"] = {
        "vfiod_vf": vfiod_x86,
        "vfiod_vf_mmio_doorbells": mmio_x86,
        "qemu_inprocess_nvme": qemu_x86,
        "vfiod_over_inprocess": _ratio(vfiod_x86, qemu_x86),
        "shadow_over_mmio_doorbells": _ratio(vfiod_x86, mmio_x86),
        "targets": "every ratio >= 0.9x of in-process (issue 9)",
    }
    if pseries:
        ddw = await _vfiod_guest("ppc64le", "power8", mib, small, fio_seconds, reps=reps)
        no_ddw = ("-global", "spapr-pci-host-bridge.ddw=off")
        per_tce = await _vfiod_guest("ppc64le", "power8", max(1, mib // 8), max(1, small // 8),
                                     fio_seconds, no_ddw)
        per_tce_py = await _vfiod_guest("ppc64le", "power8", max(1, mib // 8),
                                        max(1, small // 8), fio_seconds, no_ddw, fast_path=False)
        qemu_ppc = await _qemu_nvme_guest("ppc64le", mib, small, fio_seconds, reps)
        results["ppc64le"] = {
            "ddw_64bit_window": ddw,
            "tce32_per_tce": per_tce,
            "tce32_per_tce_python_messages": per_tce_py,
            "per_tce_fast_over_python_messages": _ratio(per_tce, per_tce_py),
            "qemu_inprocess_nvme": qemu_ppc,
            "ddw_over_per_tce": _ratio(ddw, per_tce),
            "ddw_over_inprocess": _ratio(ddw, qemu_ppc),
            "target": "DDW >= 5x the per-TCE path and >= 0.9x in-process (issue 9)",
        }
    return results


def run(mib: int = 64, small: int = 2000, pseries: bool = True,
        fio_seconds: int = 10) -> dict[str, Any]:  # fmt: skip
    return trio.run(_run, mib, small, pseries, fio_seconds)


def fio_lines(results: dict[str, Any]) -> list[str]:
    """Summary lines for the fio rows (make bench prints them after the dd rows)."""
    lines = []
    for arch, ratios in (("x86_64", "vfiod_over_inprocess"), ("ppc64le", "ddw_over_inprocess")):
        section = results.get(arch)
        if not section:
            continue
        mine = section["vfiod_vf" if arch == "x86_64" else "ddw_64bit_window"].get("fio") or {}
        theirs = section["qemu_inprocess_nvme"].get("fio") or {}
        if not mine:
            lines.append(f"  {arch} fio: not in the guest image (see make guest-images)")
            continue
        lines.append(f"  {arch} fio MB/s (vfiod VF | QEMU in-process | ratio):")
        for job in FIO_JOBS:
            a, b = mine.get(job) or {}, theirs.get(job) or {}
            lines.append(f"    {job}: {a.get('MB_per_s')} | {b.get('MB_per_s')} | "
                         f"{section[ratios].get('fio_' + job)}")
    return lines


if __name__ == "__main__":
    import sys

    quick = "--quick" in sys.argv
    out = run(mib=16 if quick else 64, small=500 if quick else 2000,
              pseries="--no-pseries" not in sys.argv, fio_seconds=2 if quick else 10)
    print(json.dumps(out, indent=2))
    print("\n".join(fio_lines(out)))
