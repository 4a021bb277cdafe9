"""The emulated host: PHBs, one PE per function, and one locked-memory account per QEMU process.

This is where the vfio-user layer meets the platform. Each function sits in its own PE (its own
IOMMU group); each client session gets a container holding that group, so its DMA_MAPs become
TCEs in that PE's windows and every device DMA is translated there (``PeDma``). A QEMU process
that attaches several functions is one ``spapr.Client`` (one "mm"): its guest RAM is charged
once against ``memlock_limit`` however many functions map it, as with preregistration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from vfiod import spapr
from vfiod.config import Config, FunctionConfig, PhbConfig
from vfiod.pci.function import PciFunction
from vfiod.server.endpoint import Endpoint
from vfiod.server.pe_dma import PeDma
from vfiod.server.session import Session
from vfiod.transport import Channel, Peer

log = logging.getLogger(__name__)


def make_function(fc: FunctionConfig) -> PciFunction:
    if fc.personality == "testdev":
        from vfiod.devices.testdev import TestDevice

        return TestDevice()
    if fc.personality == "nvme":
        from vfiod.devices.nvme import NvmeController

        assert fc.backing is not None
        return NvmeController(fc.backing, fc.size)
    raise ValueError(f"unknown personality {fc.personality!r}")


@dataclass
class ClientAccount:
    """One peer process and the sessions it holds open."""

    peer: Peer
    client: spapr.Client
    sessions: int = 0


@dataclass
class HostPhb:
    config: PhbConfig
    phb: spapr.Phb


@dataclass
class Slot:
    """A function placed on the host: its PHB, its PE, and its socket."""

    config: FunctionConfig
    function: PciFunction
    phb: HostPhb
    pe: spapr.Pe
    endpoint: Endpoint = field(init=False)


class Host:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.phbs: dict[int, HostPhb] = {
            pc.index: HostPhb(pc, spapr.Phb(index=pc.index, page_shifts=pc.page_shifts))
            for pc in config.phbs
        }
        self.clients: dict[int, ClientAccount] = {}
        self.slots: list[Slot] = []
        for fc in config.functions:
            self.add_function(fc)

    def add_function(self, fc: FunctionConfig) -> Slot:
        host_phb = self.phbs[fc.phb]
        pe = host_phb.phb.new_pe()
        slot = Slot(fc, make_function(fc), host_phb, pe)
        slot.endpoint = Endpoint(
            fc.name,
            self.config.socket_path(fc),
            slot.function,
            session_factory=self._session_factory(slot),
        )
        self.slots.append(slot)
        return slot

    @property
    def endpoints(self) -> list[Endpoint]:
        return [slot.endpoint for slot in self.slots]

    def _session_factory(
        self, slot: Slot
    ) -> Callable[[PciFunction, Channel, str, Peer], Session]:
        def factory(function: PciFunction, channel: Channel, name: str, peer: Peer) -> Session:
            account = self._acquire(peer)

            def dma() -> PeDma:
                return PeDma(slot.phb.phb, slot.pe, account.client, slot.phb.config.window_policy)

            return Session(
                function,
                channel,
                name,
                dma_factory=dma,
                peer=peer,
                on_closed=lambda: self._release(peer),
            )

        return factory

    def _acquire(self, peer: Peer) -> ClientAccount:
        account = self.clients.get(peer.pid)
        if account is None:
            client = spapr.Client(memlock_limit=self.config.memlock_limit, name=f"pid{peer.pid}")
            account = ClientAccount(peer, client)
            self.clients[peer.pid] = account
            log.info("client pid %d uid %d: new locked-memory account", peer.pid, peer.uid)
        account.sessions += 1
        return account

    def _release(self, peer: Peer) -> None:
        account = self.clients.get(peer.pid)
        if account is None:
            return
        account.sessions -= 1
        if account.sessions <= 0:
            del self.clients[peer.pid]
            log.info(
                "client pid %d: gone, %d bytes still locked (must be 0)",
                peer.pid,
                account.client.locked_bytes,
            )

    def close(self) -> None:
        for slot in self.slots:
            slot.function.close()
