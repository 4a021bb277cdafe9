"""Guest side of tests/systemd: use a vfiod function over its socket as QEMU would.

    probe.py check SOCKET [PREFIX]            one connection: read the vendor id, map 1 MiB of
                                              memfd "guest RAM", let the test device's DMA engine
                                              fill a page of it through the PE, check the bytes
    probe.py hold SOCKET READY GO [PREFIX]    check, create READY, wait (same connection) until GO
                                              exists, check again: the client survived whatever
                                              happened in between (a reload)

Prints one line of PREFIXkey=value tokens (vendor=0x7e57 dma=ok ...); exits 0 even when a check
fails (the host test asserts on the values), 0 with error=... when the socket cannot be used.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from vfiod import client
from vfiod.devices import testdev as td

PAGE = 0x1000
PATTERN = 0x5A


async def check(dev: client.Client, ram: client.GuestMemory, round_: int) -> dict[str, str]:
    out: dict[str, str] = {}
    vendor = int.from_bytes(await dev.config_read(0, 2), "little")
    out["vendor"] = f"{vendor:#06x}"
    cmd = int.from_bytes(await dev.config_read(4, 2), "little")
    await dev.config_write(4, (cmd | 0x6).to_bytes(2, "little"))  # memory space + bus master
    dst = PAGE * (1 + round_)
    pattern = PATTERN + round_
    ram.write(dst, bytes(PAGE))

    async def reg_write(reg: int, value: int, size: int) -> None:
        await dev.region_write(td.REGS_BAR, reg, value.to_bytes(size, "little"))

    await reg_write(td.REG_DMA_STATUS, 0x7, 4)
    await reg_write(td.REG_DMA_DST, dst, 8)
    await reg_write(td.REG_DMA_LEN, PAGE, 4)
    await reg_write(td.REG_DMA_PATTERN, pattern, 4)
    await reg_write(td.REG_DMA_CMD, td.CMD_FILL, 4)
    status = int.from_bytes(await dev.region_read(td.REGS_BAR, td.REG_DMA_STATUS, 4), "little")
    good = ram.read(dst, PAGE) == bytes([pattern]) * PAGE
    out["dma"] = "ok" if (good and status & 1 and not status & 6) else f"bad-status-{status:#x}"
    return out


async def run(mode: str, sock: str, args: list[str]) -> dict[str, str]:
    async with client.connect(sock) as dev:
        ram = dev.guest_memory(1 << 20)
        await dev.dma_map_memory(ram, iova=0)
        first = await check(dev, ram, 0)
        if mode == "check":
            return first
        ready, go = Path(args[0]), Path(args[1])
        ready.touch()
        with trio.move_on_after(300):
            while not go.exists():
                await trio.sleep(0.1)
        second = await check(dev, ram, 1)
        return {**first, **{f"after_{k}": v for k, v in second.items()}}


def main() -> int:
    mode, sock, *rest = sys.argv[1:]
    nargs = 0 if mode == "check" else 2
    prefix = rest[nargs] if len(rest) > nargs else ""
    try:
        result = trio.run(run, mode, sock, rest[:nargs])
    except Exception as exc:  # report, do not crash: the host test says what was expected
        result = {"error": type(exc).__name__}
        print(f"probe {sock}: {exc!r}", file=sys.stderr)
    print(" ".join(f"{prefix}{k}={v}" for k, v in result.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
