"""Numbers of the sPAPR platform: PAPR return codes, RTAS status, TCE bits, VFIO and EEH values.

Values are the ones guests, QEMU and the Linux uapi use, so they can cross the wire unchanged.
"""

from __future__ import annotations

import errno

# --- TCE entry bits (PAPR; the rest of the entry is the page-aligned real address) ---
TCE_READ = 0x1  # device may read memory (DMA to device)
TCE_WRITE = 0x2  # device may write memory (DMA from device)
TCE_RW = TCE_READ | TCE_WRITE
TCE_ENTRY_SIZE = 8

# --- PAPR hypercall return codes ---
H_SUCCESS = 0
H_HARDWARE = -1
H_FUNCTION = -2
H_PRIVILEGE = -3
H_PARAMETER = -4
H_NOT_ENOUGH_RESOURCES = -44

# --- hypercall opcodes ---
H_GET_TCE = 0x1C
H_PUT_TCE = 0x20
H_STUFF_TCE = 0x138
H_PUT_TCE_INDIRECT = 0x13C

#: At most this many entries in one H_PUT_TCE_INDIRECT list (one 4 KiB page of u64).
TCE_INDIRECT_MAX = 512
TCE_LIST_ALIGN = 0x1000

# --- RTAS status codes ---
RTAS_SUCCESS = 0
RTAS_HW_ERROR = -1
RTAS_BUSY = -2
RTAS_PARAM_ERROR = -3

# RTAS tokens QEMU advertises for DDW (guests read them from the device tree).
RTAS_IBM_QUERY_PE_DMA_WINDOW = 0x2026
RTAS_IBM_CREATE_PE_DMA_WINDOW = 0x2027
RTAS_IBM_REMOVE_PE_DMA_WINDOW = 0x2028
RTAS_IBM_RESET_PE_DMA_WINDOW = 0x2029

# DDW page-size mask bits returned by ibm,query-pe-dma-window (out of order: 2M was added last).
DDW_PGSIZE_4K = 0x01
DDW_PGSIZE_64K = 0x02
DDW_PGSIZE_16M = 0x04
DDW_PGSIZE_32M = 0x08
DDW_PGSIZE_64M = 0x10
DDW_PGSIZE_128M = 0x20
DDW_PGSIZE_256M = 0x40
DDW_PGSIZE_16G = 0x80
DDW_PGSIZE_2M = 0x100

#: page_shift -> DDW mask bit
DDW_PGSIZE_BITS: dict[int, int] = {
    12: DDW_PGSIZE_4K,
    16: DDW_PGSIZE_64K,
    24: DDW_PGSIZE_16M,
    25: DDW_PGSIZE_32M,
    26: DDW_PGSIZE_64M,
    27: DDW_PGSIZE_128M,
    28: DDW_PGSIZE_256M,
    34: DDW_PGSIZE_16G,
    21: DDW_PGSIZE_2M,
}

#: largest_block QEMU reports: 2^31 TCEs with 5 outputs, 2^37 with the 6-output extension.
DDW_LARGEST_BLOCK_5 = 0x80000000
DDW_LARGEST_BLOCK_6 = 1 << 37

# --- POWER8 PHB3 geometry ---
SPAPR_TCE_PAGE_SHIFT = 12
DMA32_WINDOW_START = 0
DMA32_WINDOW_SIZE = 0x80000000  # PHB3 tce32_size: the 32-bit MMIO window sits at 2-4 GiB
DMA64_WINDOW_START = 0x0800000000000000  # TVE #1, selected by PCI address bit 59
MAX_WINDOWS = 2
MAX_LEVELS = 5
#: IOMMU page shifts supported by default: 4K, 64K, 2M, 16M (QEMU >= 4.2 pgsz).
DEFAULT_PAGE_SHIFTS: tuple[int, ...] = (12, 16, 21, 24)
#: Host (kernel) page size used for locked-memory accounting; 64 KiB on usual ppc64 hosts.
HOST_PAGE_SHIFT = 16
#: Hardware refuses tables that would use TCE address bits >= 55.
TCE_ADDR_BITS_LIMIT = 55

