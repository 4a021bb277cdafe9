"""Helpers shared by the sPAPR tests (imported as a plain module: tests/ has no packages)."""

from __future__ import annotations

from vfiod import spapr
from vfiod.spapr.fastpath import PYTHON, cffi_impl

MEM = 0x1000_0000
MEM_SIZE = 16 << 20

IMPLS: list[spapr.fastpath.FastPath] = [PYTHON]
_c = cffi_impl()
if _c is not None:
    IMPLS.append(_c)


def make_phb(impl: spapr.fastpath.FastPath | None = None, **kw: object) -> spapr.Phb:
    phb = spapr.Phb(index=0, impl=impl, **kw)  # type: ignore[arg-type]
    phb.memory.add(MEM, MEM_SIZE, bytearray(MEM_SIZE))
    return phb


def be_list(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(8, "big") for v in values)
