"""Byte vectors written out from the spec (tables in §1-2), in both byte orders."""

from __future__ import annotations

import json

import pytest
from proto_helpers import ORDERS, Order, drain, header, one, pack, ready_client, ready_server

from vfiod.protocol import (
    CLOSED,
    NEED_DATA,
    Capabilities,
    Command,
    Connection,
    DeviceGetInfo,
    DeviceGetIrqInfo,
    DeviceGetRegionInfo,
    DeviceInfoReply,
    DeviceReset,
    DeviceSetIrqs,
    DmaMap,
    DmaMapReply,
    DmaRead,
    DmaReadReply,
    DmaUnmap,
    DmaWrite,
    DmaWriteReply,
    ErrorReply,
    IrqInfoReply,
    MsixMappableCap,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    Role,
    SetIrqsFlag,
    SparseMmapCap,
    State,
    TypeCap,
    Version,
    VersionReply,
    WriteMultiEntry,
    make_region_info_reply,
    parse_region_caps,
)

DMA_MAP_LE = bytes.fromhex(
    "0500 0200 30000000 00000000 00000000"
    "20000000 03000000 0010000000000000 00000c0000000000 0000020000000000"
)
DMA_MAP_BE = bytes.fromhex(
    "0005 0002 00000030 00000000 00000000"
    "00000020 00000003 0000000000001000 00000000000c0000 0000000000020000"
)
SET_IRQS_LE = bytes.fromhex(
    "0700 0800 24000000 00000000 00000000 14000000 24000000 02000000 00000000 02000000"
)
SET_IRQS_BE = bytes.fromhex(
    "0007 0008 00000024 00000000 00000000 00000014 00000024 00000002 00000000 00000002"
)
QEMU_JSON = (
    '{"capabilities": {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}, '
    '"max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096, '
    '"max_dma_maps": 65535, "write_multiple": true}}'
)
# id 3 reply (flags 1), argsz 104 = 32 + sparse(48) + type(16) + msix(8); caps start at 32.
REGION_INFO_REPLY_LE = bytes.fromhex(
    "0300 0500 78000000 01000000 00000000"
    "68000000 0f000000 00000000 20000000 0000010000000000 0000000000000000"
    "0100 0100 50000000 02000000 00000000"
    "0000000000000000 0010000000000000 0030000000000000 0010000000000000"
    "0200 0100 60000000 01000000 02000000"
    "0300 0100 00000000"
)
SUGGESTED = (
    b'{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,'
    b'"max_dma_maps":65535}}'
)
CAPS = (SparseMmapCap(((0, 0x1000), (0x3000, 0x1000))), TypeCap(1, 2), MsixMappableCap())


@pytest.mark.parametrize(("order", "vector"), [("little", DMA_MAP_LE), ("big", DMA_MAP_BE)])
def test_qemu_dma_map(order: Order, vector: bytes) -> None:
    server = ready_server(order)
    server.receive_data(vector, [11])
    assert one(server) == DmaMap(3, 0x1000, 0xC0000, 0x20000, fd=11, msg_id=5)
    out = server.send(DmaMapReply(msg_id=5))
    assert out.data == header(order, 5, 2, 16, 1) and out.fds == ()
    client = ready_client(order)
    assert client.send(DmaMap(3, 0x1000, 0xC0000, 0x20000, fd=11, msg_id=5)).data == vector


@pytest.mark.parametrize(("order", "vector"), [("little", SET_IRQS_LE), ("big", SET_IRQS_BE)])
def test_set_irqs_with_two_fds(order: Order, vector: bytes) -> None:
    server = ready_server(order)
    server.receive_data(vector, (20, 21))
    flags = SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER
    assert one(server) == DeviceSetIrqs(flags, 2, 0, 2, fds=(20, 21), msg_id=7)
    out = ready_client(order).send(DeviceSetIrqs(flags, 2, 0, 2, fds=(20, 21), msg_id=7))
    assert out.data == vector and out.fds == (20, 21)


@pytest.mark.parametrize("order", ORDERS)
def test_set_irqs_deassign_run_has_no_fds(order: Order) -> None:
    server = ready_server(order)
    body = pack(order, "IIIII", 20, SetIrqsFlag.DATA_EVENTFD | SetIrqsFlag.ACTION_TRIGGER,
                2, 4, 3)
    server.receive_data(header(order, 1, 8, 36) + body)
    ev = one(server)
    assert isinstance(ev, DeviceSetIrqs) and ev.count == 3 and ev.fds == ()


