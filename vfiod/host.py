"""The emulated host: PHBs, one PE per function, SR-IOV VFs, and one locked-memory account per
QEMU process. It is also what the control plane talks to (``ControlTarget``).

This is where the vfio-user layer meets the platform. Each function sits in its own PE (its own
IOMMU group); each client session gets a container holding that group, so its DMA_MAPs become
TCEs in that PE's windows and every device DMA is translated there (``PeDma``). A QEMU process
that attaches several functions is one ``spapr.Client`` (one "mm"): its guest RAM is charged
once against ``memlock_limit`` however many functions map it, as with preregistration.

SR-IOV as on PowerNV: enabling N VFs on a PF allocates a contiguous block of N PEs, one per VF,
each with its own RID, IOMMU group, container and vfio-user socket; disabling removes them.
Changing NumVFs while a VF has a client is refused with EBUSY, as the kernel refuses to change
``sriov_numvfs`` while VFs are bound.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from vfiod import spapr
from vfiod.config import Config, FunctionConfig, PhbConfig, vf_name
from vfiod.control import describe
from vfiod.control.api import SCHEMA_VERSION, ControlError, parse_pe_ref
from vfiod.layout import load_numvfs, save_numvfs
from vfiod.metrics import Family, render
from vfiod.pci.caps import SRIOV_CTRL, SRIOV_CTRL_MSE, SRIOV_CTRL_VFE, SRIOV_NUM_VF, SriovCap
from vfiod.pci.config import BarKind, BarSpec
from vfiod.pci.function import PciFunction
from vfiod.server.endpoint import Endpoint
from vfiod.server.session import Session
from vfiod.transport import Channel, Peer

log = logging.getLogger(__name__)

#: Routing-ID layout: PF number k sits alone on bus k+1 as function 0; its VFs follow at
#: First VF Offset 1, VF Stride 1 (ARI: up to 255 functions on the bus).
VF_OFFSET = 1
VF_STRIDE = 1
VF_DEVICE_IDS = {"testdev": 0x0002, "nvme": 0x0010}


def make_function(fc: FunctionConfig) -> PciFunction:
    if fc.personality == "testdev":
        from vfiod.devices.testdev import TestDevice

        return TestDevice()
    if fc.personality == "nvme":
        from vfiod.devices.nvme import NvmeController

        assert fc.backing is not None
        if not fc.backing.exists():
            fc.backing.parent.mkdir(parents=True, exist_ok=True)  # a new sparse namespace
        try:
            return NvmeController(fc.backing, fc.size, shadow_doorbells=fc.shadow_doorbells)
        except OSError as exc:
            raise OSError(exc.errno, f"function {fc.name}: namespace {fc.backing}: "
                                     f"{exc.strerror}") from None
    raise ValueError(f"unknown personality {fc.personality!r}")


def vf_config(pf: FunctionConfig, n: int) -> FunctionConfig:
    """VF n of a PF: same personality and PHB; an NVMe VF gets its own namespace file next to
    the PF's (``<stem>-vf<n><suffix>``), of the PF's size."""
    backing = None
    if pf.vf_backing is not None:
        backing = Path(pf.vf_backing.replace("{n}", str(n)))
    elif pf.backing is not None:
        backing = pf.backing.with_name(f"{pf.backing.stem}-vf{n}{pf.backing.suffix}")
    access = pf.vf_access[n] if n < len(pf.vf_access) else pf.access
    return replace(pf, name=vf_name(pf.name, n), backing=backing, totalvfs=0, numvfs=0,
                   access=access, vf_access=(), vf_backing=None)


@dataclass
class ClientAccount:
    """One peer process and the sessions it holds open: its locked-memory account and its
    RAM files (``memory.client`` is the account)."""

    peer: Peer
    memory: spapr.ClientMemory
    sessions: int = 0
    functions: set[str] = field(default_factory=set)
    since: float = field(default_factory=time.time)

    @property
    def client(self) -> spapr.Client:
        return self.memory.client


@dataclass
class HostPhb:
    config: PhbConfig
    phb: spapr.Phb


@dataclass(eq=False)
class Slot:
    """A function placed on the host: its PHB, its PE, its RID and its socket."""

    config: FunctionConfig
    function: PciFunction
    phb: HostPhb
    pe: spapr.Pe
    rid: int  # bus << 8 | devfn
    kind: str  # "function" | "pf" | "vf"
    pf: Slot | None = None
    vfs: list[Slot] = field(default_factory=list)
    sriov: SriovCap | None = None
    endpoint: Endpoint = field(init=False)
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def rid_text(self) -> str:
        return f"{self.rid >> 8:02x}:{(self.rid >> 3) & 0x1F:02x}.{self.rid & 7}"


class Host:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.phbs: dict[int, HostPhb] = {
            pc.index: HostPhb(pc, _make_phb(pc)) for pc in config.phbs
        }
        self.clients: dict[int, ClientAccount] = {}
        #: host addresses of the clients' RAM files, the same on every PHB (reused as they go)
        self.address_space = spapr.AddressSpace()
        self.slots: list[Slot] = []
        self._nursery: trio.Nursery | None = None
        self._numvfs_lock = trio.Lock()
        persisted = load_numvfs(config.state_dir)
        for bus, fc in enumerate(config.functions, start=1):
            slot = self._add_slot(fc, rid=bus << 8, kind="pf" if fc.totalvfs else "function")
            if fc.totalvfs:
                slot.sriov = self._add_sriov_cap(slot)
            numvfs = persisted.get(fc.name, fc.numvfs)
            if numvfs > fc.totalvfs:
                log.warning("PF %s: %d VFs persisted but totalvfs is now %d; using %d",
                            fc.name, numvfs, fc.totalvfs, fc.totalvfs)
                numvfs = fc.totalvfs
            if numvfs:
                self._create_vfs(slot, numvfs)

    # -- building ------------------------------------------------------------------------

    def _add_slot(
        self,
        fc: FunctionConfig,
        *,
        rid: int,
        kind: str,
        pf: Slot | None = None,
        pe: spapr.Pe | None = None,
    ) -> Slot:
        host_phb = self.phbs[fc.phb]
        pe = pe or host_phb.phb.new_pe()
        try:
            function = make_function(fc)
        except BaseException:
            host_phb.phb.remove_pe(pe)
            raise
        slot = Slot(fc, function, host_phb, pe, rid, kind, pf)
        slot.endpoint = Endpoint(
            fc.name,
            self.config.socket_path(fc),
            function,
            session_factory=self._session_factory(slot),
            access=fc.access,
        )
        self.slots.append(slot)
        return slot

    def _add_sriov_cap(self, slot: Slot) -> SriovCap:
        """The PF's SR-IOV capability; VF BARs are 64-bit prefetchable, as PowerNV requires."""
        vf_bars = {}
        bar0 = slot.function.bars.get(0)
        if bar0 is not None:
            vf_bars[0] = BarSpec(bar0.size, BarKind.MEM64, prefetchable=True)
        return SriovCap.add(
            slot.function.config,
            total_vfs=slot.config.totalvfs,
            vf_device_id=VF_DEVICE_IDS.get(slot.config.personality, 0xFFFF),
            vf_offset=VF_OFFSET,
            vf_stride=VF_STRIDE,
            vf_bars=vf_bars,
        )

    def _create_vfs(self, pf: Slot, numvfs: int) -> list[Slot]:
        pes = pf.phb.phb.new_pes(numvfs)
        vfs: list[Slot] = []
        try:
            for n, pe in enumerate(pes):
                rid = pf.rid + VF_OFFSET + n * VF_STRIDE
                vfs.append(self._add_slot(vf_config(pf.config, n), rid=rid, kind="vf", pf=pf,
                                          pe=pe))
        except BaseException:
            for vf in vfs:
                self._drop_slot(vf)
            for pe in pes[len(vfs) :]:
                pf.phb.phb.remove_pe(pe)
            raise
        pf.vfs = vfs
        self._set_sriov_registers(pf, numvfs)
        return vfs

    def _set_sriov_registers(self, pf: Slot, numvfs: int) -> None:
        assert pf.sriov is not None
        cfg = pf.function.config
        cfg.poke(pf.sriov.offset + SRIOV_NUM_VF, 2, numvfs)
        ctrl = cfg.peek(pf.sriov.offset + SRIOV_CTRL, 2) & ~(SRIOV_CTRL_VFE | SRIOV_CTRL_MSE)
        if numvfs:
            ctrl |= SRIOV_CTRL_VFE | SRIOV_CTRL_MSE
        cfg.poke(pf.sriov.offset + SRIOV_CTRL, 2, ctrl)

    def _drop_slot(self, slot: Slot) -> None:
        self.slots.remove(slot)
        slot.function.close()
        try:
            slot.phb.phb.remove_pe(slot.pe)
        except OSError as exc:
            log.error("function %s: PE %d not released: %s", slot.name, slot.pe.number, exc)

    @property
    def endpoints(self) -> list[Endpoint]:
        return [slot.endpoint for slot in self.slots]

    def slot(self, name: str) -> Slot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise ControlError("ENOENT", f"no function named {name!r}")

    # -- serving -------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every function until cancelled; VFs come and go under this nursery."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for slot in list(self.slots):
                    await nursery.start(self._serve_slot, slot)
                task_status.started()
        finally:
            self._nursery = None
            for slot in self.slots:
                slot.function.close()

    async def _serve_slot(
        self, slot: Slot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            with trio.CancelScope() as scope:
                slot.scope = scope
                await slot.endpoint.serve(task_status=task_status)
        finally:
            slot.stopped.set()

    async def set_numvfs(self, pf_name: str, numvfs: int) -> dict[str, Any]:
        async with self._numvfs_lock:
            pf = self.slot(pf_name)
            if pf.kind != "pf" or pf.sriov is None:
                raise ControlError("EINVAL", f"{pf_name} is not an SR-IOV PF")
            if not 0 <= numvfs <= pf.config.totalvfs:
                raise ControlError(
                    "EINVAL", f"{pf_name} offers at most {pf.config.totalvfs} VFs, not {numvfs}"
                )
            busy = [vf.name for vf in pf.vfs if vf.endpoint.session is not None]
            if busy:
                raise ControlError(
                    "EBUSY", f"VFs with a client attached: {', '.join(busy)}; detach them first"
                )
            old = pf.vfs
            for vf in old:
                if vf.scope is not None:
                    vf.scope.cancel()
            for vf in old:
                if vf.scope is not None:
                    await vf.stopped.wait()
                self._drop_slot(vf)
            pf.vfs = []
            self._set_sriov_registers(pf, 0)
            try:
                vfs = self._create_vfs(pf, numvfs) if numvfs else []
            except OSError as exc:
                context = f"enabling {numvfs} VFs on {pf_name}"
                raise ControlError.from_oserror(exc, context) from None
            if self._nursery is not None:
                for vf in vfs:
                    await self._nursery.start(self._serve_slot, vf)
            save_numvfs(self.config.state_dir, self._numvfs_layout())
            log.info("PF %s: %d VFs (was %d)", pf_name, numvfs, len(old))
            return {"pf": pf_name, "numvfs": numvfs, "vfs": [vf.name for vf in vfs]}

    async def reload(self, new: Config) -> list[str]:
        """Apply a changed configuration without dropping attached clients.

        Idle functions that changed or disappeared are rebuilt or removed; a function with a
        client attached keeps running as it is (reported, applied once it is idle and the
        daemon reloads again). Socket access, memlock limits (for new clients) and window
        policies (for new sessions) apply at once. Returns what was done, one line each.
        """
        async with self._numvfs_lock:
            done: list[str] = []
            for pc in new.phbs:
                current = self.phbs.get(pc.index)
                if current is None:
                    self.phbs[pc.index] = HostPhb(pc, _make_phb(pc))
                    done.append(f"phb {pc.index}: added")
                elif current.config != pc:
                    current.config = pc
                    current.phb.dma_fault = pc.fault_policy  # the next fault already
                    done.append(f"phb {pc.index}: {pc.window_policy} for new sessions, "
                                f"dma_fault {pc.fault_policy}")
            wanted = {fc.name: fc for fc in new.functions}
            top = [s for s in self.slots if s.kind != "vf"]
            for slot in top:
                fc = wanted.get(slot.name)
                if fc == slot.config:
                    continue
                if fc is not None and _only_access_changed(slot.config, fc):
                    self._apply_access(slot, fc)
                    done.append(f"{slot.name}: socket access updated")
                    continue
                busy = [x.name for x in [slot, *slot.vfs] if x.endpoint.session is not None]
                if busy:
                    done.append(f"{slot.name}: kept as it is, clients attached to "
                                f"{', '.join(busy)}")
                    continue
                await self._stop_slot(slot)
                done.append(f"{slot.name}: removed" if fc is None else f"{slot.name}: rebuilt")
            present = {s.name for s in self.slots}
            for fc in new.functions:
                if fc.name in present:
                    continue
                rid = (max((s.rid >> 8 for s in self.slots), default=0) + 1) << 8
                slot = self._add_slot(fc, rid=rid, kind="pf" if fc.totalvfs else "function")
                if fc.totalvfs:
                    slot.sriov = self._add_sriov_cap(slot)
                if fc.numvfs:
                    self._create_vfs(slot, fc.numvfs)
                if self._nursery is not None:
                    for started in [slot, *slot.vfs]:
                        await self._nursery.start(self._serve_slot, started)
                if fc.name not in {line.split(":")[0] for line in done}:
                    done.append(f"{fc.name}: added")
            self.config = new
            save_numvfs(self.config.state_dir, self._numvfs_layout())
            return done

    def _apply_access(self, slot: Slot, fc: FunctionConfig) -> None:
        slot.config = fc
        for n, target in enumerate([slot, *slot.vfs]):
            access = fc.access if target is slot else vf_config(fc, n - 1).access
            if target is not slot:
                target.config = replace(target.config, access=access)
            target.endpoint.access = access
            path = target.endpoint.path
            try:
                os.chown(path, access.uid, access.gid)
                os.chmod(path, access.mode)
            except OSError as exc:
                log.error("function %s: cannot set socket access: %s", target.name, exc)

    async def _stop_slot(self, slot: Slot) -> None:
        """Stop serving a function (and its VFs) and free its PE."""
        for target in [*slot.vfs, slot]:
            if target.scope is not None:
                target.scope.cancel()
                await target.stopped.wait()
            self._drop_slot(target)
        slot.vfs = []

    def _numvfs_layout(self) -> dict[str, int]:
        return {s.name: len(s.vfs) for s in self.slots if s.kind == "pf"}

    # -- sessions and clients ------------------------------------------------------------

    def _session_factory(
        self, slot: Slot
    ) -> Callable[[PciFunction, Channel, str, Peer], Session]:
        def factory(function: PciFunction, channel: Channel, name: str, peer: Peer) -> Session:
            account = self._acquire(peer, slot.name)

            def dma() -> spapr.PeDma:
                return spapr.PeDma(slot.phb.phb, slot.pe, account.memory,
                                   slot.phb.config.window_policy)

            return Session(
                function,
                channel,
                name,
                dma_factory=dma,
                peer=peer,
                on_closed=lambda: self._release(peer, slot.name),
            )

        return factory

    def _acquire(self, peer: Peer, function: str) -> ClientAccount:
        account = self.clients.get(peer.pid)
        if account is None:
            client = spapr.Client(memlock_limit=self.config.memlock_limit, name=f"pid{peer.pid}")
            account = ClientAccount(peer, spapr.ClientMemory(client, self.address_space))
            self.clients[peer.pid] = account
            log.info("client pid %d uid %d: new locked-memory account", peer.pid, peer.uid)
        account.sessions += 1
        account.functions.add(function)
        return account

    def _release(self, peer: Peer, function: str) -> None:
        account = self.clients.get(peer.pid)
        if account is None:
            return
        account.sessions -= 1
        account.functions.discard(function)
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

    # -- ControlTarget -------------------------------------------------------------------

    def _names_by_pe(self, phb: spapr.Phb) -> dict[int, str]:
        return {s.pe.number: s.name for s in self.slots if s.phb.phb is phb}

    def _client_of(self, slot: Slot) -> dict[str, Any] | None:
        session = slot.endpoint.session
        if session is None or session.peer is None:
            return None
        account = self.clients.get(session.peer.pid)
        since = account.since if account is not None else None
        return {"pid": session.peer.pid, "uid": session.peer.uid, "connected_since": since}

    def inventory(self) -> dict[str, Any]:
        phbs = []
        for host_phb in self.phbs.values():
            entry = describe.describe_phb(host_phb.phb, self._names_by_pe(host_phb.phb))
            entry["window_policy"] = host_phb.config.window_policy
            phbs.append(entry)
        functions = [
            {
                "name": s.name,
                "kind": s.kind,
                "rid": s.rid_text,
                "phb": s.phb.phb.index,
                "pe": s.pe.number,
                "group": s.pe.group.name,
                "device": s.config.personality,
                "socket": str(s.endpoint.path),
                "client": self._client_of(s),
                "pf": s.pf.name if s.pf is not None else None,
                "numvfs": len(s.vfs) if s.kind == "pf" else None,
                "totalvfs": s.config.totalvfs if s.kind == "pf" else None,
            }
            for s in self.slots
        ]
        clients = [
            {"pid": a.peer.pid, "uid": a.peer.uid, "functions": sorted(a.functions)}
            for a in self.clients.values()
        ]
        return {"version": SCHEMA_VERSION, "phbs": phbs, "functions": functions,
                "clients": clients}

    def _find_phb(self, index: int) -> spapr.Phb:
        host_phb = self.phbs.get(index)
        if host_phb is None:
            raise ControlError("ENOENT", f"no PHB {index}")
        return host_phb.phb

    def pe_info(self, phb: int, pe: int) -> dict[str, Any]:
        the_phb = self._find_phb(phb)
        found = describe.find_pe([the_phb], phb, pe)
        return describe.pe_info(found, self._names_by_pe(the_phb).get(pe))

    def eeh(self, target: str, op: str, **args: int) -> dict[str, Any]:
        ref = parse_pe_ref(target)
        if ref is not None:
            the_phb = self._find_phb(ref[0])
            pe = describe.find_pe([the_phb], *ref)
            function = self._names_by_pe(the_phb).get(pe.number)
        else:
            slot = self.slot(target)
            pe, function = slot.pe, slot.name
        return describe.run_eeh_op(pe, op, target=target, function=function, **args)

    def memlock(self) -> list[dict[str, Any]]:
        return [
            describe.describe_memlock(
                a.client, pid=a.peer.pid, uid=a.peer.uid, functions=a.functions
            )
            for a in self.clients.values()
        ]

    def metrics(self) -> str:
        """Prometheus text: per function, PE and client (``vfiodctl metrics``)."""
        fam = {
            name: Family(name, kind, text)
            for name, kind, text in [
                ("vfiod_function_sessions_total", "counter", "Client sessions served."),
                ("vfiod_function_refused_total", "counter", "Connections refused (busy, EPERM)."),
                ("vfiod_function_messages_total", "counter", "vfio-user requests handled."),
                ("vfiod_function_errors_total", "counter", "Requests answered with an error."),
                ("vfiod_function_client_attached", "gauge", "1 while a client is attached."),
                ("vfiod_function_dma_maps_total", "counter", "DMA_MAP requests applied."),
                ("vfiod_function_dma_unmaps_total", "counter", "DMA_UNMAP requests applied."),
                ("vfiod_function_dma_mapped_bytes", "gauge",
                 "IOVA bytes the client has mapped (valid TCEs)."),
                ("vfiod_pe_eeh_state", "gauge", "EEH state (0 normal, 2 stopped, 4 DMA stopped)."),
                ("vfiod_pe_freezes_total", "counter", "Times the PE was frozen by a fault."),
                ("vfiod_pe_dma_faults_total", "counter",
                 "Device DMAs of the PE that faulted (frozen or not, by the PHB's dma_fault)."),
                ("vfiod_pe_tces_in_use", "gauge", "Valid TCEs in the PE's windows."),
                ("vfiod_client_locked_bytes", "gauge", "Locked memory charged to a client."),
                ("vfiod_client_memlock_limit_bytes", "gauge", "The client's locked-memory limit."),
            ]
        }
        for s in self.slots:
            ep, session = s.endpoint, s.endpoint.session
            labels: dict[str, object] = {"function": s.name}
            live_maps = live_unmaps = live = messages = errors = 0
            if session is not None:
                messages, errors = session.messages, session.errors
                live = session.dma.mapped_bytes
                live_maps = session.dma.maps_total
                live_unmaps = session.dma.unmaps_total
            fam["vfiod_function_sessions_total"].add(ep.sessions_total, **labels)
            fam["vfiod_function_refused_total"].add(ep.refused_total, **labels)
            fam["vfiod_function_messages_total"].add(ep.messages_total + messages, **labels)
            fam["vfiod_function_errors_total"].add(ep.errors_total + errors, **labels)
            fam["vfiod_function_client_attached"].add(int(session is not None), **labels)
            fam["vfiod_function_dma_maps_total"].add(ep.dma_maps_total + live_maps, **labels)
            fam["vfiod_function_dma_unmaps_total"].add(ep.dma_unmaps_total + live_unmaps,
                                                       **labels)
            fam["vfiod_function_dma_mapped_bytes"].add(live, **labels)
            pe_labels = {"phb": s.phb.phb.index, "pe": s.pe.number, "function": s.name}
            fam["vfiod_pe_eeh_state"].add(s.pe.eeh_state, **pe_labels)
            fam["vfiod_pe_freezes_total"].add(s.pe.eeh.freeze_count, **pe_labels)
            fam["vfiod_pe_dma_faults_total"].add(s.pe.fault_count, **pe_labels)
            tces = 0
            if s.pe.container is not None:
                tces = sum(describe.tces_in_use(w) for w in s.pe.container.windows if w)
            fam["vfiod_pe_tces_in_use"].add(tces, **pe_labels)
        for a in self.clients.values():
            labels = {"pid": a.peer.pid, "uid": a.peer.uid}
            fam["vfiod_client_locked_bytes"].add(a.client.locked_bytes, **labels)
            limit = a.client.memlock_limit
            fam["vfiod_client_memlock_limit_bytes"].add(-1 if limit is None else limit, **labels)
        for s in self.slots:
            extra = getattr(s.function, "metrics", None)
            if extra is not None:
                for family in extra(s.name):
                    fam.setdefault(family.name, Family(family.name, family.kind, family.help))
                    fam[family.name].samples.extend(family.samples)
        return render(fam.values())


def _make_phb(pc: PhbConfig) -> spapr.Phb:
    return spapr.Phb(index=pc.index, page_shifts=pc.page_shifts, dma_fault=pc.fault_policy)


def _only_access_changed(old: FunctionConfig, new: FunctionConfig) -> bool:
    return replace(old, access=new.access, vf_access=new.vf_access) == new


def control_socket_path(config: Config) -> Path:
    return config.socket_dir / "control.sock"


__all__ = ["Host", "Slot", "control_socket_path", "make_function"]
