"""Soak: a QEMU SIGKILLed mid-I/O again and again on one NVMe VF while a guest on another VF
of the same PF does checked I/O.

After every kill the daemon must let go of everything the dead QEMU held (its session, its
locked-memory account, its fds), and at the end its fds, locked memory and RSS must be back at
the baseline taken before any guest attached. The other VF's guest checks every block it reads
back, and its namespace file must hold exactly what it wrote and nothing else.

Real x86 q35 guests under TCG, booted from the provisioned images (vfiod.qemu). The daemon is a
process of its own (tests/hostile/daemon_proc.py), so what it holds is counted from outside.

    python tests/hostile/soak.py --kills 100 --json bench/results/soak.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):  # run as a script: the repository root for vfiod and bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_proc import DaemonProc  # noqa: E402

from vfiod.qemu import guest_image  # noqa: E402
from vfiod.qemu.cmdline import qemu_command_line  # noqa: E402
from vfiod.qemu.guest import build_initrd_overlay, parse_console  # noqa: E402

NS_SIZE = 64 << 20
#: The bystander writes only below this offset; the rest of its namespace must stay zero.
BYSTANDER_AREA = 16 << 20
CHUNK = 1 << 20
MEMORY_MB = 256

#: Write and read the whole time: the kill lands in the middle of some NVMe command.
VICTIM_SCRIPT = r"""
dev=/dev/nvme0n1
[ -b $dev ] || { echo "@@VFIOD error=no-nvme-disk"; exit 1; }
( i=0
  while true; do
    dd if=/dev/zero of=$dev bs=64k count=16 seek=$(( (i % 32) * 16 )) oflag=direct 2>/dev/null
    dd if=$dev of=/dev/null bs=64k count=16 skip=$(( (i % 32) * 16 )) iflag=direct 2>/dev/null
    i=$((i + 1))
  done ) &
sleep 1
echo "@@VFIOD io=running"
wait
"""

#: Checked I/O for SECONDS: a fresh random MiB at a rotating offset, read back and compared.
BYSTANDER_SCRIPT = r"""
dev=/dev/nvme0n1
[ -b $dev ] || { echo "@@VFIOD error=no-nvme-disk"; exit 1; }
end=$(( $(cut -d. -f1 /proc/uptime) + SECONDS ))
n=0; bad=0; slot=0
echo "@@VFIOD io=running"
while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do
  slot=$(( n % SLOTS ))
  dd if=/dev/urandom of=/p bs=64k count=16 2>/dev/null
  dd if=/p of=$dev bs=64k count=16 seek=$(( slot * 16 )) oflag=direct 2>/dev/null \
    || echo "@@VFIOD error=write"
  dd if=$dev of=/b bs=64k count=16 skip=$(( slot * 16 )) iflag=direct 2>/dev/null \
    || echo "@@VFIOD error=read"
  [ "$(md5sum < /p)" = "$(md5sum < /b)" ] || bad=$((bad + 1))
  echo "@@VFIOD slot$slot=$(md5sum < /p | cut -d' ' -f1)"
  n=$((n + 1))
