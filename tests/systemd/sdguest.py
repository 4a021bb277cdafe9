"""Helpers for the systemd tests (imported as `sdguest`, like tests/control/control_fake.py):
the systemd guest image (`make systemd-image`), the vfiod tree to install in it, and booting it
with a payload.

The image ($VFIOD_CACHE/systemd-image, tools/build-systemd-image.sh) is a Debian trixie root whose
init is systemd. At boot its vfiod-ci.service unpacks the tar archive on the second virtio disk
to /run/vfiod-ci, runs run.sh there with output on ttyS0 and powers off. The root disk is attached
with snapshot=on, so the cached image never changes.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfiod.qemu import GuestResult, QemuNotProvisioned, cache_dir, parse_console, qemu_binary
from vfiod.qemu.cmdline import qemu_command_line

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "vfiod.service"
GUEST_DIR = Path(__file__).resolve().parent / "guest"
HINT = "run `make systemd-image` (tools/build-systemd-image.sh)"


@dataclass(frozen=True)
class SystemdImage:
    dir: Path
    root: Path
    disk: Path
    kernel: Path
    initrd: Path
    stamp: dict[str, str]


def systemd_image() -> SystemdImage:
    d = cache_dir() / "systemd-image"
    img = SystemdImage(d, d / "root", d / "disk.img", d / "vmlinuz", d / "initrd.img", {})
    for p in (img.disk, img.kernel, img.initrd, img.root / "usr/bin/systemd-analyze",
              d / "stamp"):
        if not p.exists():
            raise QemuNotProvisioned(f"{p} not found: {HINT}")
    stamp = dict(
        line.split("=", 1) for line in (d / "stamp").read_text().splitlines() if "=" in line
    )
    return SystemdImage(img.dir, img.root, img.disk, img.kernel, img.initrd, stamp)


@pytest.fixture(scope="session")
def sd_image() -> SystemdImage:
    """The systemd image; a clear failure (never a skip) when it is missing."""
    try:
        return systemd_image()
    except QemuNotProvisioned as e:
        pytest.fail(str(e), pytrace=False)


def build_deb(dest: Path, src: Path | None = None) -> Path:
    """The vfiod .deb of `src` (default: this repo; $VFIOD_SYSTEMD_SRC overrides), built by
    tools/build-deb.sh (`make deb`: dpkg-buildpackage in the cached trixie build root) into
    `dest`, so the guest installs exactly the tree under test, the way an operator would."""
    src = src or Path(os.environ.get("VFIOD_SYSTEMD_SRC") or REPO)
    res = subprocess.run(
        [str(src / "tools" / "build-deb.sh")], cwd=src, capture_output=True, text=True,
        env={**os.environ, "VFIOD_DEB_OUT": str(dest)}, timeout=1800,
    )  # fmt: skip
    debs = sorted(dest.glob("vfiod_*.deb"))
    if res.returncode != 0 or len(debs) != 1:
        raise RuntimeError(f"tools/build-deb.sh failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return debs[0]


def make_payload(files: Mapping[str, bytes | str | Path]) -> bytes:
    """A tar archive (the payload disk): name -> content, or a directory/file Path to add."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, content in sorted(files.items()):
            if isinstance(content, Path):
                tar.add(content, arcname=name,
                        filter=lambda ti: None if "__pycache__" in ti.name else ti)
                continue
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data + b"\0" * (-len(data) % 512)


def boot_with_payload(
    image: SystemdImage,
    payload: bytes,
    tmp: Path,
    *,
    timeout: float = 600.0,
    memory_mb: int = 1024,
    smp: int = 2,
) -> GuestResult:
    """Boot the systemd image (TCG: these machines have no usable KVM, see lab.md) with
    `payload` on /dev/vdb; returns when the guest powered off (or `timeout` passed)."""
    payload_disk = tmp / "payload.tar"
    payload_disk.write_bytes(payload)
    cmd = qemu_command_line(
        "x86_64", memory_mb=memory_mb, smp=smp, accel="tcg",
        kernel=image.kernel, initrd=image.initrd,
        kernel_args=("root=/dev/vda rw fsck.mode=skip quiet loglevel=3 "
                     "systemd.show_status=error"),
        extra_args=[
            "-drive", f"file={image.disk},format=raw,if=virtio,snapshot=on",
            "-drive", f"file={payload_disk},format=raw,if=virtio,readonly=on",
        ],
        binary=qemu_binary("x86_64"),
    )  # fmt: skip
    t0 = time.monotonic()
    timed_out = False
    with subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C", "TMPDIR": str(tmp)},
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, err = proc.communicate()
    console = out.decode(errors="replace").replace("\r", "")
    markers, lines, sections = parse_console(console)
    status = markers.get("exit")
    return GuestResult(
        console=console,
        stderr=err.decode(errors="replace"),
        returncode=None if timed_out else proc.returncode,
        exit_status=int(status) if status is not None and status.lstrip("-").isdigit() else None,
        markers=markers,
        marker_lines=lines,
        sections=sections,
        timed_out=timed_out,
        duration=time.monotonic() - t0,
        command=cmd,
    )
