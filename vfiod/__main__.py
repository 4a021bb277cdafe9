"""Command line: ``vfiod [--config FILE]`` and ``vfiod --check-config FILE``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import trio

from vfiod import __version__, logs
from vfiod.config import Config, ConfigError, load
from vfiod.daemon import Daemon, qemu_device_arg, serve_until_signalled
from vfiod.host import control_socket_path

EPILOG = """\
Without --config, vfiod serves its embedded default configuration (one test function).
Each function gets its own vfio-user socket; attach it to a QEMU >= 10.1 guest with
  -object memory-backend-memfd,id=mem,size=2G,share=on -machine q35,memory-backend=mem -m 2G
  -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"SOCKET"}}'
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
    print(f"vfiod {__version__}: serving {len(daemon.endpoints)} function(s)", flush=True)
    for ep in daemon.endpoints:
        print(f"  {ep.name}: {ep.path}")
    print(f"  control: {control_socket_path(daemon.config)}  (vfiodctl --socket ... list)")
    print("Attach a function to a QEMU >= 10.1 guest (shared memfd RAM is required):")
    qemu = _provisioned_qemu()
    for ep in daemon.endpoints:
        print(
            f"  {qemu} -accel tcg -M q35 -m 2G -nographic \\\n"
            "    -object memory-backend-memfd,id=mem,size=2G,share=on "
            "-machine memory-backend=mem \\\n"
            f"    -device '{qemu_device_arg(ep.path, ep.name)}' ..."
        )
    print("Stop with Ctrl-C or SIGTERM.", flush=True)


def _provisioned_qemu() -> str:
    """The QEMU that `make qemu` provisioned, if any (Debian 12 has no new enough one)."""
    from vfiod.qemu import QemuNotProvisioned, qemu_binary

    try:
        return str(qemu_binary("x86_64"))
    except QemuNotProvisioned:
        return "qemu-system-x86_64"


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
        config = load(args.config)
        if args.socket_dir:
            config = dataclasses.replace(config, socket_dir=Path(args.socket_dir))
        if args.state_dir:
            config = dataclasses.replace(config, state_dir=Path(args.state_dir))
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
