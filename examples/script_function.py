"""Drive a vfiod function from a script, without QEMU: the client library in 40 lines.

    python examples/script_function.py /run/vfiod/test0.sock

It maps a memfd as "guest RAM", installs an MSI-X eventfd, makes the test device copy a buffer
by DMA and ring its doorbell, and prints what happened.
"""

from __future__ import annotations

import os
import sys

import trio

from vfiod import client
from vfiod.client import from_little, little
from vfiod.devices import testdev as td
from vfiod.protocol import IrqIndex, SetIrqsFlag


async def main(path: str) -> None:
    async with client.connect(path) as dev:
        vendor = from_little(await dev.config_read(0, 2))
        print(f"vendor {vendor:#06x}, {(await dev.device_info()).num_regions} regions")
        ram = dev.guest_memory(1 << 20)
        await dev.dma_map_memory(ram, iova=0x1000_0000)
        command = from_little(await dev.config_read(0x04, 2))
        await dev.config_write(0x04, little(command | 0x6, 2))  # memory space + bus master

        efd = os.eventfd(0, os.EFD_NONBLOCK)
        trigger = SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER
        await dev.set_irqs(IrqIndex.MSIX, trigger, 0, 1, [efd])
        msix = await dev.find_capability(0x11)
        assert msix is not None, "the test device has an MSI-X capability"
        ctrl = from_little(await dev.config_read(msix + 2, 2))
        await dev.config_write(msix + 2, little(ctrl | 0x8000, 2))  # MSI-X enable

        ram.write(0, b"hello from the guest")
        program = [
            (td.REG_DMA_SRC, 0x1000_0000, 8),
            (td.REG_DMA_DST, 0x1000_8000, 8),
            (td.REG_DMA_LEN, 20, 4),
            (td.REG_DMA_VECTOR, 0, 4),
            (td.REG_DMA_CMD, td.CMD_HOST_TO_HOST, 4),
        ]
        for reg, value, size in program:
            await dev.region_write(td.REGS_BAR, reg, little(value, size))
        status = from_little(await dev.region_read(td.REGS_BAR, td.REG_DMA_STATUS, 4))
        print(f"DMA status {status:#x}, copied: {ram.read(0x8000, 20)!r}")
        print(f"MSI-X vector 0 fired {os.eventfd_read(efd)} time(s)")
        os.close(efd)
        ram.close()


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "/run/vfiod/test0.sock")
