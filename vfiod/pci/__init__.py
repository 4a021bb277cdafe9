"""PCI function model: config space, BARs/regions, capabilities, interrupts, reset, DMA view.

The session layer talks to :class:`PciFunction`; device personalities live in ``vfiod.devices``.
"""

from vfiod.pci.caps import MsiCap, MsixCap, PcieCap, PmCap, SriovCap
from vfiod.pci.config import BarKind, BarSpec, ConfigSpace
from vfiod.pci.dma import DmaFault, DmaSpace, NoDmaSpace
from vfiod.pci.function import PciFunction
from vfiod.pci.irq import IrqController, IrqInfo
from vfiod.pci.region import (
    AbsentRegion,
    BytesHandler,
    FastRange,
    MemoryRegion,
    Region,
    RegionInfo,
    RegisterHandler,
    RomRegion,
)

__all__ = [
    "AbsentRegion",
    "BarKind",
    "BarSpec",
    "BytesHandler",
    "ConfigSpace",
    "DmaFault",
    "DmaSpace",
    "FastRange",
    "IrqController",
    "IrqInfo",
    "MemoryRegion",
    "MsiCap",
    "MsixCap",
    "NoDmaSpace",
    "PciFunction",
    "PcieCap",
    "PmCap",
    "Region",
    "RegionInfo",
    "RegisterHandler",
    "RomRegion",
    "SriovCap",
]
