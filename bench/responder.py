"""A minimal blocking vfio-user responder: the floor a Python server pays per message.

No model, no trio, no protocol package: it reads each message's 16-byte header (with any fds,
which it closes at once) and then its body, and answers success with a reply of the size vfiod
sends (REGION_READ: the request's head and ``count`` zero bytes; VERSION: a small capability
string; everything else: the header alone; NO_REPLY: nothing). One client at a time.

Run: ``python -m bench.responder SOCKET`` (prints ``ready`` once it listens).
"""

from __future__ import annotations

import os
import socket
import struct
import sys

HEADER = struct.Struct("=HHIII")
VERSION, REGION_READ = 1, 9
FLAG_REPLY, FLAG_NO_REPLY = 0x1, 0x10
VERSION_BODY = struct.pack("=HH", 0, 0) + b'{"capabilities":{"max_msg_fds":16}}\0'
_ANC = socket.CMSG_SPACE(64 * 4)


def serve_one(conn: socket.socket) -> int:
    """Answer one client until it closes; returns the number of messages."""
    recvmsg, recv, send = conn.recvmsg, conn.recv, conn.send
    pack, unpack = HEADER.pack, HEADER.unpack
    messages = 0
    while True:
        head, anc, _, _ = recvmsg(16, _ANC, socket.MSG_WAITALL)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"={len(data) // 4}i", data[: len(data) // 4 * 4]):
                    os.close(fd)
        if len(head) < 16:
            return messages
        msg_id, command, size, flags, _ = unpack(head)
        body = recv(size - 16, socket.MSG_WAITALL) if size > 16 else b""
        messages += 1
        if flags & FLAG_NO_REPLY:
            continue
        if command == REGION_READ:
            count = struct.unpack_from("=I", body, 12)[0]
            payload = body[:16] + bytes(count)
        elif command == VERSION:
            payload = VERSION_BODY
        else:
            payload = b""
        send(pack(msg_id, command, 16 + len(payload), FLAG_REPLY, 0) + payload)


def main(argv: list[str]) -> int:
    path = argv[1]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                serve_one(conn)
            except OSError:
                pass  # the client went away mid-message: wait for the next one


if __name__ == "__main__":
    sys.exit(main(sys.argv))
