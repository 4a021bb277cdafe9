"""The DMA contract between devices and the platform.

Every device DMA goes through one :class:`DmaSpace`, so the platform (a plain map table without
an IOMMU, a PE's TCE tables on sPAPR) decides what an IOVA means and what a fault does. Devices
never touch client memory any other way. It lives here, in the platform layer, so that both the
providers (``vfiod.spapr.pe_dma``, the session's plain map table) and the devices that consume
it import it downwards; ``vfiod.pci.dma`` re-exports it for device code.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Protocol, runtime_checkable

#: Most iovecs one preadv/pwritev call takes (Linux UIO_MAXIOV); callers split longer lists.
IOV_MAX = 1024


class DmaFault(Exception):
    """A DMA access hit an IOVA that is unmapped, read-only, or otherwise refused.

    Carries the failing IOVA and length so a device can latch them in an error register, and
    the platform can freeze a PE.
    """

    def __init__(self, iova: int, length: int, write: bool, reason: str = "") -> None:
        self.iova = iova
        self.length = length
        self.write = write
        self.reason = reason
        kind = "write" if write else "read"
        suffix = f": {reason}" if reason else ""
        super().__init__(f"DMA {kind} fault at {iova:#x}+{length:#x}{suffix}")


@runtime_checkable
class DmaSpace(Protocol):
    """IOVA space as seen by the device; both methods raise :class:`DmaFault`.

    A DMA view may also offer the optional zero-copy method of :class:`ZeroCopyDma`
    (``iovecs``); devices look for it with :func:`zero_copy` and fall back to ``read``/``write``.
    """

    def read(self, iova: int, length: int) -> bytes: ...

    def write(self, iova: int, data: bytes) -> None: ...


class IovecLease:
    """Host memory of a translated scatter-gather list, lent for one ``with`` block.

    ``with dma.iovecs(pieces, write) as views:`` gives one memoryview per host-contiguous piece,
    in order, for ``os.preadv``/``os.pwritev`` (the kernel moves the bytes; Python must never
    index or copy them: a client that truncates its RAM file would turn that into a SIGBUS).
    Leaving the block releases every view, so the DMA view can close and unmap its files later;
    views the caller derived (slices after a short count) are the caller's to release.

    An ``OSError(EFAULT)`` leaving the block (the kernel hit memory that is no longer there, a
    truncated client file) becomes a :class:`DmaFault` built by ``on_efault``; a platform that
    freezes on faults freezes there too.
    """

    __slots__ = ("views", "_held", "_on_efault")

    def __init__(
        self,
        views: list[memoryview],
        held: Sequence[memoryview] = (),
        on_efault: Callable[[OSError], DmaFault] | None = None,
    ) -> None:
        self.views = views
        self._held = list(held)  # base views the pieces were sliced from
        self._on_efault = on_efault

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.views)

    def release(self) -> None:
        """Release every view (idempotent); the lease is empty afterwards."""
        for v in self.views:
            v.release()
        for v in self._held:
            v.release()
        self.views = []
        self._held = []

    def __enter__(self) -> list[memoryview]:
        return self.views

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        if isinstance(exc, OSError) and exc.errno == errno.EFAULT:
            if self._on_efault is not None:
                raise self._on_efault(exc) from exc
            raise DmaFault(0, 0, False, "guest memory went away during the transfer") from exc


@runtime_checkable
class ZeroCopyDma(Protocol):
    """The optional zero-copy method of a DMA view.

    ``iovecs(pieces, write)`` translates the whole list of (iova, length) ``pieces`` first
    (``write``: the device writes guest memory, so it needs write permission; else read) and
    raises :class:`DmaFault` before lending anything if any byte faults. It returns an
    :class:`IovecLease` of host memoryviews for the kernel to fill or drain.
    """

    def iovecs(self, pieces: Sequence[tuple[int, int]], write: bool) -> IovecLease: ...


def zero_copy(dma: object) -> Callable[[Sequence[tuple[int, int]], bool], IovecLease] | None:
    """The ``iovecs`` method of ``dma``, or None if the view only offers read/write."""
    fn = getattr(dma, "iovecs", None)
    return fn if callable(fn) else None


class NoDmaSpace:
    """Placeholder before the session attaches a DMA view: every access faults."""

    def read(self, iova: int, length: int) -> bytes:
        raise DmaFault(iova, length, False, "no DMA space attached")

    def write(self, iova: int, data: bytes) -> None:
        raise DmaFault(iova, len(data), True, "no DMA space attached")
