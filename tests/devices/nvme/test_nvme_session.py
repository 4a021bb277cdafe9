"""The NVMe controller behind a live vfio-user endpoint, driven like QEMU drives it: guest RAM
shared as a memfd via DMA_MAP, posted BAR0 writes for registers and doorbells, MSI-X eventfds."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import trio
from nvme_remote import BUF, IOCQ, IOSQ, IOVA, OUT, RemoteNvme, wait_eventfd

from vfiod import client
from vfiod.devices.nvme import Command, NvmeController
from vfiod.server.endpoint import Endpoint


async def test_identify_write_read_over_vfio_user(tmp_path: Path) -> None:
    ctrl = NvmeController(tmp_path / "ns.img", 1 << 20, io_queues=2)
    ep = Endpoint("nvme0", tmp_path / "nvme0.sock", ctrl)
    async with trio.open_nursery() as nursery:
        await nursery.start(ep.serve)
        async with client.connect(ep.path) as dev:
            cfg = await dev.config_read(0, 256)
            assert int.from_bytes(cfg[9:12], "little") == 0x010802
            nvme = RemoteNvme(dev)
            await nvme.start(io_queue=False)
            ram = nvme.ram
            assert await nvme.admin(Command.pack(0x06, 0, prp1=BUF, cdw10=1)) == (0, 0)
            assert ram.read(BUF - IOVA + 516, 4) == b"\x01\0\0\0"  # NN
            queues = await nvme.admin(Command.pack(0x09, 0, cdw10=7, cdw11=0x003F003F))
            assert queues[1] == 0x10001  # two I/O queues granted
            await nvme.start_io_queue()

            data = bytes(range(256)) * 16
            ram.write(BUF - IOVA, data)
            ram.write(IOSQ - IOVA,
                      Command.pack(0x01, 7, nsid=1, prp1=BUF, cdw10=4, cdw12=7 | (1 << 30)))
            ram.write(IOSQ - IOVA + 64,
                      Command.pack(0x02, 8, nsid=1, prp1=OUT, cdw10=4, cdw12=7))
            await nvme.wr(0x1008, 2)  # both commands in one doorbell, one interrupt
            assert await wait_eventfd(nvme.fds[1]) == 1
            cqes = [struct.unpack("<IIHHHH", ram.read(IOCQ - IOVA + i * 16, 16)) for i in range(2)]
            assert [(c[4], c[5]) for c in cqes] == [(7, 1), (8, 1)]  # cid, phase 1, success
            assert ram.read(OUT - IOVA, 4096) == data
            await nvme.wr(0x100C, 2)
            assert os.pread(ctrl.store.fd, 4096, 4 * 512) == data
            nvme.close()
        nursery.cancel_scope.cancel()
    ctrl.close()
