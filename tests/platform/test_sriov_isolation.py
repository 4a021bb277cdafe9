"""SR-IOV at run time and isolation between VFs, through the whole path: control plane,
vfio-user sockets, PE/TCE translation, the test device's DMA engine, EEH freeze and thaw."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from vfiod import client, config
from vfiod.client import VfioUserError, from_little, little
from vfiod.control.api import ControlError
from vfiod.daemon import Daemon
from vfiod.devices import testdev as td
from vfiod.host import control_socket_path

MiB = 1 << 20
EEH_STOPPED = 2


def pf_config(tmp_path: Path, totalvfs: int = 4, numvfs: int = 0,
              dma_fault: str = "freeze") -> config.Config:  # fmt: skip
    parsed = config.parse(
        f'[[phb]]\nindex = 0\nwindow_policy = "flat"\ndma_fault = "{dma_fault}"\n'
        f'[[function]]\nname = "pf0"\npersonality = "testdev"\ntotalvfs = {totalvfs}\n'
        f"numvfs = {numvfs}\n",
        "test",
    )
    return config.Config(tmp_path, parsed.functions, phbs=parsed.phbs, memlock_limit=1 << 30)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(pf_config(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        yield d
        nursery.cancel_scope.cancel()


async def ctl(d: Daemon, *args: str) -> tuple[int, str, str]:
    """Run vfiodctl against the daemon's control socket (in a thread: it is synchronous)."""
    import io

    from vfiod.control.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = ["--socket", str(control_socket_path(d.config)), *args]
    rc = await trio.to_thread.run_sync(lambda: main(argv, stdout=out, stderr=err))
    return rc, out.getvalue(), err.getvalue()


async def program_dma(dev: client.Client, cmd: int, src: int, dst: int, length: int) -> int:
    for reg, value, size in [(td.REG_DMA_STATUS, 0x7, 4), (td.REG_DMA_SRC, src, 8),
                             (td.REG_DMA_DST, dst, 8), (td.REG_DMA_LEN, length, 4),
                             (td.REG_DMA_PATTERN, 0xA5, 4), (td.REG_DMA_CMD, cmd, 4)]:
        await dev.region_write(td.REGS_BAR, reg, little(value, size))
    return from_little(await dev.region_read(td.REGS_BAR, td.REG_DMA_STATUS, 4))


async def bus_master(dev: client.Client) -> None:
    cmd = from_little(await dev.config_read(0x04, 2))
    await dev.config_write(0x04, little(cmd | 0x6, 2))


async def test_numvfs_creates_and_removes_vf_functions(daemon: Daemon) -> None:
    rc, out, _ = await ctl(daemon, "set-numvfs", "pf0", "3")
    assert rc == 0, out
    inv = daemon.host.inventory()
    vfs = [f for f in inv["functions"] if f["kind"] == "vf"]
    assert [v["name"] for v in vfs] == ["pf0-vf0", "pf0-vf1", "pf0-vf2"]
    assert len({v["pe"] for v in vfs}) == 3 and len({v["group"] for v in vfs}) == 3
    assert len({v["rid"] for v in vfs}) == 3
    pf = next(f for f in inv["functions"] if f["name"] == "pf0")
    assert pf["numvfs"] == 3 and pf["totalvfs"] == 4 and pf["pe"] not in {v["pe"] for v in vfs}
    for v in vfs:
        async with client.connect(v["socket"]) as dev:
            assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
    # the PF's own SR-IOV capability shows NumVFs and VF Enable
    assert daemon.host.slot("pf0").sriov.num_vfs == 3  # type: ignore[union-attr]
    rc, _, _ = await ctl(daemon, "set-numvfs", "pf0", "0")
    assert rc == 0
    assert [s.name for s in daemon.host.slots] == ["pf0"]
    assert not any(Path(v["socket"]).exists() for v in vfs)
    assert len(daemon.host.phbs[0].phb.pes) == 1


async def test_numvfs_refusals(daemon: Daemon) -> None:
    rc, _, err = await ctl(daemon, "set-numvfs", "pf0", "5")
    assert rc == 1 and "EINVAL" in err
    await daemon.host.set_numvfs("pf0", 2)
    vf = daemon.host.slot("pf0-vf1")
    async with client.connect(vf.endpoint.path):
        with pytest.raises(ControlError) as info:
            await daemon.host.set_numvfs("pf0", 1)
        assert info.value.code == "EBUSY"
        rc, _, err = await ctl(daemon, "set-numvfs", "pf0", "0")
        assert rc == 1 and "EBUSY" in err
    with trio.fail_after(5):
        while vf.endpoint.session is not None:
            await trio.sleep(0.01)
    await daemon.host.set_numvfs("pf0", 0)


