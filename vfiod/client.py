"""A trio vfio-user client that speaks like QEMU's ``vfio-user-pci``.

Tests and benchmarks drive functions with it, and a user can script a function without a guest::

    async with vfiod.client.connect("/run/vfiod/test0.sock") as dev:
        ram = dev.guest_memory(64 << 20)            # memfd-backed "guest RAM"
        await dev.dma_map_memory(ram, iova=0)       # DMA_MAP with the memfd, like QEMU
        vendor = int.from_bytes(await dev.config_read(0, 2), "little")
        await dev.region_write(0, 0x08, (1).to_bytes(4, "little"))
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        await dev.set_irqs(IrqIndex.MSIX, SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER,
                           0, 1, [efd])

Requests can be pipelined: ``send()`` returns at once with the message id, ``reply()`` waits for
it; ``request()`` does both. An error reply raises ``VfioUserError`` with its errno.

Who reads the socket: a task waiting in ``reply()`` reads it itself when no other task is
reading, so a request costs one trio wakeup instead of a hop through a receive task. A
background task reads only while no one waits for a reply, to answer the server's DMA_READ and
DMA_WRITE (and notice EOF); a requester that finds it asleep on the socket cancels that sleep
and takes over. Whoever reads dispatches everything it received; answering the server's DMA
requests is shielded from cancellation, so no reply to the server is lost half-way.
"""

from __future__ import annotations

import errno as E
import mmap
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from vfiod.protocol import (
    CLOSED,
    NEED_DATA,
    BadMessage,
    Capabilities,
    Connection,
    DeviceGetInfo,
    DeviceGetIrqInfo,
    DeviceGetRegionInfo,
    DeviceInfoReply,
    DeviceReset,
    DeviceSetIrqs,
    DmaMap,
    DmaMapFlag,
    DmaRead,
    DmaReadReply,
    DmaUnmap,
    DmaWrite,
    DmaWriteReply,
    ErrorReply,
    Event,
    IrqInfoReply,
    RegionCap,
    RegionIndex,
    RegionInfoReply,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    Version,
    VersionReply,
    parse_region_caps,
)
from vfiod.transport import Channel, close_fds

#: What QEMU 11.1 offers in its VERSION request (spec §2.1).
QEMU_CAPABILITIES: dict[str, Any] = {
    "capabilities": {
        "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
        "max_msg_fds": 16,
        "max_data_xfer_size": 1048576,
        "pgsizes": 4096,
        "max_dma_maps": 65535,
        "write_multiple": False,
    }
}


class VfioUserError(OSError):
    """The server answered a request with an error reply."""


