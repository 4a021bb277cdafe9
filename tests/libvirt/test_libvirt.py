"""docs/libvirt.md, run: Debian's libvirtd drives the provisioned QEMU 11.1.3 with the page's own
domain XML, an x86 guest on a VF of a flat PHB (<qemu:commandline> device) and a pseries guest
on a VF of a power8 PHB (virsh start --paused, qemu-monitor-command device_add, resume). Each
guest writes a pattern through its VF; it must land in the VF's namespace file.

libvirtd runs in a private mount namespace with scratch /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, so the machine's own libvirt state (if
any) is neither used nor changed; its socket is in the scratch directory."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vfiod import config
from vfiod.daemon import Daemon
from vfiod.qemu import QemuNotProvisioned, guest_image, parse_console, qemu_binary
from vfiod.qemu.guest import write_guest_initrd

pytestmark = pytest.mark.qemu

DOC = Path(__file__).resolve().parents[2] / "docs" / "libvirt.md"
PATTERN = hashlib.sha256(b"vfiod-libvirt").digest() * (1 << 16)  # 2 MiB
GUEST_IO = r"""
dev=/dev/nvme0n1
[ -b $dev ] || { echo "@@VFIOD error=no-nvme-disk"; exit 1; }
dd if=/pattern of=$dev bs=1M count=2 oflag=direct 2>/dev/null || echo "@@VFIOD error=write"
dd if=$dev of=/back bs=1M count=2 iflag=direct 2>/dev/null || echo "@@VFIOD error=read"
echo "@@VFIOD wrote=$(md5sum < /pattern | cut -d' ' -f1) read=$(md5sum < /back | cut -d' ' -f1)"
"""
QEMU_CONF = """
# tests/libvirt: QEMU as root (the vfiod sockets are root's), and nothing these CI containers
# lack: no cgroup controllers, no security driver (AppArmor), no private /dev namespace.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
STATE_DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
              "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}


def doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


class Libvirt:
    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.uri = f"qemu:///system?socket={scratch / 'sock' / 'libvirt-sock'}"

    def virsh(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                             timeout=300)
        if check and res.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {res.stderr}\n{self.log_tail()}")
        return res.stdout

    def log_tail(self) -> str:
        logs = [self.scratch / "libvirtd.log", *sorted((self.scratch / "log").glob("qemu/*.log"))]
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace")
                                                         .splitlines()[-15:])
                         for p in logs if p.exists())


@pytest.fixture
def libvirt(tmp_path: Path) -> Iterator[Libvirt]:
    if not os.access("/usr/sbin/libvirtd", os.X_OK) or shutil.which("virsh") is None:
        pytest.fail("no libvirtd/virsh: run `make libvirt` (tools/provision-libvirt.sh)",
                    pytrace=False)
    scratch = tmp_path / "libvirt"
    shutil.copytree("/etc/libvirt", scratch / "etc")
    with open(scratch / "etc" / "qemu.conf", "a") as f:
        f.write(QEMU_CONF)
    for name in (*STATE_DIRS, "sock"):
        (scratch / name).mkdir(exist_ok=True)
    (scratch / "etc" / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{scratch / "sock"}"\nauth_unix_rw = "none"\n'
        f'unix_sock_rw_perms = "0700"\nlog_outputs = "3:file:{scratch / "libvirtd.log"}"\n'
    )
    binds = " && ".join(f'mkdir -p {target} && mount --bind "$0/{name}" {target}'
                        for name, target in STATE_DIRS.items())
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
         f'{binds} && exec /usr/sbin/libvirtd --config "$0/etc/libvirtd.conf" '
         f'--pid-file "$0/libvirtd.pid"', str(scratch)],
        stdout=subprocess.DEVNULL, stderr=open(scratch / "libvirtd.stderr", "w"),
    )  # fmt: skip
    lv = Libvirt(scratch)
    try:
        deadline = time.monotonic() + 120
        while not (scratch / "sock" / "libvirt-sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("libvirtd did not start: "
                            + (scratch / "libvirtd.stderr").read_text() + lv.log_tail())
            time.sleep(0.2)
        yield lv
    finally:
        for name in ("vfiod-x86", "vfiod-pseries"):
            lv.virsh("destroy", name, check=False)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def layout(tmp: Path) -> config.Config:
    return config.parse(
        f'socket_dir = "{tmp / "run"}"\n'
        '[[phb]]\nindex = 0\nwindow_policy = "flat"\n'
        '[[phb]]\nindex = 1\nwindow_policy = "power8"\n'
        '[[function]]\nname = "nvme0"\npersonality = "nvme"\nphb = 0\n'
        'backing = "nvme0.img"\nsize = "64M"\ntotalvfs = 2\nnumvfs = 1\n'
        '[[function]]\nname = "nvme1"\npersonality = "nvme"\nphb = 1\n'
        'backing = "nvme1.img"\nsize = "64M"\ntotalvfs = 2\nnumvfs = 1\n',
        "test", state_dir=tmp / "state")


