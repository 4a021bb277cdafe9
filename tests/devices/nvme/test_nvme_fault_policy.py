"""The PHB's DMA fault policy seen from a guest's NVMe driver.

``error`` (the default on flat PHBs, for guests without EEH): a command whose data buffer does
not translate completes with Data Transfer Error, no byte moved, and the controller goes on.
``freeze`` (power8 PHBs): the PE freezes as EEH prescribes, and the function stays silent until
the guest (or an operator) recovers the PE; a function reset (as DEVICE_RESET or FLR brings)
thaws it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from nvme_helpers import BASE, PAGE, GuestRam, Host

from vfiod.devices.nvme import Command, NvmeController
from vfiod.devices.nvme import constants as K

NS_BYTES = 4 << 20


def setup(tmp_path: Path, policy: str) -> tuple[NvmeController, GuestRam, Host]:
    ctrl = NvmeController(tmp_path / "ns.img", NS_BYTES, io_queues=2)
    ram = GuestRam(4 << 20, pe=True, dma_fault=policy)
    host = Host(ctrl, ram)
    host.enable()
    host.create_io_queue(1)
    return ctrl, ram, host


@pytest.fixture
def error_policy(tmp_path: Path) -> Iterator[tuple[NvmeController, GuestRam, Host]]:
    ctrl, ram, host = setup(tmp_path, "error")
    yield ctrl, ram, host
    ctrl.close()
    ram.close()


def test_error_policy_fails_the_command_and_the_controller_goes_on(
    error_policy: tuple[NvmeController, GuestRam, Host],
) -> None:
    ctrl, ram, host = error_policy
    data = os.urandom(2 * PAGE)
    good = host.alloc(2)
    ram.poke(good, data)
    unmapped = BASE + ram.size + 16 * PAGE  # beyond guest RAM: no TCE
    # a write whose second page does not translate: Data Transfer Error, nothing written
    cqe = host.rw(1, True, 0, 16, good, unmapped)
    assert cqe.sc == K.SC_DATA_TRANSFER_ERROR
    assert os.pread(ctrl.store.fd, 2 * PAGE, 0) == bytes(2 * PAGE)
    # a read into it: the same, and guest memory untouched
    before = ram.peek(good, 2 * PAGE)
    assert host.rw(1, False, 0, 16, good, unmapped).sc == K.SC_DATA_TRANSFER_ERROR
    assert ram.peek(good, 2 * PAGE) == before
    pe = ram.pe
    assert pe is not None and not pe.frozen and pe.fault_count == 2
    # and the controller goes on: the same transfer with a good second page works
    assert host.rw(1, True, 0, 16, good, good + PAGE).sc == 0
    assert os.pread(ctrl.store.fd, 2 * PAGE, 0) == data
    assert not ctrl.csts & K.CSTS_CFS


def test_freeze_policy_stops_the_pe_until_a_function_reset(tmp_path: Path) -> None:
    ctrl, ram, host = setup(tmp_path, "freeze")
    try:
        unmapped = BASE + ram.size + 16 * PAGE
        # the data fault freezes the PE: its DMA stops, so not even the completion can be
        # posted (the guest sees a silent device; MMIO reads all-ones through the session)
        host.push(1, Command.pack(K.IO_READ, host.next_cid(), nsid=1, prp1=unmapped, cdw12=7))
        assert host.poll(1) is None
        pe = ram.pe
        assert pe is not None and pe.frozen and pe.fault_count == 1
        assert ctrl.csts & K.CSTS_CFS
        # DEVICE_RESET (or an FLR) thaws the PE; the function comes back from reset
        ram.view.device_reset()
        ctrl.reset()
        assert not pe.frozen
    finally:
        ctrl.close()
        ram.close()
