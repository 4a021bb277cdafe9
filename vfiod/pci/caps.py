"""Builders for the capabilities a function offers: PM, MSI, MSI-X, PCI Express, SR-IOV.

Each builder lays the registers out in a :class:`ConfigSpace` with the right write masks and
returns a small object that knows the offsets, so the function can read the live state (MSI-X
enable, PM power state) without hard-coding layouts elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from vfiod.pci.config import BarKind, BarSpec, ConfigSpace
from vfiod.pci.constants import (
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_EXT_CAP_ID_SRIOV,
)

# ---- Power management -----------------------------------------------------------------------

PM_PMC = 2
PM_PMCSR = 4
PM_CAP_VERSION = 3
PMCSR_STATE_MASK = 0x3
PMCSR_D0 = 0
PMCSR_D3HOT = 3
PMCSR_NO_SOFT_RESET = 0x8


@dataclass
class PmCap:
    """PCI PM cap supporting only D0 and D3hot; writes of D1/D2 are dropped (unsupported)."""

    config: ConfigSpace
    offset: int

    @classmethod
    def add(cls, config: ConfigSpace) -> PmCap:
        off = config.add_cap(PCI_CAP_ID_PM, 8)
        config.init(off + PM_PMC, 2, PM_CAP_VERSION)
        # No_Soft_Reset: D3hot -> D0 keeps state, so QEMU's PM reset step is harmless.
        config.init(off + PM_PMCSR, 2, PMCSR_NO_SOFT_RESET, wmask=PMCSR_STATE_MASK)
        cap = cls(config, off)
        config.add_hook(off + PM_PMCSR, 2, cap._on_write)
        return cap

    def _on_write(self, old: int, new: int) -> None:
        state = new & PMCSR_STATE_MASK
        if state not in (PMCSR_D0, PMCSR_D3HOT):
            # Unsupported state: the spec says the write is ignored, so restore the old state.
            self.config.poke(
                self.offset + PM_PMCSR, 2, (new & ~PMCSR_STATE_MASK) | (old & PMCSR_STATE_MASK)
            )

    @property
    def power_state(self) -> int:
        return self.config.peek(self.offset + PM_PMCSR, 2) & PMCSR_STATE_MASK


# ---- MSI ------------------------------------------------------------------------------------

MSI_FLAGS = 2
MSI_ADDRESS_LO = 4
MSI_ADDRESS_HI = 8
MSI_DATA_64 = 12
MSI_CAP_SIZE_64 = 14
MSI_FLAGS_ENABLE = 0x1
MSI_FLAGS_QMASK = 0x0E  # Multiple Message Capable: log2 of the vectors the function asks for
MSI_FLAGS_QSIZE = 0x70  # Multiple Message Enable: log2 of the vectors software granted
MSI_FLAGS_64BIT = 0x80
MSI_MAX_VECTORS = 32


@dataclass
class MsiCap:
    """MSI cap, 64-bit addresses, no per-vector masking.

    Software grants ``2**MME`` of the ``2**MMC`` vectors asked for; with fewer than asked the
    function folds vector numbers into the granted ones, as the low Message Data bits it may
    modify are fewer (PCI Local Bus 3.0, 6.8.1.3).
    """

    config: ConfigSpace
    offset: int
    vectors: int

    @classmethod
    def add(cls, config: ConfigSpace, vectors: int) -> MsiCap:
        if not 1 <= vectors <= MSI_MAX_VECTORS or vectors & (vectors - 1):
            raise ValueError("MSI supports 1, 2, 4, 8, 16 or 32 vectors")
        off = config.add_cap(PCI_CAP_ID_MSI, MSI_CAP_SIZE_64)
        mmc = vectors.bit_length() - 1
        config.init(
            off + MSI_FLAGS, 2, MSI_FLAGS_64BIT | (mmc << 1),
            wmask=MSI_FLAGS_ENABLE | MSI_FLAGS_QSIZE,
        )  # fmt: skip
        config.init(off + MSI_ADDRESS_LO, 4, 0, wmask=0xFFFFFFFC)
        config.init(off + MSI_ADDRESS_HI, 4, 0, wmask=0xFFFFFFFF)
        config.init(off + MSI_DATA_64, 2, 0, wmask=0xFFFF)
        return cls(config, off, vectors)

    @property
    def control(self) -> int:
        return self.config.peek(self.offset + MSI_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSI_FLAGS_ENABLE)

    @property
    def granted(self) -> int:
        """Vectors software enabled (MME), never more than the function asked for."""
        return min(1 << ((self.control & MSI_FLAGS_QSIZE) >> 4), self.vectors)

    def fold(self, vector: int) -> int:
        """The granted vector that carries ``vector``'s message."""
        return vector & (self.granted - 1)


