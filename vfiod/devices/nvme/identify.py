"""Builders for the data structures the controller returns: Identify pages and log pages.

Offsets follow the NVMe 1.4 base specification (Identify Controller figure 247, Identify
Namespace figure 245, log pages section 5.14.1). Everything is little endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vfiod.devices.nvme.constants import (
    ERROR_LOG_ENTRY_SIZE,
    FW_SLOT_LOG_SIZE,
    IDENTIFY_SIZE,
    NIDT_CSI,
    NIDT_NGUID,
    NIDT_UUID,
    NVME_VERSION_1_4,
    SMART_LOG_SIZE,
)


def ascii_field(text: str, size: int) -> bytes:
    """Space-padded ASCII as SN/MN/FR want it (truncated to ``size``)."""
    raw = text.encode("ascii", "replace")[:size]
    return raw + b" " * (size - len(raw))


@dataclass
class ControllerIdentity:
    """The values that go into Identify Controller (all fixed at construction)."""

    vid: int
    ssvid: int
    serial: str
    model: str
    firmware: str
    cntlid: int
    mdts: int
    nn: int
    oncs: int
    vwc: int
    aerl: int
    acl: int
    elpe: int
    wctemp: int
    cctemp: int
    subnqn: str
    frmw: int = 0x03  # slot 1 read-only, one slot
    lpa: int = 0x04  # extended data for Get Log Page (NUMDU, LPO)
    oacs: int = 0  # optional admin commands: OACS_DBBUF with shadow doorbells


def identify_controller(c: ControllerIdentity) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", d, 0, c.vid, c.ssvid)
    d[4:24] = ascii_field(c.serial, 20)
    d[24:64] = ascii_field(c.model, 40)
    d[64:72] = ascii_field(c.firmware, 8)
    d[72] = 6  # RAB: recommended arbitration burst 2^6
    # 73..75 IEEE OUI: none (0); 76 CMIC: single port, single controller, no ANA
    d[77] = c.mdts
    struct.pack_into("<H", d, 78, c.cntlid)
    struct.pack_into("<I", d, 80, NVME_VERSION_1_4)
    # 84 RTD3R, 88 RTD3E: 0 (not reported); 92 OAES: 0; 96 CTRATT: 0
    d[111] = 1  # CNTRLTYPE: I/O controller
    # 256 OACS: no security, format, firmware download, NS management, directives; bit 8
    # (Doorbell Buffer Config) when shadow doorbells are on
    struct.pack_into("<H", d, 256, c.oacs)
    d[258] = c.acl
    d[259] = c.aerl
    d[260] = c.frmw
    d[261] = c.lpa
    d[262] = c.elpe
    d[263] = 0  # NPSS: one power state
    d[264] = 0  # AVSCC
    d[265] = 0  # APSTA: no autonomous power state transitions
    struct.pack_into("<HH", d, 266, c.wctemp, c.cctemp)
    # 320 KAS = 0 (no keep alive timer), HCTMA = 0, SANICAP = 0
    d[512] = 0x66  # SQES: required and maximum 64 bytes
    d[513] = 0x44  # CQES: 16 bytes
    struct.pack_into("<H", d, 514, 0)  # MAXCMD (fabrics only)
    struct.pack_into("<I", d, 516, c.nn)
    struct.pack_into("<H", d, 520, c.oncs)
    struct.pack_into("<H", d, 522, 0)  # FUSES: no fused operations
    d[524] = 0  # FNA: format/secure erase per namespace (no Format supported anyway)
    d[525] = c.vwc
    struct.pack_into("<HH", d, 526, 0, 0)  # AWUN, AWUPF: one logical block
    d[530] = 0  # NVSCC
    d[531] = 0  # NWPC
    struct.pack_into("<H", d, 532, 0)  # ACWU
    struct.pack_into("<I", d, 536, 0)  # SGLS: SGLs not supported (PRPs only)
    struct.pack_into("<I", d, 540, 0)  # MNAN
    nqn = c.subnqn.encode("ascii")[:255]
    d[768 : 768 + len(nqn)] = nqn
    # Power state descriptor 0: 25.00 W max power, entry/exit latency not reported.
    struct.pack_into("<H", d, 2048, 2500)
    return bytes(d)


@dataclass
class NamespaceIdentity:
    nsze: int
    lbaf_index: int
    lba_shifts: tuple[int, ...]
    dlfeat: int
    nguid: bytes
    uuid: bytes


def identify_namespace(n: NamespaceIdentity) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", d, 0, n.nsze, n.nsze, n.nsze)  # NSZE, NCAP, NUSE
    d[24] = 0  # NSFEAT: no thin provisioning reporting, no NAWUN etc.
    d[25] = len(n.lba_shifts) - 1  # NLBAF (0's based)
    d[26] = n.lbaf_index  # FLBAS: format index, metadata not transferred
    d[27] = 0  # MC: no metadata
    d[28] = 0  # DPC: no protection information
    d[29] = 0  # DPS
    d[30] = 0  # NMIC: private namespace
    d[31] = 0  # RESCAP: no reservations
    d[33] = n.dlfeat
    # 99 NSATTR = 0 (not write protected)
    d[104:120] = n.nguid
    # 120 EUI64 = 0 (not reported: we have no IEEE OUI)
    for i, shift in enumerate(n.lba_shifts):
        struct.pack_into("<HBB", d, 128 + 4 * i, 0, shift, 0)  # MS=0, LBADS, RP=best
    return bytes(d)


def active_ns_list(nsids: list[int], after: int) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    out = [n for n in sorted(nsids) if n > after][: IDENTIFY_SIZE // 4]
    for i, nsid in enumerate(out):
        struct.pack_into("<I", d, 4 * i, nsid)
    return bytes(d)


def ns_descriptors(nguid: bytes, uuid: bytes, csi: int = 0) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    pos = 0
    for nidt, nid in ((NIDT_NGUID, nguid), (NIDT_UUID, uuid), (NIDT_CSI, bytes([csi]))):
        struct.pack_into("<BBH", d, pos, nidt, len(nid), 0)
        d[pos + 4 : pos + 4 + len(nid)] = nid
        pos += 4 + len(nid)
    return bytes(d)


@dataclass
class ErrorEntry:
    count: int
    sqid: int
    cid: int
    status: int  # 15-bit status field (SC, SCT, CRD, M, DNR)
    location: int = 0xFFFF  # parameter error location: not reported
    lba: int = 0
    nsid: int = 0


def error_log(entries: list[ErrorEntry], slots: int) -> bytes:
    """Newest first, ``slots`` entries, unused ones zero (error count 0 = invalid entry)."""
    d = bytearray(ERROR_LOG_ENTRY_SIZE * slots)
    for i, e in enumerate(reversed(entries[-slots:])):
        struct.pack_into(
            "<QHHHHQI",
            d,
            i * ERROR_LOG_ENTRY_SIZE,
            e.count,
            e.sqid,
            e.cid,
            e.status << 1,
            e.location,
            e.lba,
            e.nsid,
        )
    return bytes(d)


@dataclass
class SmartCounters:
    bytes_read: int = 0
    bytes_written: int = 0
    read_cmds: int = 0
    write_cmds: int = 0
    busy_minutes: int = 0
    power_cycles: int = 1
    power_on_hours: int = 0
    unsafe_shutdowns: int = 0
    media_errors: int = 0
    error_entries: int = 0


def _u128(value: int) -> bytes:
    return value.to_bytes(16, "little")


def _units(nbytes: int) -> int:
    """Data units: thousands of 512-byte units, rounded up."""
    return (nbytes // 512 + 999) // 1000


def smart_log(c: SmartCounters, critical_warning: int, temperature_k: int) -> bytes:
    d = bytearray(SMART_LOG_SIZE)
    d[0] = critical_warning
    struct.pack_into("<H", d, 1, temperature_k)
    d[3] = 100  # available spare %
    d[4] = 10  # available spare threshold %
    d[5] = 0  # percentage used
    d[32:48] = _u128(_units(c.bytes_read))
    d[48:64] = _u128(_units(c.bytes_written))
    d[64:80] = _u128(c.read_cmds)
    d[80:96] = _u128(c.write_cmds)
    d[96:112] = _u128(c.busy_minutes)
    d[112:128] = _u128(c.power_cycles)
    d[128:144] = _u128(c.power_on_hours)
    d[144:160] = _u128(c.unsafe_shutdowns)
    d[160:176] = _u128(c.media_errors)
    d[176:192] = _u128(c.error_entries)
    struct.pack_into("<H", d, 200, temperature_k)  # temperature sensor 1
    return bytes(d)


def firmware_slot_log(firmware: str) -> bytes:
    d = bytearray(FW_SLOT_LOG_SIZE)
    d[0] = 0x01  # AFI: running slot 1, no pending activation
    d[8:16] = ascii_field(firmware, 8)
    return bytes(d)
