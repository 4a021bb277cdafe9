"""A live endpoint driven by the client library: the whole vfio-user path in one process."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from vfiod import client
from vfiod.client import VfioUserError, from_little, little
from vfiod.devices import testdev as td
from vfiod.protocol import (
    DmaMap,
    DmaUnmap,
    IrqIndex,
    RegionCapId,
    RegionFlag,
    RegionRead,
    RegionWrite,
    SetIrqsFlag,
)
from vfiod.server.endpoint import Endpoint

RW = 3


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))

TRIGGER_FD = SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER


async def enable_bus_master(dev: client.Client) -> None:
    cmd = from_little(await dev.config_read(0x04, 2))
    await dev.config_write(0x04, little(cmd | 0x6, 2))  # memory space + bus master


async def test_realize_sequence_like_qemu(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as dev:
        info = await dev.device_info()
        assert info.flags & 2 and info.num_regions >= 9 and info.num_irqs >= 5
        bar2 = await dev.region_info(2)
        assert bar2.flags & RegionFlag.MMAP and bar2.fd is not None
        assert [c for c in bar2.caps if getattr(c, "areas", None)]
        os.close(bar2.fd)
        config = await dev.config_read(0, 4096)
        assert from_little(config[0:2]) == td.TEST_VENDOR_ID
        assert (await dev.irq_info(IrqIndex.MSIX)).count == td.MSIX_VECTORS


async def test_dma_engine_round_trip_through_client_memory(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as dev:
        ram = dev.guest_memory(1 << 20)
        await dev.dma_map_memory(ram, iova=0x40000000)
        await enable_bus_master(dev)
        ram.write(0x100, b"vfiod dma!")
        regs = [(td.REG_DMA_SRC, 0x40000100, 8), (td.REG_DMA_DST, 0x40008000, 8),
                (td.REG_DMA_LEN, 10, 4), (td.REG_DMA_CMD, td.CMD_HOST_TO_HOST, 4)]
        for reg, value, size in regs:
            await dev.region_write(0, reg, little(value, size))
        status = from_little(await dev.region_read(0, td.REG_DMA_STATUS, 4))
        assert status == td.STATUS_DONE
        assert ram.read(0x8000, 10) == b"vfiod dma!"
        ram.close()


async def test_dma_after_unmap_faults_and_touches_nothing(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as dev:
        ram = dev.guest_memory(1 << 20)
        await dev.dma_map_memory(ram, iova=0)
        await enable_bus_master(dev)
        await dev.dma_unmap(0x80000, 0x80000)
        for reg, value, size in [(td.REG_DMA_DST, 0x80000, 8), (td.REG_DMA_LEN, 16, 4),
                                 (td.REG_DMA_PATTERN, 0xAA, 4),
                                 (td.REG_DMA_CMD, td.CMD_FILL, 4)]:
            await dev.region_write(0, reg, little(value, size))
        status = from_little(await dev.region_read(0, td.REG_DMA_STATUS, 4))
        assert status & td.STATUS_FAULT
        assert ram.read(0x80000, 16) == b"\0" * 16
        ram.close()


async def test_doorbell_fires_installed_msix_eventfd_without_unmask(endpoint: Endpoint) -> None:
    """q35: QEMU installs the eventfd and never sends UNMASK; the vector must still fire."""
    async with client.connect(endpoint.path) as dev:
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            await dev.set_irqs(IrqIndex.MSIX, TRIGGER_FD, 3, 1, [efd])
            cap = await dev.find_capability(0x11)
            assert cap is not None
            ctrl = from_little(await dev.config_read(cap + 2, 2))
            await dev.config_write(cap + 2, little(ctrl | 0x8000, 2))  # MSI-X enable
            await dev.region_write(0, td.REG_DOORBELL, little(3, 4))
            assert os.eventfd_read(efd) == 1
        finally:
            os.close(efd)



async def test_posted_writes_are_never_answered_and_stay_in_order(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as dev:
        for i in range(50):
            await dev.region_write(0, td.REG_SCRATCH, little(i, 4), posted=True)
        assert from_little(await dev.region_read(0, td.REG_SCRATCH, 4)) == 49
        assert dev.conn.pending_requests == ()  # nothing left waiting, nothing unexpected


async def test_pipelined_dma_maps_are_applied_in_order(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as dev:
        ram = dev.guest_memory(4 << 20)
        ids = [await dev.send(DmaMap(RW, i * 4096, 0x100000 + i * 4096, 4096, ram.fd))
               for i in range(512)]
        for msg_id in ids:
            await dev.reply(msg_id)
        session = endpoint.session
        assert session is not None
        assert len(session.dma) == 512 and session.dma.backing_count == 1
        ram.close()


async def test_region_info_two_step_query(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as dev:
        from vfiod.protocol import DeviceGetRegionInfo, RegionInfoReply

        first = await dev.request(DeviceGetRegionInfo(2, 32))
        assert isinstance(first, RegionInfoReply)
        assert first.argsz is not None and first.argsz > 32
        assert first.fd is None and first.caps == b""
        second = await dev.request(DeviceGetRegionInfo(2, first.argsz))
        assert isinstance(second, RegionInfoReply) and second.fd is not None
        assert second.flags & RegionFlag.CAPS
        os.close(second.fd)
        caps = (await dev.region_info(2)).caps
        assert any(getattr(c, "cap_id", RegionCapId.SPARSE_MMAP) for c in caps)


async def test_second_client_is_refused_and_first_is_unaffected(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as first:
        await first.region_write(0, td.REG_SCRATCH, little(0x1234, 4))
        with pytest.raises(VfioUserError) as info:
            async with client.connect(endpoint.path):
                pass
        assert info.value.errno == errno.EBUSY
        assert from_little(await first.region_read(0, td.REG_SCRATCH, 4)) == 0x1234
    assert endpoint.refused_total == 1


async def test_next_client_finds_a_reset_function(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as dev:
        await dev.region_write(0, td.REG_SCRATCH, little(0xBEEF, 4))
        ram = dev.guest_memory(1 << 20)
        await dev.dma_map_memory(ram, iova=0)
        ram.close()
    await trio.sleep(0.05)
    async with client.connect(endpoint.path) as dev:
        assert from_little(await dev.region_read(0, td.REG_SCRATCH, 4)) == 0


async def test_client_going_away_releases_every_fd(endpoint: Endpoint) -> None:
    before = open_fd_count()
    for _ in range(3):
        async with client.connect(endpoint.path) as dev:
            ram = dev.guest_memory(1 << 20)
            for i in range(20):
                await dev.dma_map(i * 4096, 4096, ram.fd, i * 4096)
            efds = [os.eventfd(0) for _ in range(4)]
            await dev.set_irqs(IrqIndex.MSIX, TRIGGER_FD, 0, 4, efds)
            for fd in efds:
                os.close(fd)
            ram.close()
        await trio.sleep(0.05)
    assert open_fd_count() == before


async def test_bad_requests_get_errors_and_the_session_goes_on(endpoint: Endpoint) -> None:
    async with client.connect(endpoint.path) as dev:
        cases = [
            RegionRead(0, 42, 4),  # no such region
            RegionRead(0x2000, 0, 4),  # beyond BAR0
            RegionWrite(4096, 7, b"\0\0\0\0"),  # beyond config space
            DmaUnmap(0x4, 0, 4096),  # unknown unmap flag
            DmaUnmap(0x2, 0x1000, 4096),  # UNMAP_ALL with a range
            DmaMap(0x8, 0, 0, 4096, None),  # unknown map flag
        ]
        for ev in cases:
            with pytest.raises(VfioUserError) as info:
                await dev.request(ev)
            assert info.value.errno in (errno.EINVAL, errno.E2BIG), ev
        assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
