"""NVMe controller: PCI identity, registers, enable/reset/shutdown, Identify, queues, features,
log pages, asynchronous events."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from conftest import NS_BYTES
from nvme_helpers import PAGE, FakeDma, Host

from vfiod.devices.nvme import Command, NvmeController
from vfiod.devices.nvme import constants as K


def u16(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", b, off)[0])


def u32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def u64(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", b, off)[0])


# ---- PCI identity and registers -------------------------------------------------------------


def test_pci_identity_and_bar_layout(ctrl: NvmeController) -> None:
    cfg = ctrl.region_read(7, 0, 4096)
    assert struct.unpack_from("<HH", cfg, 0) == (0x1B36, 0x0010)
    assert int.from_bytes(cfg[0x09:0x0C], "little") == 0x010802
    assert cfg[0x0E] == 0 and cfg[0x3D] == 1  # header type 0, INTA
    bar0 = u32(cfg, 0x10)
    assert bar0 & 0xF == 0x4  # 64-bit, non-prefetchable memory
    sizes = {i: ctrl.region_info(i).size for i in range(6)}
    assert sizes == {0: K.BAR0_SIZE, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0}
    caps = dict((cid, off) for off, cid in ctrl.config.walk_caps())
    assert {0x01, 0x10, 0x05} <= set(caps) and 0x11 not in caps  # PM, PCIe, MSI; no MSI-X
    assert (u16(cfg, caps[0x10] + 2) >> 4) & 0xF == 0  # PCIe endpoint
    flags = u16(cfg, caps[0x05] + 2)
    assert flags & 0x80 and (flags >> 1) & 0x7 == 3  # 64-bit, asks for 8 >= io_queues + 1
    assert ctrl.irq_info(1).count == 8 and ctrl.irq_info(2).count == 0


@pytest.mark.parametrize("ctrl", [True], indirect=True)
def test_msix_layout(ctrl: NvmeController) -> None:
    cfg = ctrl.region_read(7, 0, 4096)
    caps = dict((cid, off) for off, cid in ctrl.config.walk_caps())
    assert {0x01, 0x10, 0x11} <= set(caps) and 0x05 not in caps  # PM, PCIe, MSI-X
    ctrl_word, table, pba = struct.unpack_from("<HII", cfg, caps[0x11] + 2)
    assert (ctrl_word & 0x7FF) + 1 == 5  # io_queues + 1
    assert table == K.MSIX_TABLE_OFFSET | 0 and pba == K.MSIX_PBA_OFFSET | 0
    assert ctrl.irq_info(2).count == 5


def test_register_reset_values(ctrl: NvmeController) -> None:
    h = Host(ctrl)
    cap = h.rd(0x00, 8)
    assert cap & 0xFFFF == 1023  # MQES
    assert cap >> 16 & 1  # CQR
    assert (cap >> 24) & 0xFF > 0  # TO
    assert (cap >> 32) & 0xF == 0  # DSTRD
    assert (cap >> 37) & 0xFF == 1  # CSS: NVM
    assert (cap >> 48) & 0xF == 0  # MPSMIN 4 KiB
    assert h.rd(0x00) | h.rd(0x04) << 32 == cap
    assert h.rd(0x08) == 0x00010400
    assert h.rd(0x1C) == 0 and h.rd(0x14) == 0
    assert h.rd(0x38) == 0 and h.rd(0x3C) == 0  # no CMB
    h.wr(0x28, 0x12345000)
    h.wr(0x2C, 0x1)
    assert h.rd(0x28, 8) == 0x1_12345000
    h.wr(0x30, 0xABCDE000_00001000 & ~0xFFF, 8)
    assert h.rd(0x30, 8) == 0xABCDE000_00001000
    h.wr(0x00, 0)  # CAP is read-only
    assert h.rd(0x00, 8) == cap
    assert h.rd(0x1000) == 0  # doorbells read as zero


def test_enable_requires_sane_admin_queue(ctrl: NvmeController) -> None:
    h = Host(ctrl)
    h.wr(0x24, 0x001F001F)
    h.wr(0x14, h.cc())  # ASQ/ACQ are zero
    assert h.rd(0x1C) & 0x3 == 0x2  # CFS, not ready
    h.wr(0x14, h.cc(en=False))
    assert h.rd(0x1C) == 0
    h.enable()
    assert h.rd(0x1C) & 0x3 == 0x1


def test_cc_en_clear_resets_queues(ioq: Host) -> None:
    ctrl = ioq.ctrl
    assert set(ctrl.sqs) == {0, 1} and set(ctrl.cqs) == {0, 1}
    ioq.wr(0x14, ioq.cc(en=False))
    assert ioq.rd(0x1C) & 1 == 0
    assert not ctrl.sqs and not ctrl.cqs
    # Doorbells on a disabled controller are ignored.
    ioq.wr(0x1000, 1)
    ioq.enable()
    assert set(ctrl.sqs) == {0}
    assert ioq.identify(1)[0].sc == 0


def test_function_reset_drops_everything(ioq: Host) -> None:
    ioq.ctrl.reset()
    assert ioq.rd(0x1C) == 0 and ioq.rd(0x14) == 0 and ioq.rd(0x24) == 0
    assert not ioq.ctrl.sqs and not ioq.ctrl.cqs


def test_shutdown_flushes_and_reports_complete(ioq: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    ioq.wr(0x14, ioq.cc(shn=1))
    assert (ioq.rd(0x1C) >> 2) & 3 == 2  # SHST: shutdown complete
    assert syncs == [ioq.ctrl.store.fd]
    ioq.wr(0x14, ioq.cc(en=False))  # reset after shutdown
    assert ioq.rd(0x1C) == 0
    ioq.enable()
    assert ioq.rd(0x1C) == 1


# ---- Identify ---------------------------------------------------------------------------------


def test_identify_controller(host: Host) -> None:
    cqe, d = host.identify(K.CNS_CONTROLLER)
    assert cqe.sc == 0 and cqe.phase == 1 and cqe.sqhd == 1
    assert u16(d, 0) == 0x1B36 and u16(d, 2) == 0x1B36  # VID, SSVID
    serial = d[4:24].decode()
    assert serial.strip() and serial == host.ctrl.serial.ljust(20)
    assert d[24:64].decode().rstrip() == "vfiod NVMe controller"
    assert d[64:72].decode().rstrip() == "vfiod01"
    assert d[77] == 8  # MDTS: 1 MiB
    assert u32(d, 80) == 0x00010400
    assert d[111] == 1  # I/O controller
    assert u16(d, 256) == K.OACS_DBBUF  # OACS: Doorbell Buffer Config only
    assert d[259] == 3  # AERL
    assert d[261] & 0x04  # LPA: extended Get Log Page
    assert d[512] == 0x66 and d[513] == 0x44  # SQES, CQES
    assert u32(d, 516) == 1  # NN
    assert u16(d, 520) == (1 << 2) | (1 << 3) | (1 << 6)  # ONCS: DSM, Write Zeroes, Timestamp
    assert u16(d, 522) == 0  # FUSES
    assert d[525] == 0x07  # VWC present, broadcast flush
    assert u32(d, 536) == 0  # SGLS: PRP only
    nqn = d[768:1024].rstrip(b"\0").decode()
    assert nqn.startswith("nqn.2014-08.org.nvmexpress:uuid:")
    assert u16(d, 2048) > 0  # power state 0 max power


def test_serial_and_nqn_unique_per_backing_file(tmp_path: Path) -> None:
    a = NvmeController(tmp_path / "a.img", 1 << 20)
    b = NvmeController(tmp_path / "b.img", 1 << 20)
    assert a.serial != b.serial and a.identity.subnqn != b.identity.subnqn
    assert len(a.serial) <= 20
    a2 = NvmeController(tmp_path / "a.img")
    assert a2.serial == a.serial  # stable across restarts
    for c in (a, b, a2):
        c.close()


def test_identify_namespace(host: Host) -> None:
    cqe, d = host.identify(K.CNS_NAMESPACE, nsid=1)
    assert cqe.sc == 0
    nblocks = NS_BYTES // 512
    assert (u64(d, 0), u64(d, 8), u64(d, 16)) == (nblocks, nblocks, nblocks)
    assert d[25] == 1  # NLBAF: two formats
    assert d[26] == 0  # FLBAS -> LBAF0
    assert u16(d, 128) == 0 and d[130] == 9  # LBAF0: no metadata, 512 bytes
    assert d[134] == 12  # LBAF1: 4096 bytes
    assert d[33] == 0x09  # DLFEAT: deallocated reads zero, Write Zeroes DEAC
    assert d[30] == 0 and d[99] == 0  # private, writable


def test_identify_namespace_4k(tmp_path: Path) -> None:
    c = NvmeController(tmp_path / "d.img", 1 << 20, block_size=4096)
    h = Host(c)
    h.enable()
    _, d = h.identify(K.CNS_NAMESPACE, nsid=1)
    assert u64(d, 0) == 256 and d[26] == 1
    c.close()


def test_identify_lists_and_errors(host: Host) -> None:
    cqe, d = host.identify(K.CNS_ACTIVE_NS_LIST, nsid=0)
    assert cqe.sc == 0 and u32(d, 0) == 1 and u32(d, 4) == 0
    cqe, d = host.identify(K.CNS_ACTIVE_NS_LIST, nsid=1)
    assert cqe.sc == 0 and u32(d, 0) == 0
    cqe, d = host.identify(K.CNS_NS_DESCRIPTORS, nsid=1)
    assert cqe.sc == 0
    descs = {}
    pos = 0
    while d[pos + 1]:
        nidt, nidl = d[pos], d[pos + 1]
        descs[nidt] = d[pos + 4 : pos + 4 + nidl]
        pos += 4 + nidl
    assert descs[K.NIDT_NGUID] == host.ctrl.nguid and len(descs[K.NIDT_UUID]) == 16
    assert descs[K.NIDT_CSI] == b"\0"
    assert host.identify(K.CNS_NAMESPACE, nsid=0)[0].sc == K.SC_INVALID_NS
    assert host.identify(K.CNS_NAMESPACE, nsid=2)[0].sc == K.SC_INVALID_NS
    assert host.identify(K.CNS_NAMESPACE, nsid=0xFFFFFFFF)[0].sc == K.SC_INVALID_NS
    assert host.identify(K.CNS_NS_DESCRIPTORS, nsid=7)[0].sc == K.SC_INVALID_NS
    for cns in (0x05, 0x06, 0x08, 0x10, 0x13, 0xFF):
        cqe, _ = host.identify(cns, nsid=1)
        assert cqe.sc == K.SC_INVALID_FIELD and cqe.dnr


def test_identify_prp_offset_spanning_pages(host: Host) -> None:
    a, b = host.alloc(), host.alloc(2)
    cqe = host.admin(0x06, prp1=a + 0x800, prp2=b + PAGE, cdw10=1)
    assert cqe.sc == 0
    data = host.dma.peek(a + 0x800, 0x800) + host.dma.peek(b + PAGE, 0x800)
    _, ref = host.identify(1)
    assert data == ref


def test_unknown_admin_opcode_and_sgl(host: Host) -> None:
    assert host.admin(0x7F).sc == K.SC_INVALID_OPCODE
    assert host.admin(0x7C, prp1=1).sc == K.SC_INVALID_FIELD  # DBBUF: unaligned buffer
    assert host.admin(0x06, cdw10=1, prp1=host.alloc(), flags=0x40).sc == K.SC_INVALID_FIELD
    assert host.admin(0x18).sc == 0  # Keep Alive
    assert host.admin(0x08, cdw10=1 | (5 << 16)).dw0 & 1  # Abort: not aborted


# ---- queues -----------------------------------------------------------------------------------


def test_create_queue_errors(host: Host) -> None:
    page = host.alloc()

    def ccq(qid: int, qsize: int = 15, flags: int = 0x3, vec: int = 1, prp1: int = page) -> int:
        return host.admin(0x05, prp1=prp1, cdw10=qid | (qsize << 16), cdw11=flags | (vec << 16)).sc

    def csq(qid: int, cqid: int, qsize: int = 15, flags: int = 0x1) -> int:
        return host.admin(0x01, prp1=page, cdw10=qid | (qsize << 16), cdw11=flags | (cqid << 16)).sc

    assert ccq(0) == K.SC_INVALID_QID
    assert ccq(5) == K.SC_INVALID_QID  # only 4 I/O queues
    assert ccq(1, qsize=0) == K.SC_INVALID_QSIZE
    assert ccq(1, qsize=1024) == K.SC_INVALID_QSIZE
    assert ccq(1, flags=0x2) == K.SC_INVALID_FIELD  # not physically contiguous
    assert ccq(1, vec=8) == K.SC_INVALID_VECTOR  # MSI asks for 8
    assert ccq(1, prp1=page + 8) == K.SC_INVALID_FIELD
    assert ccq(1) == 0
    assert ccq(1) == K.SC_INVALID_QID  # exists
    assert csq(1, 0) == K.SC_CQ_INVALID
    assert csq(1, 2) == K.SC_CQ_INVALID
    assert csq(1, 1, qsize=0) == K.SC_INVALID_QSIZE
    assert csq(1, 1, flags=0) == K.SC_INVALID_FIELD
    assert csq(0, 1) == K.SC_INVALID_QID
    assert csq(1, 1) == 0
    assert csq(2, 1) == 0  # two SQs may share a CQ
    assert host.admin(0x04, cdw10=1).sc == K.SC_INVALID_QUEUE_DELETION
    assert host.admin(0x00, cdw10=0).sc == K.SC_INVALID_QID
    assert host.admin(0x00, cdw10=3).sc == K.SC_INVALID_QID
    assert host.admin(0x00, cdw10=1).sc == 0
    assert host.admin(0x00, cdw10=2).sc == 0
    assert host.admin(0x04, cdw10=1).sc == 0
    assert host.admin(0x04, cdw10=1).sc == K.SC_INVALID_QID
    assert host.admin(0x04, cdw10=0).sc == K.SC_INVALID_QID


# ---- features ---------------------------------------------------------------------------------


def get_feature(host: Host, fid: int, sel: int = 0, cdw11: int = 0, nsid: int = 0) -> int:
    cqe = host.admin(0x0A, nsid=nsid, cdw10=fid | (sel << 8), cdw11=cdw11)
    assert cqe.sc == 0, hex(cqe.status)
    return cqe.dw0


def set_feature(host: Host, fid: int, cdw11: int, nsid: int = 0, **kw: int) -> tuple[int, int]:
    cqe = host.admin(0x09, nsid=nsid, cdw10=fid, cdw11=cdw11, **kw)
    return cqe.sc, cqe.dw0


def test_number_of_queues(host: Host) -> None:
    assert get_feature(host, K.FEAT_NUM_QUEUES) == 3 | (3 << 16)
    sc, dw0 = set_feature(host, K.FEAT_NUM_QUEUES, 63 | (63 << 16))  # Linux asks for many
    assert sc == 0 and dw0 == 3 | (3 << 16)
    sc, dw0 = set_feature(host, K.FEAT_NUM_QUEUES, 1 | (0 << 16))
    assert sc == 0 and dw0 == 1 | (0 << 16)
    assert set_feature(host, K.FEAT_NUM_QUEUES, 0xFFFF)[0] == K.SC_INVALID_FIELD
    host.create_io_queue(1)
    assert set_feature(host, K.FEAT_NUM_QUEUES, 1)[0] == K.SC_CMD_SEQ_ERROR
    page = host.alloc()
    cqe = host.admin(0x05, prp1=page, cdw10=2 | (15 << 16), cdw11=0x3 | (2 << 16))
    assert cqe.sc == K.SC_INVALID_QID  # only one CQ allocated
    host.wr(0x14, host.cc(en=False))  # reset restores the default allocation
    host.enable()
    assert get_feature(host, K.FEAT_NUM_QUEUES) == 3 | (3 << 16)


def test_simple_features_roundtrip(host: Host) -> None:
    for fid, value in (
        (K.FEAT_ARBITRATION, 0x03020103),
        (K.FEAT_IRQ_COALESCE, 0x0A05),
        (K.FEAT_WRITE_ATOMIC, 1),
        (K.FEAT_ASYNC_EVENT, 0x1FF),
    ):
        assert get_feature(host, fid, sel=K.SEL_SUPPORTED) & K.FEAT_CAP_CHANGEABLE
        assert set_feature(host, fid, value)[0] == 0
        assert get_feature(host, fid) == value
        assert get_feature(host, fid, sel=K.SEL_DEFAULT) == 0
    assert set_feature(host, K.FEAT_POWER_MGMT, 0)[0] == 0
    assert set_feature(host, K.FEAT_POWER_MGMT, 1)[0] == K.SC_INVALID_FIELD
    assert get_feature(host, K.FEAT_VOLATILE_WC) == 1
    assert set_feature(host, K.FEAT_ERROR_RECOVERY, 100, nsid=1)[0] == 0
    assert get_feature(host, K.FEAT_ERROR_RECOVERY, nsid=1) == 100
    assert set_feature(host, K.FEAT_ERROR_RECOVERY, 1 << 16, nsid=1)[0] == K.SC_INVALID_FIELD
    assert set_feature(host, K.FEAT_ERROR_RECOVERY, 1, nsid=9)[0] == K.SC_INVALID_NS
    caps = get_feature(host, K.FEAT_ERROR_RECOVERY, sel=K.SEL_SUPPORTED, nsid=1)
    assert caps & K.FEAT_CAP_NS_SPECIFIC
    # Interrupt vector configuration, per vector.
    assert get_feature(host, K.FEAT_IRQ_CONFIG, cdw11=2) == 2
    assert set_feature(host, K.FEAT_IRQ_CONFIG, 2 | (1 << 16))[0] == 0
    assert get_feature(host, K.FEAT_IRQ_CONFIG, cdw11=2) == 2 | (1 << 16)
    assert host.admin(0x0A, cdw10=K.FEAT_IRQ_CONFIG, cdw11=9).sc == K.SC_INVALID_FIELD
    # Unknown features, saving.
    for fid in (0x00, 0x03, 0x0C, 0x0D, 0x0F, 0x80, 0xFF):
        assert host.admin(0x0A, cdw10=fid).sc == K.SC_INVALID_FIELD
        assert set_feature(host, fid, 0)[0] == K.SC_INVALID_FIELD
    cqe = host.admin(0x09, cdw10=K.FEAT_ARBITRATION | (1 << 31), cdw11=0)
    assert cqe.sc == K.SC_FEAT_NOT_SAVEABLE
    # Defaults return after a controller reset.
    host.wr(0x14, host.cc(en=False))
    host.enable()
    assert get_feature(host, K.FEAT_ARBITRATION) == 0


def test_temperature_threshold(host: Host) -> None:
    assert get_feature(host, K.FEAT_TEMP_THRESHOLD) & 0xFFFF == K.SC_SUCCESS + 343
    under = (1 << 20) | 250
    assert set_feature(host, K.FEAT_TEMP_THRESHOLD, under)[0] == 0
    assert get_feature(host, K.FEAT_TEMP_THRESHOLD, cdw11=1 << 20) & 0xFFFF == 250
    sensor1 = (1 << 16) | 330
    assert set_feature(host, K.FEAT_TEMP_THRESHOLD, sensor1)[0] == 0
    assert get_feature(host, K.FEAT_TEMP_THRESHOLD, cdw11=1 << 16) & 0xFFFF == 330
    assert set_feature(host, K.FEAT_TEMP_THRESHOLD, (5 << 16) | 300)[0] == K.SC_INVALID_FIELD
    assert set_feature(host, K.FEAT_TEMP_THRESHOLD, (2 << 20) | 300)[0] == K.SC_INVALID_FIELD


def test_volatile_write_cache_off_writes_through(
    ioq: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: syncs.append(fd))
    assert set_feature(ioq, K.FEAT_VOLATILE_WC, 0)[0] == 0
    assert len(syncs) == 1  # cached data made durable on the switch
    buf = ioq.alloc()
    assert ioq.rw(1, True, 0, 1, buf).sc == 0
    assert len(syncs) == 2
    assert set_feature(ioq, K.FEAT_VOLATILE_WC, 1)[0] == 0
    assert ioq.rw(1, True, 0, 1, buf).sc == 0
    assert len(syncs) == 2


def test_timestamp(host: Host) -> None:
    buf = host.alloc()
    assert host.admin(0x0A, cdw10=K.FEAT_TIMESTAMP, prp1=buf).sc == 0
    raw = host.dma.peek(buf, 8)
    assert (raw[6] >> 1) & 7 == 0  # origin: reset
    now_ms = int(time.time() * 1000)
    host.dma.poke(buf, now_ms.to_bytes(6, "little") + b"\0\0")
    assert host.admin(0x09, cdw10=K.FEAT_TIMESTAMP, prp1=buf).sc == 0
    host.dma.poke(buf, bytes(8))
    assert host.admin(0x0A, cdw10=K.FEAT_TIMESTAMP, prp1=buf).sc == 0
    raw = host.dma.peek(buf, 8)
    assert 0 <= int.from_bytes(raw[:6], "little") - now_ms < 5000
    assert (raw[6] >> 1) & 7 == 1  # origin: set by the host


# ---- log pages and asynchronous events --------------------------------------------------------


def get_log(host: Host, lid: int, nbytes: int, offset: int = 0, rae: bool = False, nsid: int = 0):
    buf = host.alloc((nbytes + PAGE - 1) // PAGE + 1)
    numd = nbytes // 4 - 1
    cdw10 = lid | (int(rae) << 15) | ((numd & 0xFFFF) << 16)
    cqe = host.admin(
        0x02, nsid=nsid, prp1=buf, prp2=buf + PAGE, cdw10=cdw10, cdw11=numd >> 16, cdw12=offset
    )
    return cqe, host.dma.peek(buf, nbytes)


def test_log_pages(ioq: Host) -> None:
    cqe, smart = get_log(ioq, K.LOG_SMART, 512, nsid=0xFFFFFFFF)
    assert cqe.sc == 0
    assert smart[0] == 0 and u16(smart, 1) == 303 and smart[3] == 100
    buf = ioq.alloc()
    assert ioq.rw(1, True, 0, 8, buf).sc == 0
    assert ioq.rw(1, False, 0, 8, buf).sc == 0
    _, smart = get_log(ioq, K.LOG_SMART, 512)
    assert int.from_bytes(smart[32:48], "little") == 1  # data units read (rounded up)
    assert int.from_bytes(smart[64:80], "little") == 1  # host reads
    assert int.from_bytes(smart[80:96], "little") == 1  # host writes
    cqe, fw = get_log(ioq, K.LOG_FW_SLOT, 512)
    assert cqe.sc == 0 and fw[0] == 1 and fw[8:16].rstrip() == b"vfiod01"
    # Partial read with offset (extended data).
    cqe, part = get_log(ioq, K.LOG_FW_SLOT, 8, offset=8)
    assert cqe.sc == 0 and part == fw[8:16]
    assert get_log(ioq, K.LOG_FW_SLOT, 8, offset=1024)[0].sc == K.SC_INVALID_FIELD
    for lid in (0x00, 0x04, 0x05, 0x06, 0x0C, 0x80, 0xC0):
        cqe, _ = get_log(ioq, lid, 512)
        assert cqe.sc == K.SC_INVALID_LOG_PAGE and cqe.dnr


def test_error_log_records_failures(ioq: Host) -> None:
    cqe = ioq.rw(1, False, NS_BYTES // 512, 1, ioq.alloc())
    assert cqe.sc == K.SC_LBA_RANGE
    cqe2, page = get_log(ioq, K.LOG_ERROR, 64 * 16)
    assert cqe2.sc == 0
    count, sqid, cid, status = struct.unpack_from("<QHHH", page, 0)
    assert count == 1 and sqid == 1 and cid == cqe.cid and status >> 1 == cqe.status
    assert u64(page, 16) == NS_BYTES // 512 and u32(page, 24) == 1
    assert u64(page, 64) == 0  # only one entry
    _, smart = get_log(ioq, K.LOG_SMART, 512)
    assert int.from_bytes(smart[176:192], "little") == 1


def test_async_event_request_held_and_limited(host: Host) -> None:
    cids = []
    for _ in range(4):
        cid = host.next_cid()
        cids.append(cid)
        host.push(0, struct.pack("<BBH", 0x0C, 0, cid) + bytes(60))
        assert host.poll(0) is None  # held
    cqe = host.admin(0x0C)
    assert cqe.sc == K.SC_AER_LIMIT
    # Enable temperature warnings, lower the threshold below the current temperature.
    set_feature(host, K.FEAT_ASYNC_EVENT, K.AEC_SMART_TEMPERATURE)
    set_cid = host.next_cid()
    host.push(0, Command.pack(0x09, set_cid, cdw10=K.FEAT_TEMP_THRESHOLD, cdw11=300))
    aen = host.poll(0)
    assert aen is not None and aen.cid == cids[0] and aen.sc == 0
    assert aen.dw0 == K.AER_TYPE_SMART | (K.AER_SMART_TEMPERATURE << 8) | (K.LOG_SMART << 16)
    done = host.poll(0)
    assert done is not None and done.cid == set_cid and done.sc == 0
    # Masked until the SMART log is read: a second crossing raises nothing.
    assert set_feature(host, K.FEAT_TEMP_THRESHOLD, 400)[0] == 0
    assert set_feature(host, K.FEAT_TEMP_THRESHOLD, 300)[0] == 0
    assert host.poll(0) is None
    _, smart = get_log(host, K.LOG_SMART, 512)  # RAE=0: the SMART event type unmasks
    assert smart[0] & 0x02  # temperature warning
    assert set_feature(host, K.FEAT_TEMP_THRESHOLD, 400)[0] == 0
    set_cid = host.next_cid()
    host.push(0, Command.pack(0x09, set_cid, cdw10=K.FEAT_TEMP_THRESHOLD, cdw11=300))
    aen = host.poll(0)
    assert aen is not None and aen.cid == cids[1]
    assert host.poll(0) is not None
    # Reset drops outstanding AERs without completing them.
    host.wr(0x14, host.cc(en=False))
    assert host.ctrl.aer_cids == []


def test_admin_queue_fetch_fault_is_fatal(ctrl: NvmeController) -> None:
    dma = FakeDma()
    h = Host(ctrl, dma)
    h.enable()
    dma.holes.append((h.queues[0].sq_base, PAGE))
    h.ring(0)
    h.queues[0].sq_tail = 1
    h.ring(0)
    assert h.rd(0x1C) & 0x2  # CFS
    h.wr(0x14, h.cc(en=False))
    assert h.rd(0x1C) & 0x3 == 0