# ---- MSI-X ----------------------------------------------------------------------------------

MSIX_FLAGS = 2
MSIX_TABLE = 4
MSIX_PBA = 8
MSIX_FLAGS_QSIZE = 0x7FF
MSIX_FLAGS_MASKALL = 0x4000
MSIX_FLAGS_ENABLE = 0x8000
MSIX_ENTRY_SIZE = 16


@dataclass
class MsixCap:
    """MSI-X cap: table size and BIR/offsets read-only; enable and function mask writable."""

    config: ConfigSpace
    offset: int
    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @classmethod
    def add(
        cls,
        config: ConfigSpace,
        vectors: int,
        table_bar: int,
        table_offset: int,
        pba_bar: int,
        pba_offset: int,
    ) -> MsixCap:
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        if not (0 <= table_bar <= 5 and 0 <= pba_bar <= 5):
            raise ValueError("MSI-X BIR must be 0..5")
        off = config.add_cap(PCI_CAP_ID_MSIX, 12)
        config.init(
            off + MSIX_FLAGS, 2, vectors - 1, wmask=MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL
        )
        config.init(off + MSIX_TABLE, 4, table_offset | table_bar)
        config.init(off + MSIX_PBA, 4, pba_offset | pba_bar)
        return cls(config, off, vectors, table_bar, table_offset, pba_bar, pba_offset)

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8

    @property
    def control(self) -> int:
        return self.config.peek(self.offset + MSIX_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & MSIX_FLAGS_MASKALL)

    def check_layout(self, bar_sizes: dict[int, int]) -> None:
        """Raise ValueError for what QEMU rejects: table/PBA outside the BAR or overlapping."""
        t0, t1 = self.table_offset, self.table_offset + self.table_size
        p0, p1 = self.pba_offset, self.pba_offset + self.pba_size
        if t1 > bar_sizes.get(self.table_bar, 0):
            raise ValueError("MSI-X table outside its BAR")
        if p1 > bar_sizes.get(self.pba_bar, 0):
            raise ValueError("MSI-X PBA outside its BAR")
        if self.table_bar == self.pba_bar and t0 < p1 and p0 < t1:
            raise ValueError("MSI-X table and PBA overlap")


# ---- PCI Express ----------------------------------------------------------------------------

EXP_FLAGS = 0x02
EXP_DEVCAP = 0x04
EXP_DEVCTL = 0x08
EXP_DEVSTA = 0x0A
EXP_LNKCAP = 0x0C
EXP_LNKCTL = 0x10
EXP_LNKSTA = 0x12
EXP_DEVCAP2 = 0x24
EXP_DEVCTL2 = 0x28
EXP_LNKCAP2 = 0x2C
EXP_LNKCTL2 = 0x30
EXP_LNKSTA2 = 0x32
EXP_CAP_SIZE_V2 = 0x3C

EXP_TYPE_ENDPOINT = 0x0
EXP_TYPE_LEGACY_ENDPOINT = 0x1
EXP_TYPE_RC_INTEGRATED = 0x9

DEVCAP_MPSS_256 = 0x1
DEVCAP_EXT_TAG = 0x20
DEVCAP_RBER = 0x8000
DEVCAP_FLR = 0x10000000

