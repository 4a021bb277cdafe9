"""A small synchronous client of the control socket (used by ``vfiodctl``; fine for scripts).

```python
from vfiod.control.client import ControlClient

with ControlClient("/run/vfiod/control.sock") as c:
    inv = c.call("inventory")
    c.call("eeh", target="pf0", op="thaw")
```
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from vfiod.config import default_socket_dir

from .wire import MAX_REPLY_LINE, LineSplitter, WireError, decode_reply, encode_request

SOCKET_ENV = "VFIOD_CONTROL_SOCKET"


def default_control_socket() -> Path:
    """``$VFIOD_CONTROL_SOCKET``, else ``control.sock`` in vfiod's default socket directory."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    return default_socket_dir() / "control.sock"


class ConnectError(Exception):
    """The control socket could not be reached; the message says which and why."""


class DaemonError(Exception):
    """The daemon answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ProtocolError(Exception):
    """The daemon's reply broke the protocol, or the connection ended without one."""


class ControlClient:
    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_control_socket()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lines = LineSplitter(MAX_REPLY_LINE)
        self._pending: list[bytes] = []
        self._next_id = 1

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.path))
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            if isinstance(exc, PermissionError):
                hint = "run as root or as the daemon's user"
            else:
                hint = "is vfiod running? (--socket PATH or $VFIOD_CONTROL_SOCKET to choose)"
            raise ConnectError(f"cannot connect to {self.path}: {reason}; {hint}") from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, op: str, /, **args: Any) -> Any:
        """Send one request and return its result; DaemonError / ProtocolError otherwise."""
        rid = self._next_id
        line = encode_request(rid, op, args)  # WireError before connecting if args are bad
        self._next_id += 1
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused us and closed: its reply may still be waiting
        except TimeoutError:
            raise ProtocolError(f"{self.path}: the daemon does not read requests") from None
        try:
            reply = decode_reply(self._read_line())
        except WireError as exc:
            raise ProtocolError(exc.message) from None
        if not reply.ok:
            raise DaemonError(reply.code, reply.message)
        if reply.id != rid:
            raise ProtocolError(f"reply id {reply.id} does not match request id {rid}")
        return reply.result

    def _read_line(self) -> bytes:
        sock = self._sock
        assert sock is not None
        while not self._pending:
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                raise ProtocolError(f"no reply from the daemon within {self.timeout}s") from None
            except ConnectionResetError:
                data = b""
            if not data:
                raise ProtocolError(f"{self.path}: the daemon closed the connection")
            try:
                self._pending.extend(self._lines.feed(data))
            except WireError as exc:
                raise ProtocolError(exc.message) from None
        return self._pending.pop(0)
