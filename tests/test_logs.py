"""Structured logs: one event per line, key=value, context fields when known."""

from __future__ import annotations

import logging

from vfiod.logs import LogfmtFormatter


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("vfiod.test", logging.WARNING, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_one_line_with_context_fields() -> None:
    line = LogfmtFormatter().format(
        record('refused "x"\nnext', function="nvme0-vf1", pe=3, client=4242, uid=107)
    )
    assert "\n" not in line
    assert line.split(" ")[1:3] == ["level=warning", "logger=vfiod.test"]
    for field in ["function=nvme0-vf1", "pe=3", "client=4242", "uid=107"]:
        assert field in line
    assert line.endswith('msg="refused \\"x\\"\\nnext"')


def test_plain_values_are_unquoted_and_absent_context_is_omitted() -> None:
    line = LogfmtFormatter().format(record("ready"))
    assert line.endswith("msg=ready") and "function=" not in line
