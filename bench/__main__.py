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

from bench import (
    boot_bench,
    guest_bench,
    layer_bench,
    message_bench,
    nvme_bench,
    nvme_vf_bench,
    protocol_bench,
    spapr_bench,
    vfio_user_bench,
)
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
    print("vfiod daemon vs a minimal Python responder, same blocking client...", flush=True)
    results["messages"] = message_bench.run(
        reads=2000 if args.quick else 20000, maps=2000 if args.quick else 10000,
        storm=20000 if args.quick else message_bench.STORM_PAGES, rounds=1 if args.quick else 2,
    )
    print("CPU per message, layer by layer (in-process)...", flush=True)
    results["layers"] = layer_bench.run(n=2000 if args.quick else 20000)
    print("vfio-user wire layer per message (sans-I/O)...", flush=True)
    results["protocol"] = protocol_bench.run()
    print("sPAPR TCE fast path (cffi vs Python twin)...", flush=True)
    results["spapr_tce"] = spapr_bench.run(min_time=0.1 if args.quick else 0.5)
    print("NVMe data path in-process (Python vs the C mover) and two VFs...", flush=True)
    results["nvme_inprocess"] = nvme_bench.run(min_time=0.1 if args.quick else 0.5)
    if not args.no_guests:
        print("NVMe in real guests (vfiod VF vs QEMU's in-process NVMe; pseries DDW vs "
              "per-TCE)...", flush=True)
        results["nvme_guests"] = guest_bench.run(
            mib=16 if args.quick else 128, small=500 if args.quick else 4000,
            pseries=not args.no_pseries, fio_seconds=2 if args.quick else 10,
        )
        if not args.no_pseries:
            print("pseries boot with one vfiod NVMe VF vs without a device...", flush=True)
            results["pseries_boot"] = boot_bench.run(rounds=1 if args.quick else 2)

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
    _issue11_summary(results)
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
    for line in nvme_vf_bench.lines(results["nvme_inprocess"].get("two_vfs_daemon", {})):
        print(line)
    return 0


def _issue11_summary(results: dict[str, Any]) -> None:
    """The per-message and boot rows of issue 11, with their targets."""
    msg = results["messages"]
    v, r, x = msg["vfiod"], msg["responder"], msg["vfiod_over_responder"]
    print("  vfiod (power8 PHB) | minimal Python responder | ratio, same blocking client:")
    rr_v, rr_r = v["region_read_4b"], r["region_read_4b"]
    print(f"    REGION_READ 4 B round trip: {rr_v['median_us']:.1f} us (p99 {rr_v['p99_us']:.0f})"
          f" | {rr_r['median_us']:.1f} us (p99 {rr_r['p99_us']:.0f}) | "
          f"{x['region_read_round_trip']:.2f}x (target <= 0.7x)")
    for key, label, target in (("dma_map_4k_pipelined", "DMA_MAP", "0.7"),
                               ("dma_unmap_4k_pipelined", "DMA_UNMAP", "0.85")):
        ratio = x["dma_map_rate" if label == "DMA_MAP" else "dma_unmap_rate"]
        print(f"    {v[key]['n']:,} pipelined 4 KiB {label}s: {v[key]['per_s']:,.0f}/s | "
              f"{r[key]['per_s']:,.0f}/s | {ratio:.2f}x (target >= {target}x)")
    sv, sr = v["unmap_storm"], r["unmap_storm"]
    print(f"    storm of {sv['n']:,} synchronous unmaps: {sv['per_s']:,.0f}/s | "
          f"{sr['per_s']:,.0f}/s | {x['storm_rate']:.2f}x; server CPU "
          f"{sv['server']['cpu_us']:.1f} | {sr['server']['cpu_us']:.1f} us/message")
    layers = results.get("layers", {}).get("layer_cpu_us")
    if layers:
        print("  CPU per storm message by layer, in-process and warm (us): "
              + ", ".join(f"{k} {layers[k]:.1f}" for k in layer_bench.LAYERS if k in layers))
    boot = results.get("pseries_boot")
    if boot:
        with_vf = boot["with_vfiod_vf"]
        print(f"  pseries boot: {boot['without_device']['seconds']:.1f} s without a device, "
              f"{with_vf['seconds']:.1f} s with one vfiod VF: +{boot['difference_s']:.1f} s = "
              f"{boot['difference_over_without']:.2f}x (target <= 3.0x)")
        if with_vf["messages"]:
            print(f"    {with_vf['messages']:,.0f} messages: the guest waited "
                  f"{boot['difference_us_per_message']:.1f} us per message, the daemon's CPU "
                  f"{with_vf['daemon_cpu_s']:.1f} s = "
                  f"{with_vf['daemon_cpu_us_per_message']:.1f} us per message")
    ppc = results.get("nvme_guests", {}).get("ppc64le", {})
    per_tce, before = ppc.get("tce32_per_tce", {}), ppc.get("tce32_per_tce_python_messages", {})
    if per_tce.get("mb_per_s"):
        print("  pseries 32-bit per-TCE dd (ddw=off) MB/s, C message fast path | all messages "
              "through the trio session | ratio:")
        for key, val in per_tce["mb_per_s"].items():
            old = (before.get("mb_per_s") or {}).get(key)
            print(f"    {key}: {val} | {old} | "
                  f"{ppc.get('per_tce_fast_over_python_messages', {}).get(key)}")


if __name__ == "__main__":
    sys.exit(main())
