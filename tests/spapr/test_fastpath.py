"""The C fast path agrees with its pure-Python twin on random inputs (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spapr_helpers import MEM, be_list, make_phb

from vfiod import spapr
from vfiod.spapr.fastpath import LEAF_ENTRIES, PYTHON, TranslateFault, cffi_impl
from vfiod.spapr.tce import TceTable

_C = cffi_impl()
# The C module is built by `pip install` (make venv); its absence is a failure, never a skip.
assert _C is not None, "vfiod._tce is not built: run `make venv` (pip install builds it)"
C = _C

SHIFTS = st.sampled_from([12, 16, 21, 24])
u64 = st.integers(0, (1 << 64) - 1)


def memory(regions: list[tuple[int, int]]) -> spapr.HostMemory:
    mem = spapr.HostMemory()
    for addr, size in regions:
        try:
            mem.add(addr, size, bytearray(size))
        except ValueError:
            pass  # overlapping draw: skip
    return mem


regions_st = st.lists(
    st.tuples(st.integers(0, 64).map(lambda x: x << 21), st.integers(1, 8).map(lambda x: x << 20)),
    max_size=4,
)


def tce_st(shift: int) -> st.SearchStrategy[int]:
    """Mostly plausible TCEs near the regions, sometimes misaligned, poison or garbage."""
    aligned = st.integers(0, (64 << 21) >> shift).map(lambda p: p << shift)
    return st.one_of(
        st.tuples(aligned, st.integers(0, 3)).map(lambda t: t[0] | t[1]),
        st.tuples(aligned, st.integers(0, (1 << shift) - 1)).map(lambda t: t[0] | t[1]),
        u64,
    )


@settings(max_examples=200, deadline=None)
@given(st.data(), SHIFTS, regions_st, st.booleans())
def test_validate_and_put_batch_agree(
    data: st.DataObject, shift: int, regions: list[tuple[int, int]], check: bool
) -> None:
    assert C is not None
    mem = memory(regions) if check else None
    vals = data.draw(st.lists(tce_st(shift), min_size=0, max_size=600))
    raw = be_list(vals)
    n = len(vals)
    assert C.validate_be(raw, n, shift, mem) == PYTHON.validate_be(raw, n, shift, mem)
    assert C.validate(vals, n, shift, mem) == PYTHON.validate(vals, n, shift, mem)
    # the whole hypercall-style batch into two leaves from a random offset
    n = min(n, LEAF_ENTRIES)
    off = data.draw(st.integers(0, LEAF_ENTRIES - 1))
    n0 = min(n, LEAF_ENTRIES - off)
    res = []
    for impl in (PYTHON, C):
        l0, l1 = impl.new_leaf(), impl.new_leaf()
        rc = impl.put_batch_be(l0, off, n0, l1, raw, n, shift, mem)
        res.append((rc, list(l0), list(l1)))
    assert res[0] == res[1]
    if res[0][0] < 0:
        assert res[0][1][off : off + n0] + res[0][2][: n - n0] == vals[:n]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 511), st.integers(0, 512), u64, u64)
def test_fill_and_linear_agree(off: int, n: int, first: int, step: int) -> None:
    assert C is not None
    n = min(n, LEAF_ENTRIES - off)
    out = []
    for impl in (PYTHON, C):
        a, b = impl.new_leaf(), impl.new_leaf()
        impl.fill(a, off, n, first)
        impl.fill_linear(b, off, n, first, step)
        out.append((list(a), list(b)))
    assert out[0] == out[1]


@settings(max_examples=200, deadline=None)
@given(st.data(), SHIFTS, regions_st, st.booleans())
def test_translate_agrees(
    data: st.DataObject, shift: int, regions: list[tuple[int, int]], write: bool
) -> None:
    assert C is not None
    mem = memory(regions)
    bus = data.draw(st.sampled_from([0, 0x0800000000000000]))
    nb = data.draw(st.integers(1, 3 * LEAF_ENTRIES))
    entries = data.draw(st.dictionaries(st.integers(0, nb - 1), tce_st(shift), max_size=40))
    # some contiguous runs so pieces merge
    run_at = data.draw(st.integers(0, nb - 1))
    run_len = data.draw(st.integers(0, 16))
    base = data.draw(st.integers(0, 64)) << 21
    tables = []
    for impl in (PYTHON, C):
        t = TceTable(nb, impl)
        for i, v in entries.items():
            t.set(i, v)
        t.fill_linear(run_at, min(run_len, nb - run_at), base | 3, 1 << shift)
        tables.append(t)
    span = nb << shift
    sg = data.draw(
        st.lists(
            st.tuples(
                st.integers(bus - 4096 if bus else 0, bus + span + 4096),
                st.integers(0, 3 << shift),
            ),
            min_size=1,
            max_size=6,
        )
    )
    out = []
    for impl, t in zip((PYTHON, C), tables, strict=True):
        try:
            out.append(("ok", impl.translate(t, bus, shift, sg, write, mem)))
        except TranslateFault as f:
            out.append(("fault", (f.iova, f.index)))
    assert out[0] == out[1]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "stuff", "indirect", "get"]),
            st.integers(0, 600),  # page number
            st.integers(0, 40),  # npages
            st.integers(0, 300),  # address page
            st.integers(0, 3),  # perm
            st.integers(0, 4),  # misalign selector
        ),
        max_size=25,
    ),
    st.booleans(),
)
def test_hypercall_sequences_agree(ops: list[tuple[int, ...]], compat: bool) -> None:
    assert C is not None
    phbs = [make_phb(impl, qemu_compat=compat) for impl in (PYTHON, C)]
    pes = [p.new_pe() for p in phbs]
    for p, pe in zip(phbs, pes, strict=True):
        assert p.rtas_create_pe_dma_window(pe, 16, 26)[0] == 0  # 1024 x 64K at 2^59
    results: list[list[object]] = [[], []]
    for k, (p, pe) in enumerate(zip(phbs, pes, strict=True)):
        for op, page, n, addr, perm, mis in ops:
            win = (page + n) % 2
            liobn = pe.liobn(win)
            shift = 12 if win == 0 else 16
            ioba = (0 if win == 0 else 0x0800000000000000) + (page << shift) + (mis == 1) * 8
            tce = (MEM + (addr << shift)) | perm | ((mis == 2) << 11)
            if op == "put":
                results[k].append(p.h_put_tce(liobn, ioba, tce))
            elif op == "stuff":
                results[k].append(p.h_stuff_tce(liobn, ioba, tce if mis == 3 else 0, n))
            elif op == "indirect":
                lst = [tce + (i << shift) for i in range(n)]
                results[k].append(p.h_put_tce_indirect(liobn, ioba, be_list(lst), n))
            else:
                results[k].append(p.h_get_tce(liobn, ioba))
        for w in pe.windows:
            assert w is not None
            results[k].append(list(w.table.items()))
    assert results[0] == results[1]


def test_env_forces_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFIOD_NO_CFFI", "1")
    assert spapr.default_impl() is PYTHON
    assert spapr.Phb().impl is PYTHON
    monkeypatch.delenv("VFIOD_NO_CFFI")
    assert spapr.default_impl() is C
