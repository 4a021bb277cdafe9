"""Coverage-guided fuzzing of the sans-I/O wire layer (protocol/) with atheris (libFuzzer).

Each input drives one Connection (either role, negotiated or not, either byte order): the
bytes arrive in chunks with fake fds attached, every event is taken and every request it owes
is answered, and the reader may stop at any point. Invariants checked on every input:

* nothing but RemoteProtocolError ever comes out of next_event(), and answering an owed
  request is always possible (no LocalProtocolError);
* every fd fed in comes back exactly once: in an event, in the error that broke the stream, or
  from discard_buffered() when the reader stops.

    python tests/hostile/protocol_atheris.py -runs=2000000      # libFuzzer flags pass through
    python tests/hostile/protocol_atheris.py corpus_dir/         # keep what it finds

atheris is not a test dependency (`make fuzz` installs it): pip install atheris.
"""

from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path

import atheris

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["vfiod.protocol"]):
    from vfiod.protocol import (
        CLOSED,
        NEED_DATA,
        BadMessage,
        Connection,
        DeviceFeature,
        DeviceGetInfo,
        DeviceGetIrqInfo,
        DeviceGetRegionInfo,
        DmaMap,
        ErrorReply,
        Event,
        RegionRead,
        RemoteProtocolError,
        Request,
        Role,
        Version,
        VersionReply,
        event_fds,
        server_capabilities,
    )
    from vfiod.protocol import connection as _connection

# A Connection compiles its codec when built (~10 ms); the codec is immutable, so one per byte
# order serves every input. Nothing else about the Connection under test changes.
_connection.Codec = functools.cache(_connection.Codec)  # type: ignore[misc]


def _negotiated(role: Role, order: str) -> Connection:
    client = Connection(Role.CLIENT, byteorder=order)  # type: ignore[arg-type]
    server = Connection(Role.SERVER, byteorder=order)  # type: ignore[arg-type]
    out = client.send(Version(caps=server_capabilities()))
    server.receive_data(out.data, out.fds)
    req = server.next_event()
    assert isinstance(req, Version) and req.msg_id is not None
    out = server.send(VersionReply(caps=server_capabilities(), msg_id=req.msg_id))
    client.receive_data(out.data, out.fds)
    assert isinstance(client.next_event(), VersionReply)
    if role is Role.CLIENT:
        # pending requests of several layouts, so random replies reach their decoders
        for r in (DmaMap(3, 0, 0, 4096), RegionRead(0, 7, 4), DeviceGetRegionInfo(0, argsz=64),
                  DeviceGetInfo(), DeviceGetIrqInfo(2), DeviceFeature(0, bytes(16))):
            client.send(r)
        return client
    return server


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    role = Role.SERVER if fdp.ConsumeBool() else Role.CLIENT
    order = "little" if fdp.ConsumeBool() else "big"
    conn = _negotiated(role, order) if fdp.ConsumeBool() else Connection(
        role, byteorder=order)  # type: ignore[arg-type]
    sent: list[int] = []
    got: list[int] = []
    next_fd = 1000
    broken = False
    while fdp.remaining_bytes() and not broken:
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300))
        if not chunk:
            break
        fds = tuple(range(next_fd, next_fd + fdp.ConsumeIntInRange(0, 3)))
        next_fd += len(fds)
        conn.receive_data(chunk, fds)
        sent.extend(fds)
        if fdp.ConsumeIntInRange(0, 15) == 0:
            break  # the reader stops here: a session that ends with bytes still buffered
        while True:
            try:
                ev = conn.next_event()
            except RemoteProtocolError as exc:
                got.extend(exc.fds)
                broken = True
                break
            if ev is NEED_DATA or ev is CLOSED:
                break
            assert isinstance(ev, Event)
            got.extend(event_fds(ev) if not isinstance(ev, BadMessage) else ev.fds)
            owes = isinstance(ev, BadMessage | Request) and not getattr(ev, "no_reply", True)
            if owes:
                conn.send(ErrorReply(ev.msg_id, None, errno.EIO))  # type: ignore[union-attr]
    got.extend(conn.discard_buffered())
    assert sorted(got) == sorted(sent), (sorted(got), sorted(sent))
    assert conn.discard_buffered() == ()


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
