"""Config space: masks, BAR sizing, ROM BAR, capability chains, PM/PCIe registers."""

from __future__ import annotations

import errno
import struct

import pytest

from vfiod.pci import BarKind, BarSpec, ConfigSpace, PciFunction, SriovCap
from vfiod.pci.caps import (
    EXP_DEVCTL,
    EXP_DEVSTA,
    EXP_FLAGS,
    EXP_LNKCTL,
    EXP_LNKSTA,
    PM_PMCSR,
)
from vfiod.pci.constants import (
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_COMMAND_WRITABLE,
    PCI_EXT_CAP_ID_SRIOV,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_DETECTED_PARITY,
    PCI_STATUS_REC_MASTER_ABORT,
    PCI_STATUS_W1C,
)
from vfiod.pci.region import Region


def make_config() -> ConfigSpace:
    cfg = ConfigSpace()
    cfg.init_header(vendor_id=0x7E57, device_id=0x1234, class_code=0xFF0000, revision=3)
    return cfg


def u16(cfg: ConfigSpace, off: int) -> int:
    return int(struct.unpack("<H", cfg.read(off, 2))[0])


def u32(cfg: ConfigSpace, off: int) -> int:
    return int(struct.unpack("<I", cfg.read(off, 4))[0])


def w32(cfg: ConfigSpace, off: int, value: int) -> None:
    cfg.write(off, struct.pack("<I", value))


def w16(cfg: ConfigSpace, off: int, value: int) -> None:
    cfg.write(off, struct.pack("<H", value))


def test_header_fields_and_read_only() -> None:
    cfg = make_config()
    assert u16(cfg, 0) == 0x7E57 and u16(cfg, 2) == 0x1234
    assert cfg.read(0x08, 4) == bytes([3, 0x00, 0x00, 0xFF])
    assert cfg.read(0x0E, 1) == b"\x00"  # header type 0
    assert cfg.read(0x3D, 1) == b"\x01"  # INTA
    for off in (0x00, 0x08, 0x2C, 0x34):
        before = cfg.read(off, 4)
        w32(cfg, off, 0xFFFFFFFF)
        assert cfg.read(off, 4) == before, hex(off)
    cfg.write(0x0E, b"\x80")  # header type (incl. multifunction bit) is read-only
    assert cfg.read(0x0E, 1) == b"\x00"
    w16(cfg, 0x3C, 0xFFFF)  # line writable, pin read-only
    assert cfg.read(0x3C, 2) == b"\xff\x01"


def test_command_register_writable_bits_only() -> None:
    cfg = make_config()
    w16(cfg, 0x04, 0xFFFF)
    assert u16(cfg, 0x04) == PCI_COMMAND_WRITABLE
    w16(cfg, 0x04, 0)
    assert u16(cfg, 0x04) == 0


def test_status_write_one_to_clear() -> None:
    cfg = make_config()
    cfg.add_cap(PCI_CAP_ID_PM, 8)
    cfg.poke(0x06, 2, cfg.peek(0x06, 2) | PCI_STATUS_W1C)
    w16(cfg, 0x06, 0)  # writing 0 changes nothing
    assert u16(cfg, 0x06) & PCI_STATUS_W1C == PCI_STATUS_W1C
    w16(cfg, 0x06, PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_CAP_LIST)
    status = u16(cfg, 0x06)
    assert not status & PCI_STATUS_REC_MASTER_ABORT
    assert status & PCI_STATUS_DETECTED_PARITY
    assert status & PCI_STATUS_CAP_LIST  # read-only bit survives a 1 write
    w16(cfg, 0x06, 0xFFFF)
    assert u16(cfg, 0x06) == PCI_STATUS_CAP_LIST


