"""Where the provisioned QEMU binaries and guest images live (tools/provision-qemu.sh,
tools/build-guest-images.sh)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ARCHES",
    "GuestImage",
    "QemuNotProvisioned",
    "cache_dir",
    "guest_image",
    "normalize_arch",
    "qemu_bin_dir",
    "qemu_binary",
    "qemu_img",
]

#: Guest architectures, as named in GUEST_ARCHES and $VFIOD_CACHE/guest/<arch>.
ARCHES = ("x86_64", "ppc64le")

_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "ppc64le": "ppc64le", "ppc64el": "ppc64le",
            "ppc64": "ppc64le", "pseries": "ppc64le", "q35": "x86_64"}
_SYSTEM_BINARY = {"x86_64": "qemu-system-x86_64", "ppc64le": "qemu-system-ppc64"}
_KERNEL_FILE = {"x86_64": "vmlinuz", "ppc64le": "vmlinux"}

HINT = "run `make qemu guest-images`"


class QemuNotProvisioned(RuntimeError):
    """QEMU or a guest image is missing; the message says what and how to get it."""


def normalize_arch(arch: str) -> str:
    try:
        return _ALIASES[arch]
    except KeyError:
        raise ValueError(f"unknown guest arch {arch!r} (one of {', '.join(ARCHES)})") from None


def cache_dir() -> Path:
    """$VFIOD_CACHE, default ~/.cache/vfiod (the Makefile exports the same default)."""
    env = os.environ.get("VFIOD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vfiod"


def qemu_bin_dir() -> Path:
    """$VFIOD_QEMU_BIN_DIR, default $VFIOD_CACHE/bin."""
    env = os.environ.get("VFIOD_QEMU_BIN_DIR")
    return Path(env) if env else cache_dir() / "bin"


def _tool(name: str) -> Path:
    path = qemu_bin_dir() / name
    if not os.access(path, os.X_OK):
        raise QemuNotProvisioned(f"{path} not found: {HINT}")
    return path


def qemu_binary(arch: str = "x86_64") -> Path:
    """The qemu-system-* wrapper for guest `arch` (x86_64 -> qemu-system-x86_64,
    ppc64le -> qemu-system-ppc64)."""
    return _tool(_SYSTEM_BINARY[normalize_arch(arch)])


def qemu_img() -> Path:
    return _tool("qemu-img")


@dataclass(frozen=True)
class GuestImage:
    arch: str
    kernel: Path
    initrd: Path
    kernel_release: str
    modules: tuple[str, ...]


def guest_image(arch: str = "x86_64") -> GuestImage:
    """The kernel + initramfs built for `arch` in $VFIOD_CACHE/guest/<arch>."""
    arch = normalize_arch(arch)
    d = cache_dir() / "guest" / arch
    kernel = d / _KERNEL_FILE[arch]
    initrd = d / "initrd.img"
    for p in (kernel, initrd):
        try:
            found = p.is_file()
        except OSError as exc:  # hidden, e.g. by ProtectHome= under systemd (EACCES)
            raise QemuNotProvisioned(f"{p}: {exc.strerror}: {HINT}") from None
        if not found:
            extra = f" GUEST_ARCHES='{arch}'" if arch != "x86_64" else ""
            raise QemuNotProvisioned(f"{p} not found: {HINT}{extra}")
    release = (d / "kernel-release").read_text().strip() if (d / "kernel-release").is_file() else ""
    mods = (d / "modules").read_text().split() if (d / "modules").is_file() else []
    return GuestImage(arch, kernel, initrd, release, tuple(mods))
