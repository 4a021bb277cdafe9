"""A live endpoint whose session's DMA goes through a POWER8 PE (PeDma), driven like QEMU."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from vfiod import client, spapr
from vfiod.client import from_little, little
from vfiod.devices import testdev as td
from vfiod.devices.testdev import TestDevice
from vfiod.pci.function import PciFunction
from vfiod.server.endpoint import Endpoint
from vfiod.server.session import Session
from vfiod.spapr import ClientMemory, PeDma
from vfiod.transport import Channel, Peer

DMA64 = spapr.DMA64_WINDOW_START
ALL_ONES = b"\xff" * 4


@dataclass
class PeEndpoint:
    ep: Endpoint
    phb: spapr.Phb
    pe: spapr.Pe
    client: spapr.Client

    @property
    def dma(self) -> PeDma:
        session = self.ep.session
        assert session is not None and isinstance(session.dma, PeDma)
        return session.dma


@pytest.fixture
async def pe_endpoint(tmp_path: Path) -> AsyncIterator[PeEndpoint]:
    phb = spapr.Phb(index=0)
    pe = phb.new_pe()
    owner = spapr.Client(memlock_limit=64 << 20)

    def session_factory(
        function: PciFunction, channel: Channel, name: str, peer: Peer
    ) -> Session:
        return Session(
            function, channel, name, peer=peer,
            dma_factory=lambda: PeDma(phb, pe, ClientMemory(owner)),
        )

    ep = Endpoint("pe0", tmp_path / "pe0.sock", TestDevice(), session_factory=session_factory)
    async with trio.open_nursery() as nursery:
        await nursery.start(ep.serve)
        yield PeEndpoint(ep, phb, pe, owner)
        nursery.cancel_scope.cancel()
    ep.function.close()


async def enable_bus_master(dev: client.Client) -> None:
    cmd = from_little(await dev.config_read(0x04, 2))
    await dev.config_write(0x04, little(cmd | 0x6, 2))


async def run_dma(dev: client.Client, cmd: int, src: int, dst: int, length: int,
                  pattern: int = 0) -> int:  # fmt: skip
    for reg, value, size in [(td.REG_DMA_SRC, src, 8), (td.REG_DMA_DST, dst, 8),
                             (td.REG_DMA_LEN, length, 4), (td.REG_DMA_PATTERN, pattern, 4),
                             (td.REG_DMA_CMD, cmd, 4)]:  # fmt: skip
        await dev.region_write(0, reg, little(value, size))
    return from_little(await dev.region_read(0, td.REG_DMA_STATUS, 4))


async def wait_session_gone(ep: Endpoint) -> None:
    with trio.fail_after(5):
        while ep.session is not None:
            await trio.sleep(0.01)


async def test_dma_goes_through_the_pe_windows(pe_endpoint: PeEndpoint) -> None:
    async with client.connect(pe_endpoint.ep.path) as dev:
        ram = dev.guest_memory(1 << 20)
        await dev.dma_map_memory(ram, iova=0x40000000)  # 32-bit window
        await dev.dma_map_memory(ram, iova=DMA64 + (16 << 20))  # 64-bit window, created now
        dma = pe_endpoint.dma
        w1 = dma.window(1)
        assert w1 is not None and w1.start == DMA64
        assert dma.mapped_bytes == 2 << 20 and dma.backing_count == 1
        await enable_bus_master(dev)
        ram.write(0x100, b"through the TCEs")
        dst = DMA64 + (16 << 20) + 0x8000
        status = await run_dma(dev, td.CMD_HOST_TO_HOST, 0x40000100, dst, 16)
        assert status == td.STATUS_DONE
        assert ram.read(0x8000, 16) == b"through the TCEs"
        # charged: the RAM file once, plus the two window tables
        tables = spapr.get_table_size(12, 2 << 30, 1) * 2
        assert pe_endpoint.client.locked_bytes == (1 << 20) + tables
        ram.close()
    await wait_session_gone(pe_endpoint.ep)
    assert pe_endpoint.client.locked_bytes == 0
    assert pe_endpoint.pe.container is None


async def test_fault_freezes_then_eeh_recovery_and_reset(pe_endpoint: PeEndpoint) -> None:
    pe = pe_endpoint.pe
    async with client.connect(pe_endpoint.ep.path) as dev:
        ram = dev.guest_memory(1 << 20)
        await dev.dma_map_memory(ram, iova=0)
        await enable_bus_master(dev)
        await dev.region_write(0, td.REG_SCRATCH, little(0x1234, 4))
        await dev.dma_unmap(0x80000, 0x80000)
        # fill 16 bytes at an IOVA that was just unmapped: the PE freezes
        status = await run_dma(dev, td.CMD_FILL, 0, 0x80000, 16, pattern=0xAA)
        assert pe.eeh_state == spapr.EEH_PE_STATE_STOPPED_IO_DMA
        assert status == 0xFFFFFFFF  # the status read itself hits the frozen PE
        assert ram.read(0x80000, 16) == b"\0" * 16
        assert await dev.region_read(0, td.REG_ID, 4) == ALL_ONES
        assert await dev.region_read(0, td.REG_SCRATCH, 4) == ALL_ONES
        await dev.region_write(0, td.REG_SCRATCH, little(0x5678, 4))  # dropped
        # config space stays readable while frozen
        assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
        # DMA to mapped memory is refused too while frozen (nothing moves)
        ram.write(0, b"src")
        # the guest's EEH recovery: thaw MMIO, read the error, reset
        assert pe_endpoint.dma.eeh_op(spapr.VFIO_EEH_PE_UNFREEZE_IO) == 0
        assert from_little(await dev.region_read(0, td.REG_SCRATCH, 4)) == 0x1234
        fault = from_little(await dev.region_read(0, td.REG_DMA_FAULT_ADDR, 8))
        assert fault == 0x80000
        status = await run_dma(dev, td.CMD_HOST_TO_HOST, 0, 0x100, 3)
        assert status & td.STATUS_FAULT  # DMA is still stopped
        assert ram.read(0x100, 3) == b"\0" * 3
        assert pe_endpoint.dma.eeh_op(spapr.VFIO_EEH_PE_RESET_HOT) == 0
        assert await dev.config_read(0, 4) == ALL_ONES  # config blocked during the reset
        assert pe_endpoint.dma.eeh_op(spapr.VFIO_EEH_PE_RESET_DEACTIVATE) == 0
        await dev.reset()
        assert from_little(await dev.region_read(0, td.REG_SCRATCH, 4)) == 0
        await enable_bus_master(dev)
        status = await run_dma(dev, td.CMD_HOST_TO_HOST, 0, 0x100, 3)
        assert status == td.STATUS_DONE
        assert ram.read(0x100, 3) == b"src"
        ram.close()


async def test_device_reset_alone_recovers_a_guest_without_eeh(pe_endpoint: PeEndpoint) -> None:
    """pseries with vfio-user boots with eeh=off: a machine reset (DEVICE_RESET) must do."""
    async with client.connect(pe_endpoint.ep.path) as dev:
        ram = dev.guest_memory(1 << 20)
        await dev.dma_map_memory(ram, iova=0)
        await enable_bus_master(dev)
        status = await run_dma(dev, td.CMD_FILL, 0, 0x7000_0000, 16, pattern=1)
        assert status == 0xFFFFFFFF and pe_endpoint.pe.frozen
        await dev.reset()
        assert not pe_endpoint.pe.frozen
        assert from_little(await dev.region_read(0, td.REG_ID, 4)) == td.ID_VALUE
        await enable_bus_master(dev)
        assert await run_dma(dev, td.CMD_FILL, 0, 0x1000, 16, pattern=7) == td.STATUS_DONE
        assert ram.read(0x1000, 16) == b"\7" * 16
        ram.close()


async def test_map_errors_are_replies_and_next_client_gets_a_fresh_pe(
    pe_endpoint: PeEndpoint,
) -> None:
    async with client.connect(pe_endpoint.ep.path) as dev:
        ram = dev.guest_memory(1 << 20)
        with pytest.raises(client.VfioUserError) as exc:
            await dev.dma_map_memory(ram, iova=0x1_0000_0000)  # between the windows
        assert exc.value.errno == 6  # ENXIO
        big = dev.guest_memory(128 << 20)
        with pytest.raises(client.VfioUserError) as exc:
            await dev.dma_map_memory(big, iova=0)  # over the 64 MiB memlock limit
        assert exc.value.errno == 12  # ENOMEM
        big.close()
        for i in range(256):  # the boot-time clear: unmaps of nothing succeed
            await dev.dma_unmap(i << 12, 1 << 12)
        await dev.dma_map_memory(ram, iova=0)
        await enable_bus_master(dev)
        status = await run_dma(dev, td.CMD_FILL, 0, 0x7000_0000, 16)
        assert pe_endpoint.pe.frozen and status == 0xFFFFFFFF
        ram.close()
    await wait_session_gone(pe_endpoint.ep)
    assert not pe_endpoint.pe.frozen and pe_endpoint.client.locked_bytes == 0
    async with client.connect(pe_endpoint.ep.path) as dev:
        ram = dev.guest_memory(1 << 20)
        await dev.dma_map_memory(ram, iova=0)
        await enable_bus_master(dev)
        assert await run_dma(dev, td.CMD_FILL, 0, 0x2000, 4, pattern=9) == td.STATUS_DONE
        assert ram.read(0x2000, 4) == b"\x09" * 4
        ram.close()
