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
import functools
import struct as _struct
from collections.abc import Callable, Mapping
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
    """No tail: the body ends with the head.

    `uses_head`: decode() reads (or encode() writes) head values, so the compiled codec must
    hand it a dict of them; tails that do not touch the head are spared building one.
    """

    uses_head = False

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

    uses_head = True

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

    uses_head = True

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


#: A compiled decoder: (body, fds, max_data_xfer_size, max_msg_fds, msg_id, no_reply) -> event.
DecodeFn = Callable[[bytes, tuple[int, ...], int, int, int, bool], Event]
#: A compiled encoder: (event, msg_id, flags, max_data_xfer_size, max_msg_fds) -> (bytes, fds).
EncodeFn = Callable[[Any, int, int, int, int], tuple[bytes, tuple[int, ...]]]

_FD_LIMITS: dict[FdRule, int | None] = {"none": 0, "one": 1, "many": None}  # None: max_msg_fds


def _init_fields(cls: type) -> tuple[list[str], list[str]]:
    """(positional, keyword-only) __init__ parameters of an event dataclass."""
    pos: list[str] = []
    kw: list[str] = []
    for f in dataclasses.fields(cls):
        if f.init:
            (kw if f.kw_only else pos).append(f.name)
    return pos, kw


def _event_builder(kind: Kind, cls: type, names: tuple[str, ...], data_tail: bool,
                   fds_rule: FdRule) -> Callable[..., Event] | None:
    """A generated `(v, t, fds, msg_id, no_reply) -> cls(...)` taking head values `v`, the data
    tail `t` and the fds; positional arguments where possible (a frozen dataclass built from
    keywords costs twice as much). None if a field has no source here (the tail decodes it)."""
    pos, kw = _init_fields(cls)
    sources: dict[str, str] = {n: f"v[{i}]" for i, n in enumerate(names)}
    if data_tail:
        sources["data"] = "t"
    if fds_rule == "one":
        sources["fd"] = "(fds[0] if fds else None)"
    elif fds_rule == "many":
        sources["fds"] = "fds"
    args: list[str] = []
    keywords = False
    for name in pos:
        if name not in sources:
            if _has_default(cls, name):
                keywords = True  # skipped: later ones must be passed by name
                continue
            return None
        args.append(f"{name}={sources[name]}" if keywords else sources[name])
    ids = {"request": ["msg_id", "no_reply"], "reply": ["msg_id"]}[kind]
    if sorted(kw) != sorted(ids):
        return None
    args += [f"{n}={n}" for n in ids]
    src = f"lambda v, t, fds, msg_id, no_reply: cls({', '.join(args)})"
    fn: Callable[..., Event] = eval(src, {"cls": cls})  # noqa: S307 - our own source text
    return fn


