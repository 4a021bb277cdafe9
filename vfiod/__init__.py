"""vfiod: isolated, SR-IOV-style PCI functions on an emulated POWER8 PHB, served over vfio-user."""

__version__ = "0.1.0"