# --- LIOBN numbering ---
LIOBN_PCI_FLAG = 0x80000000
LIOBN_PE_SHIFT = 16  # bits 16..30: PE number (our extension of QEMU's scheme; PE 0 = QEMU)
LIOBN_PE_BITS = 15
LIOBN_INDEX_SHIFT = 8  # bits 8..15: PHB index (as QEMU)
LIOBN_WINDOW_MASK = 0xFF  # bits 0..7: window number (as QEMU)

# --- VFIO ---
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_EEH = 5
VFIO_SPAPR_TCE_v2_IOMMU = 7

VFIO_DMA_MAP_FLAG_READ = 1
VFIO_DMA_MAP_FLAG_WRITE = 2
VFIO_IOMMU_SPAPR_INFO_DDW = 1
VFIO_PCI_CONFIG_REGION_INDEX = 7  # the region index of config space (the rest is MMIO)

_VFIO_TYPE = 0x3B
_VFIO_BASE = 100


def _io_ppc(nr: int) -> int:
    """_IO(';', nr) on powerpc: _IOC_NONE is 1 and sits at bit 29."""
    return 0x20000000 | (_VFIO_TYPE << 8) | nr


VFIO_CHECK_EXTENSION = _io_ppc(_VFIO_BASE + 1)
VFIO_SET_IOMMU = _io_ppc(_VFIO_BASE + 2)
VFIO_IOMMU_SPAPR_TCE_GET_INFO = _io_ppc(_VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _io_ppc(_VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _io_ppc(_VFIO_BASE + 14)
VFIO_IOMMU_ENABLE = _io_ppc(_VFIO_BASE + 15)
VFIO_IOMMU_DISABLE = _io_ppc(_VFIO_BASE + 16)
VFIO_IOMMU_SPAPR_REGISTER_MEMORY = _io_ppc(_VFIO_BASE + 17)
VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY = _io_ppc(_VFIO_BASE + 18)
VFIO_IOMMU_SPAPR_TCE_CREATE = _io_ppc(_VFIO_BASE + 19)
VFIO_IOMMU_SPAPR_TCE_REMOVE = _io_ppc(_VFIO_BASE + 20)
VFIO_EEH_PE_OP = _io_ppc(_VFIO_BASE + 21)

# --- EEH (VFIO_EEH_PE_OP ops) ---
VFIO_EEH_PE_DISABLE = 0
VFIO_EEH_PE_ENABLE = 1
VFIO_EEH_PE_UNFREEZE_IO = 2
VFIO_EEH_PE_UNFREEZE_DMA = 3
VFIO_EEH_PE_GET_STATE = 4
VFIO_EEH_PE_RESET_DEACTIVATE = 5
VFIO_EEH_PE_RESET_HOT = 6
VFIO_EEH_PE_RESET_FUNDAMENTAL = 7
VFIO_EEH_PE_CONFIGURE = 8
VFIO_EEH_PE_INJECT_ERR = 9

# EEH PE states (GET_STATE result, = RTAS ibm,read-slot-reset-state2)
EEH_PE_STATE_NORMAL = 0
EEH_PE_STATE_RESET = 1
EEH_PE_STATE_STOPPED_IO_DMA = 2
EEH_PE_STATE_STOPPED_DMA = 4
EEH_PE_STATE_UNAVAIL = 5

# EEH error injection
EEH_ERR_TYPE_32 = 0
EEH_ERR_TYPE_64 = 1
EEH_ERR_FUNC_MAX = 19

#: errno values the container uses (re-exported for convenience)
EINVAL = errno.EINVAL
EBUSY = errno.EBUSY
ENXIO = errno.ENXIO
ENOSPC = errno.ENOSPC
EPERM = errno.EPERM
ENOMEM = errno.ENOMEM
ENOENT = errno.ENOENT
ENOTTY = errno.ENOTTY
ENODEV = errno.ENODEV
EFAULT = errno.EFAULT
EIO = errno.EIO

U64_MASK = (1 << 64) - 1
