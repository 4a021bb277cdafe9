"""construct declarations of every fixed vfio-user wire struct, for either byte order.

vfio-user is host-native (spec §1.1), so the structs are built by a factory for an explicit
byte order instead of using construct's native-order types: tests can then check both orders
on any host. Offsets in comments count from the start of the message, header included.
"""

from __future__ import annotations

import functools
import struct as _struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from construct import (
    Bytes,
    Construct,
    FormatField,
    Int16ub,
    Int16ul,
    Int32ub,
    Int32ul,
    Int64ub,
    Int64ul,
    Renamed,
    Struct,
)

ByteOrder = Literal["little", "big"]


@dataclass(frozen=True)
class WireStructs:
    """The struct set for one byte order; field names match the event field names."""

    byteorder: ByteOrder
    header: Struct
    version: Struct
    dma_map: Struct
    dma_unmap: Struct
    device_info: Struct
    region_info: Struct
    irq_info: Struct
    set_irqs: Struct
    region_access: Struct
    dma_access: Struct
    device_feature: Struct
    write_multi: Struct
    write_multi_entry: Struct
    cap_header: Struct
    sparse_mmap: Struct
    sparse_area: Struct
    cap_type: Struct


def field_names(struct: Struct) -> tuple[str, ...]:
    """Names of the named subconstructs, in wire order."""
    return tuple(sc.name for sc in struct.subcons if sc.name)


@functools.cache
def wire_structs(byteorder: ByteOrder) -> WireStructs:
    """Build (once per order) every struct with explicit endianness."""
    if byteorder == "little":
        u16, u32, u64 = Int16ul, Int32ul, Int64ul
    elif byteorder == "big":
        u16, u32, u64 = Int16ub, Int32ub, Int64ub
    else:
        raise ValueError(f"byteorder must be 'little' or 'big', not {byteorder!r}")

    def s(**fields: Construct) -> Struct:
        return Struct(*(name / sub for name, sub in fields.items()))

    return WireStructs(
        byteorder=byteorder,
        # 0 msg_id, 2 command, 4 size (whole message), 8 flags, 12 error (positive errno)
        header=s(msg_id=u16, command=u16, size=u32, flags=u32, error=u32),
        # 16 major, 18 minor, then NUL-terminated JSON
        version=s(major=u16, minor=u16),
        # 16 argsz, 20 flags, 24 offset, 32 iova, 40 size
        dma_map=s(argsz=u32, flags=u32, offset=u64, iova=u64, size=u64),
        # 16 argsz, 20 flags, 24 iova, 32 size
        dma_unmap=s(argsz=u32, flags=u32, iova=u64, size=u64),
        # 16 argsz, 20 flags, 24 num_regions, 28 num_irqs
        device_info=s(argsz=u32, flags=u32, num_regions=u32, num_irqs=u32),
        # 16 argsz, 20 flags, 24 index, 28 cap_offset, 32 size, 40 offset, then caps
        region_info=s(
            argsz=u32, flags=u32, index=u32, cap_offset=u32, size=u64, offset=u64
        ),
        # 16 argsz, 20 flags, 24 index, 28 count
        irq_info=s(argsz=u32, flags=u32, index=u32, count=u32),
        # 16 argsz, 20 flags, 24 index, 28 start, 32 count (no data array: fds only)
        set_irqs=s(argsz=u32, flags=u32, index=u32, start=u32, count=u32),
        # 16 offset, 24 region, 28 count, 32 data
        region_access=s(offset=u64, region=u32, count=u32),
        # QEMU's VFIOUserDMARW: 16 address, 24 u32 count, 28 data (spec §2.9)
        dma_access=s(address=u64, count=u32),
        # 16 argsz, 20 flags, 24 opaque feature data
        device_feature=s(argsz=u32, flags=u32),
        # 16 wr_cnt, then wr_cnt entries
        write_multi=s(wr_cnt=u64),
        write_multi_entry=s(offset=u64, region=u32, count=u32, data=Bytes(8)),
        # region-info capability chain (offsets relative to the region-info payload)
        cap_header=s(id=u16, version=u16, next=u32),
        sparse_mmap=s(nr_areas=u32, reserved=u32),
        sparse_area=s(offset=u64, size=u64),
        cap_type=s(type=u32, subtype=u32),
    )


@dataclass(frozen=True)
class Packer:
    """A construct Struct compiled to one ``struct.Struct`` for the hot path.

    The construct declaration stays the single source of truth; this is derived from it (and
    the tests check both give the same bytes). Interpreting construct field by field costs
    about 100 us a message, which would dominate a REGION_READ round trip.
    """

    names: tuple[str, ...]
    st: _struct.Struct

    @property
    def size(self) -> int:
        return self.st.size

    def parse(self, raw: bytes | memoryview) -> dict[str, Any]:
        return dict(zip(self.names, self.st.unpack_from(raw), strict=True))

    def build(self, values: Mapping[str, Any]) -> bytes:
        return self.st.pack(*[values[n] for n in self.names])


@functools.cache
def _packer_cached(cs: Struct, byteorder: ByteOrder) -> Packer:
    fmt = "<" if byteorder == "little" else ">"
    names = []
    for sc in cs.subcons:
        inner = sc.subcon if isinstance(sc, Renamed) else sc
        if isinstance(inner, FormatField):
            fmt += inner.fmtstr[1:]
        elif isinstance(inner, Bytes) and isinstance(inner.length, int):
            fmt += f"{inner.length}s"
        else:
            raise TypeError(f"cannot compile field {sc.name!r} of type {type(inner).__name__}")
        names.append(sc.name)
    return Packer(tuple(names), _struct.Struct(fmt))


def packer(cs: Struct, byteorder: ByteOrder) -> Packer:
    """The compiled form of one of the fixed structs above."""
    return _packer_cached(cs, byteorder)
