"""Choosing the accelerator: KVM only when it demonstrably boots a guest, else TCG.

On this project's machines /dev/kvm is kvm_pvm and the host CPU has no vmx/svm: firmware runs but
Debian's kernel stops with "KVM internal error" (docs: /work/shared/spec/lab.md). So a usable
/dev/kvm is never assumed: cheap checks first, then a time-limited boot of the real guest image.

VFIOD_ACCEL=tcg|kvm|auto (default auto) forces the choice.
"""

from __future__ import annotations

import os
import platform

__all__ = ["kvm_precheck", "kvm_usable", "select_accel"]

_HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "ppc64le": "ppc64le"}
_cache: dict[str, bool] = {}

#: Console/stderr text that means KVM cannot run the guest (QEMU then pauses instead of exiting).
KVM_FAILURE_PATTERNS = ("KVM internal error", "emulation failure", "failed to initialize kvm",
                        "Could not access KVM kernel module")


def kvm_precheck(arch: str = "x86_64") -> str | None:
    """Why KVM cannot work for guest `arch` without trying (None: worth a probe boot)."""
    from .locate import normalize_arch

    arch = normalize_arch(arch)
    host = _HOST_ARCH.get(platform.machine())
    if host != arch:
        return f"host is {platform.machine()}, guest is {arch}"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    if arch == "x86_64":
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            flags = ""
        words = set(flags.split())
        if "vmx" not in words and "svm" not in words:
            return "host CPU has no vmx/svm (/dev/kvm is a paravirtual kvm such as kvm_pvm)"
    return None


async def kvm_usable(arch: str = "x86_64", timeout: float = 30.0) -> bool:
    """True if KVM boots the provisioned guest image for `arch` (result cached per process)."""
    from .guest import run_guest
    from .locate import normalize_arch

    arch = normalize_arch(arch)
    forced = os.environ.get("VFIOD_ACCEL", "auto")
    if forced in ("tcg", "kvm"):
        return forced == "kvm"
    if arch in _cache:
        return _cache[arch]
    if kvm_precheck(arch) is not None:
        _cache[arch] = False
        return False
    try:
        res = await run_guest(arch, "echo @@VFIOD kvm=ok", accel="kvm", timeout=timeout,
                              _abort_patterns=KVM_FAILURE_PATTERNS)
        ok = res.exit_status == 0 and res.markers.get("kvm") == "ok"
    except (OSError, RuntimeError):
        ok = False
    _cache[arch] = ok
    return ok


async def select_accel(arch: str = "x86_64") -> str:
    """"kvm" or "tcg" for guest `arch`."""
    return "kvm" if await kvm_usable(arch) else "tcg"
