"""Real QEMU guests for tests, examples and benchmarks.

Provisioning (outside Python): `make qemu` (tools/provision-qemu.sh) puts wrappers for QEMU >= 10.1
with vfio-user-pci in $VFIOD_CACHE/bin; `make guest-images` (tools/build-guest-images.sh) builds
kernel + busybox initramfs per arch in $VFIOD_CACHE/guest/<arch>.

    from vfiod.qemu import run_guest, PCI_DUMP, parse_pci_dump
    res = (await run_guest("x86_64", PCI_DUMP, ["/tmp/x/vfu.sock"])).check()
    devs = parse_pci_dump(res)
"""

from .accel import kvm_precheck, kvm_usable, select_accel
from .cmdline import (
    format_command_line,
    kernel_command_line,
    qemu_command_line,
    vfio_user_device,
    vfio_user_device_json,
)
from .guest import GuestError, GuestResult, build_initrd_overlay, parse_console, run_guest
from .locate import (
    ARCHES,
    GuestImage,
    QemuNotProvisioned,
    cache_dir,
    guest_image,
    normalize_arch,
    qemu_bin_dir,
    qemu_binary,
    qemu_img,
)
from .snippets import PCI_DUMP, PciDeviceInfo, parse_pci_dump, section

__all__ = [
    "ARCHES",
    "PCI_DUMP",
    "GuestError",
    "GuestImage",
    "GuestResult",
    "PciDeviceInfo",
    "QemuNotProvisioned",
    "build_initrd_overlay",
    "cache_dir",
    "format_command_line",
    "guest_image",
    "kernel_command_line",
    "kvm_precheck",
    "kvm_usable",
    "normalize_arch",
    "parse_console",
    "parse_pci_dump",
    "qemu_bin_dir",
    "qemu_binary",
    "qemu_command_line",
    "qemu_img",
    "run_guest",
    "section",
    "select_accel",
    "vfio_user_device",
    "vfio_user_device_json",
]
