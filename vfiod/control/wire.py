"""The control protocol, sans-I/O: newline-delimited JSON requests and replies.

Request (one line, at most ``MAX_REQUEST_LINE`` bytes with its newline)::

    {"id": 7, "op": "eeh", "args": {"target": "vf0", "op": "thaw"}}

Reply (one line)::

    {"id": 7, "ok": true, "result": {...}}
    {"id": 7, "ok": false, "error": {"code": "ENOENT", "message": "no function vf9"}}

The server treats its peer as hostile: every field is type- and range-checked. A request that
cannot be trusted as a whole (over-long line, not UTF-8, not JSON, not an object, bad or
missing ``id``, unknown top-level key) is *fatal*: the server answers with ``"id": null`` and
closes. An unknown ``op`` or bad ``args`` is answered with ``EINVAL`` and the connection stays.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from .api import CODE_RE, EEH_OP_ARGS, EEH_OPS

MAX_REQUEST_LINE = 64 * 1024  # bytes, newline included
MAX_REPLY_LINE = 64 * 1024 * 1024  # what a client accepts from the daemon
MAX_ID = (1 << 53) - 1  # exact in every JSON implementation

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # vfiod.config function names
_NUM = r"(?:0x[0-9a-fA-F]{1,8}|[0-9]{1,10})"
_TARGET_RE = re.compile(rf"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{{0,62}}|{_NUM}:{_NUM})$")  # name or PHB:PE


class WireError(Exception):
    """A request (or reply) that breaks the protocol.

    ``fatal``: the stream cannot be trusted any more; reply (with ``id``, maybe None) and close.
    """

    def __init__(self, code: str, message: str, *, id: int | None = None, fatal: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id
        self.fatal = fatal


def _short(value: Any) -> str:
    """repr() of hostile input, bounded for logs and messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- framing ---------------------------------------------------------------------------------


