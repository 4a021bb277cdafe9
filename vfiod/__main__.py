"""Command line: ``vfiod [--config FILE]`` and ``vfiod --check-config FILE``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import trio

from vfiod import __version__, logs
from vfiod.config import Config, ConfigError, load
from vfiod.daemon import Daemon, serve_until_signalled
from vfiod.host import Slot, control_socket_path

EPILOG = """\
Without --config, vfiod serves its embedded default configuration: a "flat" PHB for x86 q35
guests and a "power8" PHB for pseries guests, an NVMe PF with 2 VFs on each (namespaces are
sparse files in the state directory) and the test function; it prints every socket and, for
each VF, the command that boots a guest on it.
Each function gets its own vfio-user socket; attach it to a QEMU >= 10.1 guest with
  -object memory-backend-memfd,id=mem,size=2G,share=on -machine q35,memory-backend=mem -m 2G
  -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"SOCKET"}}'
or through the launcher (it also does the pseries workaround):
  vfiod-qemu --socket SOCKET -- QEMU-COMMAND-LINE
SIGTERM or SIGINT stops the daemon: clients are closed and sockets removed.
SIGHUP re-reads the configuration without dropping attached clients (a bad one changes
nothing); systemd's `systemctl reload vfiod` sends it.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfiod",
        description="Serve emulated PCI functions to QEMU guests over vfio-user.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration (default: embedded)")
    p.add_argument(
        "--check-config",
        metavar="FILE",
        help="check a configuration, report every problem, exit non-zero if any",
    )
    p.add_argument("--socket-dir", metavar="DIR", help="override the socket directory")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="override where run-time changes (numvfs) persist across restarts",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    p.add_argument(
        "--log-format",
        default="logfmt",
        choices=["logfmt", "text"],
        help="logfmt: one event per line as key=value pairs (default); text: plain lines",
    )
    p.add_argument("--version", action="version", version=f"vfiod {__version__}")
    return p


def announce(daemon: Daemon) -> None:
    """What a newcomer needs: every socket per PHB, and for each VF a command that boots a
    guest on it (printed so that it works when pasted; tests/test_run.py runs it)."""
    from vfiod.qemu.boot import BootTarget, boot_commands

    config = daemon.config
    print(f"vfiod {__version__}: serving {len(daemon.endpoints)} function(s) from "
          f"{config.source}", flush=True)
    print(f"  state:   {config.state_dir}  (namespace files, run-time numvfs)")
    print(f"  control: {control_socket_path(config)}  "
          f"(vfiodctl --socket {control_socket_path(config)} list)")
    host = daemon.host
    for index, hphb in sorted(host.phbs.items()):
        slots = [s for s in host.slots if s.phb is hphb]
        if not slots:
            continue
        print(f"PHB {index} (window_policy {hphb.config.window_policy}):")
        for slot in slots:
            print(f"  {slot.name:<12} {slot.endpoint.path}  {describe_slot(slot)}")
    commands = boot_commands([
        BootTarget(s.name, s.endpoint.path, s.phb.config.window_policy)
        for s in host.slots if s.kind == "vf"
    ])
    if commands:
        print("Boot a guest on a VF (one guest per VF; paste a command in another terminal):")
        for title, command in commands:
            print(f"# {title}")
            print(command)
    print("Stop with Ctrl-C or SIGTERM.", flush=True)


def describe_slot(slot: Slot) -> str:
    what = {"testdev": "test function", "nvme": "NVMe"}.get(slot.config.personality,
                                                          slot.config.personality)
    if slot.kind == "pf":
        what += f" PF, {len(slot.vfs)} of {slot.config.totalvfs} VFs enabled"
    elif slot.kind == "vf":
        what += " VF"
    if slot.config.backing is not None:
        what += f", namespace {slot.config.backing}"
    return what


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    if args.check_config:
        try:
            load(args.check_config)
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"{exc.source}: {problem}", file=sys.stderr)
            return 1
        print(f"{args.check_config}: OK")
        return 0

    def configure() -> Config:
        config = load(args.config, state_dir=Path(args.state_dir) if args.state_dir else None)
        if args.socket_dir:
            config = dataclasses.replace(config, socket_dir=Path(args.socket_dir))
        return config

    try:
        config = configure()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        print("vfiod: refusing to start on a bad configuration", file=sys.stderr)
        return 1
    try:
        trio.run(serve_until_signalled, config, announce, configure)
    except OSError as exc:
        print(f"vfiod: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
