"""Prometheus metrics from the control socket (``vfiodctl metrics``)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import trio

from vfiod import client, config
from vfiod.client import from_little, little
from vfiod.control.cli import main as vfiodctl
from vfiod.daemon import Daemon
from vfiod.devices import testdev as td
from vfiod.host import control_socket_path

MiB = 1 << 20


def sample(text: str, name: str, **labels: object) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


async def scrape(d: Daemon) -> str:
    out = io.StringIO()
    argv = ["--socket", str(control_socket_path(d.config)), "metrics"]
    rc = await trio.to_thread.run_sync(lambda: vfiodctl(argv, stdout=out, stderr=io.StringIO()))
    assert rc == 0
    return out.getvalue()


async def test_metrics_follow_dma_faults_and_clients(tmp_path: Path) -> None:
    parsed = config.parse(
        '[[phb]]\nindex = 0\nwindow_policy = "flat"\ndma_fault = "freeze"\n'
        '[[function]]\nname = "t"\npersonality = "testdev"\n'
        f'[[function]]\nname = "n"\npersonality = "nvme"\nbacking = "{tmp_path}/n.img"\n'
        'size = "1M"\n',
        "test",
    )
    d = Daemon(config.Config(tmp_path, parsed.functions, phbs=parsed.phbs))
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        async with client.connect(d.host.slot("t").endpoint.path) as dev:
            ram = dev.guest_memory(MiB)
            for i in range(4):
                await dev.dma_map(i * 0x1000, 0x1000, ram.fd, i * 0x1000)
            await dev.dma_unmap(0x3000, 0x1000)
            cmd = from_little(await dev.config_read(0x04, 2))
            await dev.config_write(0x04, little(cmd | 0x6, 2))
            for reg, value, size in [(td.REG_DMA_DST, 0x8000, 8), (td.REG_DMA_LEN, 16, 4),
                                     (td.REG_DMA_CMD, td.CMD_FILL, 4)]:
                await dev.region_write(td.REGS_BAR, reg, little(value, size))
            text = await scrape(d)
            assert sample(text, "vfiod_function_client_attached", function="t") == 1
            assert sample(text, "vfiod_function_dma_maps_total", function="t") == 4
            assert sample(text, "vfiod_function_dma_unmaps_total", function="t") == 1
            assert sample(text, "vfiod_function_dma_mapped_bytes", function="t") == 3 * 0x1000
            assert sample(text, "vfiod_pe_freezes_total", function="t") == 1
            assert sample(text, "vfiod_pe_dma_faults_total", function="t") == 1
            assert sample(text, "vfiod_pe_eeh_state", function="t") == 2
            assert sample(text, "vfiod_pe_tces_in_use", function="t") == 3
            assert sample(text, "vfiod_client_locked_bytes") >= MiB
            ram.close()
        with trio.fail_after(10):
            while d.host.clients:
                await trio.sleep(0.01)
        text = await scrape(d)
        assert sample(text, "vfiod_function_client_attached", function="t") == 0
        assert sample(text, "vfiod_function_sessions_total", function="t") == 1
        assert sample(text, "vfiod_function_dma_maps_total", function="t") == 4
        assert sample(text, "vfiod_function_messages_total", function="t") > 10
        assert sample(text, "vfiod_nvme_read_bytes_total", function="n") == 0
        assert 'vfiod_nvme_command_seconds_bucket{function="n",le="+Inf"} 0' in text
        assert re.search(r"^# TYPE vfiod_nvme_command_seconds histogram$", text, re.M)
        nursery.cancel_scope.cancel()
