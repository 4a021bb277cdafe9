"""Receive buffer that remembers which stream position each batch of fds arrived with.

Where fds go: the sender attaches them to the first bytes of its sendmsg. A Linux AF_UNIX stream
recvmsg may first return bytes of earlier sends that carried no fds, but it stops right after
the send that carries fds (unix_stream_read_generic ends the read once it has picked up fds). So
a chunk's fds belong to the message that holds the chunk's *last* byte: seen with QEMU 11.1, which
pipelines a DMA_UNMAP and the next DMA_MAP (with its RAM fd) into one chunk. Positions are
absolute stream offsets, which makes the attribution independent of how the bytes were split.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence


class ReceiveBuffer:
    """Bytes plus fd marks; messages are taken off the front whole."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0  # absolute stream offset of self._data[0]
        self._marks: deque[tuple[int, tuple[int, ...]]] = deque()
        self.eof = False

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Append a chunk; `fds` are attributed to the chunk's last byte."""
        if fds:
            if not data:
                raise ValueError("fds must arrive with at least one byte")
            self._marks.append((self._start + len(self._data) + len(data) - 1, tuple(fds)))
        self._data += data

    def peek(self, n: int) -> bytes | None:
        """The first `n` bytes, or None if fewer are buffered."""
        if len(self._data) < n:
            return None
        return bytes(self._data[:n])

    def unpack_head(self, st: struct.Struct) -> tuple[int, ...] | None:
        """`st` unpacked from the front without copying, or None if fewer bytes are buffered."""
        if len(self._data) < st.size:
            return None
        return st.unpack_from(self._data)

    def take(self, n: int, skip: int = 0) -> tuple[bytes, tuple[int, ...]]:
        """Remove `n` bytes (all must be buffered) and the fds that arrived with them.

        Returns the bytes after the first `skip` (a message without its header, in one copy).
        Removing from the front of a bytearray is O(1) in CPython (it moves its start), so a
        chunk of many messages is not copied again for each message taken off it.
        """
        data = self._data
        if len(data) < n:
            raise ValueError("not enough data buffered")
        if n - skip < 4096:
            chunk = bytes(data[skip:n])  # two small copies beat a memoryview's setup
        else:
            with memoryview(data) as view, view[skip:n] as part:
                chunk = bytes(part)
        del data[:n]
        self._start += n
        if not self._marks:
            return chunk, ()
        fds: list[int] = []
        while self._marks and self._marks[0][0] < self._start:
            fds.extend(self._marks.popleft()[1])
        return chunk, tuple(fds)

    def detach(self) -> list[tuple[bytes, tuple[int, ...]]]:
        """Remove everything as pieces cut right after each fd batch's byte, so that feeding
        the pieces in order (to this class or to another reader of the same stream) attributes
        every fd to the message it came with."""
        data = bytes(self._data)
        pieces: list[tuple[bytes, tuple[int, ...]]] = []
        start = 0
        for last, fds in self._marks:
            end = last - self._start + 1
            pieces.append((data[start:end], fds))
            start = end
        if start < len(data):
            pieces.append((data[start:], ()))
        self._start += len(self._data)
        self._data.clear()
        self._marks.clear()
        return pieces

    def take_all(self) -> tuple[bytes, tuple[int, ...]]:
        """Remove everything: used when the stream is broken and nothing can be parsed."""
        return self.take(len(self._data))
