"""The DMA view a function gets from its session or platform.

Every device DMA goes through one :class:`DmaSpace`, so the platform (a plain map table on x86,
a TCE table on sPAPR) decides what an IOVA means and what a fault does. Devices never touch
client memory any other way.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class DmaFault(Exception):
    """A DMA access hit an IOVA that is unmapped, read-only, or otherwise refused.

    Carries the failing IOVA and length so a device can latch them in an error register, and
    the platform can freeze a PE.
    """

    def __init__(self, iova: int, length: int, write: bool, reason: str = "") -> None:
        self.iova = iova
        self.length = length
        self.write = write
        self.reason = reason
        kind = "write" if write else "read"
        suffix = f": {reason}" if reason else ""
        super().__init__(f"DMA {kind} fault at {iova:#x}+{length:#x}{suffix}")


@runtime_checkable
class DmaSpace(Protocol):
    """IOVA space as seen by the device; both methods raise :class:`DmaFault`."""

    def read(self, iova: int, length: int) -> bytes: ...

    def write(self, iova: int, data: bytes) -> None: ...


class NoDmaSpace:
    """Placeholder before the session attaches a DMA view: every access faults."""

    def read(self, iova: int, length: int) -> bytes:
        raise DmaFault(iova, length, False, "no DMA space attached")

    def write(self, iova: int, data: bytes) -> None:
        raise DmaFault(iova, len(data), True, "no DMA space attached")
