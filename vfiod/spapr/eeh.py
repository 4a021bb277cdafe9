"""EEH: the error state of one PE and the operations that freeze, thaw and reset it.

On POWER an isolation violation is not a silently dropped transaction: the PHB freezes the
PE (MMIO loads return all-ones, stores are dropped, DMA is blocked) until software recovers it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .constants import (
    EEH_ERR_FUNC_MAX,
    EEH_ERR_TYPE_32,
    EEH_ERR_TYPE_64,
    EEH_PE_STATE_NORMAL,
    EEH_PE_STATE_RESET,
    EEH_PE_STATE_STOPPED_DMA,
    EEH_PE_STATE_STOPPED_IO_DMA,
    EEH_PE_STATE_UNAVAIL,
    VFIO_EEH_PE_CONFIGURE,
    VFIO_EEH_PE_DISABLE,
    VFIO_EEH_PE_ENABLE,
    VFIO_EEH_PE_GET_STATE,
    VFIO_EEH_PE_INJECT_ERR,
    VFIO_EEH_PE_RESET_DEACTIVATE,
    VFIO_EEH_PE_RESET_FUNDAMENTAL,
    VFIO_EEH_PE_RESET_HOT,
    VFIO_EEH_PE_UNFREEZE_DMA,
    VFIO_EEH_PE_UNFREEZE_IO,
)


@dataclass(frozen=True)
class EehError:
    """Record of an injected error (what the guest asked the platform to simulate)."""

    type: int
    func: int
    addr: int
    mask: int


#: The fields the C mirror derives its flags from.
_MIRRORED = frozenset({"mmio_frozen", "dma_frozen", "reset_asserted", "config_blocked"})


@dataclass
class EehState:
    """Frozen/reset flags of a PE; ``state`` derives the PAPR value from them."""

    supported: bool = True  # platform has EEH (else ENABLE -> EIO, other ops -> ENOENT)
    inject_supported: bool = True
    mmio_frozen: bool = False
    dma_frozen: bool = False
    reset_asserted: bool = False
    config_blocked: bool = False
    unavailable: bool = False  # parent isolated / recovering in the host
    owned: bool = False  # VFIO ENABLE took ownership
    freeze_count: int = 0
    last_reset: int = 0  # op of the reset asserted (hot or fundamental)
    injected: list[EehError] = field(default_factory=list)
    #: called with the reset op when a reset is deactivated (device models reset themselves)
    reset_hooks: list[Callable[[int], None]] = field(default_factory=list)
    #: a C ``struct vfiod_eeh_flags`` the fast paths read, kept equal to the flags above
    mirror: Any = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name in _MIRRORED or name == "mirror":
            self._sync_mirror()

    def _sync_mirror(self) -> None:
        m = getattr(self, "mirror", None)
        if m is not None:
            m.mmio_enabled = int(self.mmio_enabled)
            m.dma_enabled = int(self.dma_enabled)
            m.config_blocked = int(self.config_blocked)

    @property
    def state(self) -> int:
        """0 normal, 1 reset, 2 MMIO+DMA stopped, 4 DMA stopped, 5 anything else."""
        if self.unavailable:
            return EEH_PE_STATE_UNAVAIL
        if self.reset_asserted:
            return EEH_PE_STATE_RESET
        if not self.mmio_frozen and not self.dma_frozen:
            return EEH_PE_STATE_NORMAL
        if self.mmio_frozen and self.dma_frozen:
            return EEH_PE_STATE_STOPPED_IO_DMA
        if self.dma_frozen:
            return EEH_PE_STATE_STOPPED_DMA
        return EEH_PE_STATE_UNAVAIL

    @property
    def mmio_enabled(self) -> bool:
        return not (self.mmio_frozen or self.reset_asserted)

    @property
    def dma_enabled(self) -> bool:
        return not (self.dma_frozen or self.reset_asserted)

    def freeze(self) -> None:
        """What the PHB does on an error: stop MMIO and DMA of the PE."""
        self.mmio_frozen = True
        self.dma_frozen = True
        self.freeze_count += 1

    def thaw(self) -> None:
        self.mmio_frozen = False
        self.dma_frozen = False

    def op(self, op: int, err_type: int = 0, func: int = 0, addr: int = 0, mask: int = 0) -> int:
        """VFIO_EEH_PE_OP on this PE: returns 0 (or the state for GET_STATE), OSError on misuse."""
        if op == VFIO_EEH_PE_DISABLE:
            return 0
        if not self.supported:
            if op == VFIO_EEH_PE_ENABLE:
                raise OSError(errno.EIO, "EEH not enabled on this platform")
            raise OSError(errno.ENOENT, "platform has no EEH operations")
        if op == VFIO_EEH_PE_ENABLE:
            self.owned = True
            if not self.reset_asserted:
                self.thaw()  # QEMU issues ENABLE on machine reset to unfreeze
            return 0
        if op == VFIO_EEH_PE_UNFREEZE_IO:
            self.mmio_frozen = False
            return 0
        if op == VFIO_EEH_PE_UNFREEZE_DMA:
            self.dma_frozen = False
            return 0
        if op == VFIO_EEH_PE_GET_STATE:
            return self.state
        if op in (VFIO_EEH_PE_RESET_HOT, VFIO_EEH_PE_RESET_FUNDAMENTAL):
            self.freeze()
            self.config_blocked = True
            self.reset_asserted = True
            self.last_reset = op
            return 0
        if op == VFIO_EEH_PE_RESET_DEACTIVATE:
            was = self.last_reset if self.reset_asserted else 0
            self.reset_asserted = False
            self.config_blocked = False
            self.thaw()
            if was:
                for hook in list(self.reset_hooks):
                    hook(was)
            return 0
        if op == VFIO_EEH_PE_CONFIGURE:
            return 0
        if op == VFIO_EEH_PE_INJECT_ERR:
            if err_type not in (EEH_ERR_TYPE_32, EEH_ERR_TYPE_64):
                raise OSError(errno.EINVAL, f"bad error type {err_type}")
            if not 0 <= func <= EEH_ERR_FUNC_MAX:
                raise OSError(errno.EINVAL, f"bad error function {func}")
            if not self.inject_supported:
                raise OSError(errno.ENOENT, "platform cannot inject errors")
            self.injected.append(EehError(err_type, func, addr, mask))
            self.freeze()
            return 0
        raise OSError(errno.EINVAL, f"unknown EEH op {op}")
