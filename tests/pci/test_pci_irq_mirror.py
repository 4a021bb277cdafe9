"""The C mirror of message interrupts (cffi_build/irq.h) against the IrqController it mirrors.

Two functions get the same generated SET_IRQS / enable / mask / table / reset sequence. Then
every vector is raised on both: on one by C through the mirror (what it cannot deliver left
pending and fired by Python's ``fire_pending``), on the other by Python's ``fire_vector``. The
eventfds signalled, PBA and MSI pending bits must be the same; the mirror's own fds must never
leak, whatever Python closed or replaced."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

from eventfds import count
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiod.pci import PciFunction, Region
from vfiod.pci.constants import (
    IRQ_MSI,
    IRQ_MSIX,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
)
from vfiod.pci.irq import _c_module

assert _c_module() is not None, "vfiod._fast is not built (make venv)"

EVT = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
MASK = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK
UNMASK = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK
VECTORS = 8


def make(msix: bool) -> PciFunction:
    f = PciFunction(vendor_id=0x7E57, device_id=3, class_code=0xFF0000)
    f.add_bar(0, Region(0x4000))
    if msix:
        f.add_msix(VECTORS, 0, 0x2000, 0, 0x3000)
    else:
        f.add_msi(VECTORS)
    f.seal()
    return f


def efd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)




class Side:
    def __init__(self, msix: bool) -> None:
        self.fn = make(msix)
        self.msix = msix
        self.ours: dict[int, int] = {}  # vector -> our dup of the fd installed there

    def do(self, op: tuple[object, ...]) -> None:
        fn, kind = self.fn, op[0]
        index = IRQ_MSIX if self.msix else IRQ_MSI
        if kind == "fds":
            start, n = int(op[1]), int(op[2])  # type: ignore[call-overload]
            n = min(n, VECTORS - start)
            fds = [efd() for _ in range(n)]
            for i, fd in enumerate(fds):
                old = self.ours.pop(start + i, None)
                if old is not None:
                    os.close(old)
                self.ours[start + i] = os.dup(fd)
            fn.set_irqs(index, EVT, start, n, fds)
        elif kind == "drop":
            start = int(op[1])  # type: ignore[call-overload]
            fn.set_irqs(index, EVT, start, 1, [])
            old = self.ours.pop(start, None)
            if old is not None:
                os.close(old)
        elif kind in ("mask", "unmask"):
            fn.set_irqs(index, MASK if kind == "mask" else UNMASK, int(op[1]), 1, [])  # type: ignore[call-overload]
        elif kind == "enable":
            on = bool(op[1])
            if self.msix:
                assert fn.msix is not None
                ctl = (0x8000 if on else 0) | (0x4000 if op[2] == 3 else 0)  # function mask
                fn.region_write(7, fn.msix.offset + 2, struct.pack("<H", ctl))
            else:
                assert fn.msi is not None
                mme = int(op[2]) % 4  # type: ignore[call-overload]
                fn.region_write(7, fn.msi.offset + 2, struct.pack("<H", int(on) | (mme << 4)))
        elif kind == "table" and self.msix:  # the guest's own mask bit in the table
            v = int(op[1])  # type: ignore[call-overload]
            fn.region_write(0, 0x2000 + 16 * v + 12, struct.pack("<I", 1 if op[2] else 0))
        elif kind == "reset":
            fn.reset()
            for fd in self.ours.values():
                os.close(fd)
            self.ours.clear()

    def signalled(self) -> dict[int, int]:
        return {v: count(fd) for v, fd in sorted(self.ours.items())}

    def close(self) -> None:
        for fd in self.ours.values():
            os.close(fd)
        self.fn.close()


op_st = st.one_of(
    st.tuples(st.just("fds"), st.integers(0, VECTORS - 1), st.integers(1, VECTORS)),
    st.tuples(st.just("drop"), st.integers(0, VECTORS - 1)),
    st.tuples(st.just("mask"), st.integers(0, VECTORS - 1)),
    st.tuples(st.just("unmask"), st.integers(0, VECTORS - 1)),
    st.tuples(st.just("enable"), st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("enable"), st.just(True), st.integers(0, 3)),
    st.tuples(st.just("table"), st.integers(0, VECTORS - 1), st.booleans()),
    st.tuples(st.just("reset")),
)


def mirror_fds() -> Iterator[int]:
    for name in os.listdir("/proc/self/fd"):
        if int(name) >= 100:
            yield int(name)


@settings(max_examples=200, deadline=None)
@given(msix=st.booleans(), ops=st.lists(op_st, max_size=25))
def test_the_mirror_raises_what_python_raises(msix: bool, ops: list[tuple[object, ...]]) -> None:
    before = set(mirror_fds())
    c_side, py_side = Side(msix), Side(msix)
    try:
        for op in [("enable", True, 1), ("fds", 0, VECTORS), *ops]:
            c_side.do(op)
            py_side.do(op)
            ffi_lib = c_side.fn.irq._c
            for v in range(VECTORS):
                ffi_lib.lib.vfiod_irq_fire(c_side.fn.irq.mirror, v)
                py_side.fn.irq.fire_vector(v)
            c_side.fn.irq.fire_pending()  # what C could not deliver
            assert c_side.signalled() == py_side.signalled(), op
            irq_c, irq_py = c_side.fn.irq, py_side.fn.irq
            assert irq_c.msix_pending == irq_py.msix_pending
            assert irq_c.msi_pending == irq_py.msi_pending
    finally:
        c_side.close()
        py_side.close()
    assert set(mirror_fds()) == before  # every duplicate the mirror took is closed again
