"""pytest plugin for tools/test-cross.sh (foreign architectures under qemu-user).

* Every example runs 5-20x slower under emulation, so hypothesis' per-example deadline (a
  wall-clock limit) is turned off.
* qemu-user on a big-endian guest byte-swaps the 8-byte counter of an eventfd only on the fd
  number eventfd() returned, not on a copy of it (dup, or one received with SCM_RIGHTS): a
  write of 1 through the copy reads back as 0x0100000000000000 through the original. Real
  kernels have no such thing (the counter is host-endian on both), and vfiod writes the copies
  QEMU sends it. Tests that read an eventfd that vfiod signalled through such a copy are marked
  xfail(strict) there, only when a probe shows the emulator does this; strict, so that a fixed
  emulator makes them fail and this list is removed.
* qemu-user receives SCM_RIGHTS fds into a larger control buffer than the program gave, and
  when it truncates them to the program's buffer (MSG_CTRUNC) it does not close the rest: they
  leak into the process (a real kernel closes every fd that did not fit). Tests that count
  vfiod's fds after a peer sent more fds than a receive has room for are marked the same way,
  only when a probe shows the leak.
"""

from __future__ import annotations

import array
import os
import socket

import pytest
from hypothesis import settings

settings.register_profile("vfiod-cross", deadline=None)
settings.load_profile("vfiod-cross")

#: Tests whose eventfd is signalled by vfiod through the SCM_RIGHTS copy the client sent.
EVENTFD_COPY_TESTS = (
    "tests/server/test_session.py::test_doorbell_fires_installed_msix_eventfd_without_unmask",
)


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    where = "; see tools/cross_pytest_plugin.py"
    marks = []
    if eventfd_copies_are_byte_swapped():
        marks.append((lambda nodeid: any(nodeid.endswith(t) for t in EVENTFD_COPY_TESTS),
                      "qemu-user does not byte-swap eventfd copies (dup/SCM_RIGHTS) on "
                      "big-endian guests" + where))
    if truncated_fds_leak():
        marks.append((lambda nodeid: all(t in nodeid for t in TRUNCATED_FDS_TESTS),
                      "qemu-user leaks the SCM_RIGHTS fds it truncates (MSG_CTRUNC)" + where))
    for item in items:
        for applies, reason in marks:
            if applies(item.nodeid):
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))


