"""The compiled hot-path packers must say exactly what the construct declarations say."""

from __future__ import annotations

import dataclasses

import pytest
from construct import Bytes, FormatField, Renamed
from hypothesis import given
from hypothesis import strategies as st

from vfiod.protocol import WireStructs, wire_structs
from vfiod.protocol.structs import packer

NAMES = [f.name for f in dataclasses.fields(WireStructs) if f.name != "byteorder"]


def _value_strategy(sc: Renamed) -> st.SearchStrategy[object]:
    inner = sc.subcon
    if isinstance(inner, FormatField):
        return st.integers(0, (1 << (8 * inner.length)) - 1)
    assert isinstance(inner, Bytes)
    return st.binary(min_size=inner.length, max_size=inner.length)


@pytest.mark.parametrize("order", ["little", "big"])
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_packer_matches_construct(order: str, name: str, data: st.DataObject) -> None:
    cs = getattr(wire_structs(order), name)  # type: ignore[arg-type]
    p = packer(cs, order)  # type: ignore[arg-type]
    values = {sc.name: data.draw(_value_strategy(sc)) for sc in cs.subcons}
    raw = cs.build(values)
    assert p.build(values) == raw
    assert p.size == cs.sizeof()
    assert p.parse(raw) == {k: v for k, v in cs.parse(raw).items() if not k.startswith("_")}
