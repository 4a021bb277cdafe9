"""A ControlTarget for the tests: a real spapr PHB, a PF with VFs, fake sockets and clients.

Imported as a plain module (tests/ has no packages). It follows the schema of docs/vfiodctl.md
and builds its PE/window/EEH/memlock objects with vfiod.control.describe, like the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vfiod import spapr
from vfiod.control import describe
from vfiod.control.api import SCHEMA_VERSION, ControlError, parse_pe_ref

MEM = 0x1000_0000
MEM_SIZE = 1 << 20
GiB = 1 << 30


@dataclass
class Fn:
    name: str
    kind: str  # pf | vf | function
    pe: spapr.Pe | None
    devfn: int
    pf: str | None = None
    numvfs: int | None = None
    totalvfs: int | None = None
    client: dict[str, Any] | None = None


class FakeTarget:
    def __init__(self, sock_dir: Path) -> None:
        self.sock_dir = sock_dir
        self.phb = spapr.Phb(index=0)
        self.phb.memory.add(MEM, MEM_SIZE, bytearray(MEM_SIZE))
        self.functions: dict[str, Fn] = {}
        self.fail_metrics = False
        self.slow_numvfs = 0.0
        pf = Fn("pf0", "pf", self.phb.new_pe(), 0, numvfs=0, totalvfs=4)
        self.functions[pf.name] = pf
        self.functions["loose0"] = Fn("loose0", "function", None, 0x1F)
        # a QEMU attached to the PF, with a v2 container and one preregistered region
        self.qemu = spapr.Client(memlock_limit=8 * GiB, name="qemu-guest0")
        assert pf.pe is not None
        self.container = spapr.Container(spapr.VFIO_SPAPR_TCE_v2_IOMMU, self.qemu)
        self.container.attach_group(pf.pe.group)
        pf.client = {"pid": 4242, "uid": 0, "connected_since": 1700000000.0}

    # -- helpers --
    def socket(self, fn: Fn) -> str:
        return str(self.sock_dir / f"{fn.name}.sock")

    def _fn_by_pe(self) -> dict[int, str]:
        return {f.pe.number: f.name for f in self.functions.values() if f.pe is not None}

    def _resolve(self, target: str) -> tuple[spapr.Pe, str | None]:
        ref = parse_pe_ref(target)
        if ref is not None:
            pe = describe.find_pe([self.phb], *ref)
            return pe, self._fn_by_pe().get(pe.number)
        fn = self.functions.get(target)
        if fn is None:
            raise ControlError("ENOENT", f"no function {target}")
        if fn.pe is None:
            raise ControlError("ENOENT", f"function {target} has no PE")
        return fn.pe, fn.name

    # -- ControlTarget --
    def inventory(self) -> dict[str, Any]:
        fns = []
        for f in self.functions.values():
            fns.append(
                {
                    "name": f.name,
                    "kind": f.kind,
                    "rid": f"00:{f.devfn >> 3:02x}.{f.devfn & 7}",
                    "phb": self.phb.index if f.pe is not None else None,
                    "pe": f.pe.number if f.pe is not None else None,
                    "group": f.pe.group.name if f.pe is not None else None,
                    "device": "testdev",
                    "socket": self.socket(f),
                    "client": f.client,
                    "pf": f.pf,
                    "numvfs": f.numvfs,
                    "totalvfs": f.totalvfs,
                }
            )
        clients = [
            {"pid": f.client["pid"], "uid": f.client["uid"], "functions": [f.name]}
            for f in self.functions.values()
            if f.client
        ]
        return {
            "version": SCHEMA_VERSION,
            "phbs": [describe.describe_phb(self.phb, self._fn_by_pe())],
            "functions": fns,
            "clients": clients,
        }

    async def set_numvfs(self, pf: str, numvfs: int) -> dict[str, Any]:
        fn = self.functions.get(pf)
        if fn is None:
            raise ControlError("ENOENT", f"no function {pf}")
        if fn.kind != "pf" or fn.totalvfs is None:
            raise ControlError("EINVAL", f"{pf} is not a PF")
        if numvfs > fn.totalvfs:
            raise ControlError("EINVAL", f"{pf} has at most {fn.totalvfs} VFs")
        if numvfs and fn.numvfs:
            raise ControlError("EBUSY", f"{pf} has {fn.numvfs} VFs: set 0 first")
        await trio.sleep(self.slow_numvfs)
        vfs = [f for f in self.functions.values() if f.pf == pf]
        for vf in vfs:
            assert vf.pe is not None
            self.phb.remove_pe(vf.pe)
            del self.functions[vf.name]
        for i, pe in enumerate(self.phb.new_pes(numvfs)):
            name = f"{pf}v{i}"
            self.functions[name] = Fn(name, "vf", pe, fn.devfn + 1 + i, pf=pf)
        fn.numvfs = numvfs
        return {"pf": pf, "numvfs": numvfs, "vfs": [f"{pf}v{i}" for i in range(numvfs)]}

    def pe_info(self, phb: int, pe: int) -> dict[str, Any]:
        found = describe.find_pe([self.phb], phb, pe)
        return describe.pe_info(found, self._fn_by_pe().get(pe))

    def eeh(self, target: str, op: str, **args: int) -> dict[str, Any]:
        pe, function = self._resolve(target)
        return describe.run_eeh_op(pe, op, target=target, function=function, **args)

    def memlock(self) -> list[dict[str, Any]]:
        return [describe.describe_memlock(self.qemu, pid=4242, uid=0, functions=["pf0"])]

    def metrics(self) -> str:
        if self.fail_metrics:
            raise RuntimeError("metrics exploded")
        return f"# TYPE vfiod_functions gauge\nvfiod_functions {len(self.functions)}\n"
