"""Typed events: one frozen dataclass per request and per reply, plus ErrorReply and BadMessage.

Requests take `msg_id` and `no_reply` as keyword-only fields (`msg_id=None` lets the connection
assign one); replies take a keyword-only `msg_id` that must name the request they answer.
File descriptors travel inside the events that may carry them, so ownership is explicit: every
received fd is handed out in exactly one event (or in a RemoteProtocolError).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

from .constants import PROTOCOL_MAJOR, PROTOCOL_MINOR, Command


class Event:
    """Base of everything `Connection.next_event()` returns and `Connection.send()` accepts."""


@dataclass(frozen=True)
class Request(Event):
    """A message that expects a reply unless `no_reply` (header flag NO_REPLY)."""

    command: ClassVar[Command]
    _: KW_ONLY
    msg_id: int | None = None
    no_reply: bool = False


@dataclass(frozen=True)
class Reply(Event):
    """A successful reply; the command is implied by the request `msg_id` answers."""

    command: ClassVar[Command]
    _: KW_ONLY
    msg_id: int


# --- requests, client -> server ---------------------------------------------------------------


@dataclass(frozen=True)
class Version(Request):
    """VERSION request; `caps` is the whole decoded JSON object ({"capabilities": {...}})."""

    command = Command.VERSION
    major: int = PROTOCOL_MAJOR
    minor: int = PROTOCOL_MINOR
    caps: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DmaMap(Request):
    command = Command.DMA_MAP
    flags: int
    offset: int
    iova: int
    size: int
    fd: int | None = None


@dataclass(frozen=True)
class DmaUnmap(Request):
    command = Command.DMA_UNMAP
    flags: int
    iova: int
    size: int


@dataclass(frozen=True)
class DeviceGetInfo(Request):
    command = Command.DEVICE_GET_INFO


@dataclass(frozen=True)
class DeviceGetRegionInfo(Request):
    """`argsz` is the client's reply buffer (32 on QEMU's first try, spec §2.5)."""

    command = Command.DEVICE_GET_REGION_INFO
    index: int
    argsz: int = 32


@dataclass(frozen=True)
class DeviceGetIrqInfo(Request):
    command = Command.DEVICE_GET_IRQ_INFO
    index: int


@dataclass(frozen=True)
class DeviceSetIrqs(Request):
    """Eventfds come only as `fds`; `count` > len(fds) == 0 is a de-assign run (spec §2.7)."""

    command = Command.DEVICE_SET_IRQS
    flags: int
    index: int
    start: int
    count: int
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class RegionRead(Request):
    command = Command.REGION_READ
    offset: int
    region: int
    count: int


@dataclass(frozen=True)
class RegionWrite(Request):
    command = Command.REGION_WRITE
    offset: int
    region: int
    data: bytes


@dataclass(frozen=True)
class WriteMultiEntry:
    """One posted write of REGION_WRITE_MULTI (at most 8 data bytes)."""

    offset: int
    region: int
    data: bytes


@dataclass(frozen=True)
class RegionWriteMulti(Request):
    command = Command.REGION_WRITE_MULTI
    writes: tuple[WriteMultiEntry, ...]


@dataclass(frozen=True)
class DeviceReset(Request):
    command = Command.DEVICE_RESET


@dataclass(frozen=True)
class DeviceFeature(Request):
    command = Command.DEVICE_FEATURE
    flags: int
    data: bytes = b""


# --- requests, server -> client (QEMU's VFIOUserDMARW layout, spec §2.9) ---------------------


@dataclass(frozen=True)
class DmaRead(Request):
    command = Command.DMA_READ
    address: int
    count: int


@dataclass(frozen=True)
class DmaWrite(Request):
    command = Command.DMA_WRITE
    address: int
    data: bytes


# --- replies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionReply(Reply):
    command = Command.VERSION
    major: int = PROTOCOL_MAJOR
    minor: int = PROTOCOL_MINOR
    caps: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DmaMapReply(Reply):
    command = Command.DMA_MAP


@dataclass(frozen=True)
class DmaUnmapReply(Reply):
    command = Command.DMA_UNMAP


@dataclass(frozen=True)
class DeviceInfoReply(Reply):
    command = Command.DEVICE_GET_INFO
    flags: int
    num_regions: int
    num_irqs: int


@dataclass(frozen=True)
class RegionInfoReply(Reply):
    """`caps` are the raw capability bytes that follow the 32-byte struct.

    `argsz=None` means "32 + len(caps)". On decode it is the wire value: when larger than the
    bytes received, the server truncated the reply and the client must ask again (spec §2.5).
    """

    command = Command.DEVICE_GET_REGION_INFO
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: bytes = b""
    argsz: int | None = None
    fd: int | None = None


@dataclass(frozen=True)
class IrqInfoReply(Reply):
    command = Command.DEVICE_GET_IRQ_INFO
    flags: int
    index: int
    count: int


@dataclass(frozen=True)
class SetIrqsReply(Reply):
    command = Command.DEVICE_SET_IRQS


@dataclass(frozen=True)
class RegionReadReply(Reply):
    command = Command.REGION_READ
    offset: int
    region: int
    data: bytes


@dataclass(frozen=True)
class RegionWriteReply(Reply):
    command = Command.REGION_WRITE


@dataclass(frozen=True)
class RegionWriteMultiReply(Reply):
    command = Command.REGION_WRITE_MULTI


@dataclass(frozen=True)
class DeviceResetReply(Reply):
    command = Command.DEVICE_RESET


@dataclass(frozen=True)
class DeviceFeatureReply(Reply):
    command = Command.DEVICE_FEATURE
    flags: int
    data: bytes = b""


@dataclass(frozen=True)
class DmaReadReply(Reply):
    command = Command.DMA_READ
    address: int
    data: bytes


@dataclass(frozen=True)
class DmaWriteReply(Reply):
    command = Command.DMA_WRITE


# --- outside the request/reply pairs -----------------------------------------------------------


@dataclass(frozen=True)
class ErrorReply(Event):
    """Header-only reply with flags REPLY|ERROR and a positive errno (spec §1.1).

    When sending, `command` may be None: the connection echoes the request's command.
    """

    msg_id: int
    command: int | None
    errno: int


@dataclass(frozen=True)
class BadMessage(Event):
    """A received message the stream could skip but that is malformed or not allowed now.

    Answer it with `ErrorReply(msg_id, command, errno)` unless `no_reply` (always true for a bad
    reply), and close `fds`: they are yours now.
    """

    msg_id: int
    command: int
    errno: int
    reason: str
    fds: tuple[int, ...] = ()
    no_reply: bool = False


#: Every request and reply class, keyed by command, for table lookups.
REQUEST_TYPES: dict[Command, type[Request]] = {
    cls.command: cls
    for cls in (
        Version, DmaMap, DmaUnmap, DeviceGetInfo, DeviceGetRegionInfo, DeviceGetIrqInfo,
        DeviceSetIrqs, RegionRead, RegionWrite, RegionWriteMulti, DeviceReset, DeviceFeature,
        DmaRead, DmaWrite,
    )
}
REPLY_TYPES: dict[Command, type[Reply]] = {
    cls.command: cls
    for cls in (
        VersionReply, DmaMapReply, DmaUnmapReply, DeviceInfoReply, RegionInfoReply,
        IrqInfoReply, SetIrqsReply, RegionReadReply, RegionWriteReply, RegionWriteMultiReply,
        DeviceResetReply, DeviceFeatureReply, DmaReadReply, DmaWriteReply,
    )
}