def _has_default(cls: type, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


class Codec:
    """Encode events to message bytes and decode message bodies to events, for one byte order.

    Each (kind, command) gets a decoder and an encoder compiled once from its Layout: field
    indices, which rules apply and the event constructor are resolved here, not per message.
    `decoders[kind][command]` and `encoders[kind][command]` are the hot-path entry points;
    `decode()`/`encode()` are the same with the table lookup done for you.
    """

    @staticmethod
    @functools.cache
    def shared(byteorder: ByteOrder) -> Codec:
        """The codec of a byte order, compiled once per process: a codec holds no state of
        any connection, and compiling one costs milliseconds (every session makes a
        Connection)."""
        return Codec(byteorder)

    def __init__(self, byteorder: ByteOrder) -> None:
        self.structs = wire_structs(byteorder)
        self._header = packer(self.structs.header, byteorder)
        #: The precompiled 16-byte header (msg_id, command, size, flags, error).
        self.header_struct = self._header.st
        self._fmt = "<" if byteorder == "little" else ">"
        self._packers: dict[str, Packer] = {
            f.name: packer(getattr(self.structs, f.name), byteorder)
            for f in dataclasses.fields(WireStructs)
            if f.name != "byteorder"
        }
        self.decoders: dict[Kind, dict[int, DecodeFn]] = {}
        self.encoders: dict[Kind, dict[int, EncodeFn]] = {}
        for kind, (layouts, types) in _KIND_TABLES.items():
            k: Kind = "request" if kind == "request" else "reply"
            self.decoders[k] = {
                int(cmd): self._compile_decoder(k, cmd, layout, types[cmd])
                for cmd, layout in layouts.items()
            }
            self.encoders[k] = {
                int(cmd): self._compile_encoder(k, cmd, layout, types[cmd])
                for cmd, layout in layouts.items()
            }
        self._error_header = self.header_struct.pack

    # header ---------------------------------------------------------------------------------

    def parse_header(self, raw: bytes) -> dict[str, int]:
        return self._header.parse(raw)

    def header(self, msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
        try:
            return self.header_struct.pack(msg_id, command, size, flags, error)
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
        """Every per-layout rule, generic form (the compiled codecs inline the same checks)."""
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

    # compiled decoders ----------------------------------------------------------------------

    def _compile_decoder(self, kind: Kind, command: Command, layout: Layout,
                         cls: type[Request] | type[Reply]) -> DecodeFn:
        p = self._head_struct(layout)
        names = p.names if p is not None else ()
        head_len = p.size if p is not None else 0
        unpack_from = p.st.unpack_from if p is not None else None
        rule = layout.argsz
        argsz_i = names.index("argsz") if rule != "none" else -1
        xfer_i = names.index("count") if layout.xfer_count else -1
        fd_limit = _FD_LIMITS[layout.fds]
        fd_check = _FD_CHECKS.get((kind, command))
        tail = layout.tail
        plain_tail = type(tail) is Tail
        data_tail = type(tail) is DataTail
        pad = tail.pad if isinstance(tail, DataTail) else 0
        count_i = names.index("count") if data_tail else -1
        head_dict = fd_check is not None or (not data_tail and tail.uses_head)
        build = _event_builder(kind, cls, names, data_tail, layout.fds) if (
            plain_tail or data_tail) else None
        fds_rule = layout.fds
        structs = self.structs
        empty: Mapping[str, Any] = {}
        wanted = {f.name for f in dataclasses.fields(cls)}

        def decode(body: bytes, fds: tuple[int, ...], max_xfer: int, max_fds: int,
                   msg_id: int, no_reply: bool) -> Event:
            blen = len(body)
            if blen < head_len:
                raise Malformed(E.EINVAL, f"body of {blen} bytes, fixed part is {head_len}")
            v = unpack_from(body) if unpack_from is not None else ()
            # the rules of Codec._validate, in its order
            if argsz_i >= 0:
                argsz = v[argsz_i]
                if rule == "exact":
                    if argsz != blen:
                        raise Malformed(E.EINVAL, f"argsz {argsz} disagrees with body size {blen}")
                elif rule == "buffer":
                    if not head_len <= argsz <= max_xfer:
                        raise Malformed(E.EINVAL, f"argsz {argsz} outside {head_len}..{max_xfer}")
                elif argsz < blen:
                    raise Malformed(E.EINVAL, f"argsz {argsz} smaller than body size {blen}")
            if xfer_i >= 0 and v[xfer_i] > max_xfer:
                raise Malformed(E.E2BIG, f"count {v[xfer_i]} exceeds {max_xfer}")
            if fds:
                limit = max_fds if fd_limit is None else fd_limit
                if len(fds) > limit:
                    raise Malformed(E.EINVAL, f"{len(fds)} fds, at most {limit} allowed")
            head = dict(zip(names, v, strict=True)) if head_dict else empty
            if fd_check is not None and (reason := fd_check(head, len(fds))) is not None:
                raise Malformed(E.EINVAL, reason)
            t: bytes = b""
            if plain_tail:
                if blen != head_len:
                    raise Malformed(E.EINVAL,
                                    f"{blen - head_len} unexpected bytes after the fixed part")
            elif data_tail:
                count = v[count_i]
                if blen - head_len - count not in (0, pad):
                    raise Malformed(E.EINVAL,
                                    f"count {count} disagrees with {blen - head_len} data bytes")
                t = bytes(body[head_len : head_len + count])
            if build is not None:
                return build(v, t, fds, msg_id, no_reply)
            # generic: tails that decode fields of their own (JSON, raw, write-multi)
            values = dict(zip(names, v, strict=True)) if not head_dict else dict(head)
            values.update(tail.decode(body[head_len:], values, structs))
            kwargs = {k: val for k, val in values.items() if k in wanted}
            if fds_rule == "one":
                kwargs["fd"] = fds[0] if fds else None
            elif fds_rule == "many":
                kwargs["fds"] = fds
            if kind == "request":
                kwargs["no_reply"] = no_reply
            return cls(**kwargs, msg_id=msg_id)

        return decode

    # compiled encoders ----------------------------------------------------------------------

    def _compile_encoder(self, kind: Kind, command: Command, layout: Layout,
                         cls: type[Request] | type[Reply]) -> EncodeFn:
        p = self._head_struct(layout)
        names = p.names if p is not None else ()
        head_len = p.size if p is not None else 0
        fields = {f.name for f in dataclasses.fields(cls)}
        # header and head in one pack call
        pack = _struct.Struct(self.header_struct.format + (p.st.format[1:] if p else "")).pack
        rule = layout.argsz
        fd_limit = _FD_LIMITS[layout.fds]
        fd_check = _FD_CHECKS.get((kind, command))
        tail = layout.tail
        plain_tail = type(tail) is Tail or type(tail) is IgnoredTail
        data_tail = type(tail) is DataTail
        pad = bytes(tail.pad) if isinstance(tail, DataTail) else b""
        argsz_i = names.index("argsz") if rule != "none" else -1
        xfer_i = names.index("count") if layout.xfer_count else -1
        structs = self.structs
        cmd = int(command)
        if "fd" in fields:
            def get_fds(ev: Any) -> tuple[int, ...]:
                fd = ev.fd
                return () if fd is None else (fd,)
        elif "fds" in fields:
            def get_fds(ev: Any) -> tuple[int, ...]:
                return tuple(ev.fds)
        else:
            def get_fds(ev: Any) -> tuple[int, ...]:
                return ()

        # The head values as one generated expression: event attributes, argsz = body size
        # ("exact"), count = len(data) (data tail), 0 for head fields the event lacks.
        head_values: Callable[[Any, bytes, int], tuple[Any, ...]] | None = None
        if (plain_tail or data_tail) and rule != "total":
            exprs = []
            for n in names:
                if n == "argsz" and rule == "exact":
                    exprs.append("body_len")
                elif n == "count" and data_tail:
                    exprs.append("len(t)")
                elif n in fields:
                    exprs.append(f"ev.{n}")
                else:
                    exprs.append("0")
            src = f"lambda ev, t, body_len: ({''.join(e + ', ' for e in exprs)})"
            head_values = eval(src)  # noqa: S307 - our own source text

        def encode_generic(ev: Any, fds: tuple[int, ...], msg_id: int, flags: int,
                           max_xfer: int, max_fds: int) -> tuple[bytes, bytes, int]:
            values = {n: getattr(ev, n, 0) for n in names}
            t = tail.encode(ev, values, structs)
            body_len = head_len + len(t)
            if rule == "exact" or (rule == "total" and values["argsz"] is None):
                values["argsz"] = body_len
            Codec._validate(kind, command, layout, values, body_len, head_len, len(fds),
                            max_xfer, max_fds)
            return pack(msg_id, cmd, HEADER_SIZE + body_len, flags, 0,
                        *[values[n] for n in names]), t, body_len

        def encode(ev: Any, msg_id: int, flags: int, max_xfer: int,
                   max_fds: int) -> tuple[bytes, tuple[int, ...]]:
            fds = get_fds(ev)
            t = b""
            try:
                if head_values is None:
                    data, t, body_len = encode_generic(ev, fds, msg_id, flags, max_xfer, max_fds)
                else:
                    if data_tail:
                        t = ev.data
                        if type(t) is not bytes:
                            t = bytes(t)
                    body_len = head_len + len(t) + len(pad)
                    v = head_values(ev, t, body_len)
                    # the rules of Codec._validate, in its order
                    if rule == "buffer" and not head_len <= v[argsz_i] <= max_xfer:
                        raise Malformed(E.EINVAL, f"argsz {v[argsz_i]} outside "
                                                  f"{head_len}..{max_xfer}")
                    if xfer_i >= 0 and v[xfer_i] > max_xfer:
                        raise Malformed(E.E2BIG, f"count {v[xfer_i]} exceeds {max_xfer}")
                    if fds:
                        limit = max_fds if fd_limit is None else fd_limit
                        if len(fds) > limit:
                            raise Malformed(E.EINVAL, f"{len(fds)} fds, at most {limit} allowed")
                    if fd_check is not None and (
                        reason := fd_check(dict(zip(names, v, strict=True)), len(fds))
                    ) is not None:
                        raise Malformed(E.EINVAL, reason)
                    data = pack(msg_id, cmd, HEADER_SIZE + body_len, flags, 0, *v)
                    if pad:
                        t += pad
            except _struct.error:
                # say which part is out of range: the head's fields, or the header's (msg_id)
                if p is not None:
                    try:
                        p.st.pack(*[getattr(ev, n, 0) or 0 for n in names])
                    except _struct.error as exc:
                        raise Malformed(E.EINVAL, f"field out of range: {exc}") from None
                self.header(msg_id, cmd, HEADER_SIZE, flags)
                raise Malformed(E.EINVAL, "field out of range") from None
            except ConstructError as exc:
                raise Malformed(E.EINVAL, f"field out of range: {exc}") from None
            except TypeError as exc:
                raise Malformed(E.EINVAL, f"bad field type: {exc}") from None
            return (data + t if t else data), fds

        return encode

    # generic entry points -------------------------------------------------------------------

    def encode(
        self, kind: Kind, ev: Request | Reply, msg_id: int, flags: int,
        max_data_xfer_size: int, max_msg_fds: int,
    ) -> tuple[bytes, tuple[int, ...]]:
        """Whole message bytes plus fds; raises Malformed if the event breaks a rule."""
        return self.encoders[kind][ev.command](ev, msg_id, flags, max_data_xfer_size,
                                               max_msg_fds)

    def encode_error(self, msg_id: int, command: int, errno: int) -> bytes:
        return self.header(msg_id, command, HEADER_SIZE, MsgFlag.REPLY | MsgFlag.ERROR, errno)

    def decode(
        self, kind: Kind, command: int, body: bytes, fds: tuple[int, ...],
        max_data_xfer_size: int, max_msg_fds: int, **ids: Any,
    ) -> Event:
        """Decode a body (after the header) into its event; `ids` are msg_id (and no_reply)."""
        return self.decoders[kind][command](body, fds, max_data_xfer_size, max_msg_fds,
                                            ids["msg_id"], ids.get("no_reply", False))