async def test_two_clients_on_two_vfs_are_isolated(daemon: Daemon) -> None:
    await daemon.host.set_numvfs("pf0", 2)
    a_slot, b_slot = daemon.host.slot("pf0-vf0"), daemon.host.slot("pf0-vf1")
    iova = 0x4000_0000
    async with client.connect(a_slot.endpoint.path) as a, \
            client.connect(b_slot.endpoint.path) as b:
        ram_a, ram_b = a.guest_memory(2 * MiB), b.guest_memory(2 * MiB)
        ram_a.write(0, b"A" * 4096)
        ram_b.write(0, b"B" * 4096)
        # the same IOVA in both PEs, each mapping its own client's RAM; B's second MiB read-only
        await a.dma_map_memory(ram_a, iova)
        await b.dma_map_memory(ram_b, iova, size=MiB)
        await b.dma_map_memory(ram_b, iova + MiB, offset=MiB, flags=1)
        await bus_master(a)
        await bus_master(b)

        async def copy_loop(dev: client.Client, ram: client.GuestMemory, tag: bytes) -> None:
            for i in range(20):
                dst = iova + 0x10000 + i * 0x1000
                status = await program_dma(dev, td.CMD_HOST_TO_HOST, iova, dst, 4096)
                assert status == td.STATUS_DONE
                assert ram.read(0x10000 + i * 0x1000, 4096) == tag * 4096

        async with trio.open_nursery() as nursery:  # both clients' I/O at the same time
            nursery.start_soon(copy_loop, a, ram_a, b"A")
            nursery.start_soon(copy_loop, b, ram_b, b"B")

        # B writes into its read-only mapping: a fault that freezes only B's PE
        snapshot_a, snapshot_b = ram_a.read(0, 2 * MiB), ram_b.read(0, 2 * MiB)
        status = await program_dma(b, td.CMD_FILL, 0, iova + MiB, 64)
        assert status & td.STATUS_FAULT
        assert b_slot.pe.eeh_state == EEH_STOPPED and a_slot.pe.eeh_state == 0
        assert await b.region_read(td.REGS_BAR, td.REG_ID, 4) == b"\xff" * 4  # MMIO frozen
        # A is unaffected and keeps working
        assert await program_dma(a, td.CMD_FILL, 0, iova + 0x100000, 64) == td.STATUS_DONE
        snapshot_a = snapshot_a[:0x100000] + b"\xa5" * 64 + snapshot_a[0x100040:]
        # A DMA to an IOVA that only B mapped means nothing in A's PE
        status = await program_dma(a, td.CMD_FILL, 0, iova + 2 * MiB, 64)
        assert status & td.STATUS_FAULT and a_slot.pe.eeh_state == EEH_STOPPED
        # nothing was written anywhere by the faulting DMAs, byte for byte
        assert ram_a.read(0, 2 * MiB) == snapshot_a
        assert ram_b.read(0, 2 * MiB) == snapshot_b

        # thaw through the control plane, then the functions work again
        for name in ("pf0-vf0", "pf0-vf1"):
            rc, out, err = await ctl(daemon, "--json", "eeh", name, "thaw")
            assert rc == 0, err
            assert json.loads(out)["eeh_state"] == 0
        assert from_little(await b.region_read(td.REGS_BAR, td.REG_ID, 4)) == td.ID_VALUE
        assert await program_dma(b, td.CMD_FILL, 0, iova + 0x2000, 16) == td.STATUS_DONE
        assert ram_b.read(0x2000, 16) == b"\xa5" * 16

        # unmap, then DMA: faults, never touches the unmapped memory
        await a.dma_unmap(iova, 2 * MiB)
        before = ram_a.read(0, 2 * MiB)
        status = await program_dma(a, td.CMD_FILL, 0, iova, 4096)
        assert status & td.STATUS_FAULT
        assert ram_a.read(0, 2 * MiB) == before
        ram_a.close()
        ram_b.close()


