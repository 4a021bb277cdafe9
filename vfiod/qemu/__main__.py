"""python -m vfiod.qemu cmdline|run|probe — print a guest command line, boot a guest, probe KVM."""

from __future__ import annotations

import argparse
import sys

import trio

from .accel import kvm_precheck, kvm_usable
from .cmdline import format_command_line, qemu_command_line
from .guest import run_guest
from .locate import QemuNotProvisioned


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vfiod.qemu")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("cmdline", "run"):
        p = sub.add_parser(name)
        p.add_argument("--arch", default="x86_64")
        p.add_argument("--socket", action="append", default=[], help="vfio-user socket path")
        p.add_argument("--memory-mb", type=int, default=1024)
        p.add_argument("--accel", choices=["tcg", "kvm"], default=None)
        p.add_argument("--kernel-args", default="")
    sub.choices["cmdline"].add_argument("--qmp", default=None, help="QMP socket (pseries)")
    run = sub.choices["run"]
    run.add_argument("--script", default="-", help="guest shell script file ('-': stdin)")
    run.add_argument("--timeout", type=float, default=180.0)
    probe = sub.add_parser("probe")
    probe.add_argument("--arch", default="x86_64")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "cmdline":
            cmd = qemu_command_line(a.arch, a.socket, memory_mb=a.memory_mb,
                                    accel=a.accel or "tcg", kernel_args=a.kernel_args,
                                    qmp_socket=a.qmp)
            print(format_command_line(cmd))
            if a.arch != "x86_64" and a.socket:
                print("# pseries: then over QMP: device_add each vfio-user-pci device, cont",
                      file=sys.stderr)
            return 0
        if a.cmd == "probe":
            print(f"precheck: {kvm_precheck(a.arch) or 'ok'}")
            print(f"kvm usable: {trio.run(kvm_usable, a.arch)}")
            return 0
        script = sys.stdin.read() if a.script == "-" else open(a.script).read()

        async def go() -> int:
            res = await run_guest(a.arch, script, a.socket, memory_mb=a.memory_mb,
                                  accel=a.accel, timeout=a.timeout, kernel_args=a.kernel_args)
            sys.stdout.write(res.console)
            print(f"\n# {res.describe()}", file=sys.stderr)
            return 0 if res.ok else 1

        return trio.run(go)
    except QemuNotProvisioned as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