@pytest.mark.parametrize(
    ("spec", "lower", "upper"),
    [
        (BarSpec(256, BarKind.IO), 0xFFFFFF01, None),
        (BarSpec(0x1000, BarKind.MEM32), 0xFFFFF000, None),
        (BarSpec(0x100000, BarKind.MEM32, prefetchable=True), 0xFFF00008, None),
        (BarSpec(0x10000, BarKind.MEM64, prefetchable=True), 0xFFFF000C, 0xFFFFFFFF),
        (BarSpec(1 << 33, BarKind.MEM64), 0x00000004, 0xFFFFFFFE),
    ],
)
def test_bar_sizing(spec: BarSpec, lower: int, upper: int | None) -> None:
    cfg = make_config()
    cfg.init_bar(2, spec)
    assert u32(cfg, 0x18) == spec.type_bits  # type bits visible before sizing
    w32(cfg, 0x18, 0xFFFFFFFF)
    if upper is not None:
        w32(cfg, 0x1C, 0xFFFFFFFF)
        assert u32(cfg, 0x1C) == upper
    assert u32(cfg, 0x18) == lower
    # Programming an address keeps the type bits read-only.
    w32(cfg, 0x18, 0xE0000000 if spec.kind is not BarKind.IO else 0xC000)
    assert u32(cfg, 0x18) & 0xF == spec.type_bits & 0xF


def test_absent_bar_and_rom_read_zero() -> None:
    cfg = make_config()
    for off in range(0x10, 0x28, 4):
        w32(cfg, off, 0xFFFFFFFF)
        assert u32(cfg, off) == 0
    w32(cfg, 0x30, 0xFFFFF800)
    assert u32(cfg, 0x30) == 0


def test_rom_bar_sizing_when_rom_exists() -> None:
    fn = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
    rom = fn.add_rom(b"\x55\xaa" + bytes(5000))
    assert rom.size == 8192
    fn.region_write(7, 0x30, struct.pack("<I", 0xFFFFF800))
    assert struct.unpack("<I", fn.region_read(7, 0x30, 4))[0] == 0xFFFFE000
    info = fn.region_info(6)
    assert info.size == 8192 and info.flags == 1
    assert fn.region_read(6, 0, 2) == b"\x55\xaa"
    with pytest.raises(OSError) as exc:
        fn.region_write(6, 0, b"x")
    assert exc.value.errno == errno.EINVAL
    fn.close()


def test_bad_bar_specs() -> None:
    with pytest.raises(ValueError):
        BarSpec(3000)
    with pytest.raises(ValueError):
        BarSpec(512, BarKind.IO)
    cfg = make_config()
    with pytest.raises(ValueError):
        cfg.init_bar(5, BarSpec(0x1000, BarKind.MEM64))


def test_access_sizes_and_bounds() -> None:
    cfg = make_config()
    assert len(cfg.read(0, 4096)) == 4096
    assert cfg.read(1, 2) == b"\x7e\x34"
    assert cfg.read(3, 1) == b"\x12"
    assert cfg.read(4095, 1) == b"\x00"
    for off, n in ((4095, 2), (4096, 1), (-1, 1), (0, 4097)):
        with pytest.raises(OSError) as exc:
            cfg.read(off, n)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        cfg.write(4094, b"\0\0\0\0")
    assert exc.value.errno == errno.EINVAL


def test_unaligned_write_spanning_registers() -> None:
    cfg = make_config()
    # 4-byte write at 0x3B covers reserved 0x3B, line (RW), pin (RO), min_gnt (RO).
    cfg.write(0x3B, b"\xff\x42\x07\xff")
    assert cfg.read(0x3B, 4) == b"\x00\x42\x01\x00"


def test_function_cap_chain_is_well_formed() -> None:
    fn = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
    fn.add_bar(0, Region(0x1000), BarSpec(0x1000))
    fn.add_msix(4, 0, 0x800, 0, 0xC00)
    cfg = fn.config
    assert u16(cfg, 0x06) & PCI_STATUS_CAP_LIST
    chain = cfg.walk_caps()
    assert [cid for _, cid in chain] == [PCI_CAP_ID_PM, PCI_CAP_ID_EXP, PCI_CAP_ID_MSIX]
    offsets = [off for off, _ in chain]
    assert all(off % 4 == 0 and 0x40 <= off < 0x100 for off in offsets)
    assert cfg.read(offsets[-1] + 1, 1) == b"\x00"  # chain terminates
    exp = cfg.caps[PCI_CAP_ID_EXP]
    flags = u16(cfg, exp + EXP_FLAGS)
    assert flags & 0xF == 2 and (flags >> 4) & 0xF == 0  # v2, endpoint
    assert u16(cfg, exp + EXP_LNKSTA) & 0x3FF == 0x11
    # No extended caps: 0x100 reads 0 (a valid empty chain).
    assert u32(cfg, 0x100) == 0 and cfg.walk_ext_caps() == []
    # The guest cannot rewrite the chain pointers.
    cfg.write(0x34, b"\x00")
    cfg.write(offsets[0] + 1, b"\x00")
    assert cfg.walk_caps() == chain
    fn.close()


