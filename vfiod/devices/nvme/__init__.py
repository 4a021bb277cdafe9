"""NVMe controller personality (NVMe 1.4, one namespace on a file or block device)."""

from vfiod.devices.nvme.controller import Command, NvmeController

__all__ = ["Command", "NvmeController"]
