"""What the control plane asks of the daemon, and the words both sides use.

The daemon implements ``ControlTarget``; the server (``vfiod.control.server``) validates every
request before calling it, so an implementation receives only well-typed arguments in range.
Every method returns JSON-able data (dicts, lists, str, int, float, bool, None) following the
schema in docs/vfiodctl.md, and reports a refusal by raising ``ControlError``.
"""

from __future__ import annotations

import errno
import re
from typing import Any, Protocol, runtime_checkable

#: Version of the JSON schema of ``inventory()`` (bumped only on incompatible changes).
SCHEMA_VERSION = 1

#: Error codes a reply may carry. Targets should use these; the server passes any code that
#: matches ``CODE_RE`` through unchanged.
ERROR_CODES = (
    "EINVAL",  # bad argument (type, range, unknown op or key)
    "ENOENT",  # no such PHB / PE / function / PF
    "EBUSY",  # in use (a client is attached, VFs already enabled, too many connections)
    "EPERM",  # peer not allowed
    "EIO",  # the operation failed in the platform, or an internal error
    "ENOTSUP",  # not supported by this platform / function
    "ENOSPC",  # out of PEs, LIOBNs, ...
    "ENOMEM",  # locked-memory limit
    "EPROTO",  # malformed request (not JSON, not an object, bad id): the connection is closed
    "E2BIG",  # request line too long: the connection is closed
)
CODE_RE = re.compile(r"^E[A-Z0-9]{1,15}$")

#: EEH operations of the ``eeh`` call, in CLI order.
EEH_OPS = (
    "state",  # VFIO_EEH_PE_GET_STATE
    "thaw",  # UNFREEZE_IO then UNFREEZE_DMA
    "thaw-io",  # VFIO_EEH_PE_UNFREEZE_IO
    "thaw-dma",  # VFIO_EEH_PE_UNFREEZE_DMA
    "reset-hot",  # VFIO_EEH_PE_RESET_HOT
    "reset-fundamental",  # VFIO_EEH_PE_RESET_FUNDAMENTAL
    "deactivate",  # VFIO_EEH_PE_RESET_DEACTIVATE
    "configure",  # VFIO_EEH_PE_CONFIGURE
    "inject",  # VFIO_EEH_PE_INJECT_ERR (args: type, func, addr, mask)
)

#: Keyword arguments each EEH op accepts (all ints); those marked True are required.
EEH_OP_ARGS: dict[str, dict[str, bool]] = {op: {} for op in EEH_OPS}
EEH_OP_ARGS["inject"] = {"type": True, "func": True, "addr": False, "mask": False}

#: PAPR EEH state number -> name used in JSON (``eeh_state_name``) and tables.
EEH_STATE_NAMES = {
    0: "normal",
    1: "reset",
    2: "stopped-io-dma",
    4: "stopped-dma",
    5: "unavailable",
}

#: Function kinds in ``inventory()["functions"][i]["kind"]``.
FUNCTION_KINDS = ("pf", "vf", "function")


def eeh_state_name(state: int) -> str:
    return EEH_STATE_NAMES.get(state, f"state-{state}")


class ControlError(Exception):
    """A refusal reported to the control client as ``{"code", "message"}``."""

    def __init__(self, code: str, message: str) -> None:
        if not CODE_RE.match(code):
            raise ValueError(f"bad control error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_oserror(cls, exc: OSError, context: str = "") -> ControlError:
        """Wrap an ``OSError`` of the platform (``vfiod.spapr`` raises them with errnos)."""
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        if code == "EOPNOTSUPP":
            code = "ENOTSUP"
        text = exc.strerror or str(exc) or code
        return cls(code, f"{context}: {text}" if context else text)

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


_PE_REF_RE = re.compile(r"^(0x[0-9a-fA-F]+|[0-9]+):(0x[0-9a-fA-F]+|[0-9]+)$")


def parse_pe_ref(text: str) -> tuple[int, int] | None:
    """``"PHB:PE"`` (decimal, or hex with ``0x``) -> (phb, pe); None if ``text`` is not one.

    Function names never contain ``:``, so a string is either a PE reference or a name.
    """
    m = _PE_REF_RE.match(text)
    if m is None:
        return None
    return int(m.group(1), 0), int(m.group(2), 0)


@runtime_checkable
class ControlTarget(Protocol):
    """What the control server needs from the daemon (``vfiod.daemon.Daemon`` implements it).

    Calls run in the daemon's trio thread, one at a time per connection; several connections
    may interleave only at ``await`` points (``set_numvfs``). Raise ``ControlError`` to refuse;
    any other exception is logged by the server and reported as ``EIO internal error``.
    """

    def inventory(self) -> dict[str, Any]:
        """PHBs with their PEs, functions with sockets and clients, clients (schema v1)."""
        ...

    async def set_numvfs(self, pf: str, numvfs: int) -> dict[str, Any]:
        """Enable ``numvfs`` VFs on PF ``pf`` (0 disables them); 0 <= numvfs <= 65535.

        Returns ``{"pf", "numvfs", "vfs": [names]}``. ENOENT unknown PF, EINVAL not a PF or
        numvfs > totalvfs, EBUSY when VFs are enabled and numvfs != 0 (write 0 first, like
        sysfs sriov_numvfs) or a client is attached to a VF being removed.
        """
        ...

    def pe_info(self, phb: int, pe: int) -> dict[str, Any]:
        """One PE: group, function, EEH state, container and windows (schema in the docs)."""
        ...

    def eeh(self, target: str, op: str, **args: int) -> dict[str, Any]:
        """Run EEH op ``op`` (one of ``EEH_OPS``) on a function name or ``"PHB:PE"``.

        ``args`` holds only the keys of ``EEH_OP_ARGS[op]`` (ints). Returns
        ``{"target", "function", "phb", "pe", "op", "result", "eeh_state", "eeh_state_name"}``.
        """
        ...

    def memlock(self) -> list[dict[str, Any]]:
        """Locked memory per client (one entry per client process)."""
        ...

    def metrics(self) -> str:
        """Prometheus text exposition format (may be empty)."""
        ...
