"""One vfio-user client of one function: bytes in, function calls, replies out.

Requests are handled strictly in arrival order (QEMU pipelines its DMA_MAPs and relies on a
later read seeing earlier posted writes), each to completion before the next is read, and every
handler is synchronous and short so a reply is never late for QEMU's 5 s timeout.

The hot synchronous messages go through the C fast path when it is built (``engine``): once
VERSION is answered and nothing is owed, the session hands its stream to the engine, which
handles the common case of DMA_MAP/DMA_UNMAP and of REGION_READ/REGION_WRITE of the function's
fast ranges and punts anything else back, in order; the session then handles the punted message
here, exactly as it would without the engine, and hands the stream over again. The engine runs
inside this task while punts are frequent, and in a thread of this session's nursery (blocking,
GIL released) once it handles a run of messages alone, as in a pseries guest's per-TCE storms.

Every peer is treated as hostile: a malformed message gets an error reply and the session goes
on; a broken stream ends this session only. Every fd received is either handed to its owner
(the DMA table or the function) or closed here.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from vfiod.pci.function import PciFunction
from vfiod.protocol import (
    CLOSED,
    NEED_DATA,
    BadMessage,
    Capabilities,
    Connection,
    DeviceFeature,
    DeviceGetInfo,
    DeviceGetIrqInfo,
    DeviceGetRegionInfo,
    DeviceInfoReply,
    DeviceReset,
    DeviceResetReply,
    DeviceSetIrqs,
    DmaMap,
    DmaMapReply,
    DmaUnmap,
    DmaUnmapFlag,
    DmaUnmapReply,
    ErrorReply,
    Event,
    IrqInfoReply,
    LocalProtocolError,
    MsixMappableCap,
    Outgoing,
    RegionCap,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    RemoteProtocolError,
    Reply,
    Role,
    SetIrqsReply,
    SparseMmapCap,
    TypeCap,
    Version,
    VersionReply,
    event_fds,
    make_region_info_reply,
    server_capabilities,
)
from vfiod.server import engine as fastpath
from vfiod.server.dma import DmaMapTable, DmaView
from vfiod.spapr.dma import NoDmaSpace
from vfiod.transport import Channel, Peer, close_fds, is_eventfd

log = logging.getLogger(__name__)

MAX_DATA_XFER_SIZE = 1 << 20
MAX_MSG_FDS = 16
#: How long a refused second client gets to say VERSION before it is simply closed (QEMU sends
#: it right after connecting; a peer that stays silent must not hold an fd for long).
REFUSAL_GRACE = 1.0
#: Replies are sent at least every this many messages of a pipelined burst, so a long burst
#: neither waits for its end nor keeps the other sessions from running.
MAX_BATCH = 64
#: Messages the fast path handles in a row (inside the task) before it gets its own thread.
THREAD_STREAK = 16


class SessionEnded(Exception):
    """The peer broke the protocol in a way that ends its session (logged, not re-raised)."""


class Session:
    def __init__(
        self,
        function: PciFunction,
        channel: Channel,
        name: str,
        dma_factory: Callable[[], DmaView] = DmaMapTable,
        peer: Peer | None = None,
        on_closed: Callable[[], None] | None = None,
        fast_path: bool | None = None,
        thread_streak: int = THREAD_STREAK,
    ) -> None:
        self.function = function
        self.channel = channel
        self.name = name
        self.peer = peer
        #: what every log line of this session says it is about (vfiod.logs)
        self.log_context: dict[str, object] = {
            "function": name,
            "client": peer.pid if peer else None,
            "uid": peer.uid if peer else None,
        }
        self.conn = Connection(
            Role.SERVER, max_data_xfer_size=MAX_DATA_XFER_SIZE, max_msg_fds=MAX_MSG_FDS
        )
        self._dma_factory = dma_factory
        self._on_closed = on_closed
        self.dma: DmaView = DmaMapTable()
        self.client_caps: Capabilities | None = None
        self._messages = 0  # handled here (the engine counts its own)
        self.errors = 0
        #: the C fast path: None until VERSION is answered, and for good without the C module,
        #: with ``fast_path=False`` (or VFIOD_NO_FASTPATH=1) or a foreign byte order
        self.engine: fastpath.FastEngine | None = None
        self._fast_path = fastpath.available() if fast_path is None else fast_path
        self._thread_streak = thread_streak
        self._handled = 0  # messages handled here since the engine last gave the stream back
        self._engine_messages = 0  # of engines closed already
        self._limiter = trio.CapacityLimiter(1)  # this session's engine thread

    @property
    def fast_messages(self) -> int:
        """Requests the fast path handled."""
        engine = self.engine
        return engine.messages if engine is not None else self._engine_messages

    @property
    def messages(self) -> int:
        """Requests handled, by this task and by the fast path."""
        return self._messages + self.fast_messages

    async def run(self) -> None:
        """Serve this client until it goes away or breaks the stream."""
        try:
            self.dma = self._dma_factory()
        except OSError as exc:
            # e.g. the client's locked-memory limit cannot even hold the PE's TCE table
            log.warning(
                "function %s: cannot set up DMA for the client: %s",
                self.name,
                exc,
                extra=self.log_context,
            )
            try:
                await refuse(self.channel, self.name, exc.errno or errno.ENOMEM)
            finally:
                if self._on_closed is not None:
                    self._on_closed()
            return
        self.function.attach_dma(self.dma)
        try:
            self._start_engine()
            async with trio.open_nursery() as nursery:
                # The function's own work while this client is attached (the NVMe data mover's
                # workers): cancelled with the session and waited for here, so it ends before
                # the function is reset and the DMA view closes.
                nursery.start_soon(self.function.background)
                try:
                    await self._serve()
                except SessionEnded as exc:
                    log.warning(
                        "function %s: closing the client: %s",
                        self.name,
                        exc,
                        extra=self.log_context,
                    )
                except OSError as exc:
                    log.info(
                        "function %s: connection lost: %s", self.name, exc, extra=self.log_context
                    )
                nursery.cancel_scope.cancel()
        finally:
            if self.engine is not None:
                self._engine_messages = self.engine.messages
                self.engine.close()  # the buffer was taken back; anything left is closed
                self.engine = None
            # The next client must find the function as a fresh VFIO open would: reset, its
            # interrupts released, no DMA view left over from this client.
            self.function.attach_dma(NoDmaSpace())
            self.function.reset()
            self.dma.close()
            self.channel.close()
            close_fds(self.conn.discard_buffered())  # messages never read: their fds too
            if self._on_closed is not None:
                self._on_closed()

    async def _serve(self) -> None:
        conn = self.conn
        channel = self.channel
        while True:
            replies: list[Outgoing] = []
            try:
                status = self._process(replies)
            except SessionEnded:
                await self._send_replies(replies)  # what was answered before the breach
                raise
            await self._send_replies(replies)
            if status is CLOSED:
                return
            if status is NEED_DATA:
                if self._handled and self._engine_ready():
                    await self._engine_turn()
                    continue
                data, fds = await channel.receive()
                if channel.fds_truncated:
                    close_fds(fds)
                    raise SessionEnded("sent more fds than any message may carry")
                conn.receive_data(data, fds)

    def _process(self, replies: list[Outgoing]) -> object:
        """Handle every message already received (up to MAX_BATCH), queueing the replies.

        Returns NEED_DATA, CLOSED, or None when the batch is full and more may be buffered.
        Handlers are synchronous, so a pipelined burst (QEMU's DMA_MAPs) is answered with one
        send instead of one per message.
        """
        conn = self.conn
        handle = self._handle
        for _ in range(MAX_BATCH):
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                close_fds(exc.fds)
                raise SessionEnded(f"broken stream: {exc}") from None
            if event is NEED_DATA or event is CLOSED:
                return event
            assert isinstance(event, Event)
            self._messages += 1
            self._handled += 1
            reply = handle(event)
            if reply is not None:
                replies.append(self._encode_reply(event, reply))
        return None

    # -- the fast path -------------------------------------------------------------------

    def _start_engine(self) -> None:
        """The session's engine, made with the session (so what a session holds, its wake
        eventfd included, does not change under a client once it is connected)."""
        if not self._fast_path or not fastpath.native_byteorder(self.conn.byteorder):
            self._fast_path = False
            return
        self.engine = fastpath.FastEngine(
            self.channel.sock.fileno(), max_xfer=self.conn.max_data_xfer_size,
            max_msg=self.conn.max_message_size, dma_view=self.dma.c_view,
            ranges=self.function.fast_ranges(),
        )  # fmt: skip

    def _engine_ready(self) -> bool:
        """Whether to hand the stream to the engine now: after VERSION, nothing owed."""
        return self.engine is not None and self.conn.idle

    async def _engine_turn(self) -> None:
        """Let the engine have the stream until it punts, sees EOF or fails; then take every
        byte and fd it holds back into the connection (the punted message first)."""
        engine = self.engine
        assert engine is not None
        engine.feed(self.conn.detach_buffer())
        self._handled = 0
        try:
            rc = await self._drive(engine)
        finally:
            for data, fds in engine.take():
                self.conn.receive_data(data, fds)
        if rc == fastpath.EOF:
            self.conn.receive_data(b"")
        elif rc == fastpath.CTRUNC:
            raise SessionEnded("sent more fds than any message may carry")

    async def _drive(self, engine: fastpath.FastEngine) -> int:
        while True:
            if engine.streak >= self._thread_streak:
                rc = await self._run_blocking(engine)
            else:
                rc = engine.run(block=False)
            if rc == fastpath.NEED_DATA:
                await self.channel.wait_readable()
            elif rc == fastpath.WANT_WRITE:
                await self.channel.wait_writable()
            else:
                return rc  # PUNT, EOF, CTRUNC

    async def _run_blocking(self, engine: fastpath.FastEngine) -> int:
        """One blocking run in a thread this session owns; cancelling the session (it is going
        away) wakes it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_wake_when_cancelled, engine)
            engine.running = True
            try:
                rc = await trio.to_thread.run_sync(engine.run, True, limiter=self._limiter)
            finally:
                engine.running = False
            nursery.cancel_scope.cancel()
        return int(rc)

    async def _send_replies(self, replies: list[Outgoing]) -> None:
        """Send queued replies in order: concatenated, a new send where one carries fds (they
        must ride with their own message's first byte)."""
        if not replies:
            return
        send = self.channel.send
        if len(replies) == 1:
            await send(replies[0].data, replies[0].fds)
            return
        parts: list[bytes] = []
        fds: tuple[int, ...] = ()
        for out in replies:
            if out.fds and parts:
                await send(b"".join(parts), fds)
                parts = []
            if not parts:
                fds = out.fds
            parts.append(out.data)
        await send(b"".join(parts), fds)

    def _encode_reply(self, request: Event, reply: Reply | ErrorReply) -> Outgoing:
        """Encode a reply; one that cannot fit the peer's buffer degrades instead of crashing."""
        try:
            return self.conn.send(reply)
        except LocalProtocolError as exc:
            if isinstance(reply, VersionReply):
                # A client whose VERSION is shorter than our answer: state only what differs
                # from the defaults QEMU assumes.
                small = VersionReply(
                    0, 0, {"capabilities": {"max_msg_fds": MAX_MSG_FDS}}, msg_id=reply.msg_id
                )
                try:
                    return self.conn.send(small)
                except LocalProtocolError:
                    pass
            log.info(
                "function %s: cannot send %s: %s",
                self.name,
                type(reply).__name__,
                exc,
                extra=self.log_context,
            )
            return self.conn.send(ErrorReply(_id(request), None, errno.EINVAL))

    # -- dispatch ------------------------------------------------------------------------

    def _handle(self, ev: Event) -> Reply | ErrorReply | None:
        if isinstance(ev, BadMessage):
            close_fds(ev.fds)
            self.errors += 1
            log.info(
                "function %s: bad message %d: %s",
                self.name,
                ev.command,
                ev.reason,
                extra=self.log_context,
            )
            if ev.reason == "unexpected reply":
                raise SessionEnded("sent a reply to a request we never made")
            return None if ev.no_reply else ErrorReply(ev.msg_id, ev.command, ev.errno)
        handler = self._handlers.get(type(ev))
        if handler is None:
            # Only replies to our own requests land here, and we make none yet.
            close_fds(event_fds(ev))
            raise SessionEnded(f"unexpected {type(ev).__name__}")
        msg_id = ev.msg_id
        no_reply = getattr(ev, "no_reply", False)
        try:
            reply = handler(self, ev)
        except OSError as exc:
            self.errors += 1
            err = exc.errno or errno.EIO
            log.info(
                "function %s: %s refused: %s",
                self.name,
                type(ev).__name__,
                exc,
                extra=self.log_context,
            )
            return None if no_reply else ErrorReply(msg_id, int(ev.command), err)
        return None if no_reply else reply

    def _version(self, ev: Version) -> Reply:
        try:
            self.client_caps = Capabilities.from_json(ev.caps.get("capabilities", {}))
        except (ValueError, TypeError, AttributeError) as exc:
            raise OSError(errno.EINVAL, f"bad capabilities: {exc}") from None
        caps = server_capabilities(max_msg_fds=MAX_MSG_FDS, max_data_xfer_size=MAX_DATA_XFER_SIZE)
        return VersionReply(0, 0, caps, msg_id=_id(ev))

    def _dma_map(self, ev: DmaMap) -> Reply:
        self.dma.map(ev.iova, ev.size, ev.offset, ev.flags, ev.fd)
        return DmaMapReply(msg_id=_id(ev))

    def _dma_unmap(self, ev: DmaUnmap) -> Reply:
        if ev.flags == DmaUnmapFlag.ALL:
            if ev.iova or ev.size:
                raise OSError(errno.EINVAL, "UNMAP_ALL with an address or size")
            self.dma.unmap_all()
        elif ev.flags == 0:
            self.dma.unmap(ev.iova, ev.size)
        else:
            raise OSError(errno.EINVAL, f"unsupported DMA_UNMAP flags {ev.flags:#x}")
        return DmaUnmapReply(msg_id=_id(ev))

    def _device_get_info(self, ev: DeviceGetInfo) -> Reply:
        f = self.function
        return DeviceInfoReply(f.device_flags, f.num_regions, f.num_irqs, msg_id=_id(ev))

    def _region_info(self, ev: DeviceGetRegionInfo) -> Reply:
        info = self.function.region_info(ev.index)
        caps: list[RegionCap] = []
        if info.sparse_areas:
            caps.append(SparseMmapCap(tuple(info.sparse_areas)))
        if info.region_type is not None:
            caps.append(TypeCap(*info.region_type))
        if info.msix_mappable:
            caps.append(MsixMappableCap())
        return make_region_info_reply(
            msg_id=_id(ev),
            flags=info.flags,
            index=info.index,
            size=info.size,
            offset=info.offset,
            caps=caps,
            fd=info.fd,
            byteorder=self.conn.byteorder,
        )

    def _irq_info(self, ev: DeviceGetIrqInfo) -> Reply:
        info = self.function.irq_info(ev.index)
        return IrqInfoReply(info.flags, info.index, info.count, msg_id=_id(ev))

    def _set_irqs(self, ev: DeviceSetIrqs) -> Reply:
        if not all(map(is_eventfd, ev.fds)):
            close_fds(ev.fds)
            raise OSError(errno.EINVAL, "SET_IRQS fds must be eventfds")
        # The function owns the fds from here on, even when it refuses them.
        self.function.set_irqs(ev.index, ev.flags, ev.start, ev.count, list(ev.fds))
        return SetIrqsReply(msg_id=_id(ev))

    def _region_read(self, ev: RegionRead) -> Reply:
        if self._eeh_blocked(ev.region):
            return RegionReadReply(ev.offset, ev.region, b"\xff" * ev.count, msg_id=_id(ev))
        data = self.function.region_read(ev.region, ev.offset, ev.count)
        return RegionReadReply(ev.offset, ev.region, data, msg_id=_id(ev))

    def _region_write(self, ev: RegionWrite) -> Reply:
        if not self._eeh_blocked(ev.region):
            self.function.region_write(ev.region, ev.offset, ev.data)
        return RegionWriteReply(msg_id=_id(ev))

    def _region_write_multi(self, ev: RegionWriteMulti) -> Reply:
        for w in ev.writes:
            if not self._eeh_blocked(w.region):
                self.function.region_write(w.region, w.offset, w.data)
        return RegionWriteMultiReply(msg_id=_id(ev))

    def _device_reset(self, ev: DeviceReset) -> Reply:
        self.dma.device_reset()  # through a PE: a reset thaws a frozen PE
        self.function.reset()
        return DeviceResetReply(msg_id=_id(ev))

    def _eeh_blocked(self, region: int) -> bool:
        """EEH (through a PE): a frozen PE's MMIO loads read all-ones and its stores are
        dropped; config space likewise while an EEH reset is asserted."""
        return self.dma.access_blocked(region)

    def _device_feature(self, ev: DeviceFeature) -> Reply:
        # No migration and no dma-buf: QEMU treats ENOTTY as "feature not supported".
        raise OSError(errno.ENOTTY, "no device features")

    _handlers: dict[type, Callable[[Session, Event], Reply]] = {
        Version: _version,
        DmaMap: _dma_map,
        DmaUnmap: _dma_unmap,
        DeviceGetInfo: _device_get_info,
        DeviceGetRegionInfo: _region_info,
        DeviceGetIrqInfo: _irq_info,
        DeviceSetIrqs: _set_irqs,
        RegionRead: _region_read,
        RegionWrite: _region_write,
        RegionWriteMulti: _region_write_multi,
        DeviceReset: _device_reset,
        DeviceFeature: _device_feature,
    }


