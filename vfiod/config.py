"""Daemon configuration: a TOML file (stdlib tomllib) or the embedded default.

Every problem is reported with the file, the key and the reason, all of them at once, so an
operator fixes a config in one pass; the daemon refuses to start on any of them.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfiod.sockets import SocketAccess

PERSONALITIES = ("testdev", "nvme")
WINDOW_POLICIES = ("power8", "flat")
PAGE_SIZES = {"4K": 12, "64K": 16, "2M": 21, "16M": 24, "256M": 28, "16G": 34}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

DEFAULT_TOML = """\
# vfiod embedded default (`make run`, `vfiod` without --config): what vfiod is for, SR-IOV NVMe
# behind POWER8-style host bridges. Two PHBs, one NVMe PF with 2 VFs enabled on each, every
# function its own PE, IOMMU group, TCE tables and vfio-user socket; plus the test function.
# socket_dir defaults to /run/vfiod as root, else $XDG_RUNTIME_DIR/vfiod or /tmp/vfiod-$UID;
# state_dir (relative backing paths, run-time numvfs) to /var/lib/vfiod as root, else
# ${XDG_STATE_HOME:-~/.local/state}/vfiod. Namespaces are sparse files created on first run.

# Locked memory a client (one QEMU process) may pin through all its functions, like
# RLIMIT_MEMLOCK; preregistered guest RAM is charged once however many functions map it.
memlock_limit = "64G"

[[phb]]
index = 0
# "flat": one TCE window over the client's whole IOVA space (a q35 guest without a guest IOMMU
# maps its RAM at guest-physical addresses): x86 guests.
window_policy = "flat"
page_sizes = ["4K", "64K", "2M", "16M"]
# A DMA fault fails the faulting command (Data Transfer Error) and the function goes on: x86
# guests have no EEH to recover a frozen PE ("freeze" is the alternative; flat's default).
dma_fault = "error"

[[phb]]
index = 1
# "power8": the 32-bit window at 0 and the 64-bit (DDW) window at 0x0800000000000000, the
# layout a pseries guest produces: ppc64le guests (booted through vfiod-qemu).
window_policy = "power8"
page_sizes = ["4K", "64K", "2M", "16M"]
# A DMA fault freezes the PE (EEH) until the guest recovers it, or until a function reset
# (FLR / DEVICE_RESET) or `vfiodctl eeh <function> thaw` ("error" is the alternative).
dma_fault = "freeze"

# The vfiod test function (vendor 0x7e57): registers, a DMA engine, MSI-X; see docs/client.md.
[[function]]
name = "test0"
personality = "testdev"
phb = 0

# nvme0 on the flat PHB: VFs nvme0-vf0 and nvme0-vf1, each with its own namespace file
# (nvme0-vf0.img, ...) next to the PF's, in the state directory.
[[function]]
name = "nvme0"
personality = "nvme"
phb = 0
backing = "nvme0.img"
size = "1G"
totalvfs = 4
numvfs = 2

# nvme1 on the power8 PHB, for pseries guests.
[[function]]
name = "nvme1"
personality = "nvme"
phb = 1
backing = "nvme1.img"
size = "1G"
totalvfs = 4
numvfs = 2
"""


class ConfigError(Exception):
    """One or more problems in a configuration; ``problems`` lists them all."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


#: What a DMA fault does to the faulting function's PE, by default per window policy: a pseries
#: guest (power8) has EEH and recovers a frozen PE; an x86 guest (flat) has not, so its faulting
#: command fails (Data Transfer Error for NVMe) and the function goes on.
DMA_FAULT_POLICIES = ("freeze", "error")
DEFAULT_DMA_FAULT = {"power8": "freeze", "flat": "error"}


@dataclass(frozen=True)
class PhbConfig:
    index: int
    window_policy: str = "power8"
    page_shifts: tuple[int, ...] = (12, 16, 21, 24)
    dma_fault: str = ""  # "" = the window policy's default (DEFAULT_DMA_FAULT)

    @property
    def fault_policy(self) -> str:
        """What a DMA fault does on this PHB: "freeze" (EEH) or "error"."""
        return self.dma_fault or DEFAULT_DMA_FAULT.get(self.window_policy, "freeze")


