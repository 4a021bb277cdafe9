"""eventfd helpers the tests share (importable from every test: tests/ is on sys.path)."""

from __future__ import annotations

import os


def count(fd: int) -> int:
    """Read and reset an eventfd's counter; 0 if nothing was signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
