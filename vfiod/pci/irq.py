"""Interrupt delivery: eventfds per IRQ index, SET_IRQS semantics, INTx, MSI and MSI-X masking.

Rules (spec section 2.7, pitfalls 7 and 10, lab notes):

* fds handed to :meth:`IrqController.set_irqs` are owned by the controller from the call on,
  also when it raises; they are closed when replaced, de-assigned, on reset and on close.
* A DATA_EVENTFD|TRIGGER message carrying no fds de-assigns ``start..start+count``.
* DATA_NONE|TRIGGER with count 0 disables the whole index.
* INTx is auto-masked: after one assertion nothing more is sent until an UNMASK; the COMMAND
  INTx-disable bit blocks delivery.
* MSI-X vector *v* fires if an eventfd is installed, MSI-X is enabled, the function mask is
  clear, and *v* is masked neither by an explicit SET_IRQS MASK nor by a mask bit the client
  wrote into our own table. On q35 QEMU never sends UNMASK, so an installed fd alone must be
  enough. A vector that cannot fire gets its PBA bit set and is delivered on unmask / fd install.

* MSI vector *v* (folded into the vectors software granted) fires if MSI is enabled, an
  eventfd is installed and no SET_IRQS MASK holds it; otherwise it is remembered as pending and
  delivered on fd install / unmask, like an MSI-X vector (the cap has no per-vector masks).

A C mirror (``mirror``, cffi_build/irq.h) lets C threads (the NVMe data mover's completions)
raise message vectors without Python: for each vector, a duplicate of the eventfd to signal when
the vector can be delivered right now, kept current here after every change of fds, masks,
enables and the INTx level. What C cannot deliver it records as pending, and the function fires
it here (:meth:`IrqController.fire_pending`), so PBA and pending bits stay this class's.

MSI-X irq info advertises EVENTFD only: without MASKABLE QEMU handles guest masking itself (the
path proven against QEMU), and without NORESIZE it adds vectors one by one instead of tearing
all of them down. MASK/UNMASK are still honoured if sent.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from vfiod.pci.caps import MsiCap, MsixCap
from vfiod.pci.config import ConfigSpace, einval
from vfiod.pci.constants import (
    IRQ_ERR,
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INTX,
    IRQ_MSI,
    IRQ_MSIX,
    IRQ_REQ,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_MASK_ALL,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_MASK,
    IRQ_SET_DATA_NONE,
    NUM_IRQS,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_INTERRUPT_PIN,
    PCI_STATUS,
    PCI_STATUS_INTERRUPT,
)
from vfiod.pci.msix import MsixPba, MsixTable


@dataclass(frozen=True)
class IrqInfo:
    """What DEVICE_GET_IRQ_INFO reports for one index."""

    index: int
    flags: int
    count: int


def signal_eventfd(fd: int) -> None:
    """Raise an interrupt: add 1 to the eventfd counter (8-byte native value)."""
    with contextlib.suppress(BlockingIOError):  # counter saturated: already pending
        os.eventfd_write(fd, 1)


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _c_module() -> Any:
    """The C module's (ffi, lib), or None without it (or with VFIOD_NO_CFFI=1)."""
    if os.environ.get("VFIOD_NO_CFFI", "") not in ("", "0"):
        return None
    try:
        from vfiod import _fast  # type: ignore[attr-defined]  # optional C extension
    except ImportError:  # pragma: no cover - depends on the build
        return None
    return _fast if hasattr(_fast.lib, "vfiod_irq_init") else None


MIRROR_VECTORS = 256  #: vectors the C mirror covers (cffi_build/irq.h)


