"""POWER8 PHB platform model: PEs, IOMMU groups, containers, TCE windows, hypercalls, DDW, EEH.

Where KVM and QEMU disagree the default is KVM-strict; ``Phb(qemu_compat=True)`` gives QEMU's
behaviour. See docs/spapr.md for the model and its numbers.
"""

from . import constants as _constants
from .constants import *  # noqa: F403 - the platform's numbers are part of the API
from .container import Container, SpaprTceInfo
from .dma import DmaFault, DmaSpace, IovecLease, NoDmaSpace, ZeroCopyDma
from .eeh import EehError, EehState
from .fastpath import PYTHON, CffiFastPath, PyFastPath, TranslateFault, cffi_impl, default_impl
from .memlock import (
    Client,
    PreregRegion,
    per_container_estimate,
    prereg_estimate,
    v1_estimate,
)
from .memory import HostMemory, MemoryRegion, Piece
from .pe import IommuGroup, Pe, PeHost
from .pe_dma import AddressSpace, ClientFile, ClientMemory, PeDma
from .phb import DMA_FAULT_POLICIES, Phb, make_liobn, split_liobn
from .tce import (
    TceTable,
    flat_table_size,
    get_table_size,
    kvm_tce_pages,
    level_geometry,
    qemu_guess_levels,
)
from .window import Window, WindowOwner

__all__ = [
    "AddressSpace",
    "Client",
    "DMA_FAULT_POLICIES",
    "ClientFile",
    "ClientMemory",
    "Container",
    "CffiFastPath",
    "DmaFault",
    "DmaSpace",
    "IovecLease",
    "NoDmaSpace",
    "PeDma",
    "PeHost",
    "WindowOwner",
    "ZeroCopyDma",
    "EehError",
    "EehState",
    "HostMemory",
    "IommuGroup",
    "MemoryRegion",
    "PYTHON",
    "Pe",
    "Phb",
    "Piece",
    "PreregRegion",
    "PyFastPath",
    "SpaprTceInfo",
    "TceTable",
    "TranslateFault",
    "Window",
    "cffi_impl",
    "default_impl",
    "flat_table_size",
    "get_table_size",
    "kvm_tce_pages",
    "level_geometry",
    "make_liobn",
    "per_container_estimate",
    "prereg_estimate",
    "qemu_guess_levels",
    "split_liobn",
    "v1_estimate",
] + [k for k in vars(_constants) if k.isupper() and not k.startswith("_")]
