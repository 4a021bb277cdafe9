#!/usr/bin/env python3
"""Build the vfiod guest initramfs from an extracted Debian kernel and busybox-static (stdlib only).

usage: mkinitramfs.py --kernel-root DIR --kver KVER --busybox FILE --init FILE
                      --modules "nvme ..." --out initrd.img --modules-list FILE

The requested modules and everything they depend on (the `depends=` of each module's
.modinfo) are decompressed (.ko.xz/.gz/.zst) into /lib/modules/KVER/NAME.ko;
/etc/vfiod-modules lists them in load order (dependencies first).
Modules built into the kernel (modules.builtin) are skipped. Output: gzip'ed newc cpio.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import lzma
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

_CPIO = Path(__file__).resolve().parent.parent / "vfiod" / "qemu" / "cpio.py"
_spec = importlib.util.spec_from_file_location("_vfiod_cpio", _CPIO)
assert _spec is not None and _spec.loader is not None
cpio = importlib.util.module_from_spec(_spec)
sys.modules["_vfiod_cpio"] = cpio
_spec.loader.exec_module(cpio)


def norm(name: str) -> str:
    return name.replace("-", "_")


def modname(path: str) -> str:
    base = os.path.basename(path)
    return base.split(".ko")[0]


def find_moddir(root: Path, kver: str) -> Path:
    for cand in (root / "lib" / "modules" / kver, root / "usr" / "lib" / "modules" / kver):
        if (cand / "kernel").is_dir():
            return cand
    sys.exit(f"mkinitramfs: no modules for {kver} under {root}")


def decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            sys.exit("mkinitramfs: zstd-compressed modules need zstd (apt-get install zstd)")
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def modinfo_depends(elf: bytes) -> list[str]:
    """The `depends=` entry of a module's .modinfo ELF section (64-bit ELF, either endianness).
    modules.dep is written by depmod at install time, so the Debian package does not ship it."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not a 64-bit ELF module")
    e = "<" if elf[5] == 1 else ">"
    shoff = struct.unpack_from(e + "Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from(e + "IIQQQQ", elf, shoff + i * shentsize)
        return name, off, size

    _n, stroff, _s = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name : end] == b".modinfo":
            for item in elf[off : off + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
            return []
    return []


def resolve(moddir: Path, wanted: list[str]) -> list[tuple[str, bytes]]:
    """Modules `wanted` plus their dependencies, dependencies first, as (file name, .ko bytes)."""
    index: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        index.setdefault(norm(modname(path.name)), path)
    builtin = set()
    if (moddir / "modules.builtin").is_file():
        builtin = {norm(modname(x)) for x in (moddir / "modules.builtin").read_text().split()}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(key: str, stack: tuple[str, ...]) -> None:
        if key in seen or key in builtin:
            return
        if key in stack:
            sys.exit(f"mkinitramfs: module dependency cycle: {' -> '.join(stack + (key,))}")
        if key not in index:
            sys.exit(f"mkinitramfs: module {key} (needed by {stack or 'request'}) not found")
        data = decompress(index[key])
        for d in modinfo_depends(data):
            visit(norm(d), stack + (key,))
        seen.add(key)
        order.append((modname(index[key].name), data))

    for w in wanted:
        if norm(w) in builtin:
            print(f"mkinitramfs: {w} is built into the kernel", file=sys.stderr)
        visit(norm(w), ())
    return order


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel-root", type=Path, required=True)
    ap.add_argument("--kver", required=True)
    ap.add_argument("--busybox", type=Path, required=True)
    ap.add_argument("--init", type=Path, required=True)
    ap.add_argument("--modules", default="")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--modules-list", type=Path, required=True)
    a = ap.parse_args()

    moddir = find_moddir(a.kernel_root, a.kver)
    mods = resolve(moddir, a.modules.split())
    kmod = f"lib/modules/{a.kver}"
    entries = [cpio.dir_entry(d) for d in (
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc",
        "root", "mnt", "var", "lib", "lib/modules", kmod)]  # fmt: skip
    entries += [
        cpio.chardev_entry("dev/console", 5, 1),
        cpio.chardev_entry("dev/null", 1, 3, 0o666),
        cpio.file_entry("bin/busybox", a.busybox.read_bytes(), 0o755),
        cpio.symlink_entry("bin/sh", "busybox"),
        cpio.file_entry("init", a.init.read_bytes(), 0o755),
        cpio.file_entry("etc/vfiod-kernel-release", f"{a.kver}\n".encode()),
    ]
    names = []
    for name, data in mods:
        entries.append(cpio.file_entry(f"{kmod}/{name}.ko", data))
        names.append(name)
    listing = "".join(f"{n}\n" for n in names).encode()
    entries.append(cpio.file_entry("etc/vfiod-modules", listing))
    a.out.write_bytes(cpio.gzip_bytes(cpio.newc_archive(entries)))
    a.modules_list.write_bytes(listing)
    print(f"mkinitramfs: {a.out} ({a.out.stat().st_size} bytes), modules: {' '.join(names) or '-'}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