done
echo "@@VFIOD rounds=$n bad=$bad"
"""


@dataclass
class Guest:
    console: str
    stderr: str
    returncode: int | None
    pid: int
    markers: dict[str, str]
    killed: bool
    io_started_s: float | None  # boot to the first I/O


async def run_qemu(work: Path, socket: Path, script: str, kill_after: float | None,
                   timeout: float, on_start: Any = None) -> Guest:
    """One x86 q35 TCG guest on ``socket``; with ``kill_after``, SIGKILL it that many seconds
    after its I/O started (or at ``timeout`` if it never gets there)."""
    img = guest_image("x86_64")
    initrd = work / f"initrd-{random.getrandbits(32):08x}.img"
    base = img.initrd.read_bytes()
    initrd.write_bytes(base + b"\0" * (-len(base) % 4) + build_initrd_overlay(script))
    cmd = qemu_command_line("x86_64", [socket], memory_mb=MEMORY_MB, accel="tcg",
                            kernel=img.kernel, initrd=initrd)
    out = bytearray()
    err = bytearray()
    t0 = time.monotonic()
    started: list[float] = []
    killed = False
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    if on_start is not None:
        on_start(proc.pid)
    io_running = trio.Event()

    async def pump(stream: trio.abc.ReceiveStream, buf: bytearray, watch: bool) -> None:
        async for chunk in stream:
            buf += chunk
            if watch and not io_running.is_set() and b"@@VFIOD io=running" in buf:
                started.append(time.monotonic() - t0)
                io_running.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, proc.stdout, out, True)
            nursery.start_soon(pump, proc.stderr, err, False)
            with trio.move_on_after(timeout):
                if kill_after is not None:
                    with trio.move_on_after(timeout - 1):
                        await io_running.wait()
                        await trio.sleep(kill_after)
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        initrd.unlink(missing_ok=True)
    console = out.decode(errors="replace").replace("\r", "")
    markers, _, _ = parse_console(console)
    return Guest(console, err.decode(errors="replace"), proc.returncode, proc.pid, markers,
                 killed, started[0] if started else None)


@dataclass
class Sample:
    kill: int
    io_started_s: float | None
    killed_after_s: float
    released_s: float  # SIGKILL to session gone and locked-memory account dropped
    fds: int
    rss: int
    locked_bytes: int


@dataclass
class SoakReport:
    kills: int
    wall_s: float
    baseline: dict[str, int]
    final: dict[str, int]
    samples: list[Sample]
    bystander_runs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        fds = [s.fds for s in self.samples]
        rss = [s.rss for s in self.samples]
        released = [s.released_s for s in self.samples]
        return {
            "kills": self.kills,
            "wall_s": round(self.wall_s, 1),
            "baseline": self.baseline,
            "final": self.final,
            "fds_after_each_kill": {"min": min(fds, default=0), "max": max(fds, default=0)},
            "rss_after_each_kill_mib": {"min": min(rss, default=0) >> 20,
                                        "max": max(rss, default=0) >> 20},
            "release_after_kill_s": {"max": round(max(released, default=0.0), 2),
                                     "mean": round(sum(released) / max(1, len(released)), 2)},
            "bystander_rounds": sum(int(r.get("rounds", 0)) for r in self.bystander_runs),
            "bystander_bad": sum(int(r.get("bad", 0)) for r in self.bystander_runs),
            "problems": self.problems,
        }


def _locked(accounts: list[dict[str, Any]], pid: int | None = None) -> int:
    return sum(int(a.get("locked_bytes", 0)) for a in accounts
               if pid is None or a.get("pid") == pid)


def _state(daemon: DaemonProc) -> dict[str, int]:
    return {"fds": daemon.fds(), "rss": daemon.rss(), "locked_bytes": _locked(daemon.memlock())}


async def soak(work: Path, kills: int, bystander_seconds: int = 120,
               rss_slack: int = 16 << 20, progress: Any = None,
               artifacts: Path | None = None) -> SoakReport:
    """``artifacts``: where to keep the console of a guest that went wrong and the daemon log."""
    say = progress or (lambda s: None)

    def keep(name: str, text: str) -> str:
        if artifacts is None:
            return text[-1500:]
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / name).write_text(text)
        return f"see {artifacts / name}"

    backing = work / "pf.img"
    daemon = DaemonProc(work, {"nvme0": {"personality": "nvme", "backing": str(backing),
                                         "size": NS_SIZE, "totalvfs": 2, "numvfs": 2}})
    victim_sock, bystander_sock = daemon.sock("nvme0-vf0"), daemon.sock("nvme0-vf1")
    problems: list[str] = []
    samples: list[Sample] = []
    runs: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        daemon.wait_ready(extra=["nvme0-vf0", "nvme0-vf1"])
        await trio.sleep(0.5)
        baseline = _state(daemon)
        say(f"baseline {baseline}")
        victims_done = trio.Event()
        bystander_pids: list[int] = []

        async def bystander() -> None:
            """Guest after guest of checked I/O on the other VF until the kills are over."""
            slots = BYSTANDER_AREA // CHUNK
            while not victims_done.is_set():
                script = BYSTANDER_SCRIPT.replace("SECONDS", str(bystander_seconds)).replace(
                    "SLOTS", str(slots))
                g = await run_qemu(work, bystander_sock, script, None,
                                   timeout=bystander_seconds + 300,
                                   on_start=bystander_pids.append)
                run = {"rounds": g.markers.get("rounds"), "bad": g.markers.get("bad"),
                       "returncode": g.returncode, "errors": g.markers.get("error")}
                runs.append(run)
                if g.markers.get("rounds") is None or g.markers.get("bad") != "0" or \
                        "error" in g.markers or g.returncode != 0:
                    where = keep(f"bystander-{len(runs)}.txt", g.console + "\n" + g.stderr)
                    problems.append(f"bystander run {len(runs)}: {run}: {where}")
                    victims_done.set()
                    return
                # the namespace file holds exactly what the guest last wrote to each slot
                data = backing.with_name("pf-vf1.img").read_bytes()
                for key, digest in g.markers.items():
                    m = re.fullmatch(r"slot(\d+)", key)
                    if m is None:
                        continue
                    at = int(m.group(1)) * CHUNK
                    if hashlib.md5(data[at:at + CHUNK]).hexdigest() != digest:
                        problems.append(f"bystander slot {m.group(1)} differs in the file")
                if data[BYSTANDER_AREA:].count(0) != NS_SIZE - BYSTANDER_AREA:
                    problems.append("bytes nobody wrote appeared in the bystander's namespace")
                say(f"bystander run {len(runs)}: {run}")

        async def victims() -> None:
            rng = random.Random(kills)
            try:
                for k in range(kills):
                    if any(not p.startswith("kill ") or "reached its I/O" not in p
                           for p in problems):
                        return
                    delay = rng.uniform(0.05, 2.0)
                    g = await run_qemu(work, victim_sock, VICTIM_SCRIPT, delay, timeout=150)
                    t_kill = time.monotonic()  # run_qemu returns once QEMU is reaped
                    if not g.killed:
                        where = keep(f"victim-{k}.txt", g.console + "\n" + g.stderr)
                        problems.append(f"kill {k}: the guest ended by itself: {where}")
                        return
                    if g.io_started_s is None:
                        # killed all the same (at the timeout): the release is still checked
                        where = keep(f"victim-{k}.txt", g.console + "\n" + g.stderr)
                        problems.append(f"kill {k}: the guest never reached its I/O: {where}")
                    # the daemon lets go of the dead QEMU: session, account, fds
                    with trio.move_on_after(30) as waited:
                        while True:
                            accounts = daemon.memlock()
                            if not any(a.get("pid") == g.pid for a in accounts) and \
                                    daemon.metric("vfiod_function_client_attached",
                                                  "nvme0-vf0") == 0:
                                break
                            await trio.sleep(0.05)
                    if waited.cancelled_caught:
                        problems.append(f"kill {k}: the daemon still holds the dead QEMU")
                        return
                    samples.append(Sample(
                        kill=k, io_started_s=None if g.io_started_s is None else round(
                            g.io_started_s, 2),
                        killed_after_s=round(delay, 2),
                        released_s=round(time.monotonic() - t_kill, 3),
                        fds=daemon.fds(), rss=daemon.rss(),
                        locked_bytes=_locked(daemon.memlock()),
                    ))
                    if not daemon.alive():
                        problems.append(f"kill {k}: the daemon died: {daemon.log()[-2000:]}")
                        return
                    say(f"kill {k + 1}/{kills}: io after {samples[-1].io_started_s} s, killed "
                        f"{delay:.2f} s into it; daemon fds {samples[-1].fds}, "
                        f"RSS {samples[-1].rss >> 20} MiB, released in "
                        f"{samples[-1].released_s:.2f} s")
            finally:
                victims_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander)
            # the bystander attaches first, so every kill happens next to its I/O
            with trio.fail_after(300):
                while not bystander_pids:
                    await trio.sleep(0.1)
            nursery.start_soon(victims)
        with trio.move_on_after(30):
            while daemon.alive() and (daemon.memlock() or daemon.fds() != baseline["fds"]):
                await trio.sleep(0.1)
        final = _state(daemon) if daemon.alive() else {}
        if not final:
            problems.append("the daemon is gone")
        else:
            if final["fds"] != baseline["fds"]:
                problems.append(f"fds {baseline['fds']} -> {final['fds']}: {daemon.fd_kinds()}")
            if final["locked_bytes"] != baseline["locked_bytes"]:
                problems.append(f"locked memory {baseline['locked_bytes']} -> "
                                f"{final['locked_bytes']}")
            if final["rss"] - baseline["rss"] > rss_slack:
                problems.append(f"RSS {baseline['rss']} -> {final['rss']}")
        log = daemon.log()
        crashes = [line for line in log.splitlines() if "session failed" in line
                   or "Traceback" in line]
        if crashes:
            problems.append(f"session failures in the log: {crashes[:5]}")
        if problems:
            keep("vfiod.log", log)
        if len(samples) != kills and not problems:
            problems.append(f"only {len(samples)} of {kills} kills done")
        return SoakReport(kills=len(samples), wall_s=time.monotonic() - t_start,
                          baseline=baseline, final=final, samples=samples,
                          bystander_runs=runs, problems=problems)
    finally:
        status = daemon.stop()
        if status != 0:
            problems.append(f"the daemon exited with {status}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--bystander-seconds", type=int, default=120,
                   help="length of each bystander guest's I/O run (guests follow each other)")
    p.add_argument("--json", type=Path, help="write the report (with machine info) here")
    p.add_argument("--artifacts", type=Path, default=Path("build/soak"),
                   help="consoles of guests that went wrong, and the daemon log, go here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vfiod-soak-") as tmp:
        report = trio.run(soak, Path(tmp), a.kills, a.bystander_seconds, 16 << 20,
                          lambda s: print(s, file=sys.stderr, flush=True), a.artifacts)
    summary = report.summary()
    if a.json is not None:
        from bench.machine import machine_info

        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": machine_info(), "soak": summary,
                                      "samples": [asdict(s) for s in report.samples],
                                      "bystander_runs": report.bystander_runs},
                                     indent=2) + "\n")
    print(json.dumps(summary))
    for line in report.problems:
        print("PROBLEM:", line)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
