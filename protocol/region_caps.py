"""Build and parse the DEVICE_GET_REGION_INFO capability chain (spec §2.5).

Each capability is `{u16 id, u16 version, u32 next}` plus a body; `next` is an offset from the
start of the region-info payload (the argsz field), 0 ends the chain. The chain bytes live in
`RegionInfoReply.caps`, which starts at payload offset 32 (REGION_INFO_SIZE).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from construct import ConstructError

from .constants import REGION_INFO_SIZE, RegionCapId, RegionFlag
from .events import RegionInfoReply
from .structs import ByteOrder, wire_structs

CAP_HEADER_SIZE = 8


@dataclass(frozen=True)
class SparseMmapCap:
    """Areas `(offset, size)` of the region that may be mmapped, relative to the region."""

    areas: tuple[tuple[int, int], ...]
    version: int = 1


@dataclass(frozen=True)
class TypeCap:
    type: int
    subtype: int
    version: int = 1


@dataclass(frozen=True)
class MsixMappableCap:
    """No body: tells QEMU it may mmap over the MSI-X table."""

    version: int = 1


@dataclass(frozen=True)
class UnknownCap:
    """A capability this layer does not interpret; `data` runs to the next cap (or the end)."""

    id: int
    version: int
    data: bytes = b""


RegionCap = SparseMmapCap | TypeCap | MsixMappableCap | UnknownCap


def _cap_body(cap: RegionCap, byteorder: ByteOrder) -> tuple[int, bytes]:
    s = wire_structs(byteorder)
    if isinstance(cap, SparseMmapCap):
        body = s.sparse_mmap.build({"nr_areas": len(cap.areas), "reserved": 0})
        body += b"".join(s.sparse_area.build({"offset": o, "size": n}) for o, n in cap.areas)
        return RegionCapId.SPARSE_MMAP, body
    if isinstance(cap, TypeCap):
        return RegionCapId.TYPE, s.cap_type.build({"type": cap.type, "subtype": cap.subtype})
    if isinstance(cap, MsixMappableCap):
        return RegionCapId.MSIX_MAPPABLE, b""
    return cap.id, cap.data


def build_region_caps(
    caps: Iterable[RegionCap], byteorder: ByteOrder = sys.byteorder, start: int = REGION_INFO_SIZE
) -> bytes:
    """Serialise a chain whose first cap sits at payload offset `start` (the cap_offset).

    Each cap is padded to 8 bytes so the next header stays naturally aligned, as C would.
    """
    s = wire_structs(byteorder)
    items = list(caps)
    out = bytearray()
    for i, cap in enumerate(items):
        cap_id, body = _cap_body(cap, byteorder)
        size = CAP_HEADER_SIZE + len(body)
        size += -size % 8
        nxt = 0 if i == len(items) - 1 else start + len(out) + size
        out += s.cap_header.build({"id": cap_id, "version": cap.version, "next": nxt})
        out += body + bytes(-len(body) % 8)
    return bytes(out)


def parse_region_caps(
    caps: bytes, cap_offset: int, byteorder: ByteOrder = sys.byteorder,
    start: int = REGION_INFO_SIZE,
) -> tuple[RegionCap, ...]:
    """Walk the chain in `caps` (payload bytes from offset `start`) beginning at `cap_offset`.

    Raises ValueError on an offset outside the bytes, a loop, or a short body, so a caller can
    treat a hostile reply as malformed instead of crashing.
    """
    s = wire_structs(byteorder)
    found: list[RegionCap] = []
    seen: set[int] = set()
    offset = cap_offset
    while offset:
        if offset in seen:
            raise ValueError(f"capability chain loops at offset {offset}")
        seen.add(offset)
        pos = offset - start
        if pos < 0 or pos + CAP_HEADER_SIZE > len(caps):
            raise ValueError(f"capability offset {offset} outside the reply")
        hdr = s.cap_header.parse(caps[pos : pos + CAP_HEADER_SIZE])
        end = hdr.next - start if hdr.next > offset else len(caps)
        body = caps[pos + CAP_HEADER_SIZE : max(end, pos + CAP_HEADER_SIZE)]
        try:
            found.append(_parse_cap(hdr.id, hdr.version, body, byteorder))
        except (ConstructError, IndexError) as exc:
            raise ValueError(f"capability {hdr.id} at offset {offset} too short") from exc
        offset = hdr.next
    return tuple(found)


def _parse_cap(cap_id: int, version: int, body: bytes, byteorder: ByteOrder) -> RegionCap:
    s = wire_structs(byteorder)
    if cap_id == RegionCapId.SPARSE_MMAP:
        head = s.sparse_mmap.parse(body)
        need = 8 + 16 * head.nr_areas
        if len(body) < need:
            raise IndexError("sparse mmap areas truncated")
        areas = tuple(
            (a.offset, a.size)
            for a in (s.sparse_area.parse(body[8 + 16 * i :]) for i in range(head.nr_areas))
        )
        return SparseMmapCap(areas, version)
    if cap_id == RegionCapId.TYPE:
        t = s.cap_type.parse(body)
        return TypeCap(t.type, t.subtype, version)
    if cap_id == RegionCapId.MSIX_MAPPABLE:
        return MsixMappableCap(version)
    return UnknownCap(cap_id, version, bytes(body))


def make_region_info_reply(
    *,
    msg_id: int,
    flags: int,
    index: int,
    size: int,
    offset: int = 0,
    caps: Sequence[RegionCap] = (),
    fd: int | None = None,
    byteorder: ByteOrder = sys.byteorder,
) -> RegionInfoReply:
    """A full RegionInfoReply with the CAPS flag and cap_offset set to match `caps`.

    Send it as-is: the connection truncates it if the request's argsz is too small.
    """
    raw = build_region_caps(caps, byteorder)
    flags = (flags | RegionFlag.CAPS) if caps else (flags & ~RegionFlag.CAPS)
    return RegionInfoReply(
        int(flags), index, REGION_INFO_SIZE if caps else 0, size, offset, raw,
        msg_id=msg_id, fd=fd,
    )