DEVCTL_CERE = 0x1
DEVCTL_NFERE = 0x2
DEVCTL_FERE = 0x4
DEVCTL_URRE = 0x8
DEVCTL_RELAX_EN = 0x10
DEVCTL_PAYLOAD = 0xE0
DEVCTL_EXT_TAG = 0x100
DEVCTL_NOSNOOP_EN = 0x800
DEVCTL_READRQ = 0x7000
DEVCTL_BCR_FLR = 0x8000
DEVCTL_WRITABLE = (
    DEVCTL_CERE
    | DEVCTL_NFERE
    | DEVCTL_FERE
    | DEVCTL_URRE
    | DEVCTL_RELAX_EN
    | DEVCTL_PAYLOAD
    | DEVCTL_EXT_TAG
    | DEVCTL_NOSNOOP_EN
    | DEVCTL_READRQ
    | DEVCTL_BCR_FLR
)
DEVSTA_ERRORS = 0xF  # CED, NFED, FED, URD: write-1-to-clear

LNKCTL_WRITABLE = 0x3 | 0x8 | 0x40 | 0x80  # ASPM, RCB, common clock, extended synch
SPEED_2_5GT = 1
WIDTH_X1 = 1


@dataclass
class PcieCap:
    """PCIe cap v2, endpoint type (QEMU's vfio refuses other port types for a function)."""

    config: ConfigSpace
    offset: int

    @classmethod
    def add(
        cls, config: ConfigSpace, port_type: int = EXP_TYPE_ENDPOINT, flr: bool = True
    ) -> PcieCap:
        if port_type not in (EXP_TYPE_ENDPOINT, EXP_TYPE_LEGACY_ENDPOINT, EXP_TYPE_RC_INTEGRATED):
            raise ValueError("a function's PCIe cap must be an endpoint type")
        off = config.add_cap(PCI_CAP_ID_EXP, EXP_CAP_SIZE_V2)
        config.init(off + EXP_FLAGS, 2, 0x2 | (port_type << 4))
        devcap = DEVCAP_MPSS_256 | DEVCAP_EXT_TAG | DEVCAP_RBER | (DEVCAP_FLR if flr else 0)
        config.init(off + EXP_DEVCAP, 4, devcap)
        # Defaults as after reset: relaxed ordering + no snoop enabled, MPS 128, MRRS 512.
        devctl_wmask = DEVCTL_WRITABLE if flr else DEVCTL_WRITABLE & ~DEVCTL_BCR_FLR
        config.init(
            off + EXP_DEVCTL,
            2,
            DEVCTL_RELAX_EN | DEVCTL_NOSNOOP_EN | (2 << 12),
            wmask=devctl_wmask,
        )
        config.init(off + EXP_DEVSTA, 2, 0, w1cmask=DEVSTA_ERRORS)
        config.init(off + EXP_LNKCAP, 4, SPEED_2_5GT | (WIDTH_X1 << 4))
        config.init(off + EXP_LNKCTL, 2, 0, wmask=LNKCTL_WRITABLE)
        config.init(off + EXP_LNKSTA, 2, SPEED_2_5GT | (WIDTH_X1 << 4))
        config.init(off + EXP_DEVCAP2, 4, 0)
        config.init(off + EXP_DEVCTL2, 2, 0)
        config.init(off + EXP_LNKCAP2, 4, 1 << SPEED_2_5GT)
        config.init(off + EXP_LNKCTL2, 2, SPEED_2_5GT, wmask=0xF)
        config.init(off + EXP_LNKSTA2, 2, 0)
        # FLR leaves link configuration and Max_Payload_Size alone (PCIe base spec 6.6.2).
        config.preserve_on_reset(off + EXP_DEVCTL, 2, DEVCTL_PAYLOAD)
        config.preserve_on_reset(off + EXP_LNKCTL, 2, LNKCTL_WRITABLE)
        config.preserve_on_reset(off + EXP_LNKCTL2, 2, 0xF)
        return cls(config, off)

    @property
    def port_type(self) -> int:
        return (self.config.peek(self.offset + EXP_FLAGS, 2) >> 4) & 0xF

    @property
    def devctl(self) -> int:
        return self.config.peek(self.offset + EXP_DEVCTL, 2)


