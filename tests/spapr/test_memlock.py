"""Locked-memory accounting: v1 per container, v2 once per client, tables, the limit."""

from __future__ import annotations

import errno

import pytest
from spapr_helpers import MEM, make_phb

from vfiod import spapr
from vfiod.spapr import VFIO_SPAPR_TCE_IOMMU as V1
from vfiod.spapr import VFIO_SPAPR_TCE_v2_IOMMU as V2

MiB, GiB = 1 << 20, 1 << 30


def test_seed_example_formulas() -> None:
    # 4 GiB guest, 3 IOMMU groups, each with the 2 GiB 32-bit window and a 4 GiB DDW
    assert spapr.per_container_estimate(3, [2 * GiB, 4 * GiB]) == 18 * GiB
    # preregistration with QEMU's windows: 1 GiB@4K default + 4 GiB DDW@64K host pages
    total = spapr.prereg_estimate(4 * GiB, 3, [(12, GiB, 1), (16, 4 * GiB, 1)])
    assert total == 4 * GiB + 15 * MiB
    assert spapr.v1_estimate(3, 2 * GiB) == 6 * GiB


def test_seed_example_live_v2_prereg() -> None:
    """Three containers of one client register the same 4 GiB: charged once, plus tables."""
    phb = make_phb(dma32_size=GiB)  # QEMU's 1 GiB default window
    client = spapr.Client()
    containers = []
    for _ in range(3):
        c = spapr.Container(V2, client)
        c.attach_group(phb.new_pe().group)
        c.register_memory(0, 4 * GiB)
        c.create_window(16, 4 * GiB, 1)  # default window (pending) is created first
        containers.append(c)
    assert client.locked_bytes == 4 * GiB + 15 * MiB  # "about 4 GiB", not 18
    assert len(client.regions) == 1
    for c in containers:
        c.close()
    assert client.locked_bytes == 0 and not client.regions


def test_v1_charges_per_container() -> None:
    phb = make_phb()
    client = spapr.Client()
    cs = [spapr.Container(V1, client) for _ in range(3)]
    for c in cs:
        c.attach_group(phb.new_pe().group)
        c.enable()
    assert client.locked_bytes == 3 * 2 * GiB
    cs[0].disable()
    assert client.locked_bytes == 2 * 2 * GiB


def test_limit_refuses_and_changes_nothing() -> None:
    phb = make_phb()
    client = spapr.Client(memlock_limit=3 * GiB)
    c1 = spapr.Container(V1, client)
    c1.attach_group(phb.new_pe().group)
    c1.enable()
    c2 = spapr.Container(V1, client)
    c2.attach_group(phb.new_pe().group)
    with pytest.raises(OSError) as e:
        c2.enable()
    assert e.value.errno == errno.ENOMEM
    assert client.locked_bytes == 2 * GiB and not c2.enabled
    # v2: registration and table charges are refused the same way
    v2 = spapr.Container(V2, client)
    v2.attach_group(phb.new_pe().group)
    with pytest.raises(OSError) as e:
        v2.register_memory(0, 2 * GiB)
    assert e.value.errno == errno.ENOMEM and not client.regions and not v2.enabled
    v2.register_memory(0, 1 * GiB - (64 << 10) * 64)
    v2.remove_window(0)
    before = client.locked_vm
    with pytest.raises(OSError) as e:
        v2.create_window(12, 1 << 40, 2)  # 2 x 2 GiB of tables
    assert e.value.errno == errno.ENOMEM
    assert client.locked_vm == before and v2.windows == [None, None]
    assert spapr.Client(memlock_limit=0, cap_ipc_lock=True).account(10) is None


def test_tables_charged_and_uncharged() -> None:
    phb = make_phb()
    client = spapr.Client()
    c = spapr.Container(V2, client)
    c.attach_group(phb.new_pe().group)
    c.remove_window(0)
    start = c.create_window(16, 64 * GiB, 2)
    assert client.locked_bytes == 2 * (8 * MiB + 64 * 1024)
    c.remove_window(start)
    assert client.locked_bytes == 0


def test_unregister_busy_while_mapped_and_refcount() -> None:
    phb = make_phb()
    client = spapr.Client()
    a = spapr.Container(V2, client)
    b = spapr.Container(V2, client)
    a.attach_group(phb.new_pe().group)
    b.attach_group(phb.new_pe().group)
    a.register_memory(MEM, 1 << 20)
    b.register_memory(MEM, 1 << 20)  # reference, no new charge
    assert client.locked_bytes == 1 << 20
    a.map_dma(MEM, 0, 0x1000, 3)
    b.unregister_memory(MEM, 1 << 20)  # not the last reference
    with pytest.raises(OSError) as e:
        a.unregister_memory(MEM, 1 << 20)
    assert e.value.errno == errno.EBUSY
    assert (MEM, 1 << 20) in client.regions  # kept (v4.x semantics)
    a.unmap_dma(0, 0x1000)
    a.unregister_memory(MEM, 1 << 20)
    assert not client.regions
    assert client.locked_bytes == spapr.get_table_size(12, 2 * GiB, 1)  # a's default table
