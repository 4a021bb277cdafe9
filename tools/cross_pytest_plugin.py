"""pytest plugin for tools/test-cross.sh (foreign architectures under qemu-user).

* Every example runs 5-20x slower under emulation, so hypothesis' per-example deadline (a
  wall-clock limit) is turned off.
* qemu-user on a big-endian guest byte-swaps the 8-byte counter of an eventfd only on the fd
  number eventfd() returned, not on a copy of it (dup, or one received with SCM_RIGHTS): a
  write of 1 through the copy reads back as 0x0100000000000000 through the original. Real
  kernels have no such thing (the counter is host-endian on both), and vfiod signals through
  copies (the ones QEMU sends it, and the interrupt mirror's own dups). When a probe shows the
  emulator does this, the tests' ``os.eventfd_read`` undoes it: a counter read as
  ``a + (b << 56)`` is ``a`` signals through the original plus ``b`` through copies (exact while
  fewer than 256 signals through copies pile up between two reads, which the tests never reach).
* qemu-user receives SCM_RIGHTS fds into a larger control buffer than the program gave, and
  when it truncates them to the program's buffer (MSG_CTRUNC) it does not close the rest: they
  leak into the process (a real kernel closes every fd that did not fit). Tests that count
X
  only when a probe shows the leak.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Callable

import pytest
from hypothesis import settings

settings.register_profile("vfiod-cross", deadline=None)
settings.load_profile("vfiod-cross")

def eventfd_copies_are_byte_swapped() -> bool:
    """True if a write of 1 through a dup of an eventfd reads back as something else."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    copy = os.dup(efd)
    try:
        os.eventfd_write(copy, 1)
        return os.eventfd_read(efd) != 1
    finally:
        os.close(copy)
        os.close(efd)


#: Tests that count fds after a peer sent more fds than one receive has room for.
TRUNCATED_FDS_TESTS = ("tests/server/test_fd_hygiene.py::", "100 fds")


def truncated_fds_leak() -> bool:
    """True if fds that did not fit a receive's control buffer stay open in this process."""
    a, b = socket.socketpair(socket.AF_UNIX)
    r, w = os.pipe()
    try:
        fds = [os.dup(r) for _ in range(64)]
        socket.send_fds(a, [b"x"], fds)
        for fd in fds:
            os.close(fd)
        before = len(os.listdir("/proc/self/fd"))
        _, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4 * 4))
        for _, _, data in anc:
            for fd in array.array("i", data[: len(data) - len(data) % 4]):
                os.close(fd)
        return len(os.listdir("/proc/self/fd")) != before
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


def _unswapping(read: Callable[[int], int]) -> Callable[[int], int]:
    def eventfd_read(fd: int) -> int:
        value = read(fd)
        return (value & ((1 << 56) - 1)) + (value >> 56)

    return eventfd_read


def pytest_configure(config: pytest.Config) -> None:
    if eventfd_copies_are_byte_swapped():
        os.eventfd_read = _unswapping(os.eventfd_read)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    where = "; see tools/cross_pytest_plugin.py"
    marks = []
    if truncated_fds_leak():
        marks.append((lambda nodeid: all(t in nodeid for t in TRUNCATED_FDS_TESTS),
                      "qemu-user leaks the SCM_RIGHTS fds it truncates (MSG_CTRUNC)" + where))
    for item in items:
        for applies, reason in marks:
            if applies(item.nodeid):
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))


