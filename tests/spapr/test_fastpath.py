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
assert _C is not None, "vfiod._fast is not built: run `make venv` (pip install builds it)"
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
def test_validate_agrees(
    data: st.DataObject, shift: int, regions: list[tuple[int, int]], check: bool
) -> None:
    mem = memory(regions) if check else None
    vals = data.draw(st.lists(tce_st(shift), min_size=0, max_size=600))
    raw = be_list(vals)
    n = len(vals)
    assert C.validate_be(raw, n, shift, mem) == PYTHON.validate_be(raw, n, shift, mem)
    assert C.validate(vals, n, shift, mem) == PYTHON.validate(vals, n, shift, mem)


NB = 3 * LEAF_ENTRIES + 17
idx_st = st.integers(-2, NB + 2)
n_st = st.integers(0, 2 * LEAF_ENTRIES + 3)
store_ops = st.one_of(
    st.tuples(st.just("fill"), idx_st, n_st, st.sampled_from([0, 0, 3, 0x1001, 0xF000])),
    st.tuples(st.just("linear"), idx_st, n_st, u64, u64),
    st.tuples(st.just("write"), idx_st, st.lists(u64, max_size=40), st.integers(0, 3)),
    st.tuples(st.just("write_be"), idx_st, st.lists(u64, max_size=40)),
    st.tuples(st.just("get"), idx_st),
    st.tuples(st.just("clear")),
    st.tuples(st.just("resize"), st.integers(NB - 5, 2 * NB)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(store_ops, max_size=30), st.sampled_from([0, 1, 2, 5]))
def test_store_operations_agree(ops: list[tuple[object, ...]], budget: int) -> None:
    """Same results, same errors (nothing changed on error), same entries and counters."""
    runs = []
    for impl in (PYTHON, C):
        store = impl.new_store(NB, budget)
        log: list[object] = []
        for op in ops:
            try:
                if op[0] == "fill":
                    log.append(store.fill(op[1], op[2], op[3]))  # type: ignore[arg-type]
                elif op[0] == "linear":
                    log.append(store.fill_linear(op[1], op[2], op[3], op[4]))  # type: ignore[arg-type]
                elif op[0] == "write":
                    vals = op[2]
                    assert isinstance(vals, list)
                    log.append(store.write(op[1], vals, len(vals), op[3]))  # type: ignore[arg-type]
                elif op[0] == "write_be":
                    vals = op[2]
                    assert isinstance(vals, list)
                    log.append(store.write_be(op[1], be_list(vals), len(vals)))  # type: ignore[arg-type]
                elif op[0] == "get":
                    log.append(store.get(op[1]))  # type: ignore[arg-type]
                elif op[0] == "clear":
                    store.clear()
                else:
                    store.resize(op[1])  # type: ignore[arg-type]
            except OSError as e:
                log.append(("error", e.errno))
            log.append((store.valid, store.leaf_count, store.nb_entries))
        leaves = [(lid, list(leaf)) for lid, leaf in store.leaves()]
        valid = sum(1 for _, leaf in leaves for v in leaf if v & 3)
        assert valid == store.valid
        if budget:
            assert store.leaf_count <= budget
        runs.append((log, leaves))
    assert runs[0] == runs[1]


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
            out.append(("ok", impl.translate(t.store, bus, shift, sg, write, mem)))
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