@dataclass(frozen=True)
class FunctionConfig:
    name: str
    personality: str
    phb: int = 0
    #: nvme: the namespace's backing file (created sparse when missing) or block device
    backing: Path | None = None
    #: nvme: namespace size in bytes (None: the existing file's or device's size)
    size: int | None = None
    #: SR-IOV: a PF offers this many VFs (0: a plain function); numvfs are enabled at start
    totalvfs: int = 0
    numvfs: int = 0
    access: SocketAccess = SocketAccess()
    #: a PF's per-VF socket access (VF n uses entry n; missing entries inherit the PF's)
    vf_access: tuple[SocketAccess, ...] = ()
    #: nvme PF: where VF n keeps its namespace ("{n}" is the VF number); default: next to the
    #: PF's namespace as <stem>-vf<n><suffix>
    vf_backing: str | None = None
    #: nvme: advertise shadow doorbells (Doorbell Buffer Config); a PF's VFs inherit it
    shadow_doorbells: bool = True


@dataclass(frozen=True)
class Config:
    socket_dir: Path
    functions: list[FunctionConfig] = field(default_factory=list)
    source: str = "<default>"
    phbs: list[PhbConfig] = field(default_factory=lambda: [PhbConfig(0, "flat")])
    memlock_limit: int | None = 64 << 30
    #: where run-time changes (numvfs) persist across restarts; None: nothing persists
    state_dir: Path | None = None

    def socket_path(self, function: FunctionConfig) -> Path:
        return self.socket_dir / f"{function.name}.sock"


def default_socket_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/vfiod")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "vfiod"
    return Path(f"/tmp/vfiod-{os.getuid()}")


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/vfiod")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "vfiod"


def load(path: str | os.PathLike[str] | None = None, *, state_dir: Path | None = None) -> Config:
    """Load and check a config file, or the embedded default when ``path`` is None.

    ``state_dir`` overrides the file's (``--state-dir``); relative nvme ``backing`` and
    ``vf_backing`` paths are resolved against the effective state directory.
    """
    if path is None:
        return parse(DEFAULT_TOML, "<default>", state_dir=state_dir)
    source = os.fspath(path)
    try:
        text = Path(source).read_text()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from None
    return parse(text, source, state_dir=state_dir)


