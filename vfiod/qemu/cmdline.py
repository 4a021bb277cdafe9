"""QEMU command lines for vfiod guests (q35 and pseries)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from .locate import guest_image, normalize_arch, qemu_binary

__all__ = [
    "format_command_line",
    "kernel_command_line",
    "qemu_command_line",
    "vfio_user_device",
    "vfio_user_device_json",
]


def vfio_user_device(socket_path: str | Path, dev_id: str) -> dict[str, object]:
    """The vfio-user-pci device as a QOM/QMP dict (used by -device JSON and QMP device_add)."""
    return {
        "driver": "vfio-user-pci",
        "socket": {"type": "unix", "path": str(socket_path)},
        "id": dev_id,
    }


def vfio_user_device_json(socket_path: str | Path, dev_id: str) -> str:
    """`-device` argument in QEMU's JSON form (the dotted socket.path form failed in one build)."""
    return json.dumps(vfio_user_device(socket_path, dev_id), separators=(",", ":"))


def kernel_command_line(arch: str, extra: str = "", *, vfio_user: bool = False) -> str:
    arch = normalize_arch(arch)
    if arch == "x86_64":
        args = ["console=ttyS0", "panic=-1"]
    else:
        args = ["console=hvc0", "panic=-1"]
        if vfio_user:
            # lab.md: an EEH RTAS call would reach QEMU's sPAPR EEH glue, which casts every
            # container of the PHB to the kernel-VFIO type and aborts for vfio-user.
            args.append("eeh=off")
    if extra:
        args.append(extra)
    return " ".join(args)


def qemu_command_line(
    arch: str = "x86_64",
    vfio_user_sockets: Sequence[str | Path] = (),
    *,
    memory_mb: int = 1024,
    smp: int = 1,
    accel: str = "tcg",
    kernel: str | Path | None = None,
    initrd: str | Path | None = None,
    kernel_args: str = "",
    qmp_socket: str | Path | None = None,
    paused: bool | None = None,
    extra_args: Sequence[str] = (),
    binary: str | Path | None = None,
) -> list[str]:
    """argv for one guest. Kernel and initrd default to the provisioned images.

    x86_64 (q35): vfio-user devices are `-device` JSON arguments named vfu0, vfu1, ...
    ppc64le (pseries): QEMU 11.1.3 aborts at machine start with vfio-user-pci on the command
    line, so the devices are NOT included: the command line gets `-S` and a QMP socket
    (`qmp_socket` is then required) and the caller adds the devices with QMP device_add during
    prelaunch, then `cont` (run_guest does this). The kernel gets eeh=off.
    Guest RAM is a shared memfd, as vfio-user needs for DMA_MAP.
    """
    arch = normalize_arch(arch)
    if kernel is None or initrd is None:
        img = guest_image(arch)
        kernel = img.kernel if kernel is None else kernel
        initrd = img.initrd if initrd is None else initrd
    exe = str(binary if binary is not None else qemu_binary(arch))
    cmd = [exe]
    if accel == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host"]
    elif accel == "tcg":
        cmd += ["-accel", "tcg"]
    else:
        raise ValueError(f"accel must be 'tcg' or 'kvm', not {accel!r}")
    if arch == "x86_64":
        cmd += ["-M", "q35"]
    else:
        cmd += ["-M", "pseries,x-vof=on"]
        if accel == "tcg":
            cmd += ["-cpu", "POWER8"]
    cmd += [
        "-m", str(memory_mb), "-smp", str(smp),
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-machine", "memory-backend=mem",
        "-nographic", "-nodefaults", "-serial", "stdio", "-monitor", "none",
        "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", kernel_command_line(arch, kernel_args, vfio_user=bool(vfio_user_sockets)),
    ]  # fmt: skip
    if arch == "ppc64le" and vfio_user_sockets:
        if qmp_socket is None:
            raise ValueError("pseries + vfio-user needs qmp_socket (device_add over QMP)")
        if paused is False:
            raise ValueError("pseries with vfio-user devices must start paused")
        paused = True
    else:
        for i, path in enumerate(vfio_user_sockets):
            cmd += ["-device", vfio_user_device_json(path, f"vfu{i}")]
    if qmp_socket is not None:
        cmd += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    if paused:
        cmd.append("-S")
    cmd += list(extra_args)
    return cmd


def format_command_line(argv: Sequence[str]) -> str:
    """Shell-quoted command line, for printing to a user."""
    return shlex.join(argv)
