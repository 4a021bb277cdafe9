"""The run-time layout that must survive a restart or a crash: how many VFs each PF has.

Written atomically (temporary file, fsync, rename, fsync of the directory), so after a crash
the file is either the old layout or the new one, never a torn mix; functions then come back
under the same names, on the same socket paths.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LAYOUT_FILE = "layout.json"
VERSION = 1


def load_numvfs(state_dir: Path | None) -> dict[str, int]:
    """PF name -> numvfs from the last run; {} when there is none or it cannot be read."""
    if state_dir is None:
        return {}
    path = state_dir / LAYOUT_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.error("%s: unreadable (%s); starting from the configuration", path, exc)
        return {}
    numvfs = doc.get("numvfs") if isinstance(doc, dict) else None
    if doc.get("version") != VERSION or not isinstance(numvfs, dict):
        log.error("%s: not a version %d layout; starting from the configuration", path, VERSION)
        return {}
    return {k: v for k, v in numvfs.items()
            if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def save_numvfs(state_dir: Path | None, numvfs: dict[str, int]) -> None:
    if state_dir is None:
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LAYOUT_FILE
    tmp = path.with_name(f".{LAYOUT_FILE}.{os.getpid()}.tmp")
    data = json.dumps({"version": VERSION, "numvfs": dict(sorted(numvfs.items()))}, indent=1)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
