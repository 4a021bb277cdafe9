"""Translation through a PE's windows, faults freezing the PE, and EEH recovery sequences."""

from __future__ import annotations

import pytest
from spapr_helpers import MEM, be_list

from vfiod import spapr
from vfiod.spapr import (
    EEH_PE_STATE_NORMAL,
    EEH_PE_STATE_RESET,
    EEH_PE_STATE_STOPPED_DMA,
    EEH_PE_STATE_STOPPED_IO_DMA,
    EEH_PE_STATE_UNAVAIL,
    TCE_READ,
    TCE_WRITE,
)
from vfiod.spapr import VFIO_EEH_PE_CONFIGURE as CONFIGURE
from vfiod.spapr import VFIO_EEH_PE_ENABLE as ENABLE
from vfiod.spapr import VFIO_EEH_PE_GET_STATE as GET_STATE
from vfiod.spapr import VFIO_EEH_PE_INJECT_ERR as INJECT
from vfiod.spapr import VFIO_EEH_PE_RESET_DEACTIVATE as DEACTIVATE
from vfiod.spapr import VFIO_EEH_PE_RESET_FUNDAMENTAL as FUNDAMENTAL
from vfiod.spapr import VFIO_EEH_PE_RESET_HOT as HOT
from vfiod.spapr import VFIO_EEH_PE_UNFREEZE_DMA as THAW_DMA
from vfiod.spapr import VFIO_EEH_PE_UNFREEZE_IO as THAW_IO


def mapped_pe(phb: spapr.Phb) -> spapr.Pe:
    pe = phb.new_pe()
    l0 = pe.liobn(0)
    # page 0 RW at MEM, page 1 RO at MEM+0x3000, page 2 WO at MEM+0x1000, page 3 invalid
    lst = [MEM | 3, MEM + 0x3000 | TCE_READ, MEM + 0x1000 | TCE_WRITE]
    assert phb.h_put_tce_indirect(l0, 0, be_list(lst), 3) == 0
    return pe


def test_translate_pieces(phb: spapr.Phb) -> None:
    pe = mapped_pe(phb)
    buf, base = phb.memory.lookup(MEM)
    pieces = pe.translate(0xF00, 0x200, False)  # crosses from page 0 to page 1
    assert [(off, ln) for _, off, ln in pieces] == [(base + 0xF00, 0x100), (base + 0x3000, 0x100)]
    pe.dma_write(0x10, b"abc")
    assert bytes(buf[base + 0x10 : base + 0x13]) == b"abc" and pe.dma_read(0x10, 3) == b"abc"
    pe.dma_write(0x2000, b"wo")  # write-only page accepts writes
    assert bytes(buf[base + 0x1000 : base + 0x1002]) == b"wo"
    assert pe.eeh_state == EEH_PE_STATE_NORMAL


@pytest.mark.parametrize(
    "iova,length,write",
    [
        (0x1000, 4, True),  # read-only page written
        (0x2000, 4, False),  # write-only page read
        (0x3000, 4, False),  # invalid TCE
        (0x0FF0, 0x20, True),  # crosses into the read-only page
        (2 << 30, 4, False),  # outside every window
        (0x0800000000000000, 4, False),  # DDW not created
    ],
)
def test_fault_freezes_and_touches_nothing(
    phb: spapr.Phb, iova: int, length: int, write: bool
) -> None:
    pe = mapped_pe(phb)
    buf, base = phb.memory.lookup(MEM)
    before = bytes(buf[base : base + 0x4000])
    with pytest.raises(spapr.DmaFault):
        if write:
            pe.dma_write(iova, b"\x55" * length)
        else:
            pe.dma_read(iova, length)
    assert pe.eeh_state == EEH_PE_STATE_STOPPED_IO_DMA
    assert bytes(buf[base : base + 0x4000]) == before
    # frozen: DMA blocked even where the TCE is good, MMIO reads all-ones, writes dropped
    with pytest.raises(spapr.DmaFault):
        pe.dma_read(0, 4)
    assert pe.mmio_read(4, lambda: b"\0\0\0\0") == b"\xff" * 4
    assert pe.mmio_write(lambda: None) is False


def test_fault_in_sg_list_stops_everything(phb: spapr.Phb) -> None:
    pe = mapped_pe(phb)
    with pytest.raises(spapr.DmaFault) as e:
        pe.translate_sg([(0, 16), (0x3000, 16)], False)
    assert e.value.iova == 0x3000
    assert pe.frozen


