"""The session fuzzer inside `make test`: 100,000 hostile messages against a live daemon, with
another tenant doing checked work beside them (`make fuzz` runs a million)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from session_fuzz import fuzz

#: RSS the daemon may keep after the fuzz (allocator and cache slack; it levels off at a few
#: MiB however long the fuzz runs, where a leak would grow with the messages).
RSS_SLACK = 16 << 20
#: QEMU gives up on a reply after 5 s: the bystander must never wait that long.
QEMU_REPLY_TIMEOUT = 5.0


async def test_100k_hostile_messages_leave_nothing_behind(tmp_path: Path) -> None:
    seed = int(os.environ.get("VFIOD_FUZZ_SEED", random.randrange(1 << 32)))
    report = await fuzz(tmp_path, 100_000, seed)
    context = f"seed {seed} (VFIOD_FUZZ_SEED={seed} replays it): {report}"
    assert report.messages >= 100_000, context
    assert report.problems(RSS_SLACK) == [], context
    assert report.crashes == 0 and report.leaked_fds == 0, context
    assert report.bystander["ops"] > 100, context
    assert report.bystander["max_latency_s"] < QEMU_REPLY_TIMEOUT, context
    # the fuzz reached deep states, not just the framing
    counters = report.daemon_counters
    assert counters["function_dma_maps_total"] > 100, context
    assert counters["pe_dma_faults_total"] > 0, context  # frozen or not: the PHB's dma_fault
    assert counters["function_sessions_total"] > 20, context
