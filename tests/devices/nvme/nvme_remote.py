"""Drive an NVMe function over vfio-user the way a guest driver behind QEMU does: guest RAM as a
memfd via DMA_MAP, posted BAR0 writes for registers and doorbells, MSI or MSI-X eventfds
(whichever the function offers).

Imported as a plain module by the tests next to it (tests/ has no packages).
"""

from __future__ import annotations

import os
import struct

import trio

from vfiod import client
from vfiod.client import from_little, little
from vfiod.devices.nvme import Command
from vfiod.protocol import IrqIndex, SetIrqsFlag

TRIGGER_FD = SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER
IOVA = 0x4000_0000
RAM = 1 << 20
ASQ, ACQ, IOSQ, IOCQ = (IOVA + i * 0x1000 for i in range(4))
BUF, OUT = IOVA + 0x10000, IOVA + 0x20000  # two pages each: PRP1 + PRP2, no list
DEPTH = 16


async def wait_eventfd(fd: int) -> int:
    with trio.fail_after(10):
        while True:
            try:
                return os.eventfd_read(fd)
            except BlockingIOError:
                await trio.sleep(0.001)


class RemoteNvme:
    """Admin queue, one I/O queue pair, and helpers to run commands on them."""

    def __init__(self, dev: client.Client) -> None:
        self.dev = dev
        self.ram = dev.guest_memory(RAM)
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
        self.admin_slot = 0
        self.io_slot = 0
        self.io_phase = 1

    async def wr(self, off: int, value: int, size: int = 4) -> None:
        await self.dev.region_write(0, off, little(value, size), posted=True)

    async def rd(self, off: int, size: int = 4) -> int:
        return from_little(await self.dev.region_read(0, off, size))

    async def start(self, io_queue: bool = True) -> None:
        """Map RAM, enable bus mastering and MSI-X (else MSI, 4 vectors), enable the controller,
        create queue 1."""
        dev = self.dev
        await dev.dma_map_memory(self.ram, IOVA)
        cmd = from_little(await dev.config_read(0x04, 2))
        await dev.config_write(0x04, little(cmd | 0x6, 2))
        msix = await dev.find_capability(0x11)
        if msix is not None:
            await dev.config_write(msix + 2, little(0x8000, 2))
            await dev.set_irqs(IrqIndex.MSIX, TRIGGER_FD, 0, 3, self.fds)
        else:
            msi = await dev.find_capability(0x05)
            assert msi is not None, "neither MSI-X nor MSI"
            flags = from_little(await dev.config_read(msi + 2, 2))
            await dev.config_write(msi + 2, little(flags | 0x1 | (2 << 4), 2))  # enable, MME 4
            await dev.set_irqs(IrqIndex.MSI, TRIGGER_FD, 0, 3, self.fds)
        await self.wr(0x24, ((DEPTH - 1) << 16) | (DEPTH - 1))
        await self.wr(0x28, ASQ, 8)
        await self.wr(0x30, ACQ, 8)
        await self.wr(0x14, (6 << 16) | (4 << 20) | 1)
        assert await self.rd(0x1C) & 1, "controller not ready"
        if io_queue:
            await self.start_io_queue()

    async def start_io_queue(self) -> None:
        """I/O completion queue 1 (vector 1) and submission queue 1."""
        cq = Command.pack(0x05, 0, prp1=IOCQ, cdw10=1 | ((DEPTH - 1) << 16), cdw11=3 | (1 << 16))
        assert (await self.admin(cq))[0] == 0
        sq = Command.pack(0x01, 0, prp1=IOSQ, cdw10=1 | ((DEPTH - 1) << 16), cdw11=1 | (1 << 16))
        assert (await self.admin(sq))[0] == 0

    async def admin(self, entry: bytes) -> tuple[int, int]:
        """Run one admin command; returns (status, dw0)."""
        slot = self.admin_slot
        self.admin_slot += 1
        entry = entry[:2] + struct.pack("<H", slot) + entry[4:]  # CID (SQE bytes 2-3) = slot
        self.ram.write(ASQ - IOVA + slot * 64, entry)
        await self.wr(0x1000, slot + 1)
        await wait_eventfd(self.fds[0])
        dw0, _, _, _, cid, st = struct.unpack("<IIHHHH", self.ram.read(ACQ - IOVA + slot * 16, 16))
        await self.wr(0x1004, slot + 1)
        assert st & 1 and cid == slot
        return st >> 1, dw0

    async def io(self, entry: bytes) -> int:
        """Run one I/O command on queue 1; returns its status."""
        slot = self.io_slot
        self.io_slot = (slot + 1) % DEPTH
        self.ram.write(IOSQ - IOVA + slot * 64, entry)
        await self.wr(0x1008, self.io_slot)
        await wait_eventfd(self.fds[1])
        _, _, _, _, _, st = struct.unpack("<IIHHHH", self.ram.read(IOCQ - IOVA + slot * 16, 16))
        assert st & 1 == self.io_phase
        if self.io_slot == 0:
            self.io_phase ^= 1
        await self.wr(0x100C, self.io_slot)
        return st >> 1

    async def write(self, lba: int, data: bytes, *, fua: bool = False) -> int:
        """Write up to 8 KiB at ``lba`` (512-byte blocks); returns the NVMe status."""
        assert len(data) <= 8192 and len(data) % 512 == 0
        self.ram.write(BUF - IOVA, data)
        nlb = len(data) // 512 - 1
        prp2 = BUF + 4096 if len(data) > 4096 else 0
        return await self.io(Command.pack(0x01, self.io_slot, nsid=1, prp1=BUF, prp2=prp2,
                                          cdw10=lba, cdw12=nlb | ((1 << 30) if fua else 0)))

    async def read(self, lba: int, length: int) -> tuple[int, bytes]:
        assert length <= 8192 and length % 512 == 0
        prp2 = OUT + 4096 if length > 4096 else 0
        status = await self.io(Command.pack(0x02, self.io_slot, nsid=1, prp1=OUT, prp2=prp2,
                                            cdw10=lba, cdw12=length // 512 - 1))
        return status, self.ram.read(OUT - IOVA, length)

    def close(self) -> None:
        self.ram.close()
        for fd in self.fds:
            os.close(fd)
