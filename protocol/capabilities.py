"""VERSION capabilities: the JSON object both sides exchange (spec §2.1).

The wire carries a NUL-terminated JSON object; `Version.caps` / `VersionReply.caps` hold it
decoded. This module turns it into typed values and back, compactly, because QEMU rejects a
reply larger than its own request (about 214 bytes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .constants import DEFAULT_MAX_DATA_XFER_SIZE

#: QEMU's assumption when `max_msg_fds` is absent (the spec text says 1; QEMU uses 8).
QEMU_DEFAULT_MAX_MSG_FDS = 8


@dataclass(frozen=True)
class Capabilities:
    """The `capabilities` member; defaults are what QEMU assumes when a key is absent."""

    max_msg_fds: int = QEMU_DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    pgsizes: int = 4096
    max_dma_maps: int = 65535
    write_multiple: bool = False
    migration: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The top-level object, keys in the order the spec suggests; optional keys only if set."""
        caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
        }
        if self.write_multiple:
            caps["write_multiple"] = True
        if self.migration is not None:
            caps["migration"] = dict(self.migration)
        return {"capabilities": caps}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Capabilities:
        """Parse a peer's object (any key order; unknown keys ignored). Raises ValueError."""
        caps = obj.get("capabilities", {})
        if not isinstance(caps, Mapping):
            raise ValueError("'capabilities' is not an object")
        values: dict[str, Any] = {}
        for key in ("max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps"):
            if key in caps:
                value = caps[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"capability {key!r} is not an unsigned integer")
                values[key] = value
        if "write_multiple" in caps:
            if not isinstance(caps["write_multiple"], bool):
                raise ValueError("capability 'write_multiple' is not a boolean")
            values["write_multiple"] = caps["write_multiple"]
        if "migration" in caps:
            if not isinstance(caps["migration"], Mapping):
                raise ValueError("capability 'migration' is not an object")
            values["migration"] = dict(caps["migration"])
        return cls(**values)


def server_capabilities(
    max_msg_fds: int = 16,
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
    pgsizes: int = 4096,
    max_dma_maps: int = 65535,
) -> dict[str, Any]:
    """The object a server should answer with (spec §2.1 suggested reply, stated explicitly)."""
    return Capabilities(max_msg_fds, max_data_xfer_size, pgsizes, max_dma_maps).to_json()


def encode_caps_json(obj: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON plus the NUL terminator QEMU requires."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\0"


def decode_caps_json(raw: bytes) -> dict[str, Any]:
    """Inverse of encode_caps_json; ValueError unless exactly one trailing NUL and an object."""
    if not raw.endswith(b"\0"):
        raise ValueError("capabilities JSON is not NUL-terminated")
    if b"\0" in raw[:-1]:
        raise ValueError("capabilities JSON contains a NUL byte")
    try:
        obj = json.loads(raw[:-1].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"malformed capabilities JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("capabilities JSON is not an object")
    return obj
