"""The NVMe controller behind a live vfio-user endpoint, driven like QEMU drives it: guest RAM
shared as a memfd via DMA_MAP, posted BAR0 writes for registers and doorbells, MSI-X eventfds."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio
from nvme_remote import BUF, DEPTH, IOCQ, IOSQ, IOVA, OUT, RemoteNvme, wait_eventfd

from vfiod import client, spapr
from vfiod.devices.nvme import Command, NvmeController
from vfiod.pci import PciFunction
from vfiod.server.endpoint import Endpoint
from vfiod.server.session import Session
from vfiod.spapr import ClientMemory, PeDma
from vfiod.transport import Channel, Peer


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


async def test_the_session_runs_the_c_workers_and_drains_them_before_closing_dma(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a PE (the C data mover's case), the session starts the controller's workers with
    the client and ends them, every command finished, before the DMA view closes."""
    ctrl = NvmeController(tmp_path / "ns.img", 4 << 20, io_queues=2)
    cm = ctrl._cmover
    assert cm is not None
    phb = spapr.Phb(index=0)
    pe = phb.new_pe()
    at_close: list[tuple[int, int]] = []
    real_close = PeDma.close

    def close(self: PeDma) -> None:
        at_close.append((int(cm.c.workers), int(cm.c.inflight)))
        real_close(self)

    monkeypatch.setattr(PeDma, "close", close)

    def session(f: PciFunction, ch: Channel, name: str, peer: Peer) -> Session:
        return Session(f, ch, name, peer=peer,
                       dma_factory=lambda: PeDma(phb, pe, ClientMemory(spapr.Client()), "flat"))

    ep = Endpoint("nvme0", tmp_path / "nvme0.sock", ctrl, session_factory=session)
    async with trio.open_nursery() as nursery:
        await nursery.start(ep.serve)
        async with client.connect(ep.path) as dev:
            nvme = RemoteNvme(dev)
            await nvme.start()
            with trio.fail_after(10):
                while cm.c.workers < ctrl.workers:
                    await trio.sleep(0.001)
            assert ctrl.c_mover
            data = bytes(range(256)) * 32
            assert await nvme.write(8, data) == 0
            assert await nvme.read(8, len(data)) == (0, data)
            assert ctrl.async_commands == 2  # the workers ran them
            for i in range(DEPTH - 1):  # a batch still in flight when the client goes
                nvme.ram.write(IOSQ - IOVA + i * 64, Command.pack(0x02, 100 + i, nsid=1,
                                                                  prp1=OUT, cdw10=i, cdw12=15))
            await nvme.wr(0x1008, DEPTH - 1)
            nvme.close()
        with trio.fail_after(10):
            while ep.session is not None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert at_close == [(0, 0)]  # workers gone, nothing in flight, then the view closed
    ctrl.close()