def domain_xml(xml: str, arch: str, tmp: Path, console: Path) -> str:
    """The page's XML with this machine's paths: QEMU, kernel, an initrd with the I/O script,
    the test's socket directory and a console file."""
    img = guest_image(arch)
    initrd = write_guest_initrd(arch, tmp / f"{arch}-initrd.img", GUEST_IO, {"pattern": PATTERN})
    qemu = {"x86_64": "qemu-system-x86_64", "ppc64le": "qemu-system-ppc64"}[arch]
    for old, new in ((f"/usr/bin/{qemu}", str(qemu_binary(arch))),
                     (f"/var/lib/vfiod/guest/{arch}/{img.kernel.name}", str(img.kernel)),
                     (f"/var/lib/vfiod/guest/{arch}/initrd.img", str(initrd)),
                     ("/run/vfiod/", f"{tmp / 'run'}/")):
        assert old in xml or old == "/run/vfiod/", f"docs/libvirt.md no longer has {old}"
        xml = xml.replace(old, new)
    return re.sub(r"<source path='[^']*\.console'/>", f"<source path='{console}'/>", xml)


async def wait_shut_off(lv: Libvirt, name: str, timeout: float = 600) -> None:
    with trio.fail_after(timeout):
        while "shut off" not in await trio.to_thread.run_sync(lv.virsh, "domstate", name):
            await trio.sleep(1)


async def test_docs_libvirt_recipes_boot_guests_on_vfs(libvirt: Libvirt, tmp_path: Path) -> None:
    try:
        for arch in ("x86_64", "ppc64le"):
            qemu_binary(arch)
            guest_image(arch)
    except QemuNotProvisioned as exc:
        pytest.fail(str(exc), pytrace=False)
    x86_doc, pseries_doc = doc_blocks("xml")
    monitor_cmd = re.search(r"qemu-monitor-command vfiod-pseries \\\n\s*'(\{.*\})'",
                            DOC.read_text())
    assert monitor_cmd, "docs/libvirt.md: the qemu-monitor-command step"
    device_add = monitor_cmd.group(1).replace("/run/vfiod/", f"{tmp_path / 'run'}/")
    consoles = {"x86": tmp_path / "x86.console", "pseries": tmp_path / "pseries.console"}
    for name, arch, doc in (("x86", "x86_64", x86_doc), ("pseries", "ppc64le", pseries_doc)):
        xml_file = tmp_path / f"{name}.xml"
        xml_file.write_text(domain_xml(doc, arch, tmp_path, consoles[name]))
    daemon = Daemon(layout(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        run = trio.to_thread.run_sync

        async def x86() -> None:
            await run(libvirt.virsh, "define", str(tmp_path / "x86.xml"))
            await run(libvirt.virsh, "start", "vfiod-x86")
            await wait_shut_off(libvirt, "vfiod-x86")

        async def pseries() -> None:
            await run(libvirt.virsh, "define", str(tmp_path / "pseries.xml"))
            await run(libvirt.virsh, "start", "--paused", "vfiod-pseries")
            out = await run(libvirt.virsh, "qemu-monitor-command", "vfiod-pseries", device_add)
            assert '"return":{}' in out.replace(" ", ""), out
            await run(libvirt.virsh, "resume", "vfiod-pseries")
            await wait_shut_off(libvirt, "vfiod-pseries")

        async with trio.open_nursery() as guests:
            guests.start_soon(x86)
            guests.start_soon(pseries)
        nursery.cancel_scope.cancel()
    want = hashlib.md5(PATTERN).hexdigest()
    for name, vf in (("x86", "nvme0-vf0"), ("pseries", "nvme1-vf0")):
        console = consoles[name].read_text(errors="replace").replace("\r", "")
        markers, _, _ = parse_console(console)
        ctx = f"{name}:\n{console[-3000:]}\n{libvirt.log_tail()}"
        assert markers.get("exit") == "0", ctx
        assert markers.get("wrote") == want and markers.get("read") == want, ctx
        with open(tmp_path / "state" / f"{vf}.img", "rb") as f:
            assert f.read(len(PATTERN)) == PATTERN, f"{name}: the VF's namespace file"
    assert "eeh=off" in consoles["pseries"].read_text(errors="replace")
