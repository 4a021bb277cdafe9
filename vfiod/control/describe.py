"""Build the control API's JSON objects from ``vfiod.spapr`` objects.

The daemon's ``ControlTarget`` implementation can use these so that every PE, window, EEH
result and client is described the same way (the schema of docs/vfiodctl.md). Pure functions:
they read the platform and never change it, except ``run_eeh_op`` which performs the op.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vfiod import spapr
from vfiod.spapr.constants import (
    VFIO_EEH_PE_CONFIGURE,
    VFIO_EEH_PE_GET_STATE,
    VFIO_EEH_PE_INJECT_ERR,
    VFIO_EEH_PE_RESET_DEACTIVATE,
    VFIO_EEH_PE_RESET_FUNDAMENTAL,
    VFIO_EEH_PE_RESET_HOT,
    VFIO_EEH_PE_UNFREEZE_DMA,
    VFIO_EEH_PE_UNFREEZE_IO,
)

from .api import EEH_OP_ARGS, EEH_OPS, ControlError, eeh_state_name

#: EEH op name -> the VFIO_EEH_PE_OP sequence it runs.
EEH_OP_CODES: dict[str, tuple[int, ...]] = {
    "state": (VFIO_EEH_PE_GET_STATE,),
    "thaw": (VFIO_EEH_PE_UNFREEZE_IO, VFIO_EEH_PE_UNFREEZE_DMA),
    "thaw-io": (VFIO_EEH_PE_UNFREEZE_IO,),
    "thaw-dma": (VFIO_EEH_PE_UNFREEZE_DMA,),
    "reset-hot": (VFIO_EEH_PE_RESET_HOT,),
    "reset-fundamental": (VFIO_EEH_PE_RESET_FUNDAMENTAL,),
    "deactivate": (VFIO_EEH_PE_RESET_DEACTIVATE,),
    "configure": (VFIO_EEH_PE_CONFIGURE,),
    "inject": (VFIO_EEH_PE_INJECT_ERR,),
}
assert set(EEH_OP_CODES) == set(EEH_OPS)


def hcall_mode(phb: spapr.Phb) -> str:
    """How the PHB's hypercalls treat sloppy callers: ``kvm-strict`` or ``qemu-compat``."""
    return "qemu-compat" if phb.qemu_compat else "kvm-strict"


def tces_in_use(window: spapr.Window) -> int:
    """Valid entries (R or W granted) of the window's table: a counter kept by the table."""
    return window.tces_in_use


def describe_window(pe: spapr.Pe, slot: int, window: spapr.Window) -> dict[str, Any]:
    return {
        "slot": slot,
        "liobn": pe.liobn(slot),
        "bus_offset": window.bus_offset,
        "page_shift": window.page_shift,
        "page_size": window.page_size,
        "size": window.size,
        "entries": window.nb_entries,
        "levels": window.levels,
        "tces_in_use": tces_in_use(window),
        "table_bytes": window.table.allocated_bytes,
        "accounted_bytes": window.accounted,
        "default": window.default,
    }


def describe_container(container: spapr.Container) -> dict[str, Any]:
    page = container.client.page_size
    accounted = container.enable_pages * page + sum(
        w.accounted for w in container.windows if w is not None
    )
    return {
        "type": "v2" if container.v2 else "v1",
        "groups": [g.name for g in container.groups],
        "enabled": container.enabled,
        "windows": sum(1 for w in container.windows if w is not None),
        "accounted_bytes": accounted,
    }


def describe_pe_summary(pe: spapr.Pe, function: str | None) -> dict[str, Any]:
    """One entry of ``inventory()["phbs"][i]["pes"]``."""
    state = pe.eeh_state
    return {
        "pe": pe.number,
        "group": pe.group.name,
        "group_id": pe.group.id,
        "liobns": [pe.liobn(i) for i, w in enumerate(pe.windows) if w is not None],
        "eeh_state": state,
        "eeh_state_name": eeh_state_name(state),
        "function": function,
        "container": pe.container is not None,
    }


def describe_phb(phb: spapr.Phb, functions: Mapping[int, str]) -> dict[str, Any]:
    """One entry of ``inventory()["phbs"]``; ``functions`` maps PE number -> function name."""
    return {
        "index": phb.index,
        "model": phb.model,
        "hcall_mode": hcall_mode(phb),
        "page_sizes": [1 << s for s in phb.page_shifts],
        "dma32": {"start": phb.dma32_start, "size": phb.dma32_size},
        "dma64_start": phb.dma64_start,
        "max_windows": phb.max_windows,
        "ddw": phb.ddw,
        "eeh": phb.eeh,
        "dma_fault": phb.dma_fault,
        "num_pes": phb.num_pes,
        "pes": [describe_pe_summary(phb.pes[n], functions.get(n)) for n in sorted(phb.pes)],
    }


