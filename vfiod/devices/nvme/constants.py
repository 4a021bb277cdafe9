"""NVMe 1.4 numbers used by the controller: registers, opcodes, status codes, features, logs."""

from __future__ import annotations

# ---- PCI identity ------------------------------------------------------------------------------

#: PCI class: mass storage (01h), non-volatile memory (08h), NVM Express I/O controller (02h).
NVME_CLASS_CODE = 0x010802

# ---- BAR0 layout -------------------------------------------------------------------------------

BAR0_SIZE = 0x4000
REGS_SIZE = 0x1000
DOORBELL_BASE = 0x1000
DOORBELL_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x2000
MSIX_PBA_OFFSET = 0x3000

# ---- controller registers ----------------------------------------------------------------------

REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
REG_CMBLOC = 0x38
REG_CMBSZ = 0x3C

NVME_VERSION_1_4 = 0x00010400

CC_EN = 0x1
CC_CSS_SHIFT = 4
CC_CSS_MASK = 0x7
CC_MPS_SHIFT = 7
CC_MPS_MASK = 0xF
CC_AMS_SHIFT = 11
CC_SHN_SHIFT = 14
CC_SHN_MASK = 0x3
CC_IOSQES_SHIFT = 16
CC_IOCQES_SHIFT = 20
CC_WRITABLE = 0x00FFFFF1  # EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES

CSS_NVM = 0
CSS_ADMIN_ONLY = 7

CSTS_RDY = 0x1
CSTS_CFS = 0x2
CSTS_SHST_SHIFT = 2
CSTS_SHST_MASK = 0x3 << CSTS_SHST_SHIFT
CSTS_SHST_OCCURRING = 0x1 << CSTS_SHST_SHIFT
CSTS_SHST_COMPLETE = 0x2 << CSTS_SHST_SHIFT
CSTS_NSSRO = 0x10

NSSR_MAGIC = 0x4E564D65  # "NVMe"

SQ_ENTRY_SIZE = 64
CQ_ENTRY_SIZE = 16
SQES_LOG2 = 6
CQES_LOG2 = 4

# ---- opcodes -----------------------------------------------------------------------------------

ADM_DELETE_SQ = 0x00
ADM_CREATE_SQ = 0x01
ADM_GET_LOG_PAGE = 0x02
ADM_DELETE_CQ = 0x04
ADM_CREATE_CQ = 0x05
ADM_IDENTIFY = 0x06
ADM_ABORT = 0x08
ADM_SET_FEATURES = 0x09
ADM_GET_FEATURES = 0x0A
ADM_ASYNC_EVENT = 0x0C
ADM_KEEP_ALIVE = 0x18
ADM_DBBUF_CONFIG = 0x7C

IO_FLUSH = 0x00
IO_WRITE = 0x01
IO_READ = 0x02
IO_WRITE_ZEROES = 0x08
IO_DSM = 0x09

# ---- status: (SCT << 8) | SC -------------------------------------------------------------------

SC_SUCCESS = 0x000
SC_INVALID_OPCODE = 0x001
SC_INVALID_FIELD = 0x002
SC_DATA_TRANSFER_ERROR = 0x004
SC_INTERNAL = 0x006
SC_ABORT_REQUESTED = 0x007
SC_SQ_DELETION = 0x008
SC_INVALID_NS = 0x00B
SC_CMD_SEQ_ERROR = 0x00C
SC_INVALID_PRP_OFFSET = 0x013
SC_LBA_RANGE = 0x080
SC_CAP_EXCEEDED = 0x081

SC_CQ_INVALID = 0x100
SC_INVALID_QID = 0x101
SC_INVALID_QSIZE = 0x102
SC_ABORT_LIMIT = 0x103
SC_AER_LIMIT = 0x105
SC_INVALID_VECTOR = 0x108
SC_INVALID_LOG_PAGE = 0x109
SC_INVALID_QUEUE_DELETION = 0x10C
SC_FEAT_NOT_SAVEABLE = 0x10D
SC_FEAT_NOT_CHANGEABLE = 0x10E

SC_WRITE_FAULT = 0x280
SC_UNRECOVERED_READ = 0x281

STATUS_DNR = 1 << 14  # in the 15-bit status field (bits 31:17 of CQE dword 3)

# ---- features ----------------------------------------------------------------------------------

FEAT_ARBITRATION = 0x01
FEAT_POWER_MGMT = 0x02
FEAT_TEMP_THRESHOLD = 0x04
FEAT_ERROR_RECOVERY = 0x05
FEAT_VOLATILE_WC = 0x06
FEAT_NUM_QUEUES = 0x07
FEAT_IRQ_COALESCE = 0x08
FEAT_IRQ_CONFIG = 0x09
FEAT_WRITE_ATOMIC = 0x0A
FEAT_ASYNC_EVENT = 0x0B
FEAT_TIMESTAMP = 0x0E

SEL_CURRENT = 0
SEL_DEFAULT = 1
SEL_SAVED = 2
SEL_SUPPORTED = 3

FEAT_CAP_SAVEABLE = 0x1
FEAT_CAP_NS_SPECIFIC = 0x2
FEAT_CAP_CHANGEABLE = 0x4

# ---- log pages ---------------------------------------------------------------------------------

LOG_ERROR = 0x01
LOG_SMART = 0x02
LOG_FW_SLOT = 0x03

ERROR_LOG_ENTRY_SIZE = 64
SMART_LOG_SIZE = 512
FW_SLOT_LOG_SIZE = 512

# ---- asynchronous events -----------------------------------------------------------------------

AER_TYPE_ERROR = 0x0
AER_TYPE_SMART = 0x1
AER_TYPE_NOTICE = 0x2
AER_SMART_TEMPERATURE = 0x01
AEC_SMART_TEMPERATURE = 0x02  # Asynchronous Event Configuration bit for temperature warnings

# ---- identify ----------------------------------------------------------------------------------

CNS_NAMESPACE = 0x00
CNS_CONTROLLER = 0x01
CNS_ACTIVE_NS_LIST = 0x02
CNS_NS_DESCRIPTORS = 0x03
IDENTIFY_SIZE = 4096

NSID_ALL = 0xFFFFFFFF

OACS_DBBUF = 1 << 8  # Doorbell Buffer Config (shadow doorbells and EventIdx)

ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
ONCS_TIMESTAMP = 1 << 6

NIDT_EUI64 = 1
NIDT_NGUID = 2
NIDT_UUID = 3
NIDT_CSI = 4
