"""sPAPR TCE fast-path benchmark: batched TCE writes (cffi vs Python twin) and translation.

``run()`` returns a dict of figures; the lead's ``make bench`` adds machine info and writes JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vfiod import spapr
from vfiod.spapr.fastpath import PYTHON, FastPath, cffi_impl

BATCH = 512
MEM_BASE = 0x1_0000_0000
MEM_SIZE = 64 << 20


def _rate(fn: Callable[[], None], work: int, min_time: float = 0.3) -> float:
    """Work units per second of fn (repeated until min_time has passed)."""
    fn()  # warm up (allocates leaves)
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n * work / dt


def _setup(impl: FastPath) -> tuple[spapr.Phb, spapr.Pe, int]:
    phb = spapr.Phb(index=0, impl=impl)
    phb.memory.add(MEM_BASE, MEM_SIZE, bytearray(MEM_SIZE))
    pe = phb.new_pe()
    return phb, pe, pe.liobn(0)


def _tce_list(first: int) -> bytes:
    return b"".join(((first + i * 4096) | spapr.TCE_RW).to_bytes(8, "big") for i in range(BATCH))


def bench_impl(impl: FastPath, min_time: float = 0.3) -> dict[str, float]:
    phb, pe, liobn = _setup(impl)
    win = pe.windows[0]
    assert win is not None
    lst = _tce_list(MEM_BASE)
    nbatches = 64  # spread batches over 32K entries (128 MiB of IOVA)

    def kernel() -> None:  # validate + write, the H_PUT_TCE_INDIRECT core
        for b in range(nbatches):
            win.put_be_checked(b * BATCH * 4096, lst, BATCH)

    def hcall() -> None:  # the whole hypercall, KVM-strict
        put = phb.h_put_tce_indirect
        for b in range(nbatches):
            put(liobn, b * BATCH * 4096, lst, BATCH)

    def stuff() -> None:
        phb.h_stuff_tce(liobn, 0, 0, 32768)

    def map_range() -> None:
        for b in range(nbatches):
            win.map_pages(b * BATCH * 4096, (MEM_BASE, BATCH), spapr.TCE_RW)

    out = {
        "batch_write_entries_per_s": _rate(kernel, nbatches * BATCH, min_time),
        "h_put_tce_indirect_entries_per_s": _rate(hcall, nbatches * BATCH, min_time),
        "h_stuff_tce_entries_per_s": _rate(stuff, 32768, min_time),
        "map_pages_entries_per_s": _rate(map_range, nbatches * BATCH, min_time),
    }
    # translation: 4 KiB pages mapped to scattered (non-contiguous) host pages
    for b in range(16):
        first = MEM_BASE + ((b * 7) % 16) * BATCH * 4096
        win.map_pages(b * BATCH * 4096, (first, BATCH), spapr.TCE_RW)
    big = 1 << 20

    def translate_big() -> None:
        pe.translate(0, big, False)

    sg = [(i * 8192 + 512, 1024) for i in range(64)]

    def translate_sg() -> None:
        pe.translate_sg(sg, True)

    out["translate_1MiB_GB_per_s"] = _rate(translate_big, big, min_time) / 1e9
    out["translate_sg64_pieces_per_s"] = _rate(translate_sg, len(sg), min_time)
    return out


def run(min_time: float = 0.3) -> dict[str, Any]:
    res: dict[str, Any] = {"batch": BATCH, "python": bench_impl(PYTHON, min_time)}
    c = cffi_impl()
    if c is not None:
        res["cffi"] = bench_impl(c, min_time)
        res["speedup"] = {k: res["cffi"][k] / res["python"][k] for k in res["python"]}
    return res


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
