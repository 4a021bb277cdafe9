"""The DMA contract as devices see it (defined by the platform layer, ``vfiod.spapr.dma``)."""

from vfiod.spapr.dma import (
    IOV_MAX,
    DmaFault,
    DmaSpace,
    IovecLease,
    NoDmaSpace,
    ZeroCopyDma,
    zero_copy,
)

__all__ = [
    "IOV_MAX",
    "DmaFault",
    "DmaSpace",
    "IovecLease",
    "NoDmaSpace",
    "ZeroCopyDma",
    "zero_copy",
]