class LineSplitter:
    """Bytes in, complete lines (without the newline) out; refuses lines over ``max_line``."""

    def __init__(self, max_line: int = MAX_REQUEST_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines: list[bytes] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            if nl + 1 > self.max_line:
                raise WireError("E2BIG", f"line longer than {self.max_line} bytes", fatal=True)
            lines.append(bytes(self._buf[:nl]))
            del self._buf[: nl + 1]
        if len(self._buf) >= self.max_line:
            raise WireError("E2BIG", f"line longer than {self.max_line} bytes", fatal=True)
        return lines


# ---- JSON ------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {_short(k)}")
        obj[k] = v
    return obj


def _loads(line: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys. Raises ValueError."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


class _Args:
    """Checks one request's args; every problem is EINVAL naming the op and the key."""

    def __init__(self, op: str, args: dict[str, Any]) -> None:
        self.op = op
        self.args = args
        self.used: set[str] = set()

    def _bad(self, msg: str) -> WireError:
        return WireError("EINVAL", f"{self.op}: {msg}", fatal=False)

    def int(self, key: str, lo: int, hi: int, *, required: bool = True) -> int | None:
        self.used.add(key)
        if key not in self.args:
            if required:
                raise self._bad(f"missing argument {key!r}")
            return None
        v = self.args[key]
        if not _is_int(v) or not lo <= v <= hi:
            raise self._bad(f"{key} must be an integer in {lo}..{hi}, got {_short(v)}")
        return int(v)

    def str(self, key: str, pattern: re.Pattern[str], what: str) -> str:
        self.used.add(key)
        if key not in self.args:
            raise self._bad(f"missing argument {key!r}")
        v = self.args[key]
        if not isinstance(v, str) or not pattern.match(v):
            raise self._bad(f"{key} must be {what}, got {_short(v)}")
        return v

    def done(self) -> None:
        extra = sorted(set(self.args) - self.used)
        if extra:
            raise self._bad(f"unknown argument(s) {', '.join(_short(k) for k in extra)}")


def _check_none(a: _Args) -> None:
    a.done()


def _check_set_numvfs(a: _Args) -> None:
    a.str("pf", _NAME_RE, "a function name")
    a.int("numvfs", 0, 0xFFFF)
    a.done()


def _check_pe_info(a: _Args) -> None:
    if "function" in a.args:
        a.str("function", _NAME_RE, "a function name")
        if "phb" in a.args or "pe" in a.args:
            raise a._bad("give either function or phb and pe, not both")
    else:
        a.int("phb", 0, 255)
        a.int("pe", 0, (1 << 15) - 1)
    a.done()


def _check_eeh(a: _Args) -> None:
    a.str("target", _TARGET_RE, "a function name or PHB:PE")
    a.used.add("op")
    op = a.args.get("op")
    if op not in EEH_OPS:
        raise a._bad(f"op must be one of {', '.join(EEH_OPS)}, got {_short(op)}")
    allowed = EEH_OP_ARGS[op]
    for key, required in allowed.items():
        hi = U32 if key in ("type", "func") else U64
        a.int(key, 0, hi, required=required)
    a.done()


#: op -> argument checker. The op names are the ControlTarget method names.
OPS: dict[str, Callable[[_Args], None]] = {
    "inventory": _check_none,
    "set_numvfs": _check_set_numvfs,
    "pe_info": _check_pe_info,
    "eeh": _check_eeh,
    "memlock": _check_none,
    "metrics": _check_none,
}


def check_args(op: str, args: dict[str, Any]) -> None:
    """Validate ``args`` of ``op``; WireError (EINVAL, not fatal) on any problem."""
    checker = OPS.get(op)
    if checker is None:
        raise WireError("EINVAL", f"unknown op {_short(op)} (known: {', '.join(OPS)})", fatal=False)
    checker(_Args(op, args))


def decode_request(line: bytes) -> Request:
    """One request line (without newline) -> Request, or WireError."""
    if len(line) >= MAX_REQUEST_LINE:
        raise WireError("E2BIG", f"line longer than {MAX_REQUEST_LINE} bytes", fatal=True)
    try:
        obj = _loads(line)
    except ValueError as exc:
        raise WireError("EPROTO", f"malformed request: {exc}", fatal=True) from None
    if not isinstance(obj, dict):
        raise WireError("EPROTO", "malformed request: not a JSON object", fatal=True)
    rid = obj.get("id")
    if not _is_int(rid) or not 0 <= rid <= MAX_ID:
        raise WireError(
            "EPROTO",
            f"malformed request: id must be an integer in 0..2^53-1, got {_short(rid)}",
            fatal=True,
        )
    extra = sorted(set(obj) - {"id", "op", "args"})
    if extra:
        raise WireError(
            "EPROTO",
            f"malformed request: unknown key(s) {', '.join(_short(k) for k in extra)}",
            id=rid,
            fatal=True,
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise WireError("EINVAL", f"op must be a string, got {_short(op)}", id=rid, fatal=False)
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise WireError(
            "EINVAL",
            f"{_short(op)}: args must be an object, got {_short(args)}",
            id=rid,
            fatal=False,
        )
    try:
        check_args(op, args)
    except WireError as exc:
        exc.id = rid
        raise
    return Request(rid, op, args)


def encode_request(rid: int, op: str, args: dict[str, Any] | None = None) -> bytes:
    """A request line; the same checks as the server's, so a client fails early."""
    args = {} if args is None else args
    if not _is_int(rid) or not 0 <= rid <= MAX_ID:
        raise ValueError(f"bad request id {rid!r}")
    check_args(op, args)
    line = _dumps({"id": rid, "op": op, "args": args})
    if len(line) > MAX_REQUEST_LINE:
        raise WireError("E2BIG", f"request longer than {MAX_REQUEST_LINE} bytes", fatal=True)
    return line


# ---- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    id: int | None
    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""


def encode_ok(rid: int, result: Any) -> bytes:
    """Raises TypeError/ValueError when ``result`` is not JSON-able (NaN included)."""
    return _dumps({"id": rid, "ok": True, "result": result})


def encode_error(rid: int | None, code: str, message: str) -> bytes:
    if not CODE_RE.match(code):
        code = "EIO"
    return _dumps({"id": rid, "ok": False, "error": {"code": code, "message": str(message)}})


def decode_reply(line: bytes) -> Reply:
    """A reply line (without newline) -> Reply; WireError(EPROTO, fatal) if malformed."""

    def bad(why: str) -> WireError:
        return WireError("EPROTO", f"malformed reply from the daemon: {why}", fatal=True)

    if len(line) >= MAX_REPLY_LINE:
        raise bad("too long")
    try:
        obj = _loads(line)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if not isinstance(obj, dict):
        raise bad("not a JSON object")
    rid = obj.get("id")
    if rid is not None and (not _is_int(rid) or not 0 <= rid <= MAX_ID):
        raise bad(f"bad id {_short(rid)}")
    ok = obj.get("ok")
    if ok is True:
        if set(obj) != {"id", "ok", "result"}:
            raise bad("expected keys id, ok, result")
        return Reply(rid, True, obj["result"])
    if ok is False:
        if set(obj) != {"id", "ok", "error"}:
            raise bad("expected keys id, ok, error")
        err = obj["error"]
        if not isinstance(err, dict) or set(err) != {"code", "message"}:
            raise bad("error must be {code, message}")
        code, message = err["code"], err["message"]
        if not isinstance(code, str) or not CODE_RE.match(code) or not isinstance(message, str):
            raise bad("bad error code or message")
        return Reply(rid, False, code=code, message=message)
    raise bad("ok must be true or false")
