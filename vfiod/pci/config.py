"""PCI configuration space with per-bit write masks, BAR sizing and a capability-list builder.

QEMU copies the whole space at realize and forwards every guest config write to us first, so
the space has to behave like hardware: read-only bits ignore writes, write-1-to-clear bits clear,
and BAR registers answer the all-ones sizing probe with their size mask and type bits (QEMU takes
the BAR *type* from our register and the *size* from the region info).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from vfiod.pci.constants import (
    CONFIG_SPACE_SIZE,
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_CACHE_LINE_SIZE,
    PCI_CAP_AREA_END,
    PCI_CAPABILITY_LIST,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_WRITABLE,
    PCI_DEVICE_ID,
    PCI_EXT_CAP_START,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS_ENABLE,
    PCI_ROM_ADDRESS_MASK,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_W1C,
    PCI_STD_HEADER_END,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)

WriteHook = Callable[[int, int], None]
"""Called after a guest write touched a hooked register: ``hook(old_value, new_value)``."""


def einval(message: str) -> OSError:
    """The error the session turns into an EINVAL reply."""
    return OSError(errno.EINVAL, message)


class BarKind(Enum):
    """Address-space type of a BAR; MEM64 occupies two BAR registers."""

    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True)
class BarSpec:
    """What a BAR register advertises: size (power of two), type and prefetchability."""

    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} is not a power of two")
        if self.kind is BarKind.IO:
            if self.size < 4 or self.size > 256:
                raise ValueError("IO BAR size must be 4..256 bytes")
            if self.prefetchable:
                raise ValueError("IO BARs cannot be prefetchable")
        elif self.size < 16:
            raise ValueError("memory BAR size must be at least 16 bytes")
        if self.kind is BarKind.MEM32 and self.size > 1 << 31:
            raise ValueError("32-bit memory BAR larger than 2 GiB")

    @property
    def type_bits(self) -> int:
        """The read-only low bits of the (lower) BAR register."""
        if self.kind is BarKind.IO:
            return PCI_BASE_ADDRESS_SPACE_IO
        bits = PCI_BASE_ADDRESS_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        if self.prefetchable:
            bits |= PCI_BASE_ADDRESS_MEM_PREFETCH
        return bits


class ConfigSpace:
    """4 KiB config space: value bytes plus per-bit writable and write-1-to-clear masks.

    ``init_*`` / ``poke`` set device-side state without masks; :meth:`write` is the guest path.
    Write hooks let the function react (MSI-X enable, INTx disable, PM state, FLR).
    """

    size = CONFIG_SPACE_SIZE

    def __init__(self) -> None:
        self.data = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.w1cmask = bytearray(self.size)
        self._defaults: bytes | None = None
        self._hooks: list[tuple[int, int, WriteHook]] = []
        self._preserve: list[tuple[int, int, int]] = []
        self._last_cap = 0
        self._next_cap = PCI_STD_HEADER_END
        self._last_ext_cap = 0
        self._next_ext_cap = PCI_EXT_CAP_START
        self.caps: dict[int, int] = {}
        self.ext_caps: dict[int, int] = {}

    # ---- device-side (unmasked) accessors ----------------------------------------------------

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise einval(f"config access {offset:#x}+{count} out of range")

    def peek(self, offset: int, size: int) -> int:
        """Current value of a little-endian register (device side)."""
        self._check(offset, size)
        return int.from_bytes(self.data[offset : offset + size], "little")

    def poke(self, offset: int, size: int, value: int) -> None:
        """Set a register ignoring masks (device-side state such as status bits)."""
        self._check(offset, size)
        self.data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    def init(self, offset: int, size: int, value: int, wmask: int = 0, w1cmask: int = 0) -> None:
        """Define a register: initial value and which bits the guest may write / clear."""
        self.poke(offset, size, value)
        self.wmask[offset : offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset : offset + size] = w1cmask.to_bytes(size, "little")

    def add_hook(self, offset: int, size: int, hook: WriteHook) -> None:
        """Call ``hook(old, new)`` after any guest write overlapping ``offset..offset+size``."""
        self._check(offset, size)
        self._hooks.append((offset, size, hook))

    def hooked_bytes(self) -> bytearray:
        """1 for every byte a write hook watches (a fast path must leave those writes to
        :meth:`write`), 0 elsewhere."""
        out = bytearray(self.size)
        for o, s, _ in self._hooks:
            out[o : o + s] = b"\x01" * s
        return out

    def preserve_on_reset(self, offset: int, size: int, mask: int) -> None:
        """Mark bits that survive a function-level reset (PCIe FLR keeps e.g. link control)."""
        self._check(offset, size)
        self._preserve.append((offset, size, mask))

    # ---- guest path -----------------------------------------------------------------------

    def read(self, offset: int, count: int) -> bytes:
        """Guest read of any length within the space (QEMU reads the whole space at realize)."""
        self._check(offset, count)
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """Guest write: writable bits take the new value, W1C bits clear where 1 is written."""
        count = len(data)
        self._check(offset, count)
        if self._defaults is None:
            self.seal()  # the first guest write ends building: defaults are what it saw
        touched = [
            (o, s, h, self.peek(o, s))
            for o, s, h in self._hooks
            if o < offset + count and offset < o + s
        ]
        for i, value in enumerate(data):
            pos = offset + i
            wm = self.wmask[pos]
            new = (self.data[pos] & ~wm) | (value & wm)
            new &= ~(value & self.w1cmask[pos])
            self.data[pos] = new & 0xFF
        for o, s, hook, old in touched:
            hook(old, self.peek(o, s))

    # ---- defaults and reset ----------------------------------------------------------------

    def seal(self) -> None:
        """Snapshot the current contents as the reset defaults (call after building)."""
        self._defaults = bytes(self.data)

    @property
    def sealed(self) -> bool:
        return self._defaults is not None

    def reset(self) -> None:
        """Back to defaults, keeping the bits registered with :meth:`preserve_on_reset`."""
        if self._defaults is None:
            self.seal()
            return
        kept = [(o, s, m, self.peek(o, s)) for o, s, m in self._preserve]
        self.data[:] = self._defaults
        for o, s, m, cur in kept:
            self.poke(o, s, (self.peek(o, s) & ~m) | (cur & m))

    # ---- header ------------------------------------------------------------------------------

    def init_header(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 1,
    ) -> None:
        """Standard type-0 header; QEMU requires a valid vendor and header type 0."""
        if vendor_id in (0, 0xFFFF):
            raise ValueError("invalid vendor id")
        if not 0 <= interrupt_pin <= 4:
            raise ValueError("interrupt pin must be 0..4")
        self.init(PCI_VENDOR_ID, 2, vendor_id)
        self.init(PCI_DEVICE_ID, 2, device_id)
        self.init(PCI_COMMAND, 2, 0, wmask=PCI_COMMAND_WRITABLE)
        self.init(PCI_STATUS, 2, 0, w1cmask=PCI_STATUS_W1C)
        self.init(PCI_REVISION_ID, 1, revision)
        self.init(PCI_CLASS_PROG, 3, class_code & 0xFFFFFF)
        self.init(PCI_CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self.init(PCI_HEADER_TYPE, 1, 0)
        self.init(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.init(PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self.init(PCI_ROM_ADDRESS, 4, 0)
        self.init(PCI_CAPABILITY_LIST, 1, 0)
        self.init(PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self.init(PCI_INTERRUPT_PIN, 1, interrupt_pin)

    # ---- BARs --------------------------------------------------------------------------------

    def init_bar(self, index: int, spec: BarSpec) -> None:
        """Program BAR register(s) so the all-ones probe reads back ~(size-1) | type bits."""
        if not 0 <= index <= 5:
            raise ValueError("BAR index must be 0..5")
        off = PCI_BASE_ADDRESS_0 + 4 * index
        if spec.kind is BarKind.IO:
            self.init(off, 4, spec.type_bits, wmask=~(spec.size - 1) & 0xFFFFFFFC)
            return
        self.init(off, 4, spec.type_bits, wmask=~(spec.size - 1) & 0xFFFFFFF0)
        if spec.kind is BarKind.MEM64:
            if index == 5:
                raise ValueError("a 64-bit BAR cannot start at BAR5")
            self.init(off + 4, 4, 0, wmask=(~(spec.size - 1) >> 32) & 0xFFFFFFFF)

    def init_rom(self, size: int) -> None:
        """Expansion ROM BAR: sizing plus enable bit; without a ROM it stays 0 and read-only."""
        if size == 0:
            self.init(PCI_ROM_ADDRESS, 4, 0)
            return
        if size & (size - 1) or size < 2048:
            raise ValueError("ROM size must be a power of two >= 2 KiB")
        self.init(
            PCI_ROM_ADDRESS,
            4,
            0,
            wmask=(~(size - 1) & PCI_ROM_ADDRESS_MASK) | PCI_ROM_ADDRESS_ENABLE,
        )

    # ---- capability list ---------------------------------------------------------------------

    def add_cap(self, cap_id: int, length: int) -> int:
        """Append a standard capability in 0x40..0xff; returns its offset.

        Caps are dword aligned and linked in insertion order; the header's next pointer and
        the status CAP_LIST bit are maintained here and are read-only to the guest.
        """
        if length < 2:
            raise ValueError("capability too short")
        offset = self._next_cap
        end = offset + length
        if end > PCI_CAP_AREA_END:
            raise ValueError("standard capability area is full")
        self.init(offset, 1, cap_id)
        self.init(offset + 1, 1, 0)
        if self._last_cap:
            self.poke(self._last_cap + 1, 1, offset)
        else:
            self.poke(PCI_CAPABILITY_LIST, 1, offset)
            self.poke(PCI_STATUS, 2, self.peek(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        self._last_cap = offset
        self._next_cap = (end + 3) & ~3
        self.caps.setdefault(cap_id, offset)
        return offset

    def add_ext_cap(self, cap_id: int, version: int, length: int) -> int:
        """Append a PCIe extended capability at 0x100..; header is id | version<<16 | next<<20."""
        if length < 4:
            raise ValueError("extended capability too short")
        offset = self._next_ext_cap
        end = offset + length
        if end > self.size:
            raise ValueError("extended capability area is full")
        self.init(offset, 4, (cap_id & 0xFFFF) | ((version & 0xF) << 16))
        if self._last_ext_cap:
            hdr = self.peek(self._last_ext_cap, 4)
            self.poke(self._last_ext_cap, 4, (hdr & 0xFFFFF) | (offset << 20))
        self._last_ext_cap = offset
        self._next_ext_cap = (end + 3) & ~3
        self.ext_caps.setdefault(cap_id, offset)
        return offset

    def walk_caps(self) -> list[tuple[int, int]]:
        """(offset, id) of the standard chain, validating like a guest would."""
        out: list[tuple[int, int]] = []
        if not self.peek(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return out
        pos = self.peek(PCI_CAPABILITY_LIST, 1) & ~3
        seen: set[int] = set()
        while pos:
            if pos < PCI_STD_HEADER_END or pos in seen or pos >= PCI_CAP_AREA_END:
                raise ValueError(f"malformed capability chain at {pos:#x}")
            seen.add(pos)
            out.append((pos, self.data[pos]))
            pos = self.data[pos + 1] & ~3
        return out

    def walk_ext_caps(self) -> list[tuple[int, int, int]]:
        """(offset, id, version) of the extended chain (empty if 0x100 holds 0)."""
        out: list[tuple[int, int, int]] = []
        pos = PCI_EXT_CAP_START
        seen: set[int] = set()
        while pos:
            hdr = self.peek(pos, 4)
            if hdr == 0 and pos == PCI_EXT_CAP_START:
                break
            if pos in seen or pos < PCI_EXT_CAP_START or pos + 4 > self.size:
                raise ValueError(f"malformed extended capability chain at {pos:#x}")
            seen.add(pos)
            out.append((pos, hdr & 0xFFFF, (hdr >> 16) & 0xF))
            pos = (hdr >> 20) & 0xFFC
        return out


def pack_u16(value: int) -> bytes:
    """Little-endian u16, for tests and callers writing registers."""
    return struct.pack("<H", value)


def pack_u32(value: int) -> bytes:
    """Little-endian u32, for tests and callers writing registers."""
    return struct.pack("<I", value)
