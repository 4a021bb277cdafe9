"""Region-info capability chains: build/parse round trip and hostile chains."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proto_helpers import ORDERS, Order, pack

from vfiod.protocol import (
    MsixMappableCap,
    RegionCap,
    SparseMmapCap,
    TypeCap,
    UnknownCap,
    build_region_caps,
    parse_region_caps,
)

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
caps_strategy = st.lists(
    st.one_of(
        st.builds(SparseMmapCap, st.lists(st.tuples(u64, u64), max_size=4).map(tuple)),
        st.builds(TypeCap, u32, u32),
        st.builds(MsixMappableCap),
        st.builds(UnknownCap, st.integers(4, 0xFFFF), st.integers(0, 0xFFFF),
                  st.binary(max_size=24).map(lambda b: b.ljust(-(-len(b) // 8) * 8, b"\0"))),
    ),
    max_size=5,
)


@given(caps_strategy, st.sampled_from(ORDERS))
def test_round_trip(caps: list[RegionCap], order: Order) -> None:
    raw = build_region_caps(caps, order)
    assert len(raw) % 8 == 0
    assert parse_region_caps(raw, 32 if caps else 0, order) == tuple(caps)


@pytest.mark.parametrize("order", ORDERS)
def test_next_offsets_are_relative_to_the_payload(order: Order) -> None:
    raw = build_region_caps([TypeCap(1, 2), MsixMappableCap()], order)
    assert raw == pack(order, "HHIII", 2, 1, 48, 1, 2) + pack(order, "HHI", 3, 1, 0)


@pytest.mark.parametrize(
    ("raw", "cap_offset"),
    [
        (pack("little", "HHI", 3, 1, 32), 32),  # points at itself: loop
        (pack("little", "HHI", 3, 1, 40) + pack("little", "HHI", 3, 1, 32), 32),  # 2-loop
        (pack("little", "HHI", 3, 1, 0), 16),  # cap_offset inside the fixed struct
        (pack("little", "HHI", 3, 1, 0), 36),  # header runs past the end
        (pack("little", "HHI", 3, 1, 400), 32),  # next beyond the bytes
        (pack("little", "HHII", 1, 1, 0, 3) + bytes(4), 32),  # sparse areas truncated
        (pack("little", "HHI", 2, 1, 0) + bytes(4), 32),  # type cap truncated
    ],
)
def test_hostile_chains_raise_value_error(raw: bytes, cap_offset: int) -> None:
    with pytest.raises(ValueError):
        parse_region_caps(raw, cap_offset, "little")


@given(st.binary(max_size=80), st.integers(0, 200), st.sampled_from(ORDERS))
def test_random_chains_only_raise_value_error(raw: bytes, cap_offset: int, order: Order) -> None:
    try:
        parse_region_caps(raw, cap_offset, order)
    except ValueError:
        pass
