"""``vfiodctl``: look at and steer a running vfiod through its control socket.

Exit codes: 0 success, 1 the daemon refused (error reply) or answered badly, 2 usage error,
3 cannot connect to the control socket.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .api import EEH_OPS, eeh_state_name, parse_pe_ref
from .client import (
    SOCKET_ENV,
    ConnectError,
    ControlClient,
    DaemonError,
    ProtocolError,
    default_control_socket,
)
from .wire import WireError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3

PROG = "vfiodctl"


class UsageError(Exception):
    pass


# ---- formatting ------------------------------------------------------------------------------

_UNITS = (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))


def fmt_bytes(n: Any) -> str:
    """Exact and short: the largest binary unit that divides ``n`` (4G, 4111M, 1536K, 12)."""
    if not isinstance(n, int):
        return "-"
    for suffix, unit in _UNITS:
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def fmt_hex(n: Any) -> str:
    return f"{n:#x}" if isinstance(n, int) else "-"


def fmt_time(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def fmt_client(client: Any) -> str:
    if not isinstance(client, dict):
        return "no client"
    pid, uid = client.get("pid"), client.get("uid")
    parts = [f"client pid {'?' if pid is None else pid} uid {'?' if uid is None else uid}"]
    if client.get("connected_since") is not None:
        parts.append(f"since {fmt_time(client['connected_since'])}")
    return " ".join(parts)


def table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _function_line(fn: dict[str, Any]) -> str:
    kind = fn.get("kind")
    if kind == "pf":
        what = f"pf, {fn.get('numvfs', 0)}/{fn.get('totalvfs', 0)} VFs"
    elif kind == "vf":
        what = f"vf of {fn.get('pf')}"
    else:
        what = str(kind)
    return (
        f"{fn.get('rid', '??:??.?')} {fn.get('name')} ({what}) {fn.get('socket', '-')} "
        f"{fmt_client(fn.get('client'))}"
    )


def render_inventory(inv: dict[str, Any], out: TextIO) -> None:
    """An lspci -t style tree: PHB -> PE -> function (socket, client)."""
    functions = inv.get("functions", [])
    by_pe: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for fn in functions:
        if isinstance(fn.get("phb"), int) and isinstance(fn.get("pe"), int):
            by_pe.setdefault((fn["phb"], fn["pe"]), []).append(fn)
    placed: set[str] = set()
    phbs = inv.get("phbs", [])
    if not phbs:
        out.write("no PHBs\n")
    for phb in phbs:
        pages = " ".join(fmt_bytes(p) for p in phb.get("page_sizes", []))
        policies = "".join(f", {key} {phb[key]}" for key in ("window_policy", "dma_fault")
                           if key in phb)  # fmt: skip
        out.write(
            f"PHB {phb.get('index')} ({phb.get('model', 'phb')}, {phb.get('hcall_mode')}, "
            f"pages {pages or '-'}{policies})\n"
        )
        pes = phb.get("pes", [])
        if not pes:
            out.write("\\-(no PEs)\n")
        for i, pe in enumerate(pes):
            last = i == len(pes) - 1
            stem, cont = ("\\-", "  ") if last else ("+-", "| ")
            container = " container" if pe.get("container") else ""
            out.write(
                f"{stem}PE {pe.get('pe')} {pe.get('group')} "
                f"[{pe.get('eeh_state_name', eeh_state_name(pe.get('eeh_state', -1)))}]"
                f"{container}\n"
            )
            fns = by_pe.get((phb.get("index"), pe.get("pe")), [])
            if not fns:
                out.write(f"{cont}\\-(no function)\n")
            for j, fn in enumerate(fns):
                placed.add(fn.get("name", ""))
                fstem = "\\-" if j == len(fns) - 1 else "+-"
                out.write(f"{cont}{fstem}{_function_line(fn)}\n")
    loose = [fn for fn in functions if fn.get("name") not in placed]
    if loose:
        out.write("Functions without a PE:\n")
        for fn in loose:
            out.write(f"  {_function_line(fn)}\n")


def render_pe(info: dict[str, Any], out: TextIO) -> None:
    out.write(
        f"PE {info.get('phb')}:{info.get('pe')}  group {info.get('group')} "
        f"(id {info.get('group_id')})  function {info.get('function') or '-'}\n"
    )
    eeh = info.get("eeh") or {}
    flags = [
        name
        for key, name in (
            ("mmio_frozen", "MMIO frozen"),
            ("dma_frozen", "DMA frozen"),
            ("reset_asserted", "reset asserted"),
            ("config_blocked", "config blocked"),
        )
        if eeh.get(key)
    ]
    detail = ", ".join(flags) if flags else "running"
    extra = f"; {eeh['freeze_count']} freeze(s)" if eeh.get("freeze_count") else ""
    if eeh.get("injected"):
        extra += f"; {len(eeh['injected'])} error(s) injected"
    out.write(
        f"EEH        {info.get('eeh_state_name')} ({info.get('eeh_state')}): {detail}{extra}\n"
    )
    c = info.get("container")
    if isinstance(c, dict):
        out.write(
            f"Container  {c.get('type')}, groups {', '.join(c.get('groups', []))}, "
            f"{'enabled' if c.get('enabled') else 'not enabled'}, "
            f"accounted {fmt_bytes(c.get('accounted_bytes'))}\n"
        )
    else:
        out.write("Container  none\n")
    windows = info.get("windows", [])
    if not windows:
        out.write("Windows    none\n")
        return
    rows = [["SLOT", "LIOBN", "BUS OFFSET", "PAGE", "SIZE", "ENTRIES", "TCES IN USE", "TABLE"]]
    for w in windows:
        rows.append(
            [
                str(w.get("slot")) + ("*" if w.get("default") else ""),
                fmt_hex(w.get("liobn")),
                fmt_hex(w.get("bus_offset")),
                fmt_bytes(w.get("page_size")),
                fmt_bytes(w.get("size")),
                str(w.get("entries")),
                str(w.get("tces_in_use")),
                fmt_bytes(w.get("table_bytes")),
            ]
        )
    table(rows, out)


def render_memlock(clients: list[dict[str, Any]], out: TextIO) -> None:
    if not clients:
        out.write("no clients\n")
        return
    rows = [["PID", "UID", "NAME", "FUNCTIONS", "LOCKED", "LIMIT", "REGIONS", "CONTAINERS"]]
    for c in clients:
        limit = c.get("limit")
        if c.get("cap_ipc_lock"):
            lim = "unlimited (CAP_IPC_LOCK)"
        else:
            lim = "unlimited" if limit is None else fmt_bytes(limit)
        rows.append(
            [
                str(c.get("pid", "-")),
                str(c.get("uid", "-")),
                c.get("name") or "-",
                ",".join(c.get("functions", [])) or "-",
                fmt_bytes(c.get("locked_bytes")),
                lim,
                str(len(c.get("regions", []))),
                str(len(c.get("containers", []))),
            ]
        )
    table(rows, out)


def render_numvfs(res: dict[str, Any], out: TextIO) -> None:
    vfs = res.get("vfs", [])
    if res.get("numvfs"):
        out.write(f"{res.get('pf')}: {res.get('numvfs')} VFs enabled: {' '.join(vfs)}\n")
    else:
        out.write(f"{res.get('pf')}: VFs disabled\n")


def render_eeh(res: dict[str, Any], out: TextIO) -> None:
    who = res.get("target")
    where = f"PE {res.get('phb')}:{res.get('pe')}"
    if res.get("function") and res.get("function") != who:
        where = f"{res.get('function')}, {where}"
    state = f"EEH state {res.get('eeh_state_name')} ({res.get('eeh_state')})"
    if res.get("op") == "state":
        out.write(f"{who} ({where}): {state}\n")
    else:
        out.write(f"{who} ({where}): {res.get('op')} done; {state}\n")


# ---- arguments -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line on stderr, exit code 2
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _err_type(text: str) -> int:
    aliases = {"32": 0, "64": 1, "0": 0, "1": 1}
    if text not in aliases:
        raise argparse.ArgumentTypeError(
            f"error type is 0 (32-bit, or '32') or 1 (64-bit, '64'), not {text!r}"
        )
    return aliases[text]


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the daemon's JSON result instead of a table",
    )

    p = _Parser(
        prog=PROG,
        description="Control a running vfiod: list PHBs, PEs, IOMMU groups and functions, "
        "set VFs, inspect PEs, drive EEH and show locked memory.",
        epilog="exit codes: 0 ok, 1 error from the daemon, 2 usage, 3 cannot connect. "
        f"Socket: --socket, else ${SOCKET_ENV}, else {default_control_socket()}.",
    )
    p.add_argument("--socket", metavar="PATH", help="control socket of the daemon")
    p.add_argument(
        "--json",
        action="store_true",
        default=False,
        help="print the daemon's JSON result instead of a table",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for a reply (default 30)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sub.add_parser(
        "list",
        parents=[common],
        help="PHB -> PE -> function tree with sockets and clients (--json: the inventory)",
        description="Show every PHB, its PEs (IOMMU groups, EEH state) and the "
        "function of each PE with its vfio-user socket and attached client.",
    )

    s = sub.add_parser(
        "set-numvfs",
        parents=[common],
        help="enable N VFs on a PF (0 disables)",
        description="Enable N virtual functions on physical function PF, each "
        "with its own PE, IOMMU group and socket. 0 disables them; changing a "
        "non-zero count needs 0 first (like sriov_numvfs).",
    )
    s.add_argument("pf", metavar="PF", help="name of the physical function")
    s.add_argument("numvfs", metavar="N", type=_int, help="number of VFs")

    s = sub.add_parser(
        "pe",
        parents=[common],
        help="a PE's windows, TCE counts and EEH state",
        description="Show one PE: IOMMU group, function, EEH state, container "
        "and DMA windows (LIOBN, bus offset, page size, size, TCEs in use).",
    )
    s.add_argument(
        "pe", metavar="PHB:PE|FUNCTION", help="PE as PHB:PE (decimal or 0x hex), or a function name"
    )

    s = sub.add_parser(
        "eeh",
        parents=[common],
        help="EEH state, thaw, reset, error injection",
        description="Run an EEH operation on the PE of a function (or PHB:PE).",
    )
    s.add_argument("target", metavar="FUNCTION|PHB:PE")
    ops = s.add_subparsers(dest="eeh_op", metavar="OP", parser_class=_Parser)
    ops.required = True
    ops.add_parser("state", parents=[common], help="show the EEH state (GET_STATE)")
    ops.add_parser("thaw", parents=[common], help="unfreeze MMIO and DMA")
    ops.add_parser("thaw-io", parents=[common], help="unfreeze MMIO only")
    ops.add_parser("thaw-dma", parents=[common], help="unfreeze DMA only")
    r = ops.add_parser("reset", parents=[common], help="assert a hot (or fundamental) reset")
    r.add_argument("--fundamental", action="store_true", help="fundamental instead of hot reset")
    ops.add_parser(
        "deactivate",
        parents=[common],
        help="deassert the reset: thaw, unblock config, reset the device",
    )
    ops.add_parser("configure", parents=[common], help="configure the PE after a reset")
    i = ops.add_parser("inject", parents=[common], help="inject an error (freezes the PE)")
    i.add_argument(
        "--type",
        dest="err_type",
        type=_err_type,
        required=True,
        metavar="T",
        help="0 or 32: 32-bit error; 1 or 64: 64-bit error",
    )
    i.add_argument(
        "--func",
        type=_int,
        required=True,
        metavar="F",
        help="error function 0..19 (PAPR ibm,errinjct)",
    )
    i.add_argument("--addr", type=_int, default=0, metavar="A", help="address (default 0)")
    i.add_argument("--mask", type=_int, default=0, metavar="M", help="address mask (default 0)")

    sub.add_parser(
        "memlock",
        parents=[common],
        help="locked memory per client",
        description="Locked memory of every client process: locked bytes, "
        "RLIMIT_MEMLOCK, preregistered regions and containers.",
    )
    sub.add_parser(
        "metrics",
        parents=[common],
        help="Prometheus metrics text",
        description="Print the daemon's metrics in the Prometheus text format.",
    )
    return p


# ---- commands --------------------------------------------------------------------------------

Command = Callable[[ControlClient, argparse.Namespace], tuple[Any, Callable[[Any, TextIO], None]]]


def _cmd_list(c: ControlClient, a: argparse.Namespace) -> tuple[Any, Any]:
    return c.call("inventory"), render_inventory


def _cmd_set_numvfs(c: ControlClient, a: argparse.Namespace) -> tuple[Any, Any]:
    return c.call("set_numvfs", pf=a.pf, numvfs=a.numvfs), render_numvfs


def _cmd_pe(c: ControlClient, a: argparse.Namespace) -> tuple[Any, Any]:
    ref = parse_pe_ref(a.pe)
    if ref is not None:
        return c.call("pe_info", phb=ref[0], pe=ref[1]), render_pe
    return c.call("pe_info", function=a.pe), render_pe


def _cmd_eeh(c: ControlClient, a: argparse.Namespace) -> tuple[Any, Any]:
    op = a.eeh_op
    args: dict[str, Any] = {}
    if op == "reset":
        op = "reset-fundamental" if a.fundamental else "reset-hot"
    elif op == "inject":
        args = {"type": a.err_type, "func": a.func, "addr": a.addr, "mask": a.mask}
    assert op in EEH_OPS
    return c.call("eeh", target=a.target, op=op, **args), render_eeh


def _cmd_memlock(c: ControlClient, a: argparse.Namespace) -> tuple[Any, Any]:
    return c.call("memlock"), render_memlock


def _render_metrics(text: Any, out: TextIO) -> None:
    out.write(text if not text or text.endswith("\n") else text + "\n")


def _cmd_metrics(c: ControlClient, a: argparse.Namespace) -> tuple[Any, Any]:
    return c.call("metrics"), _render_metrics


COMMANDS: dict[str, Command] = {
    "list": _cmd_list,
    "set-numvfs": _cmd_set_numvfs,
    "pe": _cmd_pe,
    "eeh": _cmd_eeh,
    "memlock": _cmd_memlock,
    "metrics": _cmd_metrics,
}


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        err.write(f"{exc}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    client = ControlClient(args.socket, timeout=args.timeout)
    try:
        result, render = COMMANDS[args.command](client, args)
    except ConnectError as exc:
        err.write(f"{PROG}: {exc}\n")
        return EXIT_CONNECT
    except DaemonError as exc:
        err.write(f"{PROG}: {exc.code}: {exc.message}\n")
        return EXIT_ERROR
    except ProtocolError as exc:
        err.write(f"{PROG}: {exc}\n")
        return EXIT_ERROR
    except WireError as exc:  # the request itself failed the local checks
        err.write(f"{PROG}: {exc.message}\n")
        return EXIT_USAGE
    finally:
        client.close()
    if args.json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        try:
            render(result, out)
        except (AttributeError, TypeError, KeyError) as exc:
            err.write(f"{PROG}: unexpected reply from the daemon ({exc}); try --json\n")
            return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