class GuestMemory:
    """A memfd standing in for a guest's shared RAM (``memory-backend-memfd,share=on``)."""

    def __init__(self, size: int, name: str = "vfiod-client-ram") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mem = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.mem[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.mem[offset : offset + len(data)] = data

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int
    caps: list[RegionCap]
    fd: int | None


class Client:
    """One connection to one function. Use :func:`connect` to get one."""

    def __init__(self, channel: Channel, nursery: trio.Nursery) -> None:
        self.channel = channel
        self.conn = Connection(Role.CLIENT)
        self.server_caps: Capabilities | None = None
        self._nursery = nursery
        self._waiting: dict[int, trio.Event] = {}
        self._replies: dict[int, Event] = {}
        self._closed: BaseException | None = None
        self._reading = False  # a task is receiving and dispatching
        self._wanted = 0  # tasks inside reply(), which read for themselves
        self._bg_scope: trio.CancelScope | None = None  # the receive task's sleep on the socket
        self._bg_wakeup = trio.Event()
        self._dma: list[tuple[int, GuestMemory, int, int]] = []  # (iova, memory, offset, size)
        self.server_dma_requests = 0

    # -- request plumbing ----------------------------------------------------------------

    async def send(self, request: Request) -> int:
        """Send without waiting; returns the message id to pass to :meth:`reply`."""
        if self._closed is not None:
            raise ConnectionError(f"connection closed: {self._closed}")
        out = self.conn.send(request)
        if not request.no_reply:
            self._waiting[out.msg_id] = trio.Event()
        await self.channel.send(out.data, out.fds)
        return out.msg_id

    async def reply(self, msg_id: int) -> Reply:
        """Wait for the reply to ``msg_id``; raises VfioUserError on an error reply."""
        if msg_id not in self._waiting and msg_id not in self._replies:
            raise KeyError(f"no request {msg_id} is pending")
        self._wanted += 1
        try:
            while msg_id not in self._replies and self._closed is None:
                if self._reading:
                    # Another task reads: it sets our event when our reply comes, or when it
                    # stops reading so that we take over.
                    waiter = self._waiting[msg_id] = trio.Event()
                    await waiter.wait()
                    continue
                if self._bg_scope is not None:
                    self._bg_scope.cancel()  # frees the socket for us at once
                    self._bg_scope = None
                await self._pump()
        finally:
            self._wanted -= 1
            if not self._wanted:
                self._bg_wakeup.set()
        self._waiting.pop(msg_id, None)
        ev = self._replies.pop(msg_id, None)
        if ev is None:
            raise ConnectionError(f"connection closed before reply {msg_id}: {self._closed}")
        if isinstance(ev, ErrorReply):
            raise VfioUserError(ev.errno, f"{os.strerror(ev.errno)} (command {ev.command})")
        assert isinstance(ev, Reply)
        return ev

    async def request(self, request: Request) -> Reply:
        return await self.reply(await self.send(request))

    async def _pump(self) -> None:
        """Receive one chunk and dispatch every event in it (the caller may read now)."""
        self._reading = True
        try:
            data, fds = await self.channel.receive()
            self.conn.receive_data(data, fds)
            while True:
                try:
                    ev = self.conn.next_event()
                except RemoteProtocolError as exc:
                    close_fds(exc.fds)
                    raise
                if ev is NEED_DATA:
                    return
                if ev is CLOSED:
                    raise ConnectionError("server closed the connection")
                await self._dispatch(ev)
        except (ConnectionError, OSError, RemoteProtocolError, trio.ClosedResourceError) as exc:
            self._close(exc)
        finally:
            self._reading = False
            for waiter in self._waiting.values():  # the next reader, or the one answered
                waiter.set()
            if not self._wanted:
                self._bg_wakeup.set()

    def _close(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        for waiter in self._waiting.values():
            waiter.set()
        self._bg_wakeup.set()

    async def _receive_loop(self) -> None:
        """Read while no requester does: the server's own requests, and EOF."""
        try:
            while self._closed is None:
                if self._reading or self._wanted:
                    self._bg_wakeup = trio.Event()
                    await self._bg_wakeup.wait()
                    continue
                with trio.CancelScope() as scope:
                    self._bg_scope = scope
                    try:
                        await self.channel.wait_readable()
                    finally:
                        if self._bg_scope is scope:
                            self._bg_scope = None
                if scope.cancelled_caught or self._reading or self._wanted:
                    continue  # a requester took the socket over
                await self._pump()
        except (OSError, trio.ClosedResourceError) as exc:
            self._close(exc)
        finally:
            self._close(ConnectionError("client closed"))

    async def _dispatch(self, ev: Event) -> None:
        if isinstance(ev, DmaRead | DmaWrite):
            # the only await while dispatching: shielded, so a reply is never half-sent
            with trio.CancelScope(shield=True):
                await self._serve_dma(ev)
            return
        if isinstance(ev, BadMessage):
            close_fds(ev.fds)
            return
        msg_id = getattr(ev, "msg_id", None)
        if msg_id is None or msg_id not in self._waiting:
            fd = getattr(ev, "fd", None)
            if fd is not None:
                close_fds([fd])
            return
        self._replies[msg_id] = ev
        self._waiting[msg_id].set()

    async def _serve_dma(self, ev: DmaRead | DmaWrite) -> None:
        """Answer the server's DMA_READ/DMA_WRITE from our mapped memory, as QEMU does."""
        self.server_dma_requests += 1
        msg_id = ev.msg_id
        assert msg_id is not None
        reply: Reply | ErrorReply
        try:
            if isinstance(ev, DmaRead):
                data = self._dma_access(ev.address, ev.count)
                reply = DmaReadReply(ev.address, data, msg_id=msg_id)
            else:
                self._dma_access(ev.address, len(ev.data), ev.data)
                reply = DmaWriteReply(msg_id=msg_id)
        except OSError as exc:
            reply = ErrorReply(msg_id, int(ev.command), exc.errno or E.EFAULT)
        if not ev.no_reply:
            out = self.conn.send(reply)
            await self.channel.send(out.data, out.fds)

    def _dma_access(self, address: int, count: int, data: bytes | None = None) -> bytes:
        for iova, memory, offset, size in self._dma:
            if iova <= address and address + count <= iova + size:
                at = offset + address - iova
                if data is None:
                    return memory.read(at, count)
                memory.write(at, data)
                return b""
        raise OSError(E.EFAULT, f"no mapping for {address:#x}+{count:#x}")

    # -- vfio-user operations ------------------------------------------------------------

    async def version(self, caps: dict[str, Any] | None = None) -> VersionReply:
        reply = await self.request(Version(0, 0, QEMU_CAPABILITIES if caps is None else caps))
        assert isinstance(reply, VersionReply)
        self.server_caps = Capabilities.from_json(reply.caps.get("capabilities", {}))
        self.conn.max_data_xfer_size = self.server_caps.max_data_xfer_size
        return reply

    def guest_memory(self, size: int) -> GuestMemory:
        return GuestMemory(size)

    async def dma_map(
        self,
        iova: int,
        size: int,
        fd: int | None = None,
        offset: int = 0,
        flags: int = DmaMapFlag.READ | DmaMapFlag.WRITE,
    ) -> None:
        """DMA_MAP; ``fd`` is sent as is (the caller keeps its own copy open)."""
        await self.request(DmaMap(int(flags), offset, iova, size, fd))

    async def dma_map_memory(
        self,
        memory: GuestMemory,
        iova: int,
        offset: int = 0,
        size: int | None = None,
        flags: int = DmaMapFlag.READ | DmaMapFlag.WRITE,
    ) -> None:
        size = memory.size - offset if size is None else size
        await self.dma_map(iova, size, memory.fd, offset, flags)
        self._dma.append((iova, memory, offset, size))

    async def dma_unmap(self, iova: int, size: int, flags: int = 0) -> None:
        await self.request(DmaUnmap(flags, iova, size))
        self._dma = [m for m in self._dma if m[0] + m[3] <= iova or m[0] >= iova + size]

    async def device_info(self) -> DeviceInfoReply:
        reply = await self.request(DeviceGetInfo())
        assert isinstance(reply, DeviceInfoReply)
        return reply

    async def region_info(self, index: int) -> RegionInfo:
        """Two-step query as QEMU does: ask with argsz 32, again with the size the server needs."""
        reply = await self.request(DeviceGetRegionInfo(index, 32))
        assert isinstance(reply, RegionInfoReply)
        if reply.argsz is not None and reply.argsz > 32:
            if reply.fd is not None:
                os.close(reply.fd)
            reply = await self.request(DeviceGetRegionInfo(index, reply.argsz))
            assert isinstance(reply, RegionInfoReply)
        caps = (
            parse_region_caps(reply.caps, reply.cap_offset, self.conn.byteorder)
            if reply.caps
            else []
        )
        return RegionInfo(reply.index, reply.flags, reply.size, reply.offset, list(caps), reply.fd)

    async def irq_info(self, index: int) -> IrqInfoReply:
        reply = await self.request(DeviceGetIrqInfo(index))
        assert isinstance(reply, IrqInfoReply)
        return reply

    async def set_irqs(
        self, index: int, flags: int, start: int, count: int, fds: Sequence[int] = ()
    ) -> None:
        await self.request(DeviceSetIrqs(int(flags), index, start, count, tuple(fds)))

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = await self.request(RegionRead(offset, region, count))
        assert isinstance(reply, RegionReadReply)
        return reply.data

    async def region_write(
        self, region: int, offset: int, data: bytes, *, posted: bool = False
    ) -> None:
        """REGION_WRITE; ``posted`` sends it NO_REPLY, as QEMU does for memory BARs."""
        ev = RegionWrite(offset, region, data, no_reply=posted)
        if posted:
            await self.send(ev)
        else:
            await self.request(ev)

    async def config_read(self, offset: int, count: int) -> bytes:
        return await self.region_read(RegionIndex.CONFIG, offset, count)

    async def config_write(self, offset: int, data: bytes) -> None:
        await self.region_write(RegionIndex.CONFIG, offset, data)

    async def find_capability(self, cap_id: int) -> int | None:
        """Offset of the first standard capability ``cap_id`` in config space, or None."""
        ptr = (await self.config_read(0x34, 1))[0] & 0xFC
        seen = 0
        while ptr and seen < 48:  # a malformed (looping) list cannot hold us forever
            head = await self.config_read(ptr, 2)
            if head[0] == cap_id:
                return ptr
            ptr, seen = head[1] & 0xFC, seen + 1
        return None

    async def reset(self) -> None:
        await self.request(DeviceReset())

    async def aclose(self) -> None:
        self.channel.close()


@asynccontextmanager
async def connect(
    path: str | os.PathLike[str], *, negotiate: bool = True
) -> AsyncIterator[Client]:
    """Connect to a function's socket and (by default) negotiate the version."""
    channel = await Channel.connect(path)
    try:
        async with trio.open_nursery() as nursery:
            client = Client(channel, nursery)
            nursery.start_soon(client._receive_loop)
            try:
                if negotiate:
                    await client.version()
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The receive loop never raises, so a group holds the caller's own exception: hand it
        # back unwrapped, as if there were no nursery.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        channel.close()


def little(value: int, size: int) -> bytes:
    """Encode a register value for REGION_WRITE (the device's own byte order is little-endian)."""
    return value.to_bytes(size, "little")


def from_little(data: bytes) -> int:
    return int.from_bytes(data, "little")


__all__ = [
    "Client",
    "GuestMemory",
    "QEMU_CAPABILITIES",
    "RegionInfo",
    "VfioUserError",
    "connect",
    "from_little",
    "little",
]