@pytest.mark.parametrize("order", ORDERS)
def test_qemu_version_request_and_suggested_reply(order: Order) -> None:
    server = Connection(Role.SERVER, byteorder=order)
    raw = header(order, 0, 1, 214) + pack(order, "HH", 0, 0) + QEMU_JSON.encode() + b"\0"
    assert len(raw) == 214
    server.receive_data(raw)
    ev = one(server)
    assert isinstance(ev, Version) and (ev.major, ev.minor, ev.msg_id) == (0, 0, 0)
    assert ev.caps == json.loads(QEMU_JSON)
    peer = Capabilities.from_json(ev.caps)
    assert peer.max_msg_fds == 16 and peer.write_multiple and peer.migration is not None
    assert server.state is State.NEGOTIATING
    out = server.send(VersionReply(0, 0, Capabilities(max_msg_fds=16).to_json(), msg_id=0))
    size = 20 + len(SUGGESTED) + 1
    assert out.data == header(order, 0, 1, size, 1) + bytes(4) + SUGGESTED + b"\0"
    assert server.state is State.READY


def test_capabilities_defaults_and_key_order() -> None:
    assert Capabilities.from_json({}) == Capabilities(max_msg_fds=8)
    shuffled = {"capabilities": {"pgsizes": 65536, "max_msg_fds": 4}}
    assert Capabilities.from_json(shuffled) == Capabilities(max_msg_fds=4, pgsizes=65536)
    with pytest.raises(ValueError):
        Capabilities.from_json({"capabilities": {"max_msg_fds": "16"}})
    with pytest.raises(ValueError):
        Capabilities.from_json({"capabilities": []})


@pytest.mark.parametrize("order", ORDERS)
def test_region_info_reply_with_sparse_mmap_chain(order: Order) -> None:
    client = ready_client(order)
    server = ready_server(order)
    if order == "little":
        expected = REGION_INFO_REPLY_LE
    else:
        expected = (
            header(order, 3, 5, 120, 1)
            + pack(order, "IIIIQQ", 104, 0xF, 0, 32, 0x10000, 0)
            + pack(order, "HHIII", 1, 1, 80, 2, 0)
            + pack(order, "QQQQ", 0, 0x1000, 0x3000, 0x1000)
            + pack(order, "HHIII", 2, 1, 96, 1, 2)
            + pack(order, "HHI", 3, 1, 0)
        )
    # server side: the second request (argsz 104) gets the whole chain, with the fd
    server.receive_data(header(order, 3, 5, 48) + pack(order, "IIIIQQ", 104, 0, 0, 0, 0, 0))
    assert one(server) == DeviceGetRegionInfo(0, argsz=104, msg_id=3)
    reply = make_region_info_reply(msg_id=3, flags=7, index=0, size=0x10000, caps=CAPS, fd=40,
                                   byteorder=order)
    out = server.send(reply)
    assert out.data == expected and out.fds == (40,)
    # client side: decode and walk the chain
    client.send(DeviceGetRegionInfo(0, argsz=104, msg_id=3))
    client.receive_data(expected, [40])
    ev = one(client)
    assert ev == reply.__class__(0xF, 0, 32, 0x10000, 0, expected[48:], argsz=104, fd=40,
                                 msg_id=3)
    assert parse_region_caps(ev.caps, ev.cap_offset, order) == CAPS


@pytest.mark.parametrize("order", ORDERS)
def test_region_info_first_query_is_truncated(order: Order) -> None:
    """spec §2.5: argsz 32 -> only the 32-byte struct, argsz = full size, no fd; CAPS and
    cap_offset kept (QEMU 11.1 checks cap_offset in 32..argsz before it asks again)."""
    server = ready_server(order)
    server.receive_data(header(order, 4, 5, 48) + pack(order, "IIIIQQ", 32, 0, 0, 0, 0, 0))
    one(server)
    out = server.send(make_region_info_reply(msg_id=4, flags=7, index=0, size=0x10000,
                                             caps=CAPS, fd=40, byteorder=order))
    assert out.data == header(order, 4, 5, 48, 1) + pack(order, "IIIIQQ", 104, 0xF, 0, 32,
                                                         0x10000, 0)
    assert out.fds == ()


@pytest.mark.parametrize("order", ORDERS)
def test_qemu_dma_read_layout(order: Order) -> None:
    """spec §2.9: u64 address at 16, u32 count at 24, data at 28, size = count + 32."""
    server, client = ready_server(order), ready_client(order)
    out = server.send(DmaRead(0x2000, 8, msg_id=9))
    assert out.data == header(order, 9, 11, 32) + pack(order, "QI", 0x2000, 8) + bytes(4)
    client.receive_data(out.data)
    assert one(client) == DmaRead(0x2000, 8, msg_id=9)
    qemu_reply = header(order, 9, 11, 40, 1) + pack(order, "QI", 0x2000, 8) + b"ABCDEFGH" + bytes(4)
    assert client.send(DmaReadReply(0x2000, b"ABCDEFGH", msg_id=9)).data == qemu_reply
    server.receive_data(qemu_reply)
    assert one(server) == DmaReadReply(0x2000, b"ABCDEFGH", msg_id=9)


