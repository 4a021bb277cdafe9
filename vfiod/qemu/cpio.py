"""Minimal writer for the Linux initramfs "newc" cpio format (stdlib only).

Also loaded by file path from tools/mkinitramfs.py (which must run with the system python and
no venv), so this module imports nothing from vfiod.
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CpioEntry", "newc_archive", "file_entry", "dir_entry", "symlink_entry", "chardev_entry",
           "gzip_bytes"]

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. `name` is relative ("init", "bin/busybox"), `mode` includes the type."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    mtime: int = 0


def file_entry(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | perm, data)


def dir_entry(name: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | perm)


def symlink_entry(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev_entry(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    return CpioEntry(name, stat.S_IFCHR | perm, b"", major, minor)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """Serialize `entries` (parents before children) plus the trailer as an uncompressed newc
    archive. Inode numbers are assigned sequentially; uid/gid are 0."""
    out = bytearray()
    ino = 1
    for e in [*entries, CpioEntry(TRAILER, 0)]:
        name = e.name.lstrip("/").encode() + b"\0"
        fields = (
            ino, e.mode, 0, 0, 2 if stat.S_ISDIR(e.mode) else 1, e.mtime, len(e.data),
            0, 0, e.rdev_major, e.rdev_minor, len(name), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name
        out += _pad4(len(header) + len(name))
        out += e.data + _pad4(len(e.data))
        ino += 1
    return bytes(out)


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    """Deterministic gzip (mtime 0), as the kernel's initramfs unpacker accepts it."""
    return gzip.compress(data, compresslevel=level, mtime=0)