def test_unbacked_tce_address_faults() -> None:
    phb = spapr.Phb(qemu_compat=True)  # QEMU stores anything
    pe = phb.new_pe()
    phb.h_put_tce(pe.liobn(0), 0, 0x7000_0000 | 3)
    with pytest.raises(spapr.DmaFault):
        pe.dma_read(0, 8)
    assert pe.eeh_state == EEH_PE_STATE_STOPPED_IO_DMA


def test_fault_is_per_pe(phb: spapr.Phb) -> None:
    a, b = mapped_pe(phb), phb.new_pe()
    phb.h_put_tce(b.liobn(0), 0, MEM | 3)
    with pytest.raises(spapr.DmaFault):
        a.dma_read(0x3000, 1)
    assert b.dma_read(0, 1) == b"\0" and b.eeh_state == EEH_PE_STATE_NORMAL


def test_recovery_sequence(phb: spapr.Phb) -> None:
    pe = mapped_pe(phb)
    resets: list[int] = []
    pe.on_reset(resets.append)
    with pytest.raises(spapr.DmaFault):
        pe.dma_read(0x3000, 1)
    assert pe.eeh_op(GET_STATE) == EEH_PE_STATE_STOPPED_IO_DMA
    assert pe.eeh_op(THAW_IO) == 0
    assert pe.eeh_op(GET_STATE) == EEH_PE_STATE_STOPPED_DMA
    assert pe.mmio_read(2, lambda: b"ok") == b"ok"  # MMIO back, DMA still stopped
    with pytest.raises(spapr.DmaFault):
        pe.dma_read(0, 1)
    assert pe.eeh_op(HOT) == 0
    assert pe.eeh_state == EEH_PE_STATE_RESET
    assert pe.config_read(4, lambda: b"\1\2\3\4") == b"\xff" * 4  # config blocked
    assert pe.eeh_op(DEACTIVATE) == 0
    assert pe.eeh_op(CONFIGURE) == 0
    assert pe.eeh_state == EEH_PE_STATE_NORMAL and resets == [HOT]
    assert pe.dma_read(0, 1) == b"\0"


def test_other_transitions(phb: spapr.Phb) -> None:
    pe = phb.new_pe()
    pe.freeze()
    assert pe.eeh_op(THAW_DMA) == 0
    assert pe.eeh_state == EEH_PE_STATE_UNAVAIL  # MMIO frozen, DMA running: "other"
    assert pe.eeh_op(THAW_IO) == 0 and pe.eeh_state == EEH_PE_STATE_NORMAL
    assert pe.eeh_op(INJECT, err_type=1, func=16, addr=0x1000, mask=~0) == 0
    assert pe.eeh_state == EEH_PE_STATE_STOPPED_IO_DMA and pe.eeh.injected[0].func == 16
    assert pe.eeh_op(ENABLE) == 0 and pe.eeh_state == EEH_PE_STATE_NORMAL  # machine reset
    assert pe.eeh_op(FUNDAMENTAL) == 0 and pe.eeh_state == EEH_PE_STATE_RESET
    assert pe.eeh_op(ENABLE) == 0 and pe.eeh_state == EEH_PE_STATE_RESET  # reset still held
    assert pe.eeh_op(DEACTIVATE) == 0 and pe.eeh_state == EEH_PE_STATE_NORMAL


def test_container_eeh_first_nonzero(phb: spapr.Phb) -> None:
    a, b = phb.new_pe(), phb.new_pe()
    c = spapr.Container(spapr.VFIO_SPAPR_TCE_v2_IOMMU)
    c.attach_group(a.group)
    c.attach_group(b.group)
    assert c.eeh_pe_op(GET_STATE) == 0
    b.freeze()
    assert c.eeh_pe_op(GET_STATE) == EEH_PE_STATE_STOPPED_IO_DMA
    assert c.eeh_pe_op(THAW_IO) == 0 and c.eeh_pe_op(THAW_DMA) == 0
    assert c.eeh_pe_op(GET_STATE) == 0


def test_translation_through_container_windows(phb: spapr.Phb) -> None:
    pe = phb.new_pe()
    c = spapr.Container(spapr.VFIO_SPAPR_TCE_v2_IOMMU)
    c.attach_group(pe.group)
    c.register_memory(MEM, 1 << 20)
    c.remove_window(0)
    start = c.create_window(16, 1 << 32)
    c.map_dma(MEM, start + 0x20000, 0x20000, spapr.VFIO_DMA_MAP_FLAG_READ)
    assert len(pe.translate(start + 0x20000, 0x20000, False)) == 1  # contiguous: one piece
    with pytest.raises(spapr.DmaFault):
        pe.dma_write(start + 0x20000, b"x")  # read-only mapping
    c.close()
    assert pe.windows[0] is not None and pe.windows[0].default
