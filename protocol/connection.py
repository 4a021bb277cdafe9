"""The sans-I/O vfio-user connection: bytes and fds in, events out, and back (h11 style).

One object per peer, for either role. It frames the stream, decodes messages with the codec,
tracks which requests are outstanding in each direction, and enforces the state table below.

States (both roles share them; the VERSION exchange drives the transitions):

    START        no VERSION request yet: only VERSION may be requested
    NEGOTIATING  a VERSION request is outstanding: no other request may be sent or accepted
    READY        VERSION answered: every request except VERSION
    CLOSED       the peer sent EOF at a message boundary
    ERROR        the incoming stream is broken (RemoteProtocolError was raised)

A refused VERSION (error reply, or a reply we cannot accept) goes back to START.

Policy choices (documented here because the spec leaves them open):
  * A message is fatal only when the stream cannot be resynchronised: header size < 16, size
    above `max_message_size` (= max(max_data_xfer_size, largest WRITE_MULTI) + MESSAGE_OVERHEAD)
    or EOF inside a message. Everything else becomes a BadMessage event and is skipped.
  * errno of a BadMessage: EINVAL for malformed or not-now messages and fd misuse, E2BIG for a
    transfer count above max_data_xfer_size, ENOSYS for a command number outside 1..18,
    EOPNOTSUPP for a known command this layer does not implement (6, 14, 17, 18).
  * Requests received must be answered in the order they arrived (spec §7.9: strictly in order);
    this also makes a reused msg_id unambiguous. Replies to our own requests match by id.
  * A reply's header command is not trusted (QEMU does not check it either): the pending
    request's command decides the layout.
"""

from __future__ import annotations

import dataclasses
import enum
import errno as E
import sys
from collections import deque
from collections.abc import Sequence
from typing import Final, Literal, NamedTuple, NoReturn

from .buffer import ReceiveBuffer
from .codec import Codec, Malformed
from .constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    HEADER_SIZE,
    MESSAGE_OVERHEAD,
    PROTOCOL_MAJOR,
    REGION_INFO_SIZE,
    WRITE_MULTI_ENTRY_SIZE,
    WRITE_MULTI_MAX_ENTRIES,
    Command,
    MsgFlag,
    RegionFlag,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    BadMessage,
    DeviceGetRegionInfo,
    DmaRead,
    ErrorReply,
    Event,
    RegionInfoReply,
    RegionRead,
    Reply,
    Request,
    Version,
    VersionReply,
)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    START = "start"
    NEGOTIATING = "negotiating"
    READY = "ready"
    CLOSED = "closed"
    ERROR = "error"


class Sentinel(enum.Enum):
    """Non-event results of next_event()."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED
_READY: Final = State.READY
_ERROR: Final = State.ERROR
_CLOSED: Final = State.CLOSED


class _Step(enum.Enum):
    VERSION_REQUESTED = "version requested"
    VERSION_ACCEPTED = "version accepted"
    VERSION_REFUSED = "version refused"


#: The explicit state table; pairs not listed leave the state unchanged.
TRANSITIONS: Final[dict[tuple[State, _Step], State]] = {
    (State.START, _Step.VERSION_REQUESTED): State.NEGOTIATING,
    (State.NEGOTIATING, _Step.VERSION_ACCEPTED): State.READY,
    (State.NEGOTIATING, _Step.VERSION_REFUSED): State.START,
}

_CLIENT_REQUESTS: Final = frozenset(
    {
        Command.VERSION, Command.DMA_MAP, Command.DMA_UNMAP, Command.DEVICE_GET_INFO,
        Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_IRQ_INFO, Command.DEVICE_SET_IRQS,
        Command.REGION_READ, Command.REGION_WRITE, Command.DEVICE_RESET,
        Command.REGION_WRITE_MULTI, Command.DEVICE_FEATURE,
    }
)
_SERVER_REQUESTS: Final = frozenset({Command.DMA_READ, Command.DMA_WRITE})
#: Which requests each role may send (it receives the other set).
SENDS: Final = {Role.CLIENT: _CLIENT_REQUESTS, Role.SERVER: _SERVER_REQUESTS}
#: Which requests are allowed in each state.
ALLOWED_REQUESTS: Final = {
    State.START: frozenset({Command.VERSION}),
    State.NEGOTIATING: frozenset[Command](),
    State.READY: (_CLIENT_REQUESTS | _SERVER_REQUESTS) - {Command.VERSION},
}


class Outgoing(NamedTuple):
    """What to write: send `data` with `fds` attached to its first byte (one sendmsg).

    A NamedTuple rather than a frozen dataclass: it is built once per message sent.
    """

    data: bytes
    fds: tuple[int, ...] = ()
    msg_id: int = 0


class _Pending:
    """A request awaiting its reply, and the largest reply its sender can take (spec §7.1)."""

    __slots__ = ("msg_id", "command", "request", "reply_limit")

    def __init__(self, msg_id: int, command: int, request: Event, reply_limit: int) -> None:
        self.msg_id = msg_id
        self.command = command
        self.request = request
        self.reply_limit = reply_limit


# Plain ints for the hot path: IntFlag/IntEnum arithmetic and Command(n) run Python code.
_REPLY: Final = int(MsgFlag.REPLY)
_TYPE_MASK: Final = int(MsgFlag.TYPE_MASK)
_NO_REPLY: Final = int(MsgFlag.NO_REPLY)
_ERROR_FLAG: Final = int(MsgFlag.ERROR)
_VERSION: Final = int(Command.VERSION)
_REGION_INFO: Final = int(Command.DEVICE_GET_REGION_INFO)
_COUNTED_READS: Final = frozenset({int(Command.REGION_READ), int(Command.DMA_READ)})
#: Requests whose replies _check_reply looks at.
_CHECKED: Final = _COUNTED_READS | {_VERSION}


def _reply_limit(command: int, request: Event, request_size: int) -> int:
    """QEMU reads a reply into the request's buffer; these are its sizes (spec §1.1, §7.1)."""
    if command == _REGION_INFO and isinstance(request, DeviceGetRegionInfo):
        return HEADER_SIZE + request.argsz
    if command in _COUNTED_READS and isinstance(request, RegionRead | DmaRead):
        return 32 + request.count
    return request_size


