"""`make bench`: run every benchmark, write one JSON file under bench/results/, print a summary.

Figures are wall-clock on a shared 2-core machine: compare ratios measured in the same run
(vfiod vs its peer, cffi vs its Python twin), not absolutes across machines.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import guest_bench, nvme_bench, protocol_bench, spapr_bench, vfio_user_bench
from bench.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    p.add_argument("--out", type=Path, help="results file (default: bench/results/<date>.json)")
    p.add_argument("--no-guests", action="store_true",
                   help="skip the real-guest NVMe runs (they boot QEMU guests: minutes)")
    p.add_argument("--no-pseries", action="store_true", help="skip the pseries guest runs")
    args = p.parse_args(argv)

    n = 2000 if args.quick else 20000
    results: dict[str, Any] = {"machine": machine_info()}
    print("vfio-user round trips (daemon process vs AF_UNIX echo floor)...", flush=True)
    results["vfio_user"] = vfio_user_bench.run(n=n, pairs=n)
    print("vfio-user wire layer per message (sans-I/O)...", flush=True)
    results["protocol"] = protocol_bench.run()
    print("sPAPR TCE fast path (cffi vs Python twin)...", flush=True)
    results["spapr_tce"] = spapr_bench.run(min_time=0.1 if args.quick else 0.5)
    print("NVMe data path in-process (zero-copy vs copy)...", flush=True)
    results["nvme_inprocess"] = nvme_bench.run(min_time=0.1 if args.quick else 0.5)
    if not args.no_guests:
        print("NVMe in real guests (vfiod VF vs QEMU's in-process NVMe; pseries DDW vs "
              "per-TCE)...", flush=True)
        results["nvme_guests"] = guest_bench.run(
            mib=16 if args.quick else 128, small=500 if args.quick else 4000,
            pseries=not args.no_pseries, fio_seconds=2 if args.quick else 10,
        )

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"bench-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    vu = results["vfio_user"]
    sp = results["spapr_tce"]
    print(f"\nresults: {out}")
    print(f"  REGION_READ 4 B round trip: {vu['region_read_4b']['median_us']:.1f} us median "
          f"(AF_UNIX echo floor {vu['peer_unix_echo_32b_36b']['median_us']:.1f} us, "
          f"{vu['region_read_over_socket_floor']:.1f}x)")
    print(f"  DMA_MAP+DMA_UNMAP 4 KiB pairs: {vu['dma_map_unmap_4k']['pairs_per_s']:.0f}/s")
    if "cffi" in sp:
        for key, value in sp["cffi"].items():
            print(f"  {key}: cffi {value:,.0f}/s, python {sp['python'][key]:,.0f}/s "
                  f"({sp['speedup'][key]:.0f}x)")
    guests = results.get("nvme_guests")
    if guests:
        print("  guest NVMe MB/s (vfiod VF | QEMU in-process | ratio):")
        x86 = guests["x86_64"]
        for key in x86["vfiod_vf"]["mb_per_s"]:
            print(f"    x86_64 {key}: {x86['vfiod_vf']['mb_per_s'][key]} | "
                  f"{x86['qemu_inprocess_nvme']['mb_per_s'][key]} | "
                  f"{x86['vfiod_over_inprocess'][key]}")
        if "ppc64le" in guests:
            ppc = guests["ppc64le"]
            print("  pseries MB/s (DDW | 32-bit per-TCE | ratio || in-process NVMe | DDW ratio):")
            for key in ppc["ddw_64bit_window"]["mb_per_s"]:
                print(f"    {key}: {ppc['ddw_64bit_window']['mb_per_s'][key]} | "
                      f"{ppc['tce32_per_tce']['mb_per_s'][key]} | {ppc['ddw_over_per_tce'][key]}"
                      f" || {ppc['qemu_inprocess_nvme']['mb_per_s'][key]} | "
                      f"{ppc['ddw_over_inprocess'][key]}")
        for line in guest_bench.fio_lines(guests):
            print(line)
    two = results["nvme_inprocess"]["two_vfs"]
    print("  in-process, two VFs at once over one VF (two threads | one thread): " + ", ".join(
        f"{k} {two[k]['two_vfs_two_threads']['over_one_vf']:.2f}x | "
        f"{two[k]['two_vfs_one_thread']['over_one_vf']:.2f}x" for k in ("read_4k", "read_1m")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