@pytest.mark.parametrize("order", ORDERS)
def test_qemu_dma_write_layout(order: Order) -> None:
    server, client = ready_server(order), ready_client(order)
    out = server.send(DmaWrite(0x3000, b"xyz", msg_id=2))
    assert out.data == header(order, 2, 12, 35) + pack(order, "QI", 0x3000, 3) + b"xyz" + bytes(4)
    client.receive_data(out.data)
    assert one(client) == DmaWrite(0x3000, b"xyz", msg_id=2)
    client.send(DmaWriteReply(msg_id=2))
    server.receive_data(header(order, 2, 12, 16, 1))
    assert one(server) == DmaWriteReply(msg_id=2)


@pytest.mark.parametrize("order", ORDERS)
def test_error_reply_is_header_only(order: Order) -> None:
    server = ready_server(order)
    server.receive_data(header(order, 6, 13, 16))
    assert one(server) == DeviceReset(msg_id=6)
    out = server.send(ErrorReply(6, None, 5))
    assert out.data == header(order, 6, 13, 16, 0x21, 5)
    client = ready_client(order)
    client.send(DeviceReset(msg_id=6))
    client.receive_data(out.data)
    assert one(client) == ErrorReply(6, Command.DEVICE_RESET, 5)


@pytest.mark.parametrize("order", ORDERS)
def test_region_read_and_posted_write(order: Order) -> None:
    server = ready_server(order)
    server.receive_data(
        header(order, 1, 9, 32) + pack(order, "QII", 0x10, 7, 4)
        + header(order, 2, 10, 34, 0x10) + pack(order, "QII", 0x20, 0, 2) + b"\x12\x34"
    )
    assert drain(server) == [
        RegionRead(0x10, 7, 4, msg_id=1),
        RegionWrite(0x20, 0, b"\x12\x34", msg_id=2, no_reply=True),
        NEED_DATA,
    ]
    out = server.send(RegionReadReply(0x10, 7, b"\x86\x80\x11\x22", msg_id=1))
    head = header(order, 1, 9, 36, 1) + pack(order, "QII", 0x10, 7, 4)
    assert out.data == head + b"\x86\x80\x11\x22"


@pytest.mark.parametrize("order", ORDERS)
def test_small_fixed_messages(order: Order) -> None:
    client = ready_client(order)
    assert client.send(DeviceGetInfo(msg_id=1)).data == header(order, 1, 4, 32) + pack(
        order, "IIII", 16, 0, 0, 0)
    assert client.send(DeviceGetIrqInfo(2, msg_id=2)).data == header(order, 2, 7, 32) + pack(
        order, "IIII", 16, 0, 2, 0)
    assert client.send(DmaUnmap(2, 0, 0, msg_id=3)).data == header(order, 3, 3, 40) + pack(
        order, "IIQQ", 24, 2, 0, 0)
    client.receive_data(header(order, 1, 4, 32, 1) + pack(order, "IIII", 16, 3, 9, 5))
    client.receive_data(header(order, 2, 7, 32, 1) + pack(order, "IIII", 16, 3, 2, 64))
    client.receive_data(header(order, 3, 3, 16, 1))
    assert drain(client)[:2] == [
        DeviceInfoReply(3, 9, 5, msg_id=1),
        IrqInfoReply(3, 2, 64, msg_id=2),
    ]


@pytest.mark.parametrize("order", ORDERS)
def test_region_write_multi(order: Order) -> None:
    server = ready_server(order)
    entries = pack(order, "QII", 0x100, 0, 4) + b"\x01\x02\x03\x04" + bytes(4)
    entries += pack(order, "QII", 0x108, 2, 8) + b"ABCDEFGH"
    server.receive_data(header(order, 8, 15, 16 + 8 + 48, 0x10) + pack(order, "Q", 2) + entries)
    assert one(server) == RegionWriteMulti(
        (WriteMultiEntry(0x100, 0, b"\x01\x02\x03\x04"), WriteMultiEntry(0x108, 2, b"ABCDEFGH")),
        msg_id=8, no_reply=True,
    )


def test_eof_at_boundary_is_closed() -> None:
    server = ready_server()
    server.receive_data(b"")
    assert server.next_event() is CLOSED
    assert server.next_event() is CLOSED
    assert server.state is State.CLOSED