def _check_reply(request: Event, reply: Event) -> str | None:
    """Reply rules that depend on the request; shared by send (ours) and receive (theirs)."""
    if isinstance(request, RegionRead | DmaRead):
        data = getattr(reply, "data", b"")
        if len(data) != request.count:
            return f"reply carries {len(data)} bytes for a request of {request.count}"
    if isinstance(request, Version) and isinstance(reply, VersionReply):
        if reply.major != request.major or reply.minor > request.minor:
            return f"version {reply.major}.{reply.minor} for {request.major}.{request.minor}"
    return None


def truncate_region_info(reply: RegionInfoReply, request_argsz: int) -> RegionInfoReply:
    """Fit a region-info reply into the client's buffer, as QEMU's two-step query expects.

    If the full payload (32 + caps) exceeds the request's argsz, send only the 32-byte struct
    with argsz = the full size and no fd: QEMU discards this reply and asks again with the
    bigger argsz (spec §2.5). CAPS and cap_offset stay as they are: QEMU 11.1 checks that a
    CAPS reply's cap_offset lies in 32..argsz *before* it looks at argsz, so a zeroed offset
    makes it fail the region with EINVAL instead of asking again.
    """
    full = REGION_INFO_SIZE + len(reply.caps)
    argsz = full if reply.argsz is None else reply.argsz
    if full <= request_argsz:
        return reply
    return dataclasses.replace(reply, caps=b"", argsz=max(argsz, full), fd=None)


