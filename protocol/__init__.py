"""Sans-I/O vfio-user wire protocol (installed as ``vfiod.protocol``).

Bytes and fds go in through `Connection.receive_data`, typed events come out of
`Connection.next_event`; `Connection.send` turns events back into bytes and fds. No sockets,
no trio, no device logic (see docs/ARCHITECTURE.md).
"""

from .buffer import ReceiveBuffer
from .capabilities import (
    QEMU_DEFAULT_MAX_MSG_FDS,
    Capabilities,
    decode_caps_json,
    encode_caps_json,
    server_capabilities,
)
from .codec import event_fds
from .connection import (
    CLOSED,
    NEED_DATA,
    Connection,
    Outgoing,
    Role,
    Sentinel,
    State,
    truncate_region_info,
)
from .constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    HEADER_SIZE,
    MESSAGE_OVERHEAD,
    REGION_INFO_SIZE,
    WRITE_MULTI_MAX_ENTRIES,
    Command,
    DeviceFlag,
    DmaMapFlag,
    DmaUnmapFlag,
    IrqIndex,
    IrqInfoFlag,
    MsgFlag,
    RegionCapId,
    RegionFlag,
    RegionIndex,
    SetIrqsFlag,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    BadMessage,
    DeviceFeature,
    DeviceFeatureReply,
    DeviceGetInfo,
    DeviceGetIrqInfo,
    DeviceGetRegionInfo,
    DeviceInfoReply,
    DeviceReset,
    DeviceResetReply,
    DeviceSetIrqs,
    DmaMap,
    DmaMapReply,
    DmaRead,
    DmaReadReply,
    DmaUnmap,
    DmaUnmapReply,
    DmaWrite,
    DmaWriteReply,
    ErrorReply,
    Event,
    IrqInfoReply,
    RegionInfoReply,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    Reply,
    Request,
    SetIrqsReply,
    Version,
    VersionReply,
    WriteMultiEntry,
)
from .region_caps import (
    MsixMappableCap,
    RegionCap,
    SparseMmapCap,
    TypeCap,
    UnknownCap,
    build_region_caps,
    make_region_info_reply,
    parse_region_caps,
)
from .structs import ByteOrder, WireStructs, wire_structs

__all__ = [
    "BadMessage", "ByteOrder", "CLOSED", "Capabilities", "Command", "Connection",
    "DEFAULT_MAX_DATA_XFER_SIZE", "DeviceFeature", "DeviceFeatureReply", "DeviceFlag",
    "DeviceGetInfo", "DeviceGetIrqInfo", "DeviceGetRegionInfo", "DeviceInfoReply",
    "DeviceReset", "DeviceResetReply", "DeviceSetIrqs", "DmaMap", "DmaMapFlag", "DmaMapReply",
    "DmaRead", "DmaReadReply", "DmaUnmap", "DmaUnmapFlag", "DmaUnmapReply", "DmaWrite",
    "DmaWriteReply", "ErrorReply", "Event", "HEADER_SIZE", "IrqIndex", "IrqInfoFlag",
    "IrqInfoReply", "LocalProtocolError", "MESSAGE_OVERHEAD", "MsgFlag", "MsixMappableCap",
    "NEED_DATA", "Outgoing", "ProtocolError", "QEMU_DEFAULT_MAX_MSG_FDS", "REGION_INFO_SIZE",
    "ReceiveBuffer", "RegionCap", "RegionCapId", "RegionFlag", "RegionIndex",
    "RegionInfoReply", "RegionRead", "RegionReadReply", "RegionWrite", "RegionWriteMulti",
    "RegionWriteMultiReply", "RegionWriteReply", "RemoteProtocolError", "Reply", "Request",
    "Role", "Sentinel", "SetIrqsFlag", "SetIrqsReply", "SparseMmapCap", "State", "TypeCap",
    "UnknownCap", "Version", "VersionReply", "WRITE_MULTI_MAX_ENTRIES", "WireStructs",
    "WriteMultiEntry", "build_region_caps", "decode_caps_json", "encode_caps_json", "event_fds",
    "make_region_info_reply", "parse_region_caps", "server_capabilities",
    "truncate_region_info", "wire_structs",
]
