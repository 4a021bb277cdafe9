"""vfiod-qemu: run a stock QEMU command line with vfiod functions attached.

    vfiod-qemu --socket /run/vfiod/nvme1-vf0.sock -- qemu-system-ppc64 -M pseries ... -append ...
    vfiod-qemu --vf nvme0-vf0 -- qemu-system-x86_64 -M q35 ...

Each function becomes a vfio-user-pci device. On q35 (and every machine but pseries) they are
`-device` arguments and QEMU replaces this process. QEMU 11.1.3 aborts at machine start when a
pseries machine has a vfio-user-pci device on its command line (README, "pseries guests"), so for
pseries the launcher starts QEMU paused with a private QMP socket, adds the devices over QMP while
the machine is in prelaunch, resumes it, and adds eeh=off to the guest kernel's command line (an
EEH RTAS call would reach the same abort). Either way QEMU keeps this terminal (the console
passes through), termination signals are forwarded, and the exit status is QEMU's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .cmdline import vfio_user_device, vfio_user_device_json
from .qmp import PRELAUNCH_TIMEOUT, prelaunch

__all__ = ["LaunchPlan", "main", "plan_launch"]

USAGE_EPILOG = """\
examples:
  vfiod-qemu --socket /run/vfiod/nvme1-vf0.sock -- qemu-system-ppc64 -M pseries,x-vof=on \\
      -cpu POWER8 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \\
      -machine memory-backend=mem -nographic -kernel vmlinux -initrd initrd.img \\
      -append console=hvc0
  vfiod-qemu --vf nvme0-vf0 --vf nvme0-vf1 -- qemu-system-x86_64 -M q35 -m 1G ...

Guest RAM must be a shared memory backend (memory-backend-memfd,share=on): vfiod maps it to do
the device's DMA. pseries: -S and a QMP socket are added, the devices are added over QMP in
prelaunch, then the machine continues (unless your command line has -S itself: then it stays
paused for you); eeh=off is appended to -append. The exit status is QEMU's (128+N if a signal N
killed it); 1 if the devices could not be added, 2 for a usage error.
"""

_ID_RE = re.compile(r"[^A-Za-z0-9_.-]")


class LaunchError(Exception):
    """A command line or socket the launcher cannot use; the message says why."""


@dataclass(frozen=True)
class LaunchPlan:
    """What to run: QEMU's argv, and for pseries the devices to add over QMP in prelaunch."""

    argv: list[str]
    pseries: bool
    devices: list[dict[str, Any]]
    qmp_socket: Path | None
    cont: bool
    warnings: list[str]


def device_id(socket_path: Path, taken: set[str]) -> str:
    """A QEMU device id from the socket's name (nvme1-vf0.sock -> nvme1-vf0), unique."""
    base = _ID_RE.sub("_", socket_path.name.removesuffix(".sock")) or "vfu"
    if not base[0].isalpha():
        base = f"vfu-{base}"
    dev_id, n = base, 1
    while dev_id in taken:
        dev_id, n = f"{base}.{n}", n + 1
    taken.add(dev_id)
    return dev_id


def _option_values(argv: Sequence[str], *names: str) -> list[str]:
    """Values of QEMU options `names` (`-M x` and `-M=x` are not QEMU syntax; `--M x` is)."""
    values = []
    for i, arg in enumerate(argv[:-1]):
        if arg in names or (arg.startswith("--") and arg[1:] in names):
            values.append(argv[i + 1])
    return values


def is_pseries(argv: Sequence[str]) -> bool:
    """A pseries machine: -M/-machine pseries[-x.y][,...], or qemu-system-ppc64's default."""
    for value in _option_values(argv, "-M", "-machine"):
        first = value.split(",", 1)[0]
        if first.startswith("type="):
            first = first[5:]
        if "=" not in first and first:
            return first == "pseries" or first.startswith("pseries-")
    return "ppc64" in Path(argv[0]).name


def plan_launch(argv: Sequence[str], sockets: Sequence[Path], qmp_dir: Path,
                machine: str = "auto") -> LaunchPlan:
    """QEMU's argv with the vfio-user devices for `sockets` (pure: no process, no socket)."""
    if not argv:
        raise LaunchError("no QEMU command line (give it after --)")
    if not sockets:
        raise LaunchError("no function to attach (--socket PATH or --vf NAME)")
    taken: set[str] = set()
    ids = [device_id(path, taken) for path in sockets]
    devices = [vfio_user_device(path, dev_id) for path, dev_id in zip(sockets, ids, strict=True)]
    pseries = is_pseries(argv) if machine == "auto" else machine == "pseries"
    out = list(argv)
    warnings = []
    if not any("share=on" in value for value in _option_values(out, "-object")):
        warnings.append("no shared memory backend (-object memory-backend-memfd,...,share=on "
                        "-machine memory-backend=...): the device's DMA will fail")
    if not pseries:
        for path, dev_id in zip(sockets, ids, strict=True):
            out += ["-device", vfio_user_device_json(path, dev_id)]
        return LaunchPlan(out, False, devices, None, True, warnings)
    if "-append" in out[:-1]:
        i = out.index("-append") + 1
        if "eeh=off" not in out[i].split():
            out[i] = f"{out[i]} eeh=off".strip()
    elif "-kernel" in out:
        out += ["-append", "eeh=off"]
    else:
        warnings.append("no -kernel/-append: boot the guest kernel with eeh=off yourself (an EEH "
                        "RTAS call aborts QEMU 11.1 with a vfio-user device on pseries)")
    user_paused = "-S" in out
    qmp = qmp_dir / "qmp.sock"
    out += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if not user_paused:
        out.append("-S")
    return LaunchPlan(out, True, devices, qmp, not user_paused, warnings)


