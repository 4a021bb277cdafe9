#!/usr/bin/env python3
"""Pack dynamically linked programs and the libraries they load into an initramfs archive
(stdlib only), to concatenate after the guest initramfs built by mkinitramfs.py.

usage: mkprograms.py --package-root DIR --binaries "usr/bin/fio ..." --out programs.cpio.gz

--package-root is a directory where Debian packages were unpacked (dpkg-deb -x): the programs
and every package their Depends resolve to. Each program goes in at its own path, with its
program interpreter (PT_INTERP) and every shared library it needs, found the way ld.so finds
them (DT_RUNPATH/DT_RPATH, then the multiarch and plain lib directories) and followed
recursively through DT_NEEDED; each library is stored under its soname. Nothing else of the
packages goes in. Output: gzip'ed newc cpio (the kernel unpacks concatenated archives in turn).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import struct
import sys
from pathlib import Path

_CPIO = Path(__file__).resolve().parent.parent / "vfiod" / "qemu" / "cpio.py"
_spec = importlib.util.spec_from_file_location("_vfiod_cpio", _CPIO)
assert _spec is not None and _spec.loader is not None
cpio = importlib.util.module_from_spec(_spec)
sys.modules["_vfiod_cpio"] = cpio
_spec.loader.exec_module(cpio)


class Elf:
    """The dynamic-linking facts of a 64-bit ELF file: PT_INTERP, DT_NEEDED, DT_RUNPATH."""

    PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
    DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 1, 5, 15, 29

    def __init__(self, data: bytes) -> None:
        if data[:4] != b"\x7fELF" or data[4] != 2:
            raise ValueError("not a 64-bit ELF file")
        e = "<" if data[5] == 1 else ">"
        phoff = struct.unpack_from(e + "Q", data, 0x20)[0]
        phentsize, phnum = struct.unpack_from(e + "HH", data, 0x36)
        self.interp: str | None = None
        self.needed: list[str] = []
        self.runpath: list[str] = []
        loads: list[tuple[int, int, int]] = []  # (vaddr, file offset, file size)
        dynamic: tuple[int, int] | None = None
        for i in range(phnum):
            ptype, _flags, off, vaddr, _paddr, filesz = struct.unpack_from(
                e + "IIQQQQ", data, phoff + i * phentsize
            )
            if ptype == self.PT_INTERP:
                self.interp = data[off : off + filesz].rstrip(b"\0").decode()
            elif ptype == self.PT_LOAD:
                loads.append((vaddr, off, filesz))
            elif ptype == self.PT_DYNAMIC:
                dynamic = (off, filesz)
        if dynamic is None:
            return  # statically linked
        entries: list[tuple[int, int]] = []
        off, size = dynamic
        for pos in range(off, off + size, 16):
            tag, val = struct.unpack_from(e + "qQ", data, pos)
            if tag == 0:
                break
            entries.append((tag, val))
        strtab = next(val for tag, val in entries if tag == self.DT_STRTAB)  # a vaddr
        base = next(o + strtab - v for v, o, n in loads if v <= strtab < v + n)

        def string(at: int) -> str:
            return data[base + at : data.index(b"\0", base + at)].decode()

        for tag, val in entries:
            if tag == self.DT_NEEDED:
                self.needed.append(string(val))
            elif tag in (self.DT_RUNPATH, self.DT_RPATH):
                self.runpath += [p for p in string(val).split(":") if p]


def in_root(root: Path, path: str, hops: int = 40) -> Path | None:
    """``path`` (absolute, as the target system sees it) inside ``root``, symlinks followed
    (absolute targets taken relative to ``root``); None if it does not exist."""
    parts = [p for p in path.split("/") if p]
    cur = root
    while parts:
        part = parts.pop(0)
        if part == "..":
            cur = cur.parent if cur != root else root
            continue
        nxt = cur / part
        if nxt.is_symlink():
            hops -= 1
            if hops < 0:
                return None
            target = os.readlink(nxt)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                cur = root
            continue
        if not nxt.exists():
            return None
        cur = nxt
    return cur


def program_files(root: Path, binaries: list[str]) -> list[tuple[str, bytes, int]]:
    """The programs, their interpreter and every library they load, as (path in the
    initramfs, contents, permissions)."""
    triplets = sorted(p.name for p in (root / "usr" / "lib").glob("*-linux-gnu*"))
    defaults = [f"/lib/{t}" for t in triplets] + [f"/usr/lib/{t}" for t in triplets]
    defaults += ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]
    out: dict[str, tuple[bytes, int]] = {}
    libs: set[str] = set()  # sonames already in
    todo: list[tuple[str, bytes]] = []
    for rel in binaries:
        path = in_root(root, "/" + rel)
        if path is None or not path.is_file():
            sys.exit(f"mkprograms: {rel} not found under {root}")
        data = path.read_bytes()
        out[rel.lstrip("/")] = (data, 0o755)
        todo.append((rel, data))
        interp = Elf(data).interp
        if interp is not None and interp.lstrip("/") not in out:
            # usrmerge: /lib64 may only exist as /usr/lib64 among the unpacked packages
            found = in_root(root, interp) or in_root(root, "/usr" + interp)
            if found is None:
                sys.exit(f"mkprograms: program interpreter {interp} of {rel} not found")
            out[interp.lstrip("/")] = (found.read_bytes(), 0o755)
            libs.add(os.path.basename(interp))
    while todo:
        rel, data = todo.pop()
        elf = Elf(data)
        origin = os.path.dirname("/" + rel.lstrip("/"))
        dirs = [d.replace("$ORIGIN", origin) for d in elf.runpath] + defaults
        for soname in elf.needed:
            if soname in libs:
                continue
            for d in dirs:
                found = in_root(root, f"{d}/{soname}")
                if found is not None and found.is_file():
                    break
            else:
                sys.exit(f"mkprograms: {soname} (needed by {rel}) not found under {root}")
            dest = f"{d}/{soname}".lstrip("/")
            libs.add(soname)
            lib = found.read_bytes()
            out[dest] = (lib, 0o644)
            todo.append((dest, lib))
    return [(path, data, perm) for path, (data, perm) in sorted(out.items())]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--package-root", type=Path, required=True)
    ap.add_argument("--binaries", required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    entries = []
    dirs: set[str] = set()
    files = program_files(a.package_root, a.binaries.split())
    for path, data, perm in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:  # may exist in the archive before this one: that is fine
                dirs.add(d)
                entries.append(cpio.dir_entry(d))
        entries.append(cpio.file_entry(path, data, perm))
    a.out.write_bytes(cpio.gzip_bytes(cpio.newc_archive(entries)))
    total = sum(len(d) for _, d, _ in files)
    print(f"mkprograms: {a.out} ({a.out.stat().st_size} bytes): {a.binaries} and "
          f"{len(files) - len(a.binaries.split())} interpreter/libraries ({total >> 20} MiB)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