async def _wake_when_cancelled(engine: fastpath.FastEngine) -> None:
    try:
        await trio.sleep_forever()
    finally:
        engine.wake()


def _id(ev: Event) -> int:
    msg_id = getattr(ev, "msg_id", None)
    assert msg_id is not None  # received requests always carry their id
    return int(msg_id)


async def refuse(channel: Channel, name: str, err: int = errno.EBUSY) -> None:
    """Answer a client's VERSION with ``err`` (EBUSY: the function is taken), then close it."""
    conn = Connection(Role.SERVER)
    try:
        with trio.move_on_after(REFUSAL_GRACE):
            while True:
                try:
                    event = conn.next_event()
                except RemoteProtocolError as exc:
                    close_fds(exc.fds)
                    return
                if event is NEED_DATA:
                    data, fds = await channel.receive()
                    conn.receive_data(data, fds)
                    continue
                if event is CLOSED:
                    return
                close_fds(event_fds(event))
                if isinstance(event, Version) and event.msg_id is not None:
                    out = conn.send(ErrorReply(event.msg_id, int(event.command), err))
                    await channel.send(out.data, out.fds)
                return
    except OSError:
        pass  # the refused peer vanished; nothing to tell it
    finally:
        log.warning("function %s: refused a client (%s)", name, errno.errorcode.get(err, err))
        channel.close()
        close_fds(conn.discard_buffered())