def describe_eeh(pe: spapr.Pe) -> dict[str, Any]:
    e = pe.eeh
    return {
        "mmio_frozen": e.mmio_frozen,
        "dma_frozen": e.dma_frozen,
        "reset_asserted": e.reset_asserted,
        "config_blocked": e.config_blocked,
        "owned": e.owned,
        "freeze_count": e.freeze_count,
        "dma_faults": pe.fault_count,
        "injected": [
            {"type": i.type, "func": i.func, "addr": i.addr, "mask": i.mask} for i in e.injected
        ],
    }


def pe_info(pe: spapr.Pe, function: str | None) -> dict[str, Any]:
    """The result of ``ControlTarget.pe_info``."""
    state = pe.eeh_state
    container = pe.container
    return {
        "phb": pe.phb.index,
        "pe": pe.number,
        "group": pe.group.name,
        "group_id": pe.group.id,
        "function": function,
        "eeh_state": state,
        "eeh_state_name": eeh_state_name(state),
        "eeh": describe_eeh(pe),
        "container": (describe_container(container)
                      if isinstance(container, spapr.Container) else None),
        "windows": [
            describe_window(pe, slot, w) for slot, w in enumerate(pe.windows) if w is not None
        ],
    }


def find_pe(phbs: Iterable[spapr.Phb], phb: int, pe: int) -> spapr.Pe:
    """The PE ``phb:pe`` or ENOENT."""
    for p in phbs:
        if p.index == phb:
            found = p.pes.get(pe)
            if found is None:
                raise ControlError("ENOENT", f"PHB {phb} has no PE {pe}")
            return found
    raise ControlError("ENOENT", f"no PHB {phb}")


def run_eeh_op(
    pe: spapr.Pe, op: str, *, target: str, function: str | None, **args: int
) -> dict[str, Any]:
    """Perform EEH op ``op`` on ``pe`` and describe the outcome (the ``eeh`` call's result).

    Platform errnos become ``ControlError`` with the errno's name.
    """
    if op not in EEH_OP_CODES:
        raise ControlError("EINVAL", f"unknown EEH op {op!r} (one of {', '.join(EEH_OPS)})")
    allowed = EEH_OP_ARGS[op]
    extra = set(args) - set(allowed)
    if extra:
        raise ControlError("EINVAL", f"eeh {op}: unexpected argument(s) {', '.join(sorted(extra))}")
    missing = [k for k, req in allowed.items() if req and k not in args]
    if missing:
        raise ControlError("EINVAL", f"eeh {op}: missing argument(s) {', '.join(missing)}")
    result = 0
    for code in EEH_OP_CODES[op]:
        try:
            if code == VFIO_EEH_PE_INJECT_ERR:
                result = pe.eeh_op(
                    code, args["type"], args["func"], args.get("addr", 0), args.get("mask", 0)
                )
            else:
                result = pe.eeh_op(code)
        except OSError as exc:
            where = f"eeh {op} on PE {pe.phb.index}:{pe.number}"
            raise ControlError.from_oserror(exc, where) from None
        except (TypeError, ValueError, OverflowError) as exc:  # defensive: bad ints
            raise ControlError("EINVAL", f"eeh {op}: {exc}") from None
    state = pe.eeh_state
    return {
        "target": target,
        "function": function,
        "phb": pe.phb.index,
        "pe": pe.number,
        "op": op,
        "result": result,
        "eeh_state": state,
        "eeh_state_name": eeh_state_name(state),
    }


def describe_memlock(
    client: spapr.Client,
    *,
    pid: int | None,
    uid: int | None,
    functions: Iterable[str] = (),
) -> dict[str, Any]:
    """One entry of ``ControlTarget.memlock()``: a client process's locked memory."""
    regions = sorted(client.regions.values(), key=lambda r: r.vaddr)
    containers = sorted(_containers(client.containers), key=lambda c: [g.name for g in c.groups])
    return {
        "pid": pid,
        "uid": uid,
        "name": client.name,
        "functions": sorted(functions),
        "locked_bytes": client.locked_bytes,
        "limit": client.memlock_limit,
        "cap_ipc_lock": client.cap_ipc_lock,
        "page_size": client.page_size,
        "regions": [
            {
                "vaddr": r.vaddr,
                "size": r.size,
                "page_shift": r.page_shift,
                "groups": sorted(g.name for c in _containers(r.containers) for g in c.groups),
            }
            for r in regions
        ],
        "containers": [describe_container(c) for c in containers],
    }


def _containers(owners: Iterable[object]) -> list[spapr.Container]:
    """The VFIO containers among a client's window owners (the platform's own PEs are not)."""
    return [c for c in owners if isinstance(c, spapr.Container)]


__all__ = [
    "EEH_OP_CODES",
    "describe_container",
    "describe_eeh",
    "describe_memlock",
    "describe_pe_summary",
    "describe_phb",
    "describe_window",
    "find_pe",
    "pe_info",
    "run_eeh_op",
    "tces_in_use",
    "hcall_mode",
]
