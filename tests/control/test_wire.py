"""The control protocol, sans-I/O: framing, request validation, replies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vfiod.control import wire
from vfiod.control.wire import (
    MAX_REQUEST_LINE,
    LineSplitter,
    Request,
    WireError,
    decode_reply,
    decode_request,
    encode_error,
    encode_ok,
    encode_request,
)


def req(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# ---- framing ----


def test_splitter_lines_and_partials() -> None:
    s = LineSplitter(64)
    assert s.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert s.pending == 4
    assert s.feed(b":2}\n\n") == [b'{"b":2}', b""]
    assert s.pending == 0


def test_splitter_exact_limit_ok_one_more_refused() -> None:
    s = LineSplitter(8)
    assert s.feed(b"1234567\n") == [b"1234567"]  # 8 bytes with the newline
    with pytest.raises(WireError) as e:
        LineSplitter(8).feed(b"12345678\n")
    assert e.value.code == "E2BIG" and e.value.fatal


def test_splitter_refuses_long_partial_line() -> None:
    s = LineSplitter(MAX_REQUEST_LINE)
    s.feed(b"x" * (MAX_REQUEST_LINE - 1))
    with pytest.raises(WireError) as e:
        s.feed(b"x")
    assert e.value.code == "E2BIG"


# ---- requests: valid ----


@pytest.mark.parametrize(
    "op,args",
    [
        ("inventory", {}),
        ("set_numvfs", {"pf": "pf0", "numvfs": 0}),
        ("set_numvfs", {"pf": "pf0", "numvfs": 65535}),
        ("pe_info", {"phb": 0, "pe": 1}),
        ("pe_info", {"phb": 255, "pe": 32767}),
        ("pe_info", {"function": "vf-1.a_b"}),
        ("eeh", {"target": "pf0", "op": "state"}),
        ("eeh", {"target": "0:0x1f", "op": "thaw"}),
        ("eeh", {"target": "pf0", "op": "inject", "type": 1, "func": 19}),
        (
            "eeh",
            {"target": "pf0", "op": "inject", "type": 0, "func": 0, "addr": 2**64 - 1, "mask": 0},
        ),
        ("memlock", {}),
        ("metrics", {}),
    ],
)
def test_valid_requests_round_trip(op: str, args: dict[str, Any]) -> None:
    line = encode_request(7, op, args)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line[:-1]) == Request(7, op, args)


def test_args_default_to_empty() -> None:
    assert decode_request(req({"id": 0, "op": "inventory"})) == Request(0, "inventory", {})


# ---- requests: fatal (EPROTO / E2BIG, id may be unknown) ----


@pytest.mark.parametrize(
    "line,code",
    [
        (b"\xff\xfe", "EPROTO"),
        (b"not json", "EPROTO"),
        (b"", "EPROTO"),
        (b'{"id": 1, "op": "inventory"', "EPROTO"),
        (b'{"id": NaN, "op": "inventory"}', "EPROTO"),
        (b'{"id": 1, "op": "metrics", "args": {"x": Infinity}}', "EPROTO"),
        (b'{"id": 1, "id": 2, "op": "inventory"}', "EPROTO"),
        (b"[" * 100000 + b"]" * 100000, "E2BIG"),
        (b"[" * 30000 + b"]" * 30000, "EPROTO"),
        (b"[1, 2]", "EPROTO"),
        (b'"inventory"', "EPROTO"),
        (b"null", "EPROTO"),
        (b'{"op": "inventory"}', "EPROTO"),
        (b'{"id": true, "op": "inventory"}', "EPROTO"),
        (b'{"id": -1, "op": "inventory"}', "EPROTO"),
        (b'{"id": 1.0, "op": "inventory"}', "EPROTO"),
        (b'{"id": "1", "op": "inventory"}', "EPROTO"),
        (b'{"id": 9007199254740992, "op": "inventory"}', "EPROTO"),
        (b'{"id": 1' + b"0" * 5000 + b', "op": "inventory"}', "EPROTO"),
    ],
)
def test_fatal_requests(line: bytes, code: str) -> None:
    with pytest.raises(WireError) as e:
        decode_request(line)
    assert e.value.code == code
    assert e.value.fatal
    assert e.value.id is None


def test_unknown_top_level_key_is_fatal_but_keeps_id() -> None:
    with pytest.raises(WireError) as e:
        decode_request(req({"id": 5, "op": "inventory", "extra": 1}))
    assert (e.value.code, e.value.fatal, e.value.id) == ("EPROTO", True, 5)


# ---- requests: EINVAL, connection kept ----


@pytest.mark.parametrize(
    "op,args,needle",
    [
        ("reboot", {}, "unknown op"),
        (3, {}, "op must be a string"),
        (None, {}, "op must be a string"),
        ("inventory", [], "args must be an object"),
        ("inventory", {"x": 1}, "unknown argument"),
        ("set_numvfs", {"pf": "pf0"}, "missing argument 'numvfs'"),
        ("set_numvfs", {"numvfs": 1}, "missing argument 'pf'"),
        ("set_numvfs", {"pf": "pf0", "numvfs": -1}, "0..65535"),
        ("set_numvfs", {"pf": "pf0", "numvfs": 65536}, "0..65535"),
        ("set_numvfs", {"pf": "pf0", "numvfs": True}, "0..65535"),
        ("set_numvfs", {"pf": "pf0", "numvfs": 1.0}, "0..65535"),
        ("set_numvfs", {"pf": "pf0", "numvfs": "2"}, "0..65535"),
        ("set_numvfs", {"pf": "../etc", "numvfs": 1}, "function name"),
        ("set_numvfs", {"pf": "", "numvfs": 1}, "function name"),
        ("set_numvfs", {"pf": "a" * 64, "numvfs": 1}, "function name"),
        ("set_numvfs", {"pf": "pf\n0", "numvfs": 1}, "function name"),
        ("set_numvfs", {"pf": 0, "numvfs": 1}, "function name"),
        ("set_numvfs", {"pf": "0:1", "numvfs": 1}, "function name"),
        ("set_numvfs", {"pf": "pf0", "numvfs": 1, "force": True}, "unknown argument"),
        ("pe_info", {}, "missing argument 'phb'"),
        ("pe_info", {"phb": 0}, "missing argument 'pe'"),
        ("pe_info", {"phb": 256, "pe": 0}, "0..255"),
        ("pe_info", {"phb": 0, "pe": 32768}, "0..32767"),
        ("pe_info", {"phb": 0, "pe": None}, "0..32767"),
        ("pe_info", {"function": "pf0", "phb": 0}, "not both"),
        ("pe_info", {"function": ["pf0"]}, "function name"),
        ("eeh", {"op": "state"}, "missing argument 'target'"),
        ("eeh", {"target": "pf0"}, "op must be one of"),
        ("eeh", {"target": "pf0", "op": "explode"}, "op must be one of"),
        ("eeh", {"target": "pf0", "op": ["state"]}, "op must be one of"),
        ("eeh", {"target": "pf 0", "op": "state"}, "function name or PHB:PE"),
        ("eeh", {"target": "0:1:2", "op": "state"}, "function name or PHB:PE"),
        ("eeh", {"target": "0:0x123456789", "op": "state"}, "function name or PHB:PE"),
        ("eeh", {"target": ":1", "op": "state"}, "function name or PHB:PE"),
        ("eeh", {"target": "pf0", "op": "state", "type": 0}, "unknown argument"),
        ("eeh", {"target": "pf0", "op": "inject", "func": 0}, "missing argument 'type'"),
        ("eeh", {"target": "pf0", "op": "inject", "type": 0}, "missing argument 'func'"),
        ("eeh", {"target": "pf0", "op": "inject", "type": 0, "func": 2**32}, "func must be"),
        (
            "eeh",
            {"target": "pf0", "op": "inject", "type": 0, "func": 0, "addr": 2**64},
            "addr must be",
        ),
        (
            "eeh",
            {"target": "pf0", "op": "inject", "type": 0, "func": 0, "mask": -1},
            "mask must be",
        ),
        ("memlock", {"all": True}, "unknown argument"),
        ("metrics", {"format": "json"}, "unknown argument"),
    ],
)
def test_einval_requests(op: Any, args: Any, needle: str) -> None:
    with pytest.raises(WireError) as e:
        decode_request(req({"id": 11, "op": op, "args": args}))
    assert e.value.code == "EINVAL"
    assert not e.value.fatal
    assert e.value.id == 11
    assert needle in e.value.message


def test_hostile_values_are_bounded_in_messages() -> None:
    with pytest.raises(WireError) as e:
        decode_request(req({"id": 1, "op": "x" * 10000}))
    assert len(e.value.message) < 200


def test_encode_request_checks_locally() -> None:
    with pytest.raises(WireError):
        encode_request(1, "set_numvfs", {"pf": "pf0", "numvfs": -3})
    with pytest.raises(WireError):
        encode_request(1, "nope", {})
    with pytest.raises(ValueError):
        encode_request(-1, "inventory", {})
    with pytest.raises(ValueError):
        encode_request(True, "inventory", {})  # type: ignore[arg-type]


# ---- replies ----


def test_reply_round_trips() -> None:
    ok = decode_reply(encode_ok(3, {"a": [1, None, "x"]})[:-1])
    assert (ok.id, ok.ok, ok.result) == (3, True, {"a": [1, None, "x"]})
    err = decode_reply(encode_error(4, "ENOENT", "no function vf9")[:-1])
    assert (err.id, err.ok, err.code, err.message) == (4, False, "ENOENT", "no function vf9")
    anon = decode_reply(encode_error(None, "EPERM", "go away")[:-1])
    assert anon.id is None and anon.code == "EPERM"


def test_encode_error_sanitises_code() -> None:
    assert decode_reply(encode_error(1, "bad code", "m")[:-1]).code == "EIO"


def test_encode_ok_refuses_non_json() -> None:
    with pytest.raises(ValueError):
        encode_ok(1, float("nan"))
    with pytest.raises(TypeError):
        encode_ok(1, {1, 2})


@pytest.mark.parametrize(
    "line",
    [
        b"garbage",
        b"[]",
        b'{"id": 1, "ok": "yes", "result": 1}',
        b'{"id": 1, "ok": true}',
        b'{"id": 1, "ok": true, "result": 1, "x": 2}',
        b'{"id": -1, "ok": true, "result": 1}',
        b'{"id": 1, "ok": false, "error": "ENOENT"}',
        b'{"id": 1, "ok": false, "error": {"code": "nope", "message": "m"}}',
        b'{"id": 1, "ok": false, "error": {"code": "EIO", "message": 3}}',
        b'{"id": 1, "ok": false, "error": {"code": "EIO"}}',
    ],
)
def test_malformed_replies(line: bytes) -> None:
    with pytest.raises(WireError) as e:
        decode_reply(line)
    assert e.value.code == "EPROTO"


def test_every_op_has_a_checker() -> None:
    assert set(wire.OPS) == {"inventory", "set_numvfs", "pe_info", "eeh", "memlock", "metrics"}