def default_socket_dir() -> Path:
    """vfiod's default socket directory (the rule of vfiod.config.default_socket_dir, repeated:
    vfiod.qemu is tooling beside the daemon's layers and imports none of them)."""
    if os.geteuid() == 0:
        return Path("/run/vfiod")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "vfiod" if runtime else Path(f"/tmp/vfiod-{os.getuid()}")


def _check_socket(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise LaunchError(f"{path}: {exc.strerror} (is vfiod running? `vfiodctl list`)") from None
    if not stat.S_ISSOCK(mode):
        raise LaunchError(f"{path}: not a socket")


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


async def run_pseries(plan: LaunchPlan, timeout: float = PRELAUNCH_TIMEOUT) -> int:
    """Start QEMU on this terminal, add the devices in prelaunch, forward signals, wait."""
    assert plan.qmp_socket is not None
    proc = await trio.lowlevel.open_process(plan.argv)  # stdin/stdout/stderr: ours
    exited = trio.Event()
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    try:
        with trio.open_signal_receiver(*forwarded) as signals:
            async with trio.open_nursery() as nursery:

                async def waiter() -> None:
                    await proc.wait()
                    exited.set()
                    nursery.cancel_scope.cancel()

                async def forward() -> None:
                    async for signum in signals:
                        if proc.returncode is None:
                            proc.send_signal(signum)

                nursery.start_soon(waiter)
                nursery.start_soon(forward)
                error = await prelaunch(plan.qmp_socket, plan.devices, exited, timeout=timeout,
                                        cont=plan.cont)
                if error is not None:
                    print(f"vfiod-qemu: {error}", file=sys.stderr, flush=True)
                    if proc.returncode is None:  # we stop it: the failure is ours to report
                        proc.kill()
                        await proc.wait()
                        return 1
                    return _exit_status(proc.returncode) or 1
                await exited.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    assert proc.returncode is not None
    return _exit_status(proc.returncode)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfiod-qemu",
        usage="vfiod-qemu [--socket PATH | --vf NAME]... [options] -- QEMU [QEMU-ARG...]",
        description="Run a QEMU command line with vfiod functions attached as vfio-user-pci "
                    "devices (pseries: added over QMP in prelaunch, the QEMU 11.1 workaround).",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--socket", action="append", default=[], metavar="PATH", type=Path,
                   help="a function's vfio-user socket (repeatable)")
    p.add_argument("--vf", action="append", default=[], metavar="NAME",
                   help="a function by name: SOCKET_DIR/NAME.sock (repeatable)")
    p.add_argument("--socket-dir", metavar="DIR", type=Path,
                   help="vfiod's socket directory for --vf (default: vfiod's default, "
                        "/run/vfiod as root)")
    p.add_argument("--machine", choices=["auto", "pseries", "other"], default="auto",
                   help="auto: pseries if -M/-machine says so or QEMU is qemu-system-ppc64")
    p.add_argument("--prelaunch-timeout", type=float, default=PRELAUNCH_TIMEOUT, metavar="S",
                   help=f"pseries: longest the QMP device_add + cont may take "
                        f"(default {PRELAUNCH_TIMEOUT:.0f})")
    p.add_argument("--dry-run", action="store_true",
                   help="print the QEMU command line (and the QMP steps) instead of running it")
    return p


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if "--" in args_in:
        cut = args_in.index("--")
        ours, qemu = args_in[:cut], args_in[cut + 1:]
    else:
        ours, qemu = args_in, []
    parser = build_parser()
    args = parser.parse_args(ours)
    sockets: list[Path] = list(args.socket)
    if args.vf:
        socket_dir = args.socket_dir or default_socket_dir()
        sockets += [socket_dir / f"{name}.sock" for name in args.vf]
    if qemu and not args.dry_run and shutil.which(qemu[0]) is None:
        print(f"vfiod-qemu: {qemu[0]}: no such program", file=sys.stderr)
        return 2
    qmp_dir = Path(tempfile.mkdtemp(prefix="vfiod-qemu-"))
    try:
        try:
            plan = plan_launch(qemu, sockets, qmp_dir, args.machine)
            if not args.dry_run:
                for path in sockets:
                    _check_socket(path)
        except LaunchError as exc:
            parser.print_usage(sys.stderr)
            print(f"vfiod-qemu: {exc}", file=sys.stderr)
            return 2
        for warning in plan.warnings:
            print(f"vfiod-qemu: warning: {warning}", file=sys.stderr, flush=True)
        if args.dry_run:
            import shlex

            print(shlex.join(plan.argv))
            if plan.pseries:
                for dev in plan.devices:
                    arg = json.dumps(dev, separators=(",", ":"))
                    print(f"# QMP in prelaunch: device_add {arg}")
                print("# QMP: cont" if plan.cont else "# left paused (-S on the command line)")
            return 0
        if not plan.pseries:
            shutil.rmtree(qmp_dir, ignore_errors=True)
            os.execvp(plan.argv[0], plan.argv)  # QEMU takes this process over
        return trio.run(run_pseries, plan, args.prelaunch_timeout)
    finally:
        shutil.rmtree(qmp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