def _is_int(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def parse(text: str, source: str, *, state_dir: Path | None = None) -> Config:
    """Check a whole document; every problem is collected before ConfigError is raised."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    known = {"socket_dir", "state_dir", "function", "phb", "memlock_limit"}
    for key in sorted(set(doc) - known):
        problems.append(f"{key}: unknown key (known: {', '.join(sorted(known))})")

    socket_dir = default_socket_dir()
    if "socket_dir" in doc:
        if isinstance(doc["socket_dir"], str) and doc["socket_dir"].startswith("/"):
            socket_dir = Path(doc["socket_dir"])
        else:
            problems.append("socket_dir: must be an absolute path (a string starting with /)")

    file_state_dir = default_state_dir()
    if "state_dir" in doc:
        if isinstance(doc["state_dir"], str) and doc["state_dir"].startswith("/"):
            file_state_dir = Path(doc["state_dir"])
        else:
            problems.append("state_dir: must be an absolute path (a string starting with /)")
    state = state_dir if state_dir is not None else file_state_dir

    memlock_limit: int | None = 64 << 30
    if "memlock_limit" in doc:
        raw_limit = doc["memlock_limit"]
        if raw_limit == "unlimited":
            memlock_limit = None
        else:
            memlock_limit = parse_size(raw_limit)
            if memlock_limit is None:
                problems.append(
                    f"memlock_limit: a size such as \"64G\" or \"unlimited\", got {raw_limit!r}"
                )

    phbs = _parse_phbs(doc.get("phb"), problems)
    phb_indexes = {p.index for p in phbs}

    functions: list[FunctionConfig] = []
    raw_functions: Any = doc.get("function", [])
    if not isinstance(raw_functions, list):
        problems.append("function: must be an array of tables ([[function]])")
        raw_functions = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_functions):
        if not isinstance(raw, dict):
            problems.append(f"function[{i}]: must be a table")
            continue
        fc = _parse_function(raw, f"function[{i}]", phb_indexes, state, problems)
        if fc is None:
            continue
        if fc.name in seen:
            problems.append(f"function[{i}].name: duplicate function name {fc.name!r}")
        seen.add(fc.name)
        functions.append(fc)
    names = {f.name for f in functions}
    for f in functions:
        for n in range(f.totalvfs):
            if vf_name(f.name, n) in names:
                problems.append(f"function {vf_name(f.name, n)!r}: the name of a VF of {f.name}")
        if f.name == "control":
            problems.append("function 'control': reserved for the control socket")
    if not raw_functions and not problems:
        problems.append("function: at least one [[function]] is needed")
    if problems:
        raise ConfigError(source, problems)
    return Config(
        socket_dir=socket_dir,
        functions=functions,
        source=source,
        phbs=phbs,
        memlock_limit=memlock_limit,
        state_dir=state,
    )


FUNCTION_KEYS = frozenset({"name", "personality", "phb", "backing", "size", "totalvfs", "numvfs",
                           "vf_access", "vf_backing", "shadow_doorbells"})


def _parse_function(raw: dict[str, Any], where: str, phb_indexes: set[int], state_dir: Path,
                    problems: list[str]) -> FunctionConfig | None:
    """One [[function]] table; every key is checked (None if any problem was found)."""
    before = len(problems)
    known_keys = FUNCTION_KEYS | ACCESS_KEYS
    for key in sorted(set(raw) - known_keys):
        problems.append(f"{where}.{key}: unknown key (known: {', '.join(sorted(known_keys))})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(
            f"{where}.name: required; letters, digits, '_', '.', '-' (at most 63), got {name!r}"
        )
    personality = raw.get("personality", "testdev")
    if personality not in PERSONALITIES:
        problems.append(
            f"{where}.personality: {personality!r} is not one of {', '.join(PERSONALITIES)}"
        )
    phb = raw.get("phb", 0)
    if not _is_int(phb, 0, 255) or phb not in phb_indexes:
        problems.append(f"{where}.phb: {phb!r} is not the index of a [[phb]]")
    backing: Path | None = None
    size: int | None = None
    if personality == "nvme":
        raw_backing = raw.get("backing")
        if not isinstance(raw_backing, str) or not raw_backing:
            problems.append(
                f"{where}.backing: an nvme function needs the path of its namespace file or "
                f"block device (relative: under the state directory), got {raw_backing!r}"
            )
        else:
            backing = state_dir / raw_backing  # an absolute path replaces state_dir
        if "size" in raw:
            size = parse_size(raw["size"])
            if not size or size % 4096:
                problems.append(
                    f"{where}.size: a non-zero multiple of 4 KiB such as \"1G\", "
                    f"got {raw['size']!r}"
                )
        elif backing is not None and not backing.exists():
            problems.append(f"{where}.size: {backing} does not exist, so a size is needed")
    elif personality in PERSONALITIES:
        for key in ("backing", "size"):
            if key in raw:
                problems.append(f"{where}.{key}: only nvme functions have a {key}")
    totalvfs = raw.get("totalvfs", 0)
    numvfs = raw.get("numvfs", 0)
    if not _is_int(totalvfs, 0, 64):
        problems.append(f"{where}.totalvfs: an integer 0..64, got {totalvfs!r}")
        totalvfs = 64
    if not _is_int(numvfs, 0, totalvfs):
        problems.append(f"{where}.numvfs: an integer 0..totalvfs ({totalvfs}), got {numvfs!r}")
    vf_backing = raw.get("vf_backing")
    if vf_backing is not None:
        if (personality != "nvme" or not isinstance(vf_backing, str) or not vf_backing
                or "{n}" not in vf_backing):
            problems.append(f"{where}.vf_backing: a path with {{n}} for the VF number "
                            f"(nvme PFs only; relative: under the state directory), "
                            f"got {vf_backing!r}")
        else:
            vf_backing = str(state_dir / vf_backing)
    shadow_doorbells = raw.get("shadow_doorbells", True)
    if not isinstance(shadow_doorbells, bool) or (
        personality != "nvme" and "shadow_doorbells" in raw
    ):
        problems.append(f"{where}.shadow_doorbells: true or false (nvme functions only), "
                        f"got {shadow_doorbells!r}")
    access = _parse_access(raw, where, problems)
    vf_access: list[SocketAccess] = []
    raw_vf_access = raw.get("vf_access", [])
    if not isinstance(raw_vf_access, list) or len(raw_vf_access) > totalvfs:
        problems.append(f"{where}.vf_access: an array of at most totalvfs tables")
        raw_vf_access = []
    for n, entry in enumerate(raw_vf_access):
        if not isinstance(entry, dict) or set(entry) - ACCESS_KEYS:
            problems.append(f"{where}.vf_access[{n}]: a table of {', '.join(sorted(ACCESS_KEYS))}")
            continue
        vf_access.append(_parse_access({**_access_fields(raw), **entry},
                                       f"{where}.vf_access[{n}]", problems))
    if len(problems) > before:
        return None
    assert isinstance(name, str)
    return FunctionConfig(name=name, personality=personality, phb=phb, backing=backing,
                          size=size, totalvfs=totalvfs, numvfs=numvfs, access=access,
                          vf_access=tuple(vf_access), vf_backing=vf_backing,
                          shadow_doorbells=shadow_doorbells)


ACCESS_KEYS = frozenset({"socket_mode", "socket_owner", "socket_group", "allowed_uids"})


def _access_fields(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k in ACCESS_KEYS}


def _user_id(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            return None
    return None


def _group_id(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            return None
    return None


def _parse_access(raw: dict[str, Any], where: str, problems: list[str]) -> SocketAccess:
    """socket_mode ("0660"), socket_owner / socket_group (name or id), allowed_uids."""
    mode, uid, gid, allowed = 0o600, -1, -1, None
    if "socket_mode" in raw:
        value = raw["socket_mode"]
        try:
            mode = int(value, 8) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            mode = -1
        if not 0 <= mode <= 0o777 or isinstance(value, bool):
            problems.append(f'{where}.socket_mode: octal permissions such as "0660", got {value!r}')
            mode = 0o600
    if "socket_owner" in raw:
        found = _user_id(raw["socket_owner"])
        if found is None:
            problems.append(f"{where}.socket_owner: no such user {raw['socket_owner']!r}")
        else:
            uid = found
    if "socket_group" in raw:
        found = _group_id(raw["socket_group"])
        if found is None:
            problems.append(f"{where}.socket_group: no such group {raw['socket_group']!r}")
        else:
            gid = found
    if "allowed_uids" in raw:
        value = raw["allowed_uids"]
        ids = [_user_id(v) for v in value] if isinstance(value, list) else [None]
        if any(i is None for i in ids):
            problems.append(f"{where}.allowed_uids: a list of user names or uids, got {value!r}")
        else:
            allowed = frozenset(i for i in ids if i is not None)
    return SocketAccess(mode=mode, uid=uid, gid=gid, allowed_uids=allowed)


def vf_name(pf: str, n: int) -> str:
    """VF ``n`` of PF ``pf`` (its socket is ``<name>.sock``)."""
    return f"{pf}-vf{n}"


def parse_size(value: object) -> int | None:
    """Bytes from an integer or a string such as "64G", "512MiB"; None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str):
        m = _SIZE_RE.match(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    return None


def _parse_phbs(raw_phbs: Any, problems: list[str]) -> list[PhbConfig]:
    if raw_phbs is None:
        return [PhbConfig(0, "flat")]
    if not isinstance(raw_phbs, list) or not raw_phbs:
        problems.append("phb: must be a non-empty array of tables ([[phb]])")
        return [PhbConfig(0, "flat")]
    phbs: list[PhbConfig] = []
    seen: set[int] = set()
    for i, raw in enumerate(raw_phbs):
        where = f"phb[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a table")
            continue
        before = len(problems)
        for key in sorted(set(raw) - {"index", "window_policy", "page_sizes", "dma_fault"}):
            problems.append(f"{where}.{key}: unknown key "
                            "(known: index, window_policy, page_sizes, dma_fault)")
        index = raw.get("index", i)
        if not _is_int(index, 0, 255):
            problems.append(f"{where}.index: an integer 0..255, got {index!r}")
        elif index in seen:
            problems.append(f"{where}.index: duplicate PHB index {index}")
        else:
            # Functions that name this index are checked against it even if the PHB has other
            # problems, so a bad window_policy does not also make every function's phb "wrong".
            seen.add(index)
        policy = raw.get("window_policy", "power8")
        if policy not in WINDOW_POLICIES:
            problems.append(
                f"{where}.window_policy: {policy!r} is not one of {', '.join(WINDOW_POLICIES)}"
            )
        sizes = raw.get("page_sizes", ["4K", "64K", "2M", "16M"])
        if not isinstance(sizes, list) or not sizes or any(s not in PAGE_SIZES for s in sizes):
            problems.append(
                f"{where}.page_sizes: a list of {', '.join(PAGE_SIZES)}, got {sizes!r}"
            )
        elif "4K" not in sizes:
            problems.append(f"{where}.page_sizes: must include 4K (vfio-user maps are 4 KiB)")
        fault = raw.get("dma_fault", "")
        if "dma_fault" in raw and fault not in DMA_FAULT_POLICIES:
            problems.append(
                f"{where}.dma_fault: {fault!r} is not one of {', '.join(DMA_FAULT_POLICIES)}"
            )
        if len(problems) == before:
            phbs.append(PhbConfig(index, policy, tuple(sorted(PAGE_SIZES[s] for s in sizes)),
                                  fault))  # fmt: skip
        elif _is_int(index, 0, 255) and not any(p.index == index for p in phbs):
            phbs.append(PhbConfig(index, "flat"))  # a stand-in, only for the function checks
    return phbs or [PhbConfig(0, "flat")]
