"""Daemon configuration: a TOML file (stdlib tomllib) or the embedded default.

Every problem is reported with the file, the key and the reason, all of them at once, so an
operator fixes a config in one pass; the daemon refuses to start on any of them.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERSONALITIES = ("testdev",)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

DEFAULT_TOML = """\
# vfiod embedded default: one test function, enough to attach a guest and watch it enumerate.
# socket_dir defaults to /run/vfiod as root, else $XDG_RUNTIME_DIR/vfiod or /tmp/vfiod-$UID.

[[function]]
name = "test0"
personality = "testdev"
"""


class ConfigError(Exception):
    """One or more problems in a configuration; ``problems`` lists them all."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass(frozen=True)
class FunctionConfig:
    name: str
    personality: str


@dataclass(frozen=True)
class Config:
    socket_dir: Path
    functions: list[FunctionConfig] = field(default_factory=list)
    source: str = "<default>"

    def socket_path(self, function: FunctionConfig) -> Path:
        return self.socket_dir / f"{function.name}.sock"


def default_socket_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/vfiod")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "vfiod"
    return Path(f"/tmp/vfiod-{os.getuid()}")


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and check a config file, or the embedded default when ``path`` is None."""
    if path is None:
        return parse(DEFAULT_TOML, "<default>")
    source = os.fspath(path)
    try:
        text = Path(source).read_text()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from None
    return parse(text, source)


def parse(text: str, source: str) -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    known = {"socket_dir", "function"}
    for key in sorted(set(doc) - known):
        problems.append(f"{key}: unknown key (known: {', '.join(sorted(known))})")

    socket_dir = default_socket_dir()
    if "socket_dir" in doc:
        if isinstance(doc["socket_dir"], str) and doc["socket_dir"].startswith("/"):
            socket_dir = Path(doc["socket_dir"])
        else:
            problems.append("socket_dir: must be an absolute path (a string starting with /)")

    functions: list[FunctionConfig] = []
    raw_functions: Any = doc.get("function", [])
    if not isinstance(raw_functions, list):
        problems.append("function: must be an array of tables ([[function]])")
        raw_functions = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_functions):
        where = f"function[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a table")
            continue
        for key in sorted(set(raw) - {"name", "personality"}):
            problems.append(f"{where}.{key}: unknown key (known: name, personality)")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            problems.append(
                f"{where}.name: required; letters, digits, '_', '.', '-' (at most 63), "
                f"got {name!r}"
            )
            continue
        if name in seen:
            problems.append(f"{where}.name: duplicate function name {name!r}")
        seen.add(name)
        personality = raw.get("personality", "testdev")
        if personality not in PERSONALITIES:
            problems.append(
                f"{where}.personality: {personality!r} is not one of {', '.join(PERSONALITIES)}"
            )
            continue
        functions.append(FunctionConfig(name=name, personality=personality))
    if not raw_functions and not problems:
        problems.append("function: at least one [[function]] is needed")
    if problems:
        raise ConfigError(source, problems)
    return Config(socket_dir=socket_dir, functions=functions, source=source)
