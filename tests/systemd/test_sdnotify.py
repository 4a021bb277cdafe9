"""vfiod.sdnotify against a fake NOTIFY_SOCKET (a datagram socket, as systemd's)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfiod import sdnotify


class FakeManager:
    """The receiving end of NOTIFY_SOCKET, with SO_PASSCRED like systemd (it checks the PID)."""

    def __init__(self, addr: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(addr)
        self.sock.settimeout(5)

    def receive(self) -> tuple[dict[str, str], int]:
        """(assignments, sender pid) of the next datagram."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:12])
        text = data.decode()
        assert text.endswith("\n"), text
        fields = dict(line.split("=", 1) for line in text.splitlines())
        return fields, pid

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_manager(tmp_path: Path) -> Iterator[tuple[FakeManager, str]]:
    path = str(tmp_path / "notify")
    mgr = FakeManager(path)
    yield mgr, path
    mgr.close()


@pytest.fixture
def abstract_manager() -> Iterator[tuple[FakeManager, str]]:
    name = f"vfiod-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    mgr = FakeManager(b"\0" + name.encode())
    yield mgr, "@" + name
    mgr.close()


def test_no_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sdnotify.ENV, raising=False)
    assert sdnotify.notify(ready=True, status="x") is False
    assert sdnotify.notify(ready=True, environ={}) is False
    assert sdnotify.notify(ready=True, environ={sdnotify.ENV: ""}) is False


def test_ready_and_status_over_a_path_socket(
    path_manager: tuple[FakeManager, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr, path = path_manager
    monkeypatch.setenv(sdnotify.ENV, path)
    assert sdnotify.notify(ready=True, status="serving 2 functions in /run/vfiod")
    fields, pid = mgr.receive()
    assert fields == {"READY": "1", "STATUS": "serving 2 functions in /run/vfiod"}
    assert pid == os.getpid()


def test_abstract_socket(abstract_manager: tuple[FakeManager, str]) -> None:
    mgr, name = abstract_manager
    assert name.startswith("@")
    assert sdnotify.notify(stopping=True, status="stopping", environ={sdnotify.ENV: name})
    fields, _ = mgr.receive()
    assert fields == {"STOPPING": "1", "STATUS": "stopping"}


def test_reloading_carries_monotonic_usec(path_manager: tuple[FakeManager, str]) -> None:
    mgr, path = path_manager
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.notify(reloading=True, status="reloading", environ={sdnotify.ENV: path})
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields, _ = mgr.receive()
    assert fields["RELOADING"] == "1"
    assert fields["STATUS"] == "reloading"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    # Then the reload finishes with READY=1, as systemd expects.
    assert sdnotify.notify(ready=True, environ={sdnotify.ENV: path})
    assert mgr.receive()[0] == {"READY": "1"}


def test_extra_and_newlines(path_manager: tuple[FakeManager, str]) -> None:
    mgr, path = path_manager
    env = {sdnotify.ENV: path}
    assert sdnotify.notify(status="two\nlines", extra={"ERRNO": 2, "WATCHDOG": "1"}, environ=env)
    assert mgr.receive()[0] == {"STATUS": "two lines", "ERRNO": "2", "WATCHDOG": "1"}
    with pytest.raises(ValueError):
        sdnotify.notify(extra={"A=B": 1}, environ=env)
    # Nothing to say: nothing sent.
    assert sdnotify.notify(environ=env) is False
    assert mgr.nothing_pending()


def test_unusable_addresses(path_manager: tuple[FakeManager, str], tmp_path: Path) -> None:
    assert sdnotify.address("relative/path") is None
    assert sdnotify.address("vsock:2:1234") is None
    assert sdnotify.address("@") is None
    assert sdnotify.address("@abc") == b"\0abc"
    assert sdnotify.address("/x/y") == "/x/y"
    assert sdnotify.notify(ready=True, environ={sdnotify.ENV: "vsock:2:1234"}) is False
    # A socket that is gone: logged, reported, never raised.
    gone = str(tmp_path / "gone")
    assert sdnotify.notify(ready=True, environ={sdnotify.ENV: gone}) is False


def test_message_format() -> None:
    msg = sdnotify.format_message(ready=True, reloading=True, stopping=True, status="s",
                                  monotonic_usec=42)
    assert msg == b"RELOADING=1\nMONOTONIC_USEC=42\nSTOPPING=1\nREADY=1\nSTATUS=s\n"
    assert sdnotify.format_message() == b""


def test_from_a_child_process_like_systemd_sees_it(
    path_manager: tuple[FakeManager, str],
) -> None:
    """A separate process (as the daemon is) reaches the manager; the credentials carry its
    PID, which is what NotifyAccess=main checks."""
    mgr, path = path_manager
    code = ("import sys; from vfiod import sdnotify; "
            "sys.exit(0 if sdnotify.notify(ready=True) else 1)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, sdnotify.ENV: path})
    assert proc.wait(timeout=60) == 0
    fields, pid = mgr.receive()
    assert fields == {"READY": "1"}
    assert pid == proc.pid
