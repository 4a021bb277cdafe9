"""VFIO sPAPR container: v1/v2 state machine and the errno of every misuse."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
from spapr_helpers import MEM, make_phb

from vfiod import spapr
from vfiod.spapr import VFIO_SPAPR_TCE_IOMMU as V1
from vfiod.spapr import VFIO_SPAPR_TCE_v2_IOMMU as V2

P = 1 << 16
GiB = 1 << 30
DMA64 = 0x0800000000000000


def err(code: int, fn: Callable[[], object]) -> None:
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno == code, e.value


def v2_setup(phb: spapr.Phb | None = None) -> tuple[spapr.Phb, spapr.Pe, spapr.Container]:
    phb = phb or make_phb()
    pe = phb.new_pe()
    c = spapr.Container(V2, spapr.Client())
    c.attach_group(pe.group)
    return phb, pe, c


def test_types_and_extensions() -> None:
    err(errno.EINVAL, lambda: spapr.Container(spapr.VFIO_TYPE1_IOMMU))
    c = spapr.Container(V2)
    assert [c.check_extension(n) for n in (1, 2, 5, 7, 99)] == [0, 1, 1, 1, 0]
    assert spapr.Container(V1, eeh=False).check_extension(spapr.VFIO_EEH) == 0
    assert spapr.VFIO_IOMMU_MAP_DMA == 0x20003B71 and spapr.VFIO_EEH_PE_OP == 0x20003B79


def test_get_info() -> None:
    c = spapr.Container(V2)
    err(errno.ENXIO, c.get_info)
    phb, pe, c = v2_setup()
    err(errno.EINVAL, lambda: c.get_info(argsz=12))
    info = c.get_info()
    assert (info.flags, info.dma32_window_start, info.dma32_window_size) == (1, 0, 2 * GiB)
    assert (info.pgsizes, info.max_dynamic_windows_supported, info.levels) == (0x1211000, 2, 5)
    assert len(info.to_bytes()) == 32 and len(c.get_info(argsz=16).to_bytes()) == 16
    c1 = spapr.Container(V1)
    c1.attach_group(phb.new_pe().group)
    assert c1.get_info().flags == 0 and c1.get_info().pgsizes == 0


def test_attach_rules() -> None:
    phb = make_phb()
    a, b = phb.new_pe(), phb.new_pe()
    c1 = spapr.Container(V1)
    c1.attach_group(a.group)
    err(errno.EBUSY, lambda: c1.attach_group(b.group))  # one group per v1 container
    err(errno.EBUSY, lambda: c1.attach_group(a.group))  # same group again
    c2 = spapr.Container(V2)
    err(errno.EBUSY, lambda: c2.attach_group(a.group))  # owned elsewhere
    nodd = spapr.Phb(ddw=False)
    err(errno.EINVAL, lambda: c2.attach_group(nodd.new_pe().group))  # v2 needs DDW
    other = spapr.Phb(index=1)
    other.model = "phb4"  # type: ignore[misc]
    c2.attach_group(b.group)
    err(errno.EPERM, lambda: c2.attach_group(other.new_pe().group))
    gone = phb.new_pe()
    phb.remove_pe(gone)
    err(errno.ENODEV, lambda: c2.attach_group(gone.group))
    err(errno.EBUSY, lambda: phb.remove_pe(b))


def test_v2_shares_tables_across_groups() -> None:
    phb = make_phb()
    a, b = phb.new_pe(), phb.new_pe()
    c = spapr.Container(V2)
    c.attach_group(a.group)
    assert c.def_window_pending and a.active_windows() == 0  # ownership taken
    c.register_memory(MEM, 1 << 24)
    start = c.create_window(16, 4 * GiB, 1)
    assert start == DMA64 and not c.def_window_pending  # pending default took slot 0
    assert c.windows[0] is not None and c.windows[1] is not None
    assert c.windows[1].bus_offset == DMA64 and c.windows[0].page_shift == 12
    c.attach_group(b.group)  # later group receives existing windows
    assert b.windows == a.windows == c.windows
    c.map_dma(MEM, DMA64, 1 << 20, spapr.VFIO_DMA_MAP_FLAG_READ)
    assert phb.h_get_tce(b.liobn(1), DMA64) == (0, MEM | spapr.TCE_READ)
    c.detach_group(b.group)
    assert b.active_windows() == 1 and b.windows[0] is not None and b.windows[0].default
    err(errno.EINVAL, lambda: c.detach_group(b.group))


def test_v2_create_remove_errors() -> None:
    c = spapr.Container(V2)
    err(errno.ENXIO, lambda: c.create_window(16, GiB))
    err(errno.ENXIO, lambda: c.remove_window(0))
    phb, pe, c = v2_setup()
    err(errno.ENOTTY, c.enable)
    err(errno.ENOTTY, c.disable)
    err(errno.EINVAL, lambda: c.create_window(16, GiB, flags=1))
    c.remove_window(0)  # drops the pending default window
    assert not c.def_window_pending and c.windows == [None, None]
    err(errno.EINVAL, lambda: c.create_window(13, GiB))  # page size unsupported
    err(errno.EINVAL, lambda: c.create_window(16, 3 * GiB))  # not a power of two
    err(errno.EINVAL, lambda: c.create_window(16, GiB, 0))  # levels 0
    err(errno.EINVAL, lambda: c.create_window(16, GiB, 6))  # levels > 5
    err(errno.EINVAL, lambda: c.create_window(12, 1 << 63, 1))  # address bits >= 55
    assert c.create_window(12, GiB) == 0
    assert c.create_window(24, 1 << 40, 2) == DMA64
    err(errno.ENOSPC, lambda: c.create_window(16, GiB))
    err(errno.EINVAL, lambda: c.remove_window(0x4000_0000))  # no window there
    c.remove_window(DMA64 + 0x1000)  # any address inside names the window
    assert c.windows[1] is None and pe.windows[1] is None
    other = spapr.Client()
    err(errno.EPERM, lambda: c.create_window(16, GiB, caller=other))


def test_v2_register_rules() -> None:
    phb, pe, c = v2_setup()
    err(errno.EPERM, lambda: c.unregister_memory(MEM, P))  # nothing bound yet
    err(errno.EINVAL, lambda: c.register_memory(MEM, P, flags=1))
    err(errno.EINVAL, lambda: c.register_memory(MEM + 0x1000, P))
    err(errno.EINVAL, lambda: c.register_memory(MEM, 0x1000))
    err(errno.EINVAL, lambda: c.register_memory((1 << 64) - P, 2 * P))  # wraps
    c.register_memory(MEM, 1 << 20)
    err(errno.EBUSY, lambda: c.register_memory(MEM, 1 << 20))
    err(errno.EINVAL, lambda: c.register_memory(MEM + P, 1 << 20))  # overlaps another
    err(errno.ENOENT, lambda: c.unregister_memory(MEM, 2 << 20))
    err(errno.EINVAL, lambda: c.unregister_memory(MEM, 1 << 20, flags=1))
    err(errno.EINVAL, lambda: c.unregister_memory(MEM + 1, 1 << 20))
    err(errno.EPERM, lambda: c.register_memory(MEM, P, caller=spapr.Client()))
    c2 = spapr.Container(V2, c.client)
    err(errno.EPERM, lambda: c2.unregister_memory(MEM, 1 << 20))  # c2 has no mm yet
    c2.register_memory(MEM + (4 << 20), P)
    err(errno.ENOENT, lambda: c2.unregister_memory(MEM, 1 << 20))  # not referenced by c2
    err(errno.ENOTTY, lambda: spapr.Container(V1).register_memory(MEM, P))
    err(errno.ENOTTY, lambda: spapr.Container(V1).create_window(16, GiB))


def test_register_pin_check_and_region_page_size() -> None:
    mem = spapr.HostMemory()
    mem.add(0, 1 << 20, bytearray(1 << 20), page_shift=16)
    client = spapr.Client(memory=mem)
    phb = make_phb()
    c = spapr.Container(V2, client)
    c.attach_group(phb.new_pe().group)
    err(errno.EFAULT, lambda: c.register_memory(1 << 20, 1 << 20))  # not backed
    c.register_memory(0, 1 << 20)
    assert client.regions[(0, 1 << 20)].page_shift == 16
    c.remove_window(0)
    c.create_window(24, GiB)
    c.create_window(16, GiB)  # slot 1 at 2^59, 64K pages
    err(errno.EINVAL, lambda: c.map_dma(0, 0, 1 << 24, 3))  # 16M IOMMU page > 64K backing
    c.map_dma(0, DMA64, 1 << 20, 3)


def test_map_unmap_errors_v2() -> None:
    phb, pe, c = v2_setup()
    err(errno.EPERM, lambda: c.map_dma(MEM, 0, 0x1000, 3))  # not enabled (no REGISTER)
    err(errno.EPERM, lambda: c.unmap_dma(0, 0x1000))
    c.register_memory(MEM, 1 << 22)
    err(errno.EINVAL, lambda: c.map_dma(MEM, 0, 0x1000, 4))  # unknown flag
    err(errno.ENXIO, lambda: c.map_dma(MEM, 0x9000_0000, 0x1000, 3))  # in no window
    err(errno.EINVAL, lambda: c.map_dma(MEM, 0, 0x1800, 3))  # size not page multiple
    err(errno.EINVAL, lambda: c.map_dma(MEM + 0x800, 0, 0x1000, 3))  # vaddr
    err(errno.EINVAL, lambda: c.map_dma(MEM, 0, 0x1000, 0))  # neither R nor W
    err(errno.EINVAL, lambda: c.map_dma(MEM, 0x800, 0x1000, 3))  # misaligned iova (kernel: 1)
    err(errno.EINVAL, lambda: c.map_dma(MEM, (2 << 30) - 0x1000, 0x2000, 3))  # crosses end
    err(errno.EINVAL, lambda: c.map_dma(0x2000_0000, 0, 0x1000, 3))  # not preregistered
    c.map_dma(MEM, 0x10000, 0x3000, spapr.VFIO_DMA_MAP_FLAG_WRITE)
    assert phb.h_get_tce(pe.liobn(0), 0x10000)[1] == MEM | 3  # W promoted to R|W
    c.map_dma(MEM + 0x8000, 0x10000, 0x1000, 1)  # replaces, no EEXIST
    assert phb.h_get_tce(pe.liobn(0), 0x10000)[1] == MEM + 0x8000 | 1
    err(errno.EINVAL, lambda: c.unmap_dma(0x10000, 0x1000, flags=1))
    err(errno.ENXIO, lambda: c.unmap_dma(0x9000_0000, 0x1000))
    err(errno.EINVAL, lambda: c.unmap_dma(0x10000, 0x800))
    err(errno.EINVAL, lambda: c.unmap_dma(0x10800, 0x1000))
    err(errno.EINVAL, lambda: c.unmap_dma((2 << 30) - 0x1000, 0x2000))
    c.unmap_dma(0x10000, 0x3000)
    c.unmap_dma(0x100000, 0x1000)  # never mapped: fine
    assert phb.h_get_tce(pe.liobn(0), 0x10000)[1] == 0
    err(errno.EPERM, lambda: c.map_dma(MEM, 0, 0x1000, 3, caller=spapr.Client()))


def test_v1_enable_and_map() -> None:
    mem = spapr.HostMemory()
    mem.add(MEM, 1 << 20, bytearray(1 << 20))
    client = spapr.Client(memory=mem)
    phb = make_phb()
    c = spapr.Container(V1, client)
    err(errno.ENODEV, c.enable)
    err(errno.ENOTTY, lambda: c.unregister_memory(0, P))
    pe = phb.new_pe()
    c.attach_group(pe.group)
    err(errno.EPERM, lambda: c.map_dma(MEM, 0, 0x1000, 3))  # not enabled
    c.enable()
    assert client.locked_bytes == 2 * GiB
    err(errno.EBUSY, c.enable)
    err(errno.EFAULT, lambda: c.map_dma(0x9000_0000, 0, 0x1000, 3))  # cannot pin
    c.map_dma(MEM, 0x4000, 0x2000, 3)  # creates the pending default window
    assert not c.def_window_pending
    assert phb.h_get_tce(pe.liobn(0), 0x5000)[1] == MEM + 0x1000 | 3
    table = spapr.get_table_size(12, 2 * GiB, 1)
    assert client.locked_bytes == 2 * GiB + table
    c.disable()
    c.disable()  # always fine
    assert client.locked_bytes == table
    c.close()
    assert client.locked_bytes == 0 and pe.container is None


def test_v1_enable_eperm_without_32bit_window() -> None:
    phb = make_phb(dma32_size=0)
    c = spapr.Container(V1)
    c.attach_group(phb.new_pe().group)
    err(errno.EPERM, c.enable)


def test_eeh_pe_op_errors() -> None:
    c = spapr.Container(V2)
    err(errno.ENODEV, lambda: c.eeh_pe_op(spapr.VFIO_EEH_PE_GET_STATE))
    phb, pe, c = v2_setup()
    err(errno.EINVAL, lambda: c.eeh_pe_op(42))
    err(errno.EINVAL, lambda: c.eeh_pe_op(spapr.VFIO_EEH_PE_INJECT_ERR, err_type=2))
    err(errno.EINVAL, lambda: c.eeh_pe_op(spapr.VFIO_EEH_PE_INJECT_ERR, func=20))
    noinj = make_phb(eeh_inject=False)
    _, _, c2 = v2_setup(noinj)
    err(errno.ENOENT, lambda: c2.eeh_pe_op(spapr.VFIO_EEH_PE_INJECT_ERR, func=3))
    noeeh = make_phb(eeh=False)
    _, _, c3 = v2_setup(noeeh)
    err(errno.EIO, lambda: c3.eeh_pe_op(spapr.VFIO_EEH_PE_ENABLE))
    err(errno.ENOENT, lambda: c3.eeh_pe_op(spapr.VFIO_EEH_PE_GET_STATE))
    assert c3.eeh_pe_op(spapr.VFIO_EEH_PE_DISABLE) == 0
