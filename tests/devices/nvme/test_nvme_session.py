"""The NVMe controller behind a live vfio-user endpoint, driven like QEMU drives it: guest RAM
shared as a memfd via DMA_MAP, posted BAR0 writes for registers and doorbells, MSI-X eventfds."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import trio

from vfiod import client
from vfiod.client import from_little, little
from vfiod.devices.nvme import Command, NvmeController
from vfiod.protocol import IrqIndex, SetIrqsFlag
from vfiod.server.endpoint import Endpoint

TRIGGER_FD = SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER
IOVA = 0x4000_0000
RAM = 1 << 20
ASQ, ACQ, IOSQ, IOCQ, BUF, OUT = (IOVA + i * 0x1000 for i in range(6))


async def wait_eventfd(fd: int) -> int:
    with trio.fail_after(5):
        while True:
            try:
                return os.eventfd_read(fd)
            except BlockingIOError:
                await trio.sleep(0.001)


async def test_identify_write_read_over_vfio_user(tmp_path: Path) -> None:
    ctrl = NvmeController(tmp_path / "ns.img", 1 << 20, io_queues=2)
    ep = Endpoint("nvme0", tmp_path / "nvme0.sock", ctrl)
    async with trio.open_nursery() as nursery:
        await nursery.start(ep.serve)
        async with client.connect(ep.path) as dev:
            ram = dev.guest_memory(RAM)
            await dev.dma_map_memory(ram, IOVA)
            cfg = await dev.config_read(0, 256)
            assert int.from_bytes(cfg[9:12], "little") == 0x010802
            cmd = from_little(await dev.config_read(0x04, 2))
            await dev.config_write(0x04, little(cmd | 0x6, 2))
            msix = ctrl.config.caps[0x11]
            await dev.config_write(msix + 2, little(0x8000, 2))
            fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
            await dev.set_irqs(IrqIndex.MSIX, TRIGGER_FD, 0, 3, fds)

            async def wr(off: int, value: int, size: int = 4) -> None:
                await dev.region_write(0, off, little(value, size), posted=True)

            async def rd(off: int, size: int = 4) -> int:
                return from_little(await dev.region_read(0, off, size))

            await wr(0x24, 0x001F001F)
            await wr(0x28, ASQ, 8)
            await wr(0x30, ACQ, 8)
            await wr(0x14, (6 << 16) | (4 << 20) | 1)
            assert await rd(0x1C) & 1

            async def admin(slot: int, entry: bytes) -> tuple[int, int]:
                ram.write(ASQ - IOVA + slot * 64, entry)
                await wr(0x1000, slot + 1)
                await wait_eventfd(fds[0])
                dw0, _, _, _, cid, st = struct.unpack(
                    "<IIHHHH", ram.read(ACQ - IOVA + slot * 16, 16)
                )
                await wr(0x1004, slot + 1)
                assert st & 1 and cid == slot
                return st >> 1, dw0

            assert await admin(0, Command.pack(0x06, 0, prp1=BUF, cdw10=1)) == (0, 0)
            assert ram.read(BUF - IOVA + 516, 4) == b"\x01\0\0\0"  # NN
            assert (await admin(1, Command.pack(0x09, 1, cdw10=7, cdw11=0x003F003F)))[1] == 0x10001
            assert (
                await admin(
                    2, Command.pack(0x05, 2, prp1=IOCQ, cdw10=1 | (15 << 16), cdw11=3 | (1 << 16))
                )
            )[0] == 0
            assert (
                await admin(
                    3, Command.pack(0x01, 3, prp1=IOSQ, cdw10=1 | (15 << 16), cdw11=1 | (1 << 16))
                )
            )[0] == 0

            data = bytes(range(256)) * 16
            ram.write(BUF - IOVA, data)
            ram.write(
                IOSQ - IOVA, Command.pack(0x01, 7, nsid=1, prp1=BUF, cdw10=4, cdw12=7 | (1 << 30))
            )
            ram.write(IOSQ - IOVA + 64, Command.pack(0x02, 8, nsid=1, prp1=OUT, cdw10=4, cdw12=7))
            await wr(0x1008, 2)  # both commands in one doorbell
            assert await wait_eventfd(fds[1]) == 1
            cqes = [struct.unpack("<IIHHHH", ram.read(IOCQ - IOVA + i * 16, 16)) for i in range(2)]
            assert [(c[4], c[5]) for c in cqes] == [(7, 1), (8, 1)]  # cid, phase 1, success
            assert ram.read(OUT - IOVA, 4096) == data
            await wr(0x100C, 2)
            assert os.pread(ctrl.store.fd, 4096, 4 * 512) == data
            ram.close()
            for fd in fds:
                os.close(fd)
        nursery.cancel_scope.cancel()
    ctrl.close()
