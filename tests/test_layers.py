"""The layering docs/ARCHITECTURE.md promises, checked on the source (every import, including
the ones under ``if TYPE_CHECKING``): each package imports only packages of a lower layer, and
the platform's modules import each other without a cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Layer of each package (docs/ARCHITECTURE.md); a package may import only lower layers.
LAYERS: dict[str, int] = {
    # the wire (sans-I/O), the platform, and glue that knows nothing of either
    "vfiod.protocol": 0,
    "vfiod.spapr": 0,
    "vfiod._fast": -1,  # the C hot paths, below everything that calls them
    "vfiod.transport": 0,
    "vfiod.sockets": 0,
    "vfiod.metrics": 0,
    "vfiod.layout": 0,
    "vfiod.logs": 0,
    "vfiod.sdnotify": 0,
    "vfiod.qemu": 0,
    # functions on the platform; configuration; the client on the wire
    "vfiod.pci": 1,
    "vfiod.config": 1,
    "vfiod.client": 1,
    # devices on functions; sessions serving functions; the control plane's protocol
    "vfiod.devices": 2,
    "vfiod.server": 2,
    "vfiod.control": 2,
    # the host puts it together; the daemon runs it
    "vfiod.host": 3,
    "vfiod.daemon": 4,
    "vfiod.__main__": 5,
}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for path in sorted((ROOT / "vfiod").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    for path in sorted((ROOT / "protocol").glob("*.py")):
        mods["vfiod.protocol" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Every vfiod module ``name`` imports (absolute names, ``from vfiod import x`` -> x)."""
    out: set[str] = set()
    is_pkg = path.stem == "__init__"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "vfiod":
                out.update(f"vfiod.{a.name}" for a in node.names)
            elif target.startswith("vfiod."):
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("vfiod."))
    return out


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_packages_import_only_lower_layers() -> None:
    bad = []
    for name, path in _modules().items():
        if name == "vfiod":
            continue
        src = _package(name)
        assert src in LAYERS, f"{src} has no layer in this test (and docs/ARCHITECTURE.md)"
        for target in _imports(name, path):
            dst = _package(target)
            if dst == src or dst == "vfiod.__version__":
                continue
            assert dst in LAYERS, f"{name} imports {target}, a package with no layer"
            if LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{name} (layer {LAYERS[src]}) imports {target} (layer {LAYERS[dst]})")
    assert not bad, "\n".join(bad)


def test_platform_modules_form_no_cycle() -> None:
    mods = {n: p for n, p in _modules().items() if n.startswith("vfiod.spapr")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        if name == "vfiod.spapr":
            continue  # the package only re-exports
        graph[name] = {t for t in _imports(name, path) if t in mods and t != "vfiod.spapr"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
