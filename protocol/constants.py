"""Numbers of the vfio-user wire protocol (spec §1-2; values from <linux/vfio.h>).

Kept in one module so the codec, the connection and the session layer share one spelling.
"""

from __future__ import annotations

import enum
from typing import Final


class Command(enum.IntEnum):
    """Header `command` field (spec §2)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgFlag(enum.IntFlag):
    """Header `flags` field: the low nibble is the message type, the rest are bits."""

    REQUEST = 0
    REPLY = 1
    TYPE_MASK = 0xF
    NO_REPLY = 0x10
    ERROR = 0x20


class RegionFlag(enum.IntFlag):
    READ = 1
    WRITE = 2
    MMAP = 4
    CAPS = 8


class DeviceFlag(enum.IntFlag):
    RESET = 1
    PCI = 2


class RegionIndex(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class IrqIndex(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = 1
    MASKABLE = 2
    AUTOMASKED = 4
    NORESIZE = 8


class SetIrqsFlag(enum.IntFlag):
    DATA_NONE = 1
    DATA_BOOL = 2
    DATA_EVENTFD = 4
    ACTION_MASK = 8
    ACTION_UNMASK = 16
    ACTION_TRIGGER = 32


class DmaMapFlag(enum.IntFlag):
    READ = 1
    WRITE = 2


class DmaUnmapFlag(enum.IntFlag):
    GET_DIRTY_BITMAP = 1
    ALL = 2


class RegionCapId(enum.IntEnum):
    """Capability ids in a DEVICE_GET_REGION_INFO reply chain (spec §2.5)."""

    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


HEADER_SIZE: Final = 16
#: Payload size of `struct vfio_region_info`; region-info capability offsets count from its start.
REGION_INFO_SIZE: Final = 32
#: REGION_WRITE_MULTI limits (spec §2.11).
WRITE_MULTI_MAX_ENTRIES: Final = 200
WRITE_MULTI_DATA_SIZE: Final = 8
WRITE_MULTI_ENTRY_SIZE: Final = 24
#: Bytes a message may carry beyond `max_data_xfer_size`. The largest fixed part in front of a
#: data transfer is 32 bytes (header + REGION_READ/WRITE head, or header + QEMU's DMA head and
#: its 4 tail bytes); 64 covers that with margin and admits nothing unreasonable. Anything
#: larger is fatal because its body cannot be skipped without buffering it.
MESSAGE_OVERHEAD: Final = 64
#: QEMU's default `max_data_xfer_size` (spec §1.3).
DEFAULT_MAX_DATA_XFER_SIZE: Final = 1 << 20
#: The only protocol major version this layer speaks (QEMU sends and requires 0.0).
PROTOCOL_MAJOR: Final = 0
PROTOCOL_MINOR: Final = 0