def test_extended_caps_chain_and_sriov() -> None:
    cfg = make_config()
    first = cfg.add_ext_cap(0x0001, 2, 0x48)
    sriov = SriovCap.add(
        cfg, total_vfs=4, vf_device_id=0x5678, vf_bars={0: BarSpec(0x4000, BarKind.MEM64)}
    )
    chain = cfg.walk_ext_caps()
    assert chain == [(first, 0x0001, 2), (sriov.offset, PCI_EXT_CAP_ID_SRIOV, 1)]
    assert first == 0x100 and sriov.offset == 0x148
    assert u32(cfg, 0x100) >> 20 == 0x148
    assert u16(cfg, sriov.offset + 0x0E) == 4 and u16(cfg, sriov.offset + 0x1A) == 0x5678
    w16(cfg, sriov.offset + 0x10, 3)
    w16(cfg, sriov.offset + 0x08, 0x9)
    assert sriov.num_vfs == 3 and sriov.vf_enabled
    w32(cfg, sriov.offset + 0x24, 0xFFFFFFFF)
    assert u32(cfg, sriov.offset + 0x24) == 0xFFFFC004


def test_pm_power_states() -> None:
    fn = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
    assert fn.pm is not None
    pmcsr = fn.pm.offset + PM_PMCSR
    fn.region_write(7, pmcsr, struct.pack("<H", 3))
    assert fn.pm.power_state == 3
    fn.region_write(7, pmcsr, struct.pack("<H", 1))  # D1 unsupported: ignored
    assert fn.pm.power_state == 3
    fn.region_write(7, pmcsr, struct.pack("<H", 0))
    assert fn.pm.power_state == 0
    assert u16(fn.config, pmcsr) & 0x8  # No_Soft_Reset
    fn.region_write(7, pmcsr, struct.pack("<H", 3))
    fn.reset()
    assert fn.pm.power_state == 0
    fn.close()


def test_pcie_devctl_devsta_and_reset_preservation() -> None:
    fn = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
    assert fn.pcie is not None
    exp = fn.pcie.offset
    cfg = fn.config
    w16(cfg, exp + EXP_DEVCTL, 0x7FFF)
    assert u16(cfg, exp + EXP_DEVCTL) == 0x7FFF & 0x79FF
    cfg.poke(exp + EXP_DEVSTA, 2, 0x2F)
    w16(cfg, exp + EXP_DEVSTA, 0x1)
    assert u16(cfg, exp + EXP_DEVSTA) == 0x2E
    w16(cfg, exp + EXP_LNKCTL, 0x40)
    fn.reset()
    devctl = u16(cfg, exp + EXP_DEVCTL)
    assert devctl & 0xE0 == 0xE0  # Max_Payload_Size survives FLR
    assert devctl & 0xF == 0  # error reporting enables do not
    assert u16(cfg, exp + EXP_LNKCTL) == 0x40
    assert u16(cfg, exp + EXP_DEVSTA) == 0
    fn.close()


def test_flr_via_devctl_resets_function() -> None:
    fn = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
    assert fn.pcie is not None
    fn.region_write(7, 0x04, struct.pack("<H", 0x6))
    fn.region_write(7, fn.pcie.offset + EXP_DEVCTL, struct.pack("<H", 0x8000))
    assert u16(fn.config, 0x04) == 0
    assert not u16(fn.config, fn.pcie.offset + EXP_DEVCTL) & 0x8000
    fn.close()


def test_config_reset_restores_defaults() -> None:
    fn = PciFunction(vendor_id=0x7E57, device_id=1, class_code=0xFF0000)
    fn.add_bar(0, Region(0x1000))
    fn.region_write(7, 0x10, struct.pack("<I", 0xFEB00000))
    fn.region_write(7, 0x04, struct.pack("<H", 0x406))
    fn.region_write(7, 0x3C, b"\x0b")
    fn.reset()
    assert u32(fn.config, 0x10) == 0
    assert u16(fn.config, 0x04) == 0
    assert fn.config.read(0x3C, 1) == b"\x00"
    fn.close()
