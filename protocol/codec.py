"""Table-driven message codec: one Layout per (command, request|reply) instead of 28 functions.

A message body (everything after the 16-byte header) is a fixed construct struct (the "head")
followed by a tail whose shape depends on the command. Event fields and struct fields share
names, so the generic code copies values across; the tails handle what cannot be declared
(data whose length is the head's `count`, NUL-terminated JSON, QEMU's DMA tail padding, ...).
The same `_validate` runs on decode (peer's fault: Malformed -> BadMessage) and on encode (our
fault: Malformed -> LocalProtocolError), so both directions enforce identical rules.
"""

from __future__ import annotations

import dataclasses
import errno as E
import struct as _struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from construct import ConstructError

from .capabilities import decode_caps_json, encode_caps_json
from .constants import (
    HEADER_SIZE,
    WRITE_MULTI_DATA_SIZE,
    WRITE_MULTI_ENTRY_SIZE,
    WRITE_MULTI_MAX_ENTRIES,
    Command,
    MsgFlag,
    SetIrqsFlag,
)
from .events import (
    REPLY_TYPES,
    REQUEST_TYPES,
    Event,
    Reply,
    Request,
    WriteMultiEntry,
)
from .structs import ByteOrder, Packer, WireStructs, packer, wire_structs


class Malformed(Exception):
    """A message (or an event to encode) breaks a per-message rule; the stream is intact."""

    def __init__(self, errno: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = errno
        self.reason = reason


# --- tails -------------------------------------------------------------------------------------


class Tail:
    """No tail: the body ends with the head."""

    def encode(self, ev: Event, head: dict[str, Any], s: WireStructs) -> bytes:
        return b""

    def decode(self, rest: bytes, head: Mapping[str, Any], s: WireStructs) -> dict[str, Any]:
        if rest:
            raise Malformed(E.EINVAL, f"{len(rest)} unexpected bytes after the fixed part")
        return {}


class IgnoredTail(Tail):
    """Header-only reply; a peer may echo up to `limit` bytes of the request, which we skip."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def decode(self, rest: bytes, head: Mapping[str, Any], s: WireStructs) -> dict[str, Any]:
        if len(rest) > self.limit:
            raise Malformed(E.EINVAL, f"reply body of {len(rest)} bytes, at most {self.limit}")
        return {}


class DataTail(Tail):
    """`data` of head.count bytes, then `pad` bytes (QEMU's DMA messages carry 4, spec §2.9).

    On decode the padding is optional, so both QEMU's and a tight layout are accepted.
    """

    def __init__(self, pad: int = 0) -> None:
        self.pad = pad

    def encode(self, ev: Event, head: dict[str, Any], s: WireStructs) -> bytes:
        data = bytes(getattr(ev, "data"))  # noqa: B009 - generic over event types
        head["count"] = len(data)
        return data + bytes(self.pad)

    def decode(self, rest: bytes, head: Mapping[str, Any], s: WireStructs) -> dict[str, Any]:
        count = head["count"]
        if len(rest) - count not in {0, self.pad}:
            raise Malformed(E.EINVAL, f"count {count} disagrees with {len(rest)} data bytes")
        return {"data": bytes(rest[:count])}


class PadTail(Tail):
    """Optional zero padding only (QEMU's DMA_READ request is 32 bytes, count at 24)."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def encode(self, ev: Event, head: dict[str, Any], s: WireStructs) -> bytes:
        return bytes(self.pad)

    def decode(self, rest: bytes, head: Mapping[str, Any], s: WireStructs) -> dict[str, Any]:
        if len(rest) not in {0, self.pad}:
            raise Malformed(E.EINVAL, f"{len(rest)} unexpected bytes after the fixed part")
        return {}


class RawTail(Tail):
    """The rest of the body, uninterpreted, in event field `name`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, ev: Event, head: dict[str, Any], s: WireStructs) -> bytes:
        return bytes(getattr(ev, self.name))

    def decode(self, rest: bytes, head: Mapping[str, Any], s: WireStructs) -> dict[str, Any]:
        return {self.name: bytes(rest)}


class JsonTail(Tail):
    """VERSION's NUL-terminated JSON object, in event field `caps`."""

    def encode(self, ev: Event, head: dict[str, Any], s: WireStructs) -> bytes:
        try:
            return encode_caps_json(getattr(ev, "caps"))  # noqa: B009
        except (TypeError, ValueError) as exc:
            raise Malformed(E.EINVAL, f"capabilities not JSON-serialisable: {exc}") from None

    def decode(self, rest: bytes, head: Mapping[str, Any], s: WireStructs) -> dict[str, Any]:
        try:
            return {"caps": decode_caps_json(rest)}
        except ValueError as exc:
            raise Malformed(E.EINVAL, str(exc)) from None


class WriteMultiTail(Tail):
    """REGION_WRITE_MULTI entries {u64 offset, u32 region, u32 count<=8, u8 data[8]}."""

    def encode(self, ev: Event, head: dict[str, Any], s: WireStructs) -> bytes:
        writes: tuple[WriteMultiEntry, ...] = getattr(ev, "writes")  # noqa: B009
        if len(writes) > WRITE_MULTI_MAX_ENTRIES:
            raise Malformed(E.EINVAL, f"{len(writes)} writes, at most {WRITE_MULTI_MAX_ENTRIES}")
        out = bytearray()
        for w in writes:
            if len(w.data) > WRITE_MULTI_DATA_SIZE:
                raise Malformed(E.EINVAL, "a write-multi entry carries at most 8 bytes")
            out += s.write_multi_entry.build(
                {"offset": w.offset, "region": w.region, "count": len(w.data),
                 "data": bytes(w.data).ljust(WRITE_MULTI_DATA_SIZE, b"\0")}
            )
        head["wr_cnt"] = len(writes)
        return bytes(out)

    def decode(self, rest: bytes, head: Mapping[str, Any], s: WireStructs) -> dict[str, Any]:
        n = head["wr_cnt"]
        if n > WRITE_MULTI_MAX_ENTRIES:
            raise Malformed(E.EINVAL, f"wr_cnt {n} exceeds {WRITE_MULTI_MAX_ENTRIES}")
        if len(rest) != n * WRITE_MULTI_ENTRY_SIZE:
            raise Malformed(E.EINVAL, f"wr_cnt {n} disagrees with {len(rest)} entry bytes")
        writes = []
        for i in range(n):
            e = s.write_multi_entry.parse(rest[i * WRITE_MULTI_ENTRY_SIZE :])
            if e.count > WRITE_MULTI_DATA_SIZE:
                raise Malformed(E.EINVAL, f"write-multi entry count {e.count} exceeds 8")
            writes.append(WriteMultiEntry(e.offset, e.region, bytes(e.data[: e.count])))
        return {"writes": tuple(writes)}


# --- layouts -----------------------------------------------------------------------------------

#: How `argsz` relates to the body: "exact" = equals the body size; "buffer" = the client's reply
#: buffer (region-info request); "total" = full payload size, may exceed a truncated body.
ArgszRule = Literal["none", "exact", "buffer", "total"]
FdRule = Literal["none", "one", "many"]


@dataclass(frozen=True)
class Layout:
    head: str | None
    tail: Tail = Tail()
    argsz: ArgszRule = "none"
    fds: FdRule = "none"
    #: head.count is a data-transfer size, bounded by max_data_xfer_size (E2BIG).
    xfer_count: bool = False


def _set_irqs_fds(values: Mapping[str, Any], nfds: int) -> str | None:
    if nfds and not values["flags"] & SetIrqsFlag.DATA_EVENTFD:
        return "fds sent without DATA_EVENTFD"
    if nfds > values["count"]:
        return f"{nfds} fds for count {values['count']}"
    return None


#: Extra fd rules beyond the per-layout maximum.
_FD_CHECKS = {("request", Command.DEVICE_SET_IRQS): _set_irqs_fds}

_NO_TAIL = Tail()

REQUEST_LAYOUTS: dict[Command, Layout] = {
    Command.VERSION: Layout("version", JsonTail()),
    Command.DMA_MAP: Layout("dma_map", argsz="exact", fds="one"),
    Command.DMA_UNMAP: Layout("dma_unmap", argsz="exact"),
    Command.DEVICE_GET_INFO: Layout("device_info", argsz="exact"),
    Command.DEVICE_GET_REGION_INFO: Layout("region_info", argsz="buffer"),
    Command.DEVICE_GET_IRQ_INFO: Layout("irq_info", argsz="exact"),
    Command.DEVICE_SET_IRQS: Layout("set_irqs", argsz="exact", fds="many"),
    Command.REGION_READ: Layout("region_access", xfer_count=True),
    Command.REGION_WRITE: Layout("region_access", DataTail(), xfer_count=True),
    Command.REGION_WRITE_MULTI: Layout("write_multi", WriteMultiTail()),
    Command.DEVICE_RESET: Layout(None),
    Command.DEVICE_FEATURE: Layout("device_feature", RawTail("data"), argsz="exact"),
    Command.DMA_READ: Layout("dma_access", PadTail(4), xfer_count=True),
    Command.DMA_WRITE: Layout("dma_access", DataTail(pad=4), xfer_count=True),
}

# Header-only replies tolerate an echo of at most the request's body (QEMU's reply buffer).
REPLY_LAYOUTS: dict[Command, Layout] = {
    Command.VERSION: Layout("version", JsonTail()),
    Command.DMA_MAP: Layout(None, IgnoredTail(32)),
    Command.DMA_UNMAP: Layout(None, IgnoredTail(24)),
    Command.DEVICE_GET_INFO: Layout("device_info", argsz="exact"),
    Command.DEVICE_GET_REGION_INFO: Layout(
        "region_info", RawTail("caps"), argsz="total", fds="one"
    ),
    Command.DEVICE_GET_IRQ_INFO: Layout("irq_info", argsz="exact"),
    Command.DEVICE_SET_IRQS: Layout(None, IgnoredTail(20)),
    Command.REGION_READ: Layout("region_access", DataTail(), xfer_count=True),
    Command.REGION_WRITE: Layout(None, IgnoredTail(16)),
    Command.REGION_WRITE_MULTI: Layout(None),
    Command.DEVICE_RESET: Layout(None),
    Command.DEVICE_FEATURE: Layout("device_feature", RawTail("data"), argsz="exact"),
    Command.DMA_READ: Layout("dma_access", DataTail(pad=4), xfer_count=True),
    Command.DMA_WRITE: Layout(None, IgnoredTail(16)),
}

_EventTypes = Mapping[Command, type[Request] | type[Reply]]
_KIND_TABLES: dict[str, tuple[dict[Command, Layout], _EventTypes]] = {
    "request": (REQUEST_LAYOUTS, REQUEST_TYPES),
    "reply": (REPLY_LAYOUTS, REPLY_TYPES),
}
Kind = Literal["request", "reply"]


def event_fds(ev: Event) -> tuple[int, ...]:
    """The fds an event carries, whatever its type."""
    fd = getattr(ev, "fd", None)
    if fd is not None:
        return (fd,)
    return tuple(getattr(ev, "fds", ()))


class Codec:
    """Encode events to message bytes and decode message bodies to events, for one byte order."""

    def __init__(self, byteorder: ByteOrder) -> None:
        self.structs = wire_structs(byteorder)
        self._header = packer(self.structs.header, byteorder)
        self._packers: dict[str, Packer] = {
            f.name: packer(getattr(self.structs, f.name), byteorder)
            for f in dataclasses.fields(WireStructs)
            if f.name != "byteorder"
        }

    # header ---------------------------------------------------------------------------------

    def parse_header(self, raw: bytes) -> dict[str, int]:
        return self._header.parse(raw)

    def header(self, msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
        try:
            return self._header.st.pack(msg_id, command, size, flags, error)
        except _struct.error as exc:
            raise Malformed(E.EINVAL, f"header field out of range: {exc}") from None

    # shared rules ---------------------------------------------------------------------------

    def _head_struct(self, layout: Layout) -> Packer | None:
        return self._packers[layout.head] if layout.head else None

    @staticmethod
    def _validate(
        kind: Kind, command: Command, layout: Layout, values: Mapping[str, Any], body_len: int,
        head_len: int, nfds: int, max_data_xfer_size: int, max_msg_fds: int,
    ) -> None:
        argsz: int = values.get("argsz", 0)
        if layout.argsz == "exact" and argsz != body_len:
            raise Malformed(E.EINVAL, f"argsz {argsz} disagrees with body size {body_len}")
        if layout.argsz == "buffer" and not head_len <= argsz <= max_data_xfer_size:
            raise Malformed(E.EINVAL, f"argsz {argsz} outside {head_len}..{max_data_xfer_size}")
        if layout.argsz == "total" and argsz < body_len:
            raise Malformed(E.EINVAL, f"argsz {argsz} smaller than body size {body_len}")
        if layout.xfer_count and values["count"] > max_data_xfer_size:
            raise Malformed(E.E2BIG, f"count {values['count']} exceeds {max_data_xfer_size}")
        limit = {"none": 0, "one": 1, "many": max_msg_fds}[layout.fds]
        if nfds > limit:
            raise Malformed(E.EINVAL, f"{nfds} fds, at most {limit} allowed")
        check = _FD_CHECKS.get((kind, command))
        if check is not None and (reason := check(values, nfds)) is not None:
            raise Malformed(E.EINVAL, reason)

    # encode ---------------------------------------------------------------------------------

    def encode(
        self, kind: Kind, ev: Request | Reply, msg_id: int, flags: int,
        max_data_xfer_size: int, max_msg_fds: int,
    ) -> tuple[bytes, tuple[int, ...]]:
        """Whole message bytes plus fds; raises Malformed if the event breaks a rule."""
        command = ev.command
        layout = _KIND_TABLES[kind][0][command]
        struct = self._head_struct(layout)
        names = struct.names if struct is not None else ()
        values: dict[str, Any] = {n: getattr(ev, n, 0) for n in names}
        fds = event_fds(ev)
        try:
            tail = layout.tail.encode(ev, values, self.structs)
            head_len = struct.size if struct is not None else 0
            body_len = head_len + len(tail)
            if layout.argsz == "exact" or (layout.argsz == "total" and values["argsz"] is None):
                values["argsz"] = body_len
            self._validate(kind, command, layout, values, body_len, head_len, len(fds),
                           max_data_xfer_size, max_msg_fds)
            head = struct.build(values) if struct is not None else b""
        except (ConstructError, _struct.error) as exc:
            raise Malformed(E.EINVAL, f"field out of range: {exc}") from None
        except TypeError as exc:
            raise Malformed(E.EINVAL, f"bad field type: {exc}") from None
        size = HEADER_SIZE + body_len
        return self.header(msg_id, command, size, flags) + head + tail, fds

    def encode_error(self, msg_id: int, command: int, errno: int) -> bytes:
        return self.header(msg_id, command, HEADER_SIZE, MsgFlag.REPLY | MsgFlag.ERROR, errno)

    # decode ---------------------------------------------------------------------------------

    def decode(
        self, kind: Kind, command: Command, body: bytes, fds: tuple[int, ...],
        max_data_xfer_size: int, max_msg_fds: int, **ids: Any,
    ) -> Event:
        """Decode a body (after the header) into its event; `ids` are msg_id (and no_reply)."""
        layouts, types = _KIND_TABLES[kind]
        layout = layouts[command]
        cls = types[command]
        struct = self._head_struct(layout)
        values: dict[str, Any] = {}
        head_len = 0
        if struct is not None:
            head_len = struct.size
            if len(body) < head_len:
                raise Malformed(E.EINVAL, f"body of {len(body)} bytes, fixed part is {head_len}")
            values = struct.parse(body)
        self._validate(kind, command, layout, values, len(body), head_len, len(fds),
                       max_data_xfer_size, max_msg_fds)
        values.update(layout.tail.decode(body[head_len:], values, self.structs))
        wanted = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in wanted}
        if layout.fds == "one":
            kwargs["fd"] = fds[0] if fds else None
        elif layout.fds == "many":
            kwargs["fds"] = fds
        return cls(**kwargs, **ids)