class _Index:
    """eventfds and explicit SET_IRQS masks of one IRQ index."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.fds: list[int | None] = [None] * count
        self.masked = [False] * count
        #: bumped whenever a sub-index gets an fd: a new eventfd may reuse an old fd's number
        self.gen = [0] * count

    def assign(self, sub: int, fd: int | None) -> None:
        old = self.fds[sub]
        if old is not None and old != fd:
            _close(old)
        self.fds[sub] = fd
        self.gen[sub] += 1

    def clear(self) -> None:
        for i in range(self.count):
            self.assign(i, None)
        self.masked = [False] * self.count


class IrqController:
    """All interrupt state of one function; the function forwards SET_IRQS here."""

    msix_info_flags = IRQ_INFO_EVENTFD
    intx_info_flags = IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED

    def __init__(
        self,
        config: ConfigSpace,
        *,
        msix: MsixCap | None = None,
        err_irq: bool = True,
    ) -> None:
        self.config = config
        self.msix: MsixCap | None = None
        pin = config.peek(PCI_INTERRUPT_PIN, 1)
        self._idx: dict[int, _Index] = {
            IRQ_INTX: _Index(1 if pin else 0),
            IRQ_MSI: _Index(0),
            IRQ_MSIX: _Index(0),
            IRQ_ERR: _Index(1 if err_irq else 0),
            IRQ_REQ: _Index(0),
        }
        self.msix_pending: list[bool] = []
        self.msix_table: MsixTable | None = None
        self.msix_pba: MsixPba | None = None
        self.msi: MsiCap | None = None
        self.msi_pending: list[bool] = []
        if msix is not None:
            self.attach_msix(msix)
        self.intx_level = False
        self.intx_automasked = False
        self.intx_unmask_fd: int | None = None
        config.add_hook(PCI_COMMAND, 2, self._on_command)
        #: the C mirror (``struct vfiod_irq``), None without the C module
        self.mirror: Any = None
        self._c = _c_module()
        self._pushed: list[tuple[int, int] | None] = [None] * MIRROR_VECTORS
        self._pushed_mode = (-1, -1)
        if self._c is not None:
            self.mirror = self._c.ffi.new("struct vfiod_irq *")
            self._c.lib.vfiod_irq_init(self.mirror)

    def attach_msix(self, msix: MsixCap) -> None:
        """Create the table/PBA handlers for an MSI-X cap (the function maps them in a BAR)."""
        if self.msix is not None:
            raise ValueError("MSI-X already attached")
        self.msix = msix
        self._idx[IRQ_MSIX] = _Index(msix.vectors)
        self.msix_pending = [False] * msix.vectors
        self.msix_table = MsixTable(msix.vectors, self._on_table_mask)
        self.msix_pba = MsixPba(msix.vectors, lambda v: self.msix_pending[v])
        self.config.add_hook(msix.offset + 2, 2, self._on_msix_control)

    def attach_msi(self, msi: MsiCap) -> None:
        """Serve the IRQ_MSI index for an MSI cap (``msi.vectors`` eventfds)."""
        if self.msi is not None:
            raise ValueError("MSI already attached")
        self.msi = msi
        self._idx[IRQ_MSI] = _Index(msi.vectors)
        self.msi_pending = [False] * msi.vectors
        self.config.add_hook(msi.offset + 2, 2, self._on_msi_control)

    # ---- info -------------------------------------------------------------------------------

    def info(self, index: int) -> IrqInfo:
        if not 0 <= index < NUM_IRQS:
            raise einval(f"no IRQ index {index}")
        count = self._idx[index].count
        if index == IRQ_INTX:
            flags = self.intx_info_flags if count else 0
        elif index == IRQ_MSIX:
            flags = self.msix_info_flags if count else 0
        else:
            flags = IRQ_INFO_EVENTFD if count else 0
        return IrqInfo(index, flags, count)

    def fd(self, index: int, sub: int = 0) -> int | None:
        """Installed eventfd (for tests and diagnostics)."""
        return self._idx[index].fds[sub]

    def explicitly_masked(self, index: int, sub: int = 0) -> bool:
        return self._idx[index].masked[sub]

    # ---- SET_IRQS -----------------------------------------------------------------------------

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int]) -> None:
        """Apply one DEVICE_SET_IRQS; takes ownership of ``fds`` even when it raises."""
        try:
            self._set_irqs(index, flags, start, count, fds)
        except BaseException:
            for fd in fds:
                _close(fd)
            raise
        finally:
            self.sync_mirror()

    # ---- the C mirror -------------------------------------------------------------------------

    def _deliverable(self, vector: int) -> tuple[int, int] | None:
        """(fd, generation) of the eventfd that raises ``vector`` right now, or None: what
        fire_vector would signal without setting a pending bit."""
        if self.msix_enabled:
            slot = self._idx[IRQ_MSIX]
            if vector < slot.count and self.msix_can_fire(vector):
                fd = slot.fds[vector]
                assert fd is not None
                return fd, slot.gen[vector]
            return None
        if self.msi is not None and self.msi.enabled and vector < self.msi.vectors:
            granted = self.msi.fold(vector)
            slot = self._idx[IRQ_MSI]
            fd = slot.fds[granted]
            if fd is not None and not slot.masked[granted]:
                return fd, slot.gen[granted]
        return None

    def sync_mirror(self) -> None:
        """Tell the C mirror what can be delivered now (after any change of interrupt state)."""
        m = self.mirror
        if m is None:
            return
        lib = self._c.lib
        self._sync_mode()
        count = self.msix.vectors if self.msix is not None else 0
        if self.msi is not None:
            count = max(count, self.msi.vectors)
        for v in range(min(count, MIRROR_VECTORS)):
            key = self._deliverable(v)
            if key != self._pushed[v]:
                rc = lib.vfiod_irq_set(m, v, key[0] if key is not None else -1)
                if rc < 0:
                    raise OSError(-rc, os.strerror(-rc))
                self._pushed[v] = key

    def _sync_mode(self) -> None:
        m = self.mirror
        if m is None:
            return
        mode = (2 if self.msix_enabled else 1 if self.msi_enabled else 0, int(self.intx_level))
        if mode != self._pushed_mode:
            self._c.lib.vfiod_irq_set_mode(m, *mode)
            self._pushed_mode = mode

    def fire_pending(self) -> int:
        """Fire the vectors C could not deliver (pending bits, or nothing when messages are
        off); returns how many there were."""
        m = self.mirror
        if m is None or not m.npending:
            return 0
        buf = self._c.ffi.new("uint8_t[]", MIRROR_VECTORS)
        n = int(self._c.lib.vfiod_irq_take(m, buf, MIRROR_VECTORS))
        for i in range(n):
            self.fire_vector(buf[i])
        return n

    def _set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int]) -> None:
        if not 0 <= index < NUM_IRQS:
            raise einval(f"no IRQ index {index}")
        data = flags & IRQ_SET_DATA_MASK
        action = flags & IRQ_SET_ACTION_MASK_ALL
        if flags & ~(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL):
            raise einval(f"unknown SET_IRQS flags {flags:#x}")
        if bin(data).count("1") != 1 or bin(action).count("1") != 1:
            raise einval("SET_IRQS needs exactly one data type and one action")
        if data != IRQ_SET_DATA_EVENTFD and fds:
            raise einval("fds given without DATA_EVENTFD")
        if data == IRQ_SET_DATA_EVENTFD and fds and len(fds) != count:
            raise einval("DATA_EVENTFD needs one fd per sub-index, or none to de-assign")
        if any(fd < 0 for fd in fds):
            raise einval("negative fd")
        slot = self._idx[index]
        if count == 0:
            if data == IRQ_SET_DATA_NONE and action == IRQ_SET_ACTION_TRIGGER:
                self.disable(index)
            return
        if start < 0 or start + count > slot.count:
            raise einval(f"IRQ index {index}: {start}+{count} exceeds count {slot.count}")
        subs = range(start, start + count)

        if data == IRQ_SET_DATA_EVENTFD:
            if action == IRQ_SET_ACTION_TRIGGER:
                for i, sub in enumerate(subs):
                    slot.assign(sub, fds[i] if fds else None)
                self._after_assign(index)
                return
            if action == IRQ_SET_ACTION_UNMASK and index == IRQ_INTX:
                # Resample fd: the session polls it and calls intx_unmask() when it fires.
                new_fd = fds[0] if fds else None
                if self.intx_unmask_fd is not None and self.intx_unmask_fd != new_fd:
                    _close(self.intx_unmask_fd)
                self.intx_unmask_fd = new_fd
                return
            raise einval("DATA_EVENTFD only with TRIGGER (or INTx UNMASK)")
        if data != IRQ_SET_DATA_NONE:
            raise einval("DATA_BOOL is not supported")

        if action == IRQ_SET_ACTION_MASK:
            for sub in subs:
                slot.masked[sub] = True
        elif action == IRQ_SET_ACTION_UNMASK:
            for sub in subs:
                slot.masked[sub] = False
            if index == IRQ_INTX:
                self.intx_unmask()
            elif index == IRQ_MSIX:
                self._flush_msix()
            elif index == IRQ_MSI:
                self._flush_msi()
        else:  # DATA_NONE | TRIGGER with count > 0: loopback trigger
            for sub in subs:
                self.trigger(index, sub)

    def _after_assign(self, index: int) -> None:
        if index == IRQ_MSIX:
            self._flush_msix()
        elif index == IRQ_MSI:
            self._flush_msi()
        elif index == IRQ_INTX:
            self._try_intx()

    def trigger(self, index: int, sub: int = 0) -> bool:
        """Fire one sub-index as the device would; returns True if an eventfd was signalled."""
        if index == IRQ_MSIX:
            return self.fire_msix(sub)
        if index == IRQ_MSI:
            return self.fire_msi(sub)
        if index == IRQ_INTX:
            return self._deliver_intx()
        fd = self._idx[index].fds[sub]
        if fd is None or self._idx[index].masked[sub]:
            return False
        signal_eventfd(fd)
        return True

    def disable(self, index: int) -> None:
        """Close every eventfd of the index and forget masks (and MSI-X pending bits)."""
        self._idx[index].clear()
        if index == IRQ_MSIX:
            self.msix_pending = [False] * len(self.msix_pending)
        elif index == IRQ_MSI:
            self.msi_pending = [False] * len(self.msi_pending)
        elif index == IRQ_INTX:
            self.intx_automasked = False
            _close(self.intx_unmask_fd)
            self.intx_unmask_fd = None

    # ---- MSI-X --------------------------------------------------------------------------------

    def msix_can_fire(self, vector: int) -> bool:
        slot = self._idx[IRQ_MSIX]
        if self.msix is None or slot.fds[vector] is None or slot.masked[vector]:
            return False
        if self.msix.function_masked:
            return False
        return not (self.msix_table is not None and self.msix_table.masked(vector))

    def fire_msix(self, vector: int) -> bool:
        """Raise an MSI-X vector; sets its PBA bit instead if it cannot be delivered now."""
        if self.msix is None or not 0 <= vector < self.msix.vectors:
            raise ValueError(f"no MSI-X vector {vector}")
        if not self.msix.enabled:
            return False
        if not self.msix_can_fire(vector):
            self.msix_pending[vector] = True
            return False
        fd = self._idx[IRQ_MSIX].fds[vector]
        assert fd is not None
        signal_eventfd(fd)
        return True

    def _flush_msix(self) -> None:
        if self.msix is None or not self.msix.enabled:
            return
        for v, pending in enumerate(self.msix_pending):
            if pending and self.msix_can_fire(v):
                self.msix_pending[v] = False
                fd = self._idx[IRQ_MSIX].fds[v]
                assert fd is not None
                signal_eventfd(fd)

    def _on_table_mask(self, vector: int) -> None:
        self._flush_msix()
        self.sync_mirror()

    def _on_msix_control(self, old: int, new: int) -> None:
        self._flush_msix()
        self.sync_mirror()

    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and self.msix.enabled

    # ---- MSI ----------------------------------------------------------------------------------

    def fire_msi(self, vector: int) -> bool:
        """Raise MSI ``vector``; remembered as pending if it cannot be delivered now."""
        if self.msi is None or not 0 <= vector < self.msi.vectors:
            raise ValueError(f"no MSI vector {vector}")
        if not self.msi.enabled:
            return False
        granted = self.msi.fold(vector)
        slot = self._idx[IRQ_MSI]
        fd = slot.fds[granted]
        if fd is None or slot.masked[granted]:
            self.msi_pending[granted] = True
            return False
        signal_eventfd(fd)
        return True

    def _flush_msi(self) -> None:
        if self.msi is None or not self.msi.enabled:
            return
        slot = self._idx[IRQ_MSI]
        for v, pending in enumerate(self.msi_pending):
            fd = slot.fds[v]
            if pending and fd is not None and not slot.masked[v]:
                self.msi_pending[v] = False
                signal_eventfd(fd)

    def _on_msi_control(self, old: int, new: int) -> None:
        self._flush_msi()
        self.sync_mirror()

    @property
    def msi_enabled(self) -> bool:
        return self.msi is not None and self.msi.enabled

    # ---- either kind of message ---------------------------------------------------------------

    @property
    def msg_enabled(self) -> bool:
        """MSI-X or MSI is on: the function signals messages and leaves INTx alone."""
        return self.msix_enabled or self.msi_enabled

    def fire_vector(self, vector: int) -> bool:
        """Raise ``vector`` through whichever of MSI-X and MSI is enabled (False: neither)."""
        if self.msix_enabled:
            return self.fire_msix(vector)
        if self.msi_enabled:
            return self.fire_msi(vector)
        return False

    # ---- INTx ---------------------------------------------------------------------------------

    def _intx_disabled(self) -> bool:
        return bool(self.config.peek(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE)

    def _deliver_intx(self) -> bool:
        slot = self._idx[IRQ_INTX]
        if not slot.count or slot.fds[0] is None or slot.masked[0]:
            return False
        if self.intx_automasked or self._intx_disabled():
            return False
        fd = slot.fds[0]
        assert fd is not None
        signal_eventfd(fd)
        self.intx_automasked = True
        return True

    def _try_intx(self) -> None:
        if self.intx_level:
            self._deliver_intx()

    def assert_intx(self) -> None:
        """Device raises its INTx level; delivered now or when unmasked / re-enabled."""
        if not self._idx[IRQ_INTX].count:
            return
        self.intx_level = True
        status = self.config.peek(PCI_STATUS, 2)
        self.config.poke(PCI_STATUS, 2, status | PCI_STATUS_INTERRUPT)
        self._sync_mode()
        self._try_intx()

    def deassert_intx(self) -> None:
        self.intx_level = False
        status = self.config.peek(PCI_STATUS, 2)
        self.config.poke(PCI_STATUS, 2, status & ~PCI_STATUS_INTERRUPT)
        self._sync_mode()

    def intx_unmask(self) -> None:
        """EOI from the client: clear the auto-mask and re-deliver if still asserted."""
        self._idx[IRQ_INTX].masked = [False] * self._idx[IRQ_INTX].count
        self.intx_automasked = False
        self._try_intx()

    def _on_command(self, old: int, new: int) -> None:
        if old & PCI_COMMAND_INTX_DISABLE and not new & PCI_COMMAND_INTX_DISABLE:
            self._try_intx()

    # ---- ERR ----------------------------------------------------------------------------------

    def signal_err(self) -> bool:
        """Tell the client about an error (AER eventfd), if it installed one."""
        return self.trigger(IRQ_ERR) if self._idx[IRQ_ERR].count else False

    # ---- lifecycle ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Function reset: every index disabled, table back to masked, INTx deasserted."""
        for index in self._idx:
            self.disable(index)
        if self.msix_table is not None:
            self.msix_table.reset()
        self.intx_level = False
        self.sync_mirror()

    def close(self) -> None:
        for index in self._idx:
            self.disable(index)
        if self.mirror is not None:
            self._c.lib.vfiod_irq_close(self.mirror)
            self._pushed = [None] * MIRROR_VECTORS

    def open_fds(self) -> list[int]:
        """Every fd currently owned (for leak checks)."""
        out = [fd for s in self._idx.values() for fd in s.fds if fd is not None]
        if self.intx_unmask_fd is not None:
            out.append(self.intx_unmask_fd)
        return out


__all__ = ["IrqController", "IrqInfo", "signal_eventfd"]