class Connection:
    """One vfio-user peer. Feed it with receive_data(), pull events with next_event(), and turn
    events into bytes with send(). It never touches sockets or fds; fd integers pass through.

    `max_data_xfer_size` and `max_msg_fds` are plain attributes: a session may lower or raise
    them once capabilities are negotiated.
    """

    def __init__(
        self,
        role: Role,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        max_msg_fds: int = 16,
        byteorder: Literal["little", "big"] = sys.byteorder,
    ) -> None:
        self.role = role
        self.max_data_xfer_size = max_data_xfer_size
        self.max_msg_fds = max_msg_fds
        self.byteorder = byteorder
        self.state = State.START
        self._codec = Codec(byteorder)
        self._header = self._codec.header_struct
        self._buffer = ReceiveBuffer()
        self._inbound: deque[_Pending] = deque()  # received requests awaiting our reply
        self._outbound: dict[int, _Pending] = {}  # our requests awaiting their reply
        self._next_id = 0
        # Hot path, resolved once: in READY, the requests the peer may send, by plain int
        # command, to their compiled decoders (everything else takes the checked slow path).
        peer = SENDS[Role.SERVER if role is Role.CLIENT else Role.CLIENT]
        decoders = self._codec.decoders["request"]
        self._ready_decoders = {
            int(c): decoders[int(c)] for c in peer & ALLOWED_REQUESTS[State.READY]
        }
        self._reply_decoders = self._codec.decoders["reply"]
        self._request_encoders = self._codec.encoders["request"]
        self._reply_encoders = self._codec.encoders["reply"]

    # --- limits and ids --------------------------------------------------------------------------

    @property
    def max_data_xfer_size(self) -> int:
        return self._max_data_xfer_size

    @max_data_xfer_size.setter
    def max_data_xfer_size(self, value: int) -> None:
        self._max_data_xfer_size = value
        multi = 8 + WRITE_MULTI_MAX_ENTRIES * WRITE_MULTI_ENTRY_SIZE
        self._max_message_size = max(value, multi) + MESSAGE_OVERHEAD

    @property
    def max_message_size(self) -> int:
        """Largest acceptable incoming message; anything bigger is fatal (body not skippable)."""
        return self._max_message_size

    @property
    def pending_requests(self) -> tuple[int, ...]:
        """Ids of our requests still waiting for a reply."""
        return tuple(self._outbound)

    @property
    def outstanding_requests(self) -> tuple[int, ...]:
        """Ids of received requests we still owe a reply, in the order they must be answered."""
        return tuple(p.msg_id for p in self._inbound)

    @property
    def idle(self) -> bool:
        """READY, every received request answered, the stream still open: a point where
        another reader may take the stream over (``detach_buffer``) and give it back."""
        return self.state is _READY and not self._inbound and not self._buffer.eof

    def detach_buffer(self) -> list[tuple[bytes, tuple[int, ...]]]:
        """Hand over the bytes (a partial message at most, when idle) and fds received but
        not yet parsed, as pieces that keep each fd with its message when fed back in order
        through ``receive_data``. The caller owns the fds from here on."""
        if not self.idle:
            raise LocalProtocolError("the stream can only be handed over while idle")
        return self._buffer.detach()

    def next_msg_id(self) -> int:
        """A u16 id not used by any of our pending requests."""
        for _ in range(1 << 16):
            candidate = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            if candidate not in self._outbound:
                return candidate
        raise LocalProtocolError("all 65536 message ids are pending")

    # --- receiving -------------------------------------------------------------------------------

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add bytes from the socket; b"" means EOF. `fds` arrived with this chunk.

        Raises LocalProtocolError (taking no ownership of `fds`) after EOF or after an error.
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in ERROR state")
        if self._buffer.eof:
            raise LocalProtocolError("data received after EOF")
        if not data:
            if fds:
                raise LocalProtocolError("fds cannot arrive without data")
            self._buffer.eof = True
            return
        self._buffer.feed(data, fds)

    def discard_buffered(self) -> tuple[int, ...]:
        """Drop every byte still buffered and return the fds that came with them.

        For a peer that goes away (or is sent away) with messages unread: their fds are the
        caller's to close, as are the fds of every event it took.
        """
        _, fds = self._buffer.take_all()
        return fds

    def next_event(self) -> Event | Sentinel:
        """The next event, NEED_DATA, or CLOSED; raises RemoteProtocolError if fatal."""
        state = self.state
        if state is not _READY:
            if state is _ERROR:
                raise RemoteProtocolError("connection already failed")
            if state is _CLOSED:
                return CLOSED
        buffer = self._buffer
        hdr = buffer.unpack_head(self._header)
        if hdr is None:
            return self._starved()
        msg_id, command, size, flags, error = hdr
        if size < HEADER_SIZE:
            self._fail(f"message size {size} is below the header size")
        if size > self._max_message_size:
            self._fail(f"message size {size} exceeds {self._max_message_size}")
        if len(buffer) < size:
            return self._starved()
        body, fds = buffer.take(size, HEADER_SIZE)
        # Fast path: a request the peer may send now, REQUEST type with at most NO_REPLY set.
        if state is _READY and not flags & ~_NO_REPLY:
            decode = self._ready_decoders.get(command)
            if decode is not None:
                no_reply = flags != 0
                try:
                    ev = decode(body, fds, self._max_data_xfer_size, self.max_msg_fds,
                                msg_id, no_reply)
                except Malformed as exc:
                    ev = BadMessage(msg_id, command, exc.errno, exc.reason, fds, no_reply)
                    if not no_reply:
                        self._inbound.append(_Pending(msg_id, command, ev, size))
                    return ev
                if not no_reply:
                    self._inbound.append(_Pending(msg_id, command, ev,
                                                  _reply_limit(command, ev, size)))
                return ev
        if flags & _TYPE_MASK == _REPLY:
            return self._interpret_reply(msg_id, command, flags, error, body, fds)
        return self._interpret(msg_id, command, flags, body, fds)

    def _starved(self) -> Sentinel:
        if not self._buffer.eof:
            return NEED_DATA
        if len(self._buffer):
            self._fail("EOF in the middle of a message")
        self.state = State.CLOSED
        return CLOSED

    def _fail(self, reason: str) -> NoReturn:
        _, fds = self._buffer.take_all()
        self.state = State.ERROR
        raise RemoteProtocolError(reason, fds)

    def _interpret(self, msg_id: int, command: int, flags: int, body: bytes,
                   fds: tuple[int, ...]) -> Event:
        """A request off the fast path: every rule checked in turn, for the right errno."""
        msg_type = flags & _TYPE_MASK
        no_reply = bool(flags & _NO_REPLY)
        request_size = HEADER_SIZE + len(body)

        def bad(errno: int, reason: str) -> BadMessage:
            ev = BadMessage(msg_id, command, errno, reason, fds, no_reply)
            if not no_reply:
                self._inbound.append(_Pending(msg_id, command, ev, request_size))
            return ev

        if msg_type != MsgFlag.REQUEST:
            return bad(E.EINVAL, f"unknown message type {msg_type}")
        if flags & _ERROR_FLAG:
            return bad(E.EINVAL, "ERROR flag on a request")
        try:
            cmd = Command(command)
        except ValueError:
            return bad(E.ENOSYS, f"unknown command {command}")
        if cmd in SENDS[self.role]:
            return bad(E.EINVAL, f"{cmd.name} is not a request a {self.role.value} accepts")
        if cmd not in SENDS[Role.CLIENT] | SENDS[Role.SERVER]:
            return bad(E.EOPNOTSUPP, f"{cmd.name} is not supported")
        if cmd not in ALLOWED_REQUESTS.get(self.state, frozenset()):
            return bad(E.EINVAL, f"{cmd.name} not allowed in state {self.state.name}")
        if cmd is Command.VERSION and no_reply:
            return bad(E.EINVAL, "VERSION with NO_REPLY")
        try:
            ev = self._codec.decoders["request"][command](
                body, fds, self._max_data_xfer_size, self.max_msg_fds, msg_id, no_reply)
            if isinstance(ev, Version) and ev.major != PROTOCOL_MAJOR:
                raise Malformed(E.EINVAL, f"unsupported major version {ev.major}")
        except Malformed as exc:
            return bad(exc.errno, exc.reason)
        if not no_reply:
            limit = _reply_limit(command, ev, request_size)
            self._inbound.append(_Pending(msg_id, command, ev, limit))
        if cmd is Command.VERSION:
            self._step(_Step.VERSION_REQUESTED)
        return ev

    def _interpret_reply(self, msg_id: int, header_command: int, flags: int, error: int,
                         body: bytes, fds: tuple[int, ...]) -> Event:
        pending = self._outbound.pop(msg_id, None)
        if pending is None:
            return BadMessage(msg_id, header_command, E.EINVAL, "unexpected reply", fds, True)
        command = pending.command
        ev: Event
        try:
            if HEADER_SIZE + len(body) > pending.reply_limit:
                raise Malformed(E.EINVAL, f"reply larger than the {pending.reply_limit} asked")
            if flags & _ERROR_FLAG:
                if body or fds:
                    raise Malformed(E.EINVAL, "error reply with a body or fds")
                if error <= 0:
                    raise Malformed(E.EINVAL, "error reply without an errno")
                ev = ErrorReply(msg_id, command, error)
            else:
                ev = self._reply_decoders[command](body, fds, self._max_data_xfer_size,
                                                   self.max_msg_fds, msg_id, False)
                if command in _CHECKED and (
                    reason := _check_reply(pending.request, ev)
                ) is not None:
                    raise Malformed(E.EINVAL, reason)
        except Malformed as exc:
            ev = BadMessage(msg_id, command, exc.errno, exc.reason, fds, True)
        if command == _VERSION:
            accepted = isinstance(ev, VersionReply)
            self._step(_Step.VERSION_ACCEPTED if accepted else _Step.VERSION_REFUSED)
        return ev

    def _step(self, step: _Step) -> None:
        self.state = TRANSITIONS.get((self.state, step), self.state)

    # --- sending ---------------------------------------------------------------------------------

    def send(self, event: Event) -> Outgoing:
        """Encode `event`; raises LocalProtocolError (and changes nothing) if not allowed now."""
        state = self.state
        if state is _ERROR or state is _CLOSED:
            raise LocalProtocolError(f"cannot send in state {state.name}")
        if isinstance(event, Reply | ErrorReply):
            return self._send_reply(event)
        if isinstance(event, Request):
            return self._send_request(event)
        raise LocalProtocolError(f"{type(event).__name__} cannot be sent")

    def _send_request(self, ev: Request) -> Outgoing:
        cmd = ev.command
        if cmd not in SENDS[self.role]:
            raise LocalProtocolError(f"a {self.role.value} does not send {cmd.name}")
        if cmd not in ALLOWED_REQUESTS.get(self.state, frozenset()):
            raise LocalProtocolError(f"{cmd.name} not allowed in state {self.state.name}")
        no_reply = ev.no_reply
        if no_reply and cmd == _VERSION:
            raise LocalProtocolError("VERSION needs a reply")
        if ev.msg_id is None:
            msg_id = self.next_msg_id()
        else:
            msg_id = ev.msg_id
            if not no_reply and msg_id in self._outbound:
                raise LocalProtocolError(f"msg_id {msg_id} is already pending")
        try:
            data, fds = self._request_encoders[cmd](
                ev, msg_id, _NO_REPLY if no_reply else 0, self._max_data_xfer_size,
                self.max_msg_fds)
        except Malformed as exc:
            raise LocalProtocolError(exc.reason) from None
        if not no_reply:
            # The pending entry keeps the event as given: only its fields that shape the
            # reply (count, argsz, version) are read back, never its msg_id.
            self._outbound[msg_id] = _Pending(msg_id, cmd, ev, _reply_limit(cmd, ev, len(data)))
        if cmd == _VERSION:
            self._step(_Step.VERSION_REQUESTED)
        return Outgoing(data, fds, msg_id)

    def _send_reply(self, ev: Reply | ErrorReply) -> Outgoing:
        inbound = self._inbound
        if not inbound or inbound[0].msg_id != ev.msg_id:
            owed = inbound[0].msg_id if inbound else None
            raise LocalProtocolError(
                f"msg_id {ev.msg_id} is not the next request to answer (next: {owed})"
            )
        pending = inbound[0]
        command = pending.command
        fds: tuple[int, ...]
        if type(ev) is ErrorReply:
            if ev.command is not None and ev.command != command:
                raise LocalProtocolError(f"error reply for command {ev.command}, "
                                         f"request was {command}")
            if ev.errno <= 0:
                raise LocalProtocolError("an error reply needs a positive errno")
            try:
                data = self._codec.encode_error(ev.msg_id, command, ev.errno)
            except Malformed as exc:
                raise LocalProtocolError(exc.reason) from None
            fds = ()
        else:
            assert isinstance(ev, Reply)
            request = pending.request
            if type(request) is BadMessage or ev.command != command:
                raise LocalProtocolError(
                    f"{type(ev).__name__} cannot answer {type(request).__name__}"
                )
            if isinstance(ev, RegionInfoReply):
                if isinstance(request, DeviceGetRegionInfo):
                    ev = truncate_region_info(ev, request.argsz)
                _check_region_info(ev)
            if command in _CHECKED and (reason := _check_reply(request, ev)) is not None:
                raise LocalProtocolError(reason)
            try:
                data, fds = self._reply_encoders[command](
                    ev, ev.msg_id, _REPLY, self._max_data_xfer_size, self.max_msg_fds)
            except Malformed as exc:
                raise LocalProtocolError(exc.reason) from None
            if len(data) > pending.reply_limit:
                raise LocalProtocolError(
                    f"reply of {len(data)} bytes exceeds the peer's buffer of "
                    f"{pending.reply_limit} (spec §7.1)"
                )
        inbound.popleft()
        if command == _VERSION:
            ok = isinstance(ev, VersionReply)
            self._step(_Step.VERSION_ACCEPTED if ok else _Step.VERSION_REFUSED)
        return Outgoing(data, fds, ev.msg_id)


def _check_region_info(ev: RegionInfoReply) -> None:
    if ev.caps and not ev.flags & RegionFlag.CAPS:
        raise LocalProtocolError("region-info caps without the CAPS flag")
    if ev.caps and not REGION_INFO_SIZE <= ev.cap_offset < REGION_INFO_SIZE + len(ev.caps):
        raise LocalProtocolError(f"cap_offset {ev.cap_offset} does not point into the caps")
