"""Watch it happen: one daemon, two x86_64 guests and one pseries guest, each on its own VF.

    make qemu guest-images            # QEMU 11.1 and the guest kernels (GUEST_ARCHES default)
    .venv/bin/python examples/three_guests.py

It starts vfiod on examples/nvme-sriov.toml (namespaces and sockets in a temporary directory),
boots the guests at the same time under TCG — x86 on nvme0-vf0 and nvme0-vf1 (the "flat" PHB),
pseries on nvme1-vf0 (the "power8" PHB, attached with QEMU's prelaunch device_add workaround) —
lets each write and read back its own data with direct I/O, prints `vfiodctl list` while they
run, and finally checks that every VF's namespace file holds exactly its own guest's bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path

import trio

from vfiod import config
from vfiod.control.cli import main as vfiodctl
from vfiod.daemon import Daemon
from vfiod.host import control_socket_path
from vfiod.qemu import GuestResult, run_guest

HERE = Path(__file__).resolve().parent
PATTERN = 2 << 20

GUEST = r"""
dev=/dev/nvme0n1
echo "@@VFIOD nvme=$(cat /sys/class/nvme/nvme0/model | tr -d ' ') dev=$dev"
dd if=/pattern of=$dev bs=64k oflag=direct 2>/dev/null
dd if=$dev of=/back bs=64k count=32 iflag=direct 2>/dev/null
echo "@@VFIOD wrote=$(md5sum < /pattern | cut -d' ' -f1) read=$(md5sum < /back | cut -d' ' -f1)"
"""

GUESTS = [("x86-a", "x86_64", "nvme0-vf0"), ("x86-b", "x86_64", "nvme0-vf1"),
          ("pseries", "ppc64le", "nvme1-vf0")]


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vfiod-three-guests-") as tmpdir:
        tmp = Path(tmpdir)
        text = (HERE / "nvme-sriov.toml").read_text().replace("/var/tmp/vfiod-example",
                                                              str(tmp))
        cfg = config.parse(text, "examples/nvme-sriov.toml")
        daemon = Daemon(config.Config(tmp, cfg.functions, phbs=cfg.phbs,
                                      memlock_limit=cfg.memlock_limit))
        patterns = {name: os.urandom(PATTERN) for name, _, _ in GUESTS}
        results: dict[str, GuestResult] = {}

        async def guest(name: str, arch: str, vf: str) -> None:
            print(f"{name}: booting {arch} on {vf}", flush=True)
            results[name] = await run_guest(
                arch, GUEST, [str(daemon.host.slot(vf).endpoint.path)], memory_mb=1024,
                timeout=1200, files={"/pattern": patterns[name]},
            )
            print(f"{name}: {results[name].describe()} {results[name].markers}", flush=True)

        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            async with trio.open_nursery() as guests:
                for name, arch, vf in GUESTS:
                    guests.start_soon(guest, name, arch, vf)
                await trio.sleep(20)
                out = io.StringIO()
                argv = ["--socket", str(control_socket_path(daemon.config)), "list"]
                await trio.to_thread.run_sync(lambda: vfiodctl(argv, stdout=out))
                print(out.getvalue(), flush=True)
            nursery.cancel_scope.cancel()

        ok = True
        for name, _, vf in GUESTS:
            digest = hashlib.md5(patterns[name]).hexdigest()
            res = results[name]
            seen = (res.markers.get("wrote"), res.markers.get("read"))
            data = (tmp / f"{vf}.img").read_bytes()[:PATTERN]
            good = seen == (digest, digest) and data == patterns[name]
            ok &= good
            print(f"{name} on {vf}: {'OK' if good else 'FAILED'} (namespace holds its own data: "
                  f"{data == patterns[name]})")
            if not good:
                print(res.tail())
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
