"""A tiny sd_notify(3) client: tell systemd about readiness, status, reloads and shutdown.

systemd passes a Type=notify service the address of its notification socket in $NOTIFY_SOCKET:
a filesystem path, or an abstract socket name written with a leading '@'. A notification is one
datagram of newline-separated VAR=VALUE assignments (READY=1, STATUS=..., RELOADING=1 with
MONOTONIC_USEC=..., STOPPING=1, ...). Without $NOTIFY_SOCKET (not started by systemd, or not
Type=notify) every call is a no-op, so the daemon calls it unconditionally::

    from vfiod import sdnotify

    sdnotify.notify(ready=True, status="serving 2 functions")     # once every socket listens
    sdnotify.notify(reloading=True, status="reloading")           # on SIGHUP (adds MONOTONIC_USEC)
    sdnotify.notify(ready=True, status="serving 3 functions")     # reload done
    sdnotify.notify(stopping=True, status="stopping")             # on SIGTERM

No dependency beyond the standard library. A failure to send is logged and reported as False; it
never raises into the daemon (systemd then times the start out, which says more than a crash).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["ENV", "address", "format_message", "notify"]

log = logging.getLogger(__name__)

#: The environment variable systemd sets for Type=notify services.
ENV = "NOTIFY_SOCKET"

_SEND_TIMEOUT = 2.0  # seconds; systemd's queue is large, a blocked send means it is gone


def address(value: str | None = None) -> str | bytes | None:
    """The socket address for sendto() from a $NOTIFY_SOCKET value (default: the environment).

    '/path' stays a path; '@name' becomes the abstract address b'\\0name'. Anything else (empty,
    relative, or systemd's 'vsock:CID:PORT' form, which an AF_UNIX-only service cannot use) gives
    None.
    """
    if value is None:
        value = os.environ.get(ENV)
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def _clean(value: object) -> str:
    # One assignment per line: a newline inside a value would start a bogus assignment.
    return " ".join(str(value).splitlines())


def format_message(
    *,
    ready: bool = False,
    status: str | None = None,
    stopping: bool = False,
    reloading: bool = False,
    extra: Mapping[str, object] | None = None,
    monotonic_usec: int | None = None,
) -> bytes:
    """The datagram for one notification (see ``notify``)."""
    fields: list[str] = []
    if reloading:
        fields.append("RELOADING=1")
        if monotonic_usec is None:
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields.append(f"MONOTONIC_USEC={monotonic_usec}")
    if stopping:
        fields.append("STOPPING=1")
    if ready:
        fields.append("READY=1")
    if status is not None:
        fields.append(f"STATUS={_clean(status)}")
    for key, value in (extra or {}).items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"bad sd_notify variable name {key!r}")
        fields.append(f"{key}={_clean(value)}")
    return ("\n".join(fields) + "\n").encode() if fields else b""


def notify(
    *,
    ready: bool = False,
    status: str | None = None,
    stopping: bool = False,
    reloading: bool = False,
    extra: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Send one notification to systemd. True if it was sent; False without $NOTIFY_SOCKET (a
    no-op), with nothing to send, or if sending failed (logged).

    ready: READY=1 (startup finished, or a reload finished). status: STATUS=<text>, shown by
    `systemctl status`. stopping: STOPPING=1. reloading: RELOADING=1 plus MONOTONIC_USEC=<now>
    (CLOCK_MONOTONIC, as systemd requires for reload notifications); send ready=True when the
    reload is done. extra: any other VAR=VALUE (e.g. {"WATCHDOG": 1}, {"ERRNO": 2}).
    environ: where to find NOTIFY_SOCKET (default os.environ; for tests).
    """
    env = os.environ if environ is None else environ
    addr = address(env.get(ENV))
    if addr is None:
        if env.get(ENV):
            log.warning("%s=%r is not a socket this daemon can use; not notifying",
                        ENV, env.get(ENV))
        return False
    message = format_message(ready=ready, status=status, stopping=stopping,
                             reloading=reloading, extra=extra)
    if not message:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sent = sock.sendto(message, addr)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", env.get(ENV), exc)
        return False
    if sent != len(message):
        log.warning("sd_notify to %s: short send (%d of %d bytes)", env.get(ENV), sent,
                    len(message))
        return False
    return True
