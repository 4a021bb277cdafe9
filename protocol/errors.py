"""Exceptions of the wire layer, split by whose fault it is (as in h11)."""

from __future__ import annotations

from collections.abc import Iterable


class ProtocolError(Exception):
    """Base class: something violated the vfio-user protocol."""


class LocalProtocolError(ProtocolError):
    """Our side tried to do something the protocol forbids; nothing was sent or consumed."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the stream beyond resynchronisation; the connection is now ERROR.

    `fds` are the received file descriptors that no event will ever carry (those of the broken
    message and anything buffered after it); the caller must close them.
    """

    def __init__(self, message: str, fds: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.fds: tuple[int, ...] = tuple(fds)
