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

import contextlib
import dataclasses
import enum
import errno as E
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NoReturn

from .buffer import ReceiveBuffer
from .codec import Codec, Kind, Malformed
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


@dataclass(frozen=True)
class Outgoing:
    """What to write: send `data` with `fds` attached to its first byte (one sendmsg)."""

    data: bytes
    fds: tuple[int, ...] = ()
    msg_id: int = 0


@dataclass(frozen=True)
class _Pending:
    """A request awaiting its reply, and the largest reply its sender can take (spec §7.1)."""

    msg_id: int
    command: int
    request: Event
    reply_limit: int


def _reply_limit(command: int, request: Event, request_size: int) -> int:
    """QEMU reads a reply into the request's buffer; these are its sizes (spec §1.1, §7.1)."""
    if isinstance(request, DeviceGetRegionInfo):
        return HEADER_SIZE + request.argsz
    if isinstance(request, RegionRead | DmaRead):
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
        self._buffer = ReceiveBuffer()
        self._inbound: deque[_Pending] = deque()  # received requests awaiting our reply
        self._outbound: dict[int, _Pending] = {}  # our requests awaiting their reply
        self._next_id = 0

    # --- limits and ids --------------------------------------------------------------------------

    @property
    def max_message_size(self) -> int:
        """Largest acceptable incoming message; anything bigger is fatal (body not skippable)."""
        multi = 8 + WRITE_MULTI_MAX_ENTRIES * WRITE_MULTI_ENTRY_SIZE
        return max(self.max_data_xfer_size, multi) + MESSAGE_OVERHEAD

    @property
    def pending_requests(self) -> tuple[int, ...]:
        """Ids of our requests still waiting for a reply."""
        return tuple(self._outbound)

    @property
    def outstanding_requests(self) -> tuple[int, ...]:
        """Ids of received requests we still owe a reply, in the order they must be answered."""
        return tuple(p.msg_id for p in self._inbound)

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

    def next_event(self) -> Event | Sentinel:
        """The next event, NEED_DATA, or CLOSED; raises RemoteProtocolError if fatal."""
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection already failed")
        if self.state is State.CLOSED:
            return CLOSED
        raw = self._buffer.peek(HEADER_SIZE)
        if raw is None:
            return self._starved()
        hdr = self._codec.parse_header(raw)
        size = hdr["size"]
        if size < HEADER_SIZE:
            self._fail(f"message size {size} is below the header size")
        if size > self.max_message_size:
            self._fail(f"message size {size} exceeds {self.max_message_size}")
        if len(self._buffer) < size:
            return self._starved()
        message, fds = self._buffer.take(size)
        return self._interpret(hdr, message[HEADER_SIZE:], fds)

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

    def _interpret(self, hdr: dict[str, int], body: bytes, fds: tuple[int, ...]) -> Event:
        msg_id, command, flags = hdr["msg_id"], hdr["command"], hdr["flags"]
        msg_type = flags & MsgFlag.TYPE_MASK
        if msg_type == MsgFlag.REPLY:
            return self._interpret_reply(hdr, body, fds)
        no_reply = bool(flags & MsgFlag.NO_REPLY)
        request_size = HEADER_SIZE + len(body)

        def bad(errno: int, reason: str) -> BadMessage:
            ev = BadMessage(msg_id, command, errno, reason, fds, no_reply)
            if not no_reply:
                self._inbound.append(_Pending(msg_id, command, ev, request_size))
            return ev

        if msg_type != MsgFlag.REQUEST:
            return bad(E.EINVAL, f"unknown message type {msg_type}")
        if flags & MsgFlag.ERROR:
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
            ev = self._decode("request", cmd, body, fds, msg_id=msg_id, no_reply=no_reply)
            if isinstance(ev, Version) and ev.major != PROTOCOL_MAJOR:
                raise Malformed(E.EINVAL, f"unsupported major version {ev.major}")
        except Malformed as exc:
            return bad(exc.errno, exc.reason)
        if not no_reply:
            limit = _reply_limit(cmd, ev, request_size)
            self._inbound.append(_Pending(msg_id, cmd, ev, limit))
        if cmd is Command.VERSION:
            self._step(_Step.VERSION_REQUESTED)
        return ev

    def _interpret_reply(self, hdr: dict[str, int], body: bytes, fds: tuple[int, ...]) -> Event:
        msg_id, flags = hdr["msg_id"], hdr["flags"]
        pending = self._outbound.pop(msg_id, None)
        if pending is None:
            return BadMessage(msg_id, hdr["command"], E.EINVAL, "unexpected reply", fds, True)
        command = pending.command
        ev: Event
        try:
            if HEADER_SIZE + len(body) > pending.reply_limit:
                raise Malformed(E.EINVAL, f"reply larger than the {pending.reply_limit} asked")
            if flags & MsgFlag.ERROR:
                if body or fds:
                    raise Malformed(E.EINVAL, "error reply with a body or fds")
                if hdr["error"] <= 0:
                    raise Malformed(E.EINVAL, "error reply without an errno")
                ev = ErrorReply(msg_id, command, hdr["error"])
            else:
                ev = self._decode("reply", Command(command), body, fds, msg_id=msg_id)
                if (reason := _check_reply(pending.request, ev)) is not None:
                    raise Malformed(E.EINVAL, reason)
        except Malformed as exc:
            ev = BadMessage(msg_id, command, exc.errno, exc.reason, fds, True)
        if command == Command.VERSION:
            accepted = isinstance(ev, VersionReply)
            self._step(_Step.VERSION_ACCEPTED if accepted else _Step.VERSION_REFUSED)
        return ev

    def _decode(self, kind: Kind, cmd: Command, body: bytes, fds: tuple[int, ...],
                **ids: int | bool) -> Event:
        return self._codec.decode(kind, cmd, body, fds, self.max_data_xfer_size,
                                  self.max_msg_fds, **ids)

    def _step(self, step: _Step) -> None:
        self.state = TRANSITIONS.get((self.state, step), self.state)

    # --- sending ---------------------------------------------------------------------------------

    def send(self, event: Event) -> Outgoing:
        """Encode `event`; raises LocalProtocolError (and changes nothing) if not allowed now."""
        if self.state in (State.ERROR, State.CLOSED):
            raise LocalProtocolError(f"cannot send in state {self.state.name}")
        if isinstance(event, Request):
            return self._send_request(event)
        if isinstance(event, Reply | ErrorReply):
            return self._send_reply(event)
        raise LocalProtocolError(f"{type(event).__name__} cannot be sent")

    def _send_request(self, ev: Request) -> Outgoing:
        cmd = ev.command
        if cmd not in SENDS[self.role]:
            raise LocalProtocolError(f"a {self.role.value} does not send {cmd.name}")
        if cmd not in ALLOWED_REQUESTS.get(self.state, frozenset()):
            raise LocalProtocolError(f"{cmd.name} not allowed in state {self.state.name}")
        if cmd is Command.VERSION and ev.no_reply:
            raise LocalProtocolError("VERSION needs a reply")
        if ev.msg_id is None:
            msg_id = self.next_msg_id()
        else:
            msg_id = ev.msg_id
            if not ev.no_reply and msg_id in self._outbound:
                raise LocalProtocolError(f"msg_id {msg_id} is already pending")
        flags = MsgFlag.REQUEST | (MsgFlag.NO_REPLY if ev.no_reply else 0)
        data, fds = self._encode("request", ev, msg_id, flags)
        if not ev.no_reply:
            sent = dataclasses.replace(ev, msg_id=msg_id)
            self._outbound[msg_id] = _Pending(msg_id, cmd, sent, _reply_limit(cmd, sent, len(data)))
        if cmd is Command.VERSION:
            self._step(_Step.VERSION_REQUESTED)
        return Outgoing(data, fds, msg_id)

    def _send_reply(self, ev: Reply | ErrorReply) -> Outgoing:
        if not self._inbound or self._inbound[0].msg_id != ev.msg_id:
            owed = self._inbound[0].msg_id if self._inbound else None
            raise LocalProtocolError(
                f"msg_id {ev.msg_id} is not the next request to answer (next: {owed})"
            )
        pending = self._inbound[0]
        if isinstance(ev, ErrorReply):
            if ev.command is not None and ev.command != pending.command:
                raise LocalProtocolError(f"error reply for command {ev.command}, "
                                         f"request was {pending.command}")
            if ev.errno <= 0:
                raise LocalProtocolError("an error reply needs a positive errno")
            with _ours():
                data = self._codec.encode_error(ev.msg_id, pending.command, ev.errno)
            fds: tuple[int, ...] = ()
        else:
            if isinstance(pending.request, BadMessage) or ev.command != pending.command:
                raise LocalProtocolError(
                    f"{type(ev).__name__} cannot answer {type(pending.request).__name__}"
                )
            if isinstance(ev, RegionInfoReply) and isinstance(pending.request,
                                                             DeviceGetRegionInfo):
                ev = truncate_region_info(ev, pending.request.argsz)
            if (reason := _check_reply(pending.request, ev)) is not None:
                raise LocalProtocolError(reason)
            data, fds = self._encode("reply", ev, ev.msg_id, MsgFlag.REPLY)
            if len(data) > pending.reply_limit:
                raise LocalProtocolError(
                    f"reply of {len(data)} bytes exceeds the peer's buffer of "
                    f"{pending.reply_limit} (spec §7.1)"
                )
        self._inbound.popleft()
        if pending.command == Command.VERSION:
            ok = isinstance(ev, VersionReply)
            self._step(_Step.VERSION_ACCEPTED if ok else _Step.VERSION_REFUSED)
        return Outgoing(data, fds, ev.msg_id)

    def _encode(self, kind: Kind, ev: Request | Reply, msg_id: int,
                flags: int) -> tuple[bytes, tuple[int, ...]]:
        if isinstance(ev, RegionInfoReply) and ev.caps and not ev.flags & RegionFlag.CAPS:
            raise LocalProtocolError("region-info caps without the CAPS flag")
        if isinstance(ev, RegionInfoReply) and ev.caps and not (
            REGION_INFO_SIZE <= ev.cap_offset < REGION_INFO_SIZE + len(ev.caps)
        ):
            raise LocalProtocolError(f"cap_offset {ev.cap_offset} does not point into the caps")
        with _ours():
            return self._codec.encode(kind, ev, msg_id, flags, self.max_data_xfer_size,
                                      self.max_msg_fds)



@contextlib.contextmanager
def _ours() -> Iterator[None]:
    """Codec rule violations while encoding are the caller's fault."""
    try:
        yield
    except Malformed as exc:
        raise LocalProtocolError(exc.reason) from None
