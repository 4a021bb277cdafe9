"""The NVM command set (I/O queues): Read, Write, Flush, Write Zeroes, Dataset Management.

One namespace (NSID 1) on a :class:`~vfiod.devices.nvme.backing.BackingStore`. Read and Write
hand their PRP pieces to the :class:`~vfiod.devices.nvme.mover.DataMover`; a DMA fault ends the
command with Data Transfer Error (raised as DmaFault to the dispatcher), a store error with
Write Fault / Unrecovered Read Error. Durability: FUA, or a volatile write cache switched off,
makes a write reach stable storage (fdatasync) before it completes.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from vfiod.devices.nvme.backing import BackingStore
from vfiod.devices.nvme.constants import (
    IO_DSM,
    IO_FLUSH,
    IO_READ,
    IO_WRITE,
    IO_WRITE_ZEROES,
    NSID_ALL,
    SC_INVALID_FIELD,
    SC_INVALID_NS,
    SC_INVALID_OPCODE,
    SC_LBA_RANGE,
    SC_UNRECOVERED_READ,
    SC_WRITE_FAULT,
)
from vfiod.devices.nvme.identify import SmartCounters
from vfiod.devices.nvme.mover import DataMover
from vfiod.devices.nvme.prp import NvmeStatus
from vfiod.devices.nvme.queues import Command

log = logging.getLogger(__name__)

NSID = 1
FUA = 1 << 30  # CDW12: Force Unit Access
DEAC = 1 << 25  # CDW12 of Write Zeroes: deallocate


@dataclass(frozen=True)
class Namespace:
    """The one namespace: its store, geometry and identifiers."""

    store: BackingStore
    lba_shift: int
    nguid: bytes
    uuid: bytes

    @property
    def block_size(self) -> int:
        return 1 << self.lba_shift

    @property
    def nsze(self) -> int:
        return self.store.size >> self.lba_shift


class NvmCommands:
    """Executes I/O queue commands; counters go to the controller's SMART record."""

    def __init__(
        self,
        namespace: Namespace,
        mover: DataMover,
        smart: SmartCounters,
        max_transfer: int,
        write_cache: Callable[[], bool],
    ) -> None:
        self.ns = namespace
        self.mover = mover
        self.smart = smart
        self.max_transfer = max_transfer
        self._write_cache = write_cache  # Volatile Write Cache feature (off: write-through)

    def execute(self, cmd: Command) -> int:
        """Run ``cmd``; returns dw0, raises NvmeStatus / DmaFault to end it with an error."""
        op = cmd.opcode
        if op == IO_READ or op == IO_WRITE:
            if cmd.nsid != NSID:
                raise NvmeStatus(SC_INVALID_NS)
            self._read_write(cmd, op == IO_WRITE)
            return 0
        if op == IO_FLUSH:
            if cmd.nsid not in (NSID, NSID_ALL):
                raise NvmeStatus(SC_INVALID_NS)
            self.flush()
            return 0
        if cmd.nsid != NSID:
            raise NvmeStatus(SC_INVALID_NS)
        if op == IO_WRITE_ZEROES:
            self._write_zeroes(cmd)
            return 0
        if op == IO_DSM:
            self._dsm(cmd)
            return 0
        raise NvmeStatus(SC_INVALID_OPCODE)

    def flush(self) -> None:
        try:
            self.ns.store.flush()
        except OSError as err:
            self.flush_failed(err)

    def flush_failed(self, err: OSError) -> NoReturn:
        """A flush that failed (here, or in the C data mover): a media error, Write Fault."""
        log.error("nvme: flush failed: %s", err)
        self.smart.media_errors += 1
        raise NvmeStatus(SC_WRITE_FAULT) from err

    def _lba_range(self, cmd: Command) -> tuple[int, int]:
        slba = cmd.cdw[10] | (cmd.cdw[11] << 32)
        nlb = (cmd.cdw[12] & 0xFFFF) + 1
        if slba + nlb > self.ns.nsze:
            raise NvmeStatus(SC_LBA_RANGE, lba=slba)
        return slba, nlb

    def _read_write(self, cmd: Command, write: bool) -> None:
        slba = cmd.cdw[10] | (cmd.cdw[11] << 32)
        nlb = (cmd.cdw[12] & 0xFFFF) + 1
        shift = self.ns.lba_shift
        length = nlb << shift
        if length > self.max_transfer:
            raise NvmeStatus(SC_INVALID_FIELD)
        if slba + nlb > self.ns.nsze:
            raise NvmeStatus(SC_LBA_RANGE, lba=slba)
        pieces = self.mover.pieces(cmd.prp1, cmd.prp2, length)
        try:
            self.mover.transfer(pieces, not write, slba << shift)
        except OSError as err:
            log.error("nvme: %s at LBA %d failed: %s", "write" if write else "read", slba, err)
            self.smart.media_errors += 1
            raise NvmeStatus(SC_WRITE_FAULT if write else SC_UNRECOVERED_READ, lba=slba) from err
        if write:
            self.smart.write_cmds += 1
            self.smart.bytes_written += length
            if cmd.cdw[12] & FUA or not self._write_cache():
                self.flush()
        else:
            self.smart.read_cmds += 1
            self.smart.bytes_read += length

    def _write_zeroes(self, cmd: Command) -> None:
        slba, nlb = self._lba_range(cmd)
        shift = self.ns.lba_shift
        store = self.ns.store
        try:
            if cmd.cdw[12] & DEAC and store.deallocate_zeroes:
                store.deallocate(slba << shift, nlb << shift)
            else:
                store.write_zeroes(slba << shift, nlb << shift)
        except OSError as err:
            self.smart.media_errors += 1
            raise NvmeStatus(SC_WRITE_FAULT, lba=slba) from err
        self.smart.write_cmds += 1
        if cmd.cdw[12] & FUA or not self._write_cache():
            self.flush()

    def _dsm(self, cmd: Command) -> None:
        nr = (cmd.cdw[10] & 0xFF) + 1
        deallocate = bool(cmd.cdw[11] & 0x4)
        raw = self.mover.from_guest(self.mover.pieces(cmd.prp1, cmd.prp2, nr * 16))
        if not deallocate:
            return  # integral read/write hints only: nothing to do
        ranges = []
        for i in range(nr):  # validate every range before deallocating any
            _attrs, nlb, slba = struct.unpack_from("<IIQ", raw, i * 16)
            if slba + nlb > self.ns.nsze:
                raise NvmeStatus(SC_LBA_RANGE, lba=slba)
            if nlb:
                ranges.append((slba, nlb))
        shift = self.ns.lba_shift
        for slba, nlb in ranges:
            try:
                self.ns.store.deallocate(slba << shift, nlb << shift)
            except OSError as err:
                self.smart.media_errors += 1
                raise NvmeStatus(SC_WRITE_FAULT, lba=slba) from err


__all__ = ["NSID", "Namespace", "NvmCommands"]