async def test_memlock_is_charged_once_per_client_across_vfs(daemon: Daemon) -> None:
    """One process mapping the same RAM through two VFs is charged once (preregistration)."""
    await daemon.host.set_numvfs("pf0", 2)
    paths = [daemon.host.slot(f"pf0-vf{i}").endpoint.path for i in range(2)]
    async with client.connect(paths[0]) as a, client.connect(paths[1]) as b:
        ram = a.guest_memory(64 * MiB)
        await a.dma_map_memory(ram, 0x1000_0000)
        one = daemon.host.memlock()
        await b.dma_map(0x1000_0000, 64 * MiB, ram.fd)
        two = daemon.host.memlock()
        assert len(two) == 1 and two[0]["pid"] == os.getpid()
        assert sorted(two[0]["functions"]) == ["pf0-vf0", "pf0-vf1"]
        assert len(two[0]["regions"]) == 1 and two[0]["regions"][0]["size"] == 64 * MiB
        ram_charge = 64 * MiB
        assert one[0]["locked_bytes"] >= ram_charge
        # the second VF adds only its TCE table, not the RAM again
        assert two[0]["locked_bytes"] - one[0]["locked_bytes"] < ram_charge
        ram.close()
    with trio.fail_after(5):
        while daemon.host.clients:
            await trio.sleep(0.01)


async def test_vfs_from_the_config_and_control_list(tmp_path: Path) -> None:
    d = Daemon(pf_config(tmp_path, totalvfs=2, numvfs=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        rc, out, _ = await ctl(d, "list")
        assert rc == 0 and "pf0-vf0" in out and "pf0-vf1" in out
        rc, out, _ = await ctl(d, "--json", "list")
        assert {f["name"] for f in json.loads(out)["functions"]} == {"pf0", "pf0-vf0", "pf0-vf1"}
        rc, out, _ = await ctl(d, "pe", "pf0-vf1")
        assert rc == 0
        nursery.cancel_scope.cancel()


async def test_too_many_vfs_for_the_client_limit_is_refused_cleanly(tmp_path: Path) -> None:
    """A client whose memlock limit cannot hold even a TCE table gets a clear refusal."""
    parsed = pf_config(tmp_path)
    d = Daemon(config.Config(tmp_path, parsed.functions, phbs=parsed.phbs, memlock_limit=4096))
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        with pytest.raises(VfioUserError) as info:
            async with client.connect(d.host.slot("pf0").endpoint.path) as dev:
                ram = dev.guest_memory(MiB)
                await dev.dma_map_memory(ram, 0)
        assert info.value.errno in (errno.ENOMEM, errno.EBUSY)
        nursery.cancel_scope.cancel()


async def test_error_policy_a_fault_fails_the_dma_and_the_vf_goes_on(tmp_path: Path) -> None:
    """A flat PHB's default: a DMA fault fails that DMA only (the test device reports it), the PE
    stays running (no EEH for an x86 guest to recover), the other VF never notices."""
    parsed = config.parse('[[phb]]\nindex = 0\nwindow_policy = "flat"\n'
                          '[[function]]\nname = "pf0"\npersonality = "testdev"\n'
                          "totalvfs = 2\nnumvfs = 2\n", "test")
    d = Daemon(config.Config(tmp_path, parsed.functions, phbs=parsed.phbs))
    assert d.host.phbs[0].phb.dma_fault == "error"
    iova = 0x4000_0000
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        slot = d.host.slot("pf0-vf0")
        async with client.connect(slot.endpoint.path) as dev:
            ram = dev.guest_memory(MiB)
            await dev.dma_map_memory(ram, iova)
            await bus_master(dev)
            snapshot = ram.read(0, MiB)
            status = await program_dma(dev, td.CMD_FILL, 0, iova + MiB - 32, 64)  # runs off
            assert status & td.STATUS_FAULT
            assert ram.read(0, MiB) == snapshot  # nothing written, not even the mapped half
            assert slot.pe.eeh_state == 0 and slot.pe.fault_count == 1
            assert from_little(await dev.region_read(td.REGS_BAR, td.REG_ID, 4)) == td.ID_VALUE
            assert await program_dma(dev, td.CMD_FILL, 0, iova, 64) == td.STATUS_DONE
            assert ram.read(0, 64) == b"\xa5" * 64
        nursery.cancel_scope.cancel()
