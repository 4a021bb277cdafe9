"""Shared helpers for the wire-layer tests (pure: fds are fake integers)."""

from __future__ import annotations

import struct
from typing import Literal

from vfiod.protocol import (
    NEED_DATA,
    Connection,
    Event,
    Role,
    Sentinel,
    Version,
    VersionReply,
    server_capabilities,
)

Order = Literal["little", "big"]
ORDERS: tuple[Order, ...] = ("little", "big")


def fmt(order: Order) -> str:
    return "<" if order == "little" else ">"


def header(order: Order, msg_id: int, command: int, size: int, flags: int = 0,
           error: int = 0) -> bytes:
    """An independent (struct-module) encoding of the 16-byte header."""
    return struct.pack(fmt(order) + "HHIII", msg_id, command, size, flags, error)


def pack(order: Order, spec: str, *values: int) -> bytes:
    return struct.pack(fmt(order) + spec, *values)


def drain(conn: Connection) -> list[Event | Sentinel]:
    """All events currently available, ending with the NEED_DATA or CLOSED sentinel."""
    out: list[Event | Sentinel] = []
    while True:
        ev = conn.next_event()
        out.append(ev)
        if isinstance(ev, Sentinel):
            return out


def one(conn: Connection) -> Event:
    ev = conn.next_event()
    assert isinstance(ev, Event), ev
    assert conn.next_event() is NEED_DATA
    return ev


def deliver(src: Connection, dst: Connection, ev: Event) -> Event:
    """Send `ev` from src and decode it at dst."""
    out = src.send(ev)
    dst.receive_data(out.data, out.fds)
    return one(dst)


def pair(order: Order = "little", **kw: int) -> tuple[Connection, Connection]:
    """A (client, server) pair that has completed VERSION negotiation."""
    client = Connection(Role.CLIENT, byteorder=order, **kw)
    server = Connection(Role.SERVER, byteorder=order, **kw)
    req = deliver(client, server, Version(caps=server_capabilities()))
    assert isinstance(req, Version) and req.msg_id is not None
    deliver(server, client, VersionReply(caps=server_capabilities(), msg_id=req.msg_id))
    return client, server


def ready_server(order: Order = "little", **kw: int) -> Connection:
    return pair(order, **kw)[1]


def ready_client(order: Order = "little", **kw: int) -> Connection:
    return pair(order, **kw)[0]