# ---- SR-IOV (extended) ----------------------------------------------------------------------

SRIOV_CAP = 0x04
SRIOV_CTRL = 0x08
SRIOV_STATUS = 0x0A
SRIOV_INITIAL_VF = 0x0C
SRIOV_TOTAL_VF = 0x0E
SRIOV_NUM_VF = 0x10
SRIOV_FUNC_LINK = 0x12
SRIOV_VF_OFFSET = 0x14
SRIOV_VF_STRIDE = 0x16
SRIOV_VF_DID = 0x1A
SRIOV_SUP_PGSIZE = 0x1C
SRIOV_SYS_PGSIZE = 0x20
SRIOV_BAR = 0x24
SRIOV_CAP_SIZE = 0x40
SRIOV_CTRL_VFE = 0x1
SRIOV_CTRL_MSE = 0x8
SRIOV_CTRL_ARI = 0x10


@dataclass
class SriovCap:
    """SR-IOV extended cap on a PF: VF count/offset/stride, VF device id, VF BAR sizing.

    QEMU drops SR-IOV caps from the guest's view, so this is for the daemon's own PF model;
    the registers still behave (NumVFs, enable bits and VF BARs writable).
    """

    config: ConfigSpace
    offset: int

    @classmethod
    def add(
        cls,
        config: ConfigSpace,
        *,
        total_vfs: int,
        vf_device_id: int,
        vf_offset: int = 1,
        vf_stride: int = 1,
        vf_bars: dict[int, BarSpec] | None = None,
    ) -> SriovCap:
        off = config.add_ext_cap(PCI_EXT_CAP_ID_SRIOV, 1, SRIOV_CAP_SIZE)
        config.init(off + SRIOV_CAP, 4, 0)
        config.init(
            off + SRIOV_CTRL, 2, 0, wmask=SRIOV_CTRL_VFE | SRIOV_CTRL_MSE | SRIOV_CTRL_ARI
        )
        config.init(off + SRIOV_STATUS, 2, 0)
        config.init(off + SRIOV_INITIAL_VF, 2, total_vfs)
        config.init(off + SRIOV_TOTAL_VF, 2, total_vfs)
        config.init(off + SRIOV_NUM_VF, 2, 0, wmask=0xFFFF)
        config.init(off + SRIOV_FUNC_LINK, 2, 0)
        config.init(off + SRIOV_VF_OFFSET, 2, vf_offset)
        config.init(off + SRIOV_VF_STRIDE, 2, vf_stride)
        config.init(off + SRIOV_VF_DID, 2, vf_device_id)
        config.init(off + SRIOV_SUP_PGSIZE, 4, 0x553)  # 4K, 8K, 64K, 256K, 1M, 4M
        config.init(off + SRIOV_SYS_PGSIZE, 4, 0x1, wmask=0x553)
        for index, spec in (vf_bars or {}).items():
            if not 0 <= index <= 5:
                raise ValueError("VF BAR index must be 0..5")
            reg = off + SRIOV_BAR + 4 * index
            config.init(reg, 4, spec.type_bits, wmask=~(spec.size - 1) & 0xFFFFFFF0)
            if spec.kind is BarKind.MEM64:
                config.init(reg + 4, 4, 0, wmask=(~(spec.size - 1) >> 32) & 0xFFFFFFFF)
        return cls(config, off)

    @property
    def num_vfs(self) -> int:
        return self.config.peek(self.offset + SRIOV_NUM_VF, 2)

    @property
    def vf_enabled(self) -> bool:
        return bool(self.config.peek(self.offset + SRIOV_CTRL, 2) & SRIOV_CTRL_VFE)
