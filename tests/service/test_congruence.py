"""One protocol, three homes: LocalMemory, MemoryClient over shared memory, MemoryClient over the gRPC stream.

Both classes implement `memory_service.Memory` (protocol.py), with its signatures exactly.
Every test here runs against all three (the `memory` fixture) and checks a ground truth (numpy brute force,
the entries as written), or runs one script on all three at once (`backends`) and requires the same
results, the same exception classes and the same messages. A failed call must leave the bank exactly as
it was: stats, specs, entry metadata and every payload byte.
"""

from __future__ import annotations

import dataclasses
import inspect

import ml_dtypes
import numpy as np
import pytest

from svc_util import DIM, EMB, KV, LAYERS, arr, bank_state, make_entry, make_spec, meta_view, outcome

from memory_service import (
    AlreadyExists, BankStats, Budget, EntryMeta, FetchResult, InvalidArgument, KeySpace, KVLayout, LocalMemory,
    Memory, MemoryClient, NewEntry, NotFound, PruneResult, QueryResult, ResourceExhausted, StreamSpec, StreamStats,
)
from memory_service.types import QueryFetchResult
from memory_service.protocol import METHODS


def brute(keys: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer inner-product top-k by numpy: ids [L, k], scores [L, k]."""
    scores = np.einsum("nld,ld->ln", keys.astype(np.float64), q.astype(np.float64))  # [L, N]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


# ---- the protocol ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [LocalMemory, MemoryClient])
def test_implementations_have_the_protocols_signatures(impl):
    """Every call of the protocol: the same parameter names, kinds, defaults and (evaluated) annotations."""
    assert issubclass(impl, Memory)
    for name in METHODS:
        want = inspect.signature(getattr(Memory, name), eval_str=True)
        got = inspect.signature(getattr(impl, name), eval_str=True)
        assert got == want, f"{impl.__name__}.{name}{got} differs from Memory.{name}{want}"
    for name in ("__enter__", "__exit__"):  # the context manager (__enter__ returns the implementation itself)
        want = inspect.signature(getattr(Memory, name)).parameters
        assert inspect.signature(getattr(impl, name)).parameters == want, name


def test_every_backend_is_a_memory(memory):
    assert isinstance(memory, Memory)
    assert memory.__enter__() is memory  # (the fixture's `with` closes it)


# ---- ground truth, per backend ---------------------------------------------------------------------------

def test_put_ids_and_fetch_layer_subsets_bit_exact(memory):
    memory.create_stream(make_spec())
    memory.create_stream(make_spec("other"))
    entries = [make_entry(i) for i in range(9)]
    assert memory.put("cam0", entries[:6]) == [0, 1, 2, 3, 4, 5]
    assert memory.put("other", entries[:2]) == [0, 1]  # ids are per stream
    assert memory.put("cam0", entries[6:]) == [6, 7, 8]
    got = memory.fetch("cam0", [7, 1, 4], layers=[3, 0])
    assert got.ids == (7, 1, 4) and got.layers == (3, 0)
    assert got.kv.dtype == ml_dtypes.bfloat16 and got.kv.shape == (3, 2, *KV.layer_shape)
    for n, eid in enumerate([7, 1, 4]):
        for j, layer in enumerate([3, 0]):
            assert got.kv[n, j].tobytes() == entries[eid].kv[layer].tobytes()
    full = memory.fetch("cam0", list(range(9)))
    assert full.layers == tuple(range(LAYERS))
    assert full.kv.tobytes() == np.stack([e.kv for e in entries]).tobytes()
    assert memory.fetch("cam0", np.array([2], np.int64), layers=[1]).kv[0, 0].tobytes() == entries[2].kv[1].tobytes()


def test_queries_match_numpy_brute_force(memory):
    memory.create_stream(make_spec())
    entries = [make_entry(i, pinned=i % 7 == 0) for i in range(60)]
    memory.put("cam0", entries)
    keys = np.stack([e.keys["nam"] for e in entries])  # [N, L, D]
    q = np.random.default_rng(11).standard_normal((LAYERS, DIM)).astype(np.float32)

    r = memory.query("cam0", "nam", q, 5)
    ids, scores = brute(keys, q, 5)
    assert r.ids.shape == (LAYERS, 5) and r.ids.dtype == np.int64 and r.scores.dtype == np.float32
    assert np.array_equal(r.ids, ids) and np.allclose(r.scores, scores, rtol=1e-5, atol=1e-5)
    assert np.array_equal(r.frames, ids)  # frame_index == seed == id
    assert r.trace.scanned == 60

    mean = memory.query("cam0", "nam", q, 4, combine="mean")
    expect = np.argsort(-np.einsum("nld,ld->n", keys, q), kind="stable")[:4]
    assert mean.ids.shape == (4,) and np.array_equal(mean.ids, expect)

    r = memory.query("cam0", "nam", q, 60, exclude_frames=(10, 50))
    kept = {i for i in r.ids.reshape(-1).tolist() if i >= 0}
    assert kept == set(range(10)) | set(range(50, 60))
    assert (r.ids[:, 20:] == -1).all() and np.isneginf(r.scores[:, 20:]).all() and (r.frames[:, 20:] == -1).all()

    pinned = memory.query("cam0", "emb", entries[14].keys["emb"], 10, pinned_only=True)
    assert pinned.ids[0] == 14 and pinned.scores[0] == pytest.approx(1.0, abs=1e-5)  # cosine: itself
    assert set(pinned.ids[:9].tolist()) == {0, 7, 14, 21, 28, 35, 42, 49, 56} and pinned.ids[9] == -1


def test_query_fetch_is_query_then_fetch(memory):
    """One call: the ranking Query gives, and the K/V Fetch gives for each layer's hits the caller lacks, grouped
    by layer set; resident ids stay in the ranking but are never fetched; `include` is fetched whatever ranks."""
    memory.create_stream(make_spec())
    entries = [make_entry(i) for i in range(12)]
    memory.put("cam0", entries)
    q = np.random.default_rng(5).standard_normal((LAYERS, DIM)).astype(np.float32)
    want = memory.query("cam0", "nam", q, 4, exclude_frames=(10, 12))
    held = [int(want.ids[0, 0]), int(want.ids[1, 1])]  # two ids the ranking holds: still ranked, never fetched
    got = memory.query_fetch("cam0", "nam", q, 4, exclude_frames=(10, 12), resident=held)
    assert isinstance(got, QueryFetchResult)
    assert np.array_equal(got.query.ids, want.ids) and np.array_equal(got.query.scores, want.scores)
    assert np.array_equal(got.query.frames, want.frames)
    pairs = {(e, layer) for g in got.fetched for e in g.ids for layer in g.layers}
    expect = {(int(e), layer) for layer in range(LAYERS) for e in want.ids[layer] if e >= 0 and e not in held}
    assert pairs == expect and sum(len(g.ids) * len(g.layers) for g in got.fetched) == len(expect)
    for g in got.fetched:  # each group is exactly a Fetch of its ids and layers
        assert g.kv.tobytes() == memory.fetch("cam0", list(g.ids), list(g.layers)).kv.tobytes()
        assert got.kv_of(g.ids[0], g.layers[0]).tobytes() == entries[g.ids[0]].kv[g.layers[0]].tobytes()
    assert all(got.kv_of(e, layer) is None for e in held for layer in range(LAYERS))
    assert len({g.layers for g in got.fetched}) == len(got.fetched)  # one group per layer set

    # per-layer resident, include, fetch_k and a layer subset: exactly the pairs of the rule (query_fetch.py)
    resident = [[int(want.ids[0, 1])], [], [11], []]  # layer 0 holds its 2nd hit, layer 2 an id no row has
    got = memory.query_fetch("cam0", "nam", q, 4, exclude_frames=(10, 12), fetch_k=2, include=[11, 11],
                             resident=resident[1:], layers=[3, 1, 2])
    expect = set()
    for j, layer in enumerate([1, 2, 3]):
        hits = [int(e) for e in want.ids[layer] if e >= 0 and e != 11][:2]
        expect |= {(e, layer) for e in [11, *hits] if e not in resident[1 + j]}
    assert {(e, layer) for g in got.fetched for e in g.ids for layer in g.layers} == expect
    assert got.fetched[0].ids[0] == 11 and all(list(g.layers) == sorted(g.layers) for g in got.fetched)
    assert all(g.kv.tobytes() == memory.fetch("cam0", list(g.ids), list(g.layers)).kv.tobytes() for g in got.fetched)

    # one ranking for all layers (combine="mean"), everything held: the ranking and nothing fetched
    mean = memory.query("cam0", "nam", q, 3, combine="mean")
    got = memory.query_fetch("cam0", "nam", q, 3, combine="mean", resident=mean.ids.tolist())
    assert np.array_equal(got.query.ids, mean.ids) and got.fetched == ()
    got = memory.query_fetch("cam0", "nam", q, 3, combine="mean", layers=[2])
    assert len(got.fetched) == 1 and got.fetched[0].ids == tuple(mean.ids.tolist()) and got.fetched[0].layers == (2,)


def test_delete_pin_prune_budget_stats_entries(memory):
    memory.create_stream(make_spec(budget=Budget(max_entries=5), policy="fifo"))
    for i in range(8):  # one per call: a put's own entries are never its victims
        memory.put("cam0", [make_entry(i)])
    assert [e.entry_id for e in memory.entries("cam0")] == [3, 4, 5, 6, 7]
    memory.pin("cam0", [3])
    assert memory.put("cam0", [make_entry(8)]) == [8]
    assert [e.entry_id for e in memory.entries("cam0")] == [3, 5, 6, 7, 8]  # 4 went: 3 is pinned
    assert memory.prune("cam0") == PruneResult(evicted=(), degraded=(), reason="within budget")
    assert memory.delete("cam0", [6, 5, 6]) == 2
    with pytest.raises(NotFound):
        memory.fetch("cam0", [5])
    st = memory.stats("cam0")
    assert (st.entries, st.pinned, st.next_entry_id, st.evicted_total) == (3, 1, 9, 6)
    assert st.payload_bytes == 3 * LAYERS * KV.layer_bytes and st.budget == Budget(max_entries=5)
    memory.pin("cam0", [3], pinned=False)
    metas = memory.entries("cam0")
    assert [(m.entry_id, m.frame_index, m.chunk_index, m.prompt, m.pinned, m.codec) for m in metas] == [
        (3, 3, 1, "scene 3", False, "raw"), (7, 7, 2, "scene 2", False, "raw"), (8, 8, 2, "scene 3", False, "raw")]
    bank = memory.stats()
    assert isinstance(bank, BankStats) and bank.entries == 3 and [s.name for s in bank.streams] == ["cam0"]
    assert [s.name for s in memory.list_streams()] == ["cam0"]
    memory.drop_stream("cam0")
    assert memory.list_streams() == [] and memory.stats().entries == 0


def test_keys_only_stream(memory):
    spec = StreamSpec("k", {"e": KeySpace(4), "n": KeySpace(3, per_layer=True, layers=2)})
    memory.create_stream(spec)
    assert memory.list_streams() == [spec]
    vecs = [np.eye(4, dtype=np.float32)[i] for i in range(4)]
    ids = memory.put("k", [NewEntry(i, 0, f"p{i}", {"e": vecs[i], "n": np.full((2, 3), i, np.float32)})
                           for i in range(4)])
    assert ids == [0, 1, 2, 3]
    assert memory.query("k", "e", vecs[2], 1).ids.tolist() == [2]
    assert memory.query("k", "n", np.ones((2, 3)), 2).ids.tolist() == [[3, 2], [3, 2]]
    assert memory.stats("k").payload_bytes == 0 and {m.codec for m in memory.entries("k")} == {"none"}
    with pytest.raises(InvalidArgument, match="keys-only"):
        memory.fetch("k", [0])


def _two_layer_keys(seed: int) -> dict:
    keys = make_entry(seed).keys
    return {"nam": keys["nam"][:2], "emb": keys["emb"]}


def test_fp8_storage_round_trip(memory):
    kv = KVLayout(layers=2, heads=2, head_dim=8, tokens_per_frame=16)
    memory.create_stream(make_spec("f8", kv=kv, storage="fp8"))
    rng = np.random.default_rng(5)
    entries = [NewEntry(i, 0, "", _two_layer_keys(i), rng.standard_normal(kv.shape).astype(ml_dtypes.bfloat16))
               for i in range(3)]
    memory.put("f8", entries)
    got = memory.fetch("f8", [2, 0], layers=[1]).kv
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == (2, 1, *kv.layer_shape)
    for n, eid in enumerate([2, 0]):
        ref = entries[eid].kv[1].astype(np.float32)
        assert np.allclose(got[n, 0].astype(np.float32), ref, rtol=0.08, atol=np.abs(ref).max() / 448)
        assert not np.array_equal(got[n, 0].astype(np.float32), ref)  # it really was quantized
    assert {m.codec for m in memory.entries("f8")} == {"fp8"}


# ---- bad input: the same exception everywhere, and nothing changes ---------------------------------------

def _setup_bad(m) -> None:
    m.create_stream(make_spec(budget=Budget(max_entries=8)))
    m.put("cam0", [make_entry(i, pinned=i == 2) for i in range(6)])
    m.create_stream(StreamSpec("k", {"e": KeySpace(4)}))
    m.put("k", [NewEntry(0, 0, "", {"e": np.ones(4, np.float32)})])
    m.create_stream(make_spec("full", budget=Budget(max_entries=2)))
    m.put("full", [make_entry(i, pinned=True) for i in range(2)])


def _bad_entry(**change) -> NewEntry:
    e = make_entry(51)
    keys = {**e.keys, **change.pop("keys", {})}
    for name in [k for k, v in keys.items() if v is None]:
        del keys[name]
    return dataclasses.replace(e, keys=keys, **change)


def _nan_kv() -> np.ndarray:
    kv = make_entry(51).kv.copy()
    kv[1, 0, 2, 1, 3] = np.nan
    return kv


Q = np.ones((LAYERS, DIM), np.float32)
BAD = [
    # put: one good entry first, so all-or-nothing is tested too
    ("key dim", lambda m: m.put("cam0", [make_entry(50), _bad_entry(keys={"nam": np.zeros((LAYERS, DIM + 1))})]),
     InvalidArgument, "expects [4, 32]"),
    ("key rank", lambda m: m.put("cam0", [make_entry(50), _bad_entry(keys={"nam": np.zeros(DIM)})]),
     InvalidArgument, "expects [4, 32]"),
    ("key strings", lambda m: m.put("cam0", [_bad_entry(keys={"emb": np.array(["x"] * EMB)})]), InvalidArgument, ""),
    ("key bools", lambda m: m.put("cam0", [_bad_entry(keys={"emb": np.ones(EMB, bool)})]), InvalidArgument, "bool"),
    ("NaN key", lambda m: m.put("cam0", [make_entry(50), _bad_entry(keys={"emb": np.full(EMB, np.nan)})]),
     InvalidArgument, "NaN"),
    ("inf key", lambda m: m.put("cam0", [_bad_entry(keys={"nam": np.full((LAYERS, DIM), np.inf)})]),
     InvalidArgument, "NaN or inf"),
    ("NaN kv", lambda m: m.put("cam0", [make_entry(50), _bad_entry(kv=_nan_kv())]), InvalidArgument, "NaN or inf"),
    ("kv dtype", lambda m: m.put("cam0", [_bad_entry(kv=make_entry(51).kv.astype(np.float32))]),
     InvalidArgument, "expects bfloat16"),
    ("kv shape", lambda m: m.put("cam0", [make_entry(50), _bad_entry(kv=make_entry(51).kv[:2])]),
     InvalidArgument, "expects [4, 2, 5, 2, 8]"),
    ("kv to keys-only", lambda m: m.put("k", [NewEntry(1, 0, "", {"e": np.ones(4)}, make_entry(1).kv)]),
     InvalidArgument, "keys-only"),
    ("missing space", lambda m: m.put("cam0", [_bad_entry(keys={"emb": None})]), InvalidArgument, "emb"),
    ("unknown space", lambda m: m.put("cam0", [_bad_entry(keys={"zzz": np.ones(3)})]), InvalidArgument, "zzz"),
    ("negative frame", lambda m: m.put("cam0", [make_entry(50), _bad_entry(frame_index=-1)]),
     InvalidArgument, "frame_index"),
    ("float frame", lambda m: m.put("cam0", [_bad_entry(frame_index=1.5)]), InvalidArgument, "frame_index"),
    # the spec-free rules (validate.check_batch) that MemoryClient runs before encoding, as the bank does
    ("NaN importance", lambda m: m.put("cam0", [make_entry(50), _bad_entry(importance=float("nan"))]),
     InvalidArgument, "entry 1 importance is nan, expected a finite number"),
    ("text importance", lambda m: m.put("cam0", [_bad_entry(importance="high")]), InvalidArgument,
     "entry 0 importance is 'high', expected a finite number"),
    ("prompt not text", lambda m: m.put("cam0", [_bad_entry(prompt=5)]), InvalidArgument,
     "entry 0 prompt is a int, expected str"),
    ("negative rope", lambda m: m.put("cam0", [_bad_entry(rope_position=-2)]), InvalidArgument, "rope_position"),
    ("zero cosine", lambda m: m.put("cam0", [_bad_entry(keys={"emb": np.zeros(EMB)})]), InvalidArgument, "zero"),
    ("not an entry", lambda m: m.put("cam0", [make_entry(50), {"frame_index": 1}]), InvalidArgument, "NewEntry"),
    ("empty batch", lambda m: m.put("cam0", []), InvalidArgument, "empty batch"),
    ("put unknown stream", lambda m: m.put("ghost", [make_entry(1)]), NotFound, "stream 'ghost' not found"),
    ("all pinned", lambda m: m.put("full", [make_entry(9)]), ResourceExhausted, "pinned"),
    # query
    ("k 0", lambda m: m.query("cam0", "nam", Q, 0), InvalidArgument, "k is 0"),
    ("k -1", lambda m: m.query("cam0", "nam", Q, -1), InvalidArgument, "k is -1"),
    ("k huge", lambda m: m.query("cam0", "nam", Q, 5000), InvalidArgument, "[1, 1024]"),
    ("k float", lambda m: m.query("cam0", "nam", Q, 2.5), InvalidArgument, "k is 2.5"),
    ("query space", lambda m: m.query("cam0", "nope", np.ones(3), 1), InvalidArgument, "no key space 'nope'"),
    ("query dims", lambda m: m.query("cam0", "nam", np.ones(DIM), 1), InvalidArgument, "expects [4, 32]"),
    ("query NaN", lambda m: m.query("cam0", "nam", np.full((LAYERS, DIM), np.nan), 1), InvalidArgument, "NaN"),
    ("query strings", lambda m: m.query("cam0", "emb", np.array(["a"] * EMB), 1), InvalidArgument, ""),
    ("combine", lambda m: m.query("cam0", "nam", Q, 1, combine="max"), InvalidArgument, "combine"),
    ("exclude order", lambda m: m.query("cam0", "nam", Q, 1, exclude_frames=(5, 1)), InvalidArgument, "lo <= hi"),
    ("query unknown stream", lambda m: m.query("ghost", "nam", Q, 1), NotFound, "stream 'ghost' not found"),
    ("query empty name", lambda m: m.query("", "nam", Q, 1), NotFound, "stream '' not found"),
    # fetch
    ("fetch unknown entry", lambda m: m.fetch("cam0", [0, 99]), NotFound, "no entries [99]"),
    ("fetch bad layer", lambda m: m.fetch("cam0", [0], layers=[LAYERS]), InvalidArgument, "distinct ints in"),
    ("fetch dup layers", lambda m: m.fetch("cam0", [0], layers=[1, 1]), InvalidArgument, "distinct ints in"),
    ("fetch no layers", lambda m: m.fetch("cam0", [0], layers=[]), InvalidArgument, "layers"),
    ("fetch no ids", lambda m: m.fetch("cam0", []), InvalidArgument, "empty"),
    ("fetch 2-d ids", lambda m: m.fetch("cam0", [[0, 1]]), InvalidArgument, "1-d"),
    ("fetch float ids", lambda m: m.fetch("cam0", [0.5]), InvalidArgument, "1-d list of ints"),
    ("fetch keys-only", lambda m: m.fetch("k", [0]), InvalidArgument, "keys-only"),
    ("fetch unknown stream", lambda m: m.fetch("ghost", [0]), NotFound, "stream 'ghost' not found"),
    # query_fetch: the query's errors, the fetch's errors, and its own arguments - all before the bank changes
    ("qf unknown stream", lambda m: m.query_fetch("ghost", "nam", Q, 1), NotFound, "stream 'ghost' not found"),
    ("qf k 0", lambda m: m.query_fetch("cam0", "nam", Q, 0), InvalidArgument, "k is 0"),
    ("qf k huge", lambda m: m.query_fetch("cam0", "nam", Q, 5000), InvalidArgument, "[1, 1024]"),
    ("qf query dims", lambda m: m.query_fetch("cam0", "nam", np.ones(DIM), 1), InvalidArgument, "expects [4, 32]"),
    ("qf fetch_k", lambda m: m.query_fetch("cam0", "nam", Q, 2, fetch_k=-1), InvalidArgument, "fetch_k is -1"),
    ("qf fetch_k past k", lambda m: m.query_fetch("cam0", "nam", Q, 2, fetch_k=3), InvalidArgument,
     "fetch_k is 3; expected None (every hit: k) or an int in [0, k=2]"),
    ("qf fetch_k float", lambda m: m.query_fetch("cam0", "nam", Q, 2, fetch_k=1.5), InvalidArgument,
     "fetch_k is 1.5; expected None (every hit: k) or an int in [0, k=2]"),
    ("qf bad layer", lambda m: m.query_fetch("cam0", "nam", Q, 1, layers=[LAYERS]), InvalidArgument,
     "distinct ints in"),
    ("qf no layers", lambda m: m.query_fetch("cam0", "nam", Q, 1, layers=[]), InvalidArgument, "layers"),
    ("qf resident lists", lambda m: m.query_fetch("cam0", "nam", Q, 1, resident=[[0], [1]]), InvalidArgument,
     "resident has 2 id lists"),
    ("qf resident mixed", lambda m: m.query_fetch("cam0", "nam", Q, 1, resident=[[0], 1, [], []]), InvalidArgument,
     "resident mixes"),
    ("qf include unknown", lambda m: m.query_fetch("cam0", "nam", Q, 1, include=[99]), NotFound, "no entries [99]"),
    ("qf include 2-d", lambda m: m.query_fetch("cam0", "nam", Q, 1, include=[[0]]), InvalidArgument, "1-d"),
    ("qf keys-only", lambda m: m.query_fetch("k", "e", np.ones(4), 1), InvalidArgument, "keys-only"),
    # the rest
    ("delete partly unknown", lambda m: m.delete("cam0", [0, 99]), NotFound, "99"),
    ("delete none", lambda m: m.delete("cam0", []), InvalidArgument, "empty"),
    ("delete 2-d", lambda m: m.delete("cam0", [[0, 1]]), InvalidArgument, "1-d"),
    ("pin unknown", lambda m: m.pin("cam0", [1, 99]), NotFound, "99"),
    ("drop unknown", lambda m: m.drop_stream("ghost"), NotFound, "ghost"),
    ("stats unknown", lambda m: m.stats("ghost"), NotFound, "ghost"),
    ("stats empty name", lambda m: m.stats(""), NotFound, "stream '' not found"),
    ("entries unknown", lambda m: m.entries("ghost"), NotFound, "ghost"),
    ("prune unknown", lambda m: m.prune("ghost"), NotFound, "ghost"),
    ("duplicate stream", lambda m: m.create_stream(make_spec()), AlreadyExists, "already exists"),
    ("unknown policy", lambda m: m.create_stream(make_spec("new", policy="lru2")), InvalidArgument,
     "unknown pruning policy 'lru2'"),
]


def test_bad_input_raises_and_changes_nothing(memory):
    _setup_bad(memory)
    before = bank_state(memory)
    wrong = []
    for name, call, exc, text in BAD:
        try:
            call(memory)
            wrong.append(f"{name}: no error, expected {exc.__name__}")
        except Exception as got:  # noqa: BLE001 - any other class is the failure being looked for
            if type(got) is not exc or text not in str(got):
                wrong.append(f"{name}: {type(got).__name__}({got}), expected {exc.__name__} saying {text!r}")
        if bank_state(memory) != before:
            wrong.append(f"{name}: the failed call changed the bank")
            before = bank_state(memory)
    assert not wrong, "\n".join(wrong)


# ---- one script, three backends, identical results ------------------------------------------------------

def view(x):
    """A comparable form of any protocol result (arrays as dtype, shape and bytes; no wall-clock fields)."""
    if isinstance(x, QueryResult):
        return ("query", arr(x.ids), arr(x.scores), arr(x.frames), x.trace.scanned,
                tuple(name for name, _ in x.trace.steps))
    if isinstance(x, QueryFetchResult):
        return ("query_fetch", view(x.query), view(x.fetched))
    if isinstance(x, FetchResult):
        return ("fetch", x.ids, x.layers, arr(x.kv))
    if isinstance(x, EntryMeta):
        return meta_view(x)
    if isinstance(x, BankStats):
        return ("bank", tuple(sorted(x.streams, key=lambda s: s.name)), x.entries, x.payload_bytes)
    if isinstance(x, (list, tuple)):
        return tuple(view(v) for v in x)
    assert x is None or isinstance(x, (int, str, StreamStats, StreamSpec, PruneResult)), type(x)
    return x


CLIENT_SIDE = {"k float", "fetch no layers", "stats empty name", "qf no layers"}


def script(m) -> list:
    """Every operation of the protocol, good and bad, recorded as ("ok", result) / ("error", class, message)."""
    out = []

    def do(fn):
        o = outcome(fn)
        out.append(o if o[0] == "error" else ("ok", view(o[1])))

    kv8 = KVLayout(layers=2, heads=2, head_dim=8, tokens_per_frame=16)
    rng = np.random.default_rng(9)
    do(lambda: m.create_stream(make_spec(budget=Budget(max_entries=12), policy="lru")))
    do(lambda: m.create_stream(make_spec("f8", kv=kv8, storage="fp8", policy="lfu(half_life_s=60)")))
    do(lambda: m.create_stream(StreamSpec("k", {"e": KeySpace(4, metric="l2", index="hnsw")})))
    do(lambda: m.create_stream(make_spec("bytes", budget=Budget(max_bytes=3 * LAYERS * KV.layer_bytes),
                                         degrade=("keys_only",))))
    for start in range(0, 20, 4):
        do(lambda: m.put("cam0", [make_entry(i, pinned=i % 9 == 0) for i in range(start, start + 4)]))
    do(lambda: m.put("f8", [NewEntry(i, i, "x", _two_layer_keys(i),
                                     rng.standard_normal(kv8.shape).astype(ml_dtypes.bfloat16)) for i in range(5)]))
    do(lambda: m.put("k", [NewEntry(i, 0, "", {"e": np.arange(4, dtype=np.float32) * i}) for i in range(6)]))
    for i in range(5):
        do(lambda: m.put("bytes", [make_entry(100 + i)]))
    q = np.random.default_rng(3).standard_normal((LAYERS, DIM)).astype(np.float32)
    for kw in ({}, {"combine": "mean"}, {"exclude_frames": (4, 12)}, {"pinned_only": True}, {"k": 30}):
        do(lambda: m.query("cam0", "nam", q, **{"k": 3, **kw}))
    do(lambda: m.query("cam0", "emb", np.linspace(-1, 1, EMB), 5))
    do(lambda: m.query("f8", "nam", q[:2], 2, combine="mean"))
    do(lambda: m.query("k", "e", np.ones(4), 3))
    do(lambda: m.fetch("cam0", [19, 8, 12], layers=[2, 0]))
    do(lambda: m.fetch("cam0", [e.entry_id for e in m.entries("cam0")]))
    do(lambda: m.fetch("f8", [4, 0]))
    do(lambda: m.fetch("bytes", [0]))  # degraded to keys only: its payload is gone
    for kw in ({}, {"resident": [3, 4]}, {"fetch_k": 1, "include": [0], "layers": [2, 0]}, {"combine": "mean"},
               {"resident": [[1], [], [2], []], "exclude_frames": (4, 12)}):
        do(lambda: m.query_fetch("cam0", "nam", q, 3, **kw))
    do(lambda: m.query_fetch("f8", "nam", q[:2], 2, resident=[4]))
    do(lambda: m.query_fetch("bytes", "nam", q, 1, fetch_k=0))  # degraded entries: nothing fetched, no error
    do(lambda: m.delete("cam0", [19, 10]))
    do(lambda: m.pin("cam0", [11, 12]))
    do(lambda: m.pin("cam0", [9], pinned=False))
    do(lambda: m.put("cam0", [make_entry(i) for i in range(20, 24)]))
    do(lambda: m.prune("cam0"))
    do(lambda: m.prune("f8"))
    for name in ("cam0", "f8", "k", "bytes"):
        do(lambda: m.entries(name))
        do(lambda: m.stats(name))
    do(lambda: m.stats())
    do(lambda: sorted(m.list_streams(), key=lambda s: s.name))
    for name, call, _, _ in BAD:
        do(lambda: call(m))
        if name in CLIENT_SIDE:  # the client refuses these itself and cannot quote the service's limits
            out[-1] = out[-1][:2]
    do(lambda: m.drop_stream("k"))
    do(lambda: sorted(s.name for s in m.list_streams()))
    do(lambda: m.stats())
    return out


def test_same_script_same_results_everywhere(backends):
    results = {kind: script(m) for kind, m in backends.items()}
    local = results["local"]
    assert sum(o[0] == "error" for o in local) >= len(BAD)
    for kind in ("shm", "stream"):
        assert len(results[kind]) == len(local)
        for n, (want, got) in enumerate(zip(local, results[kind])):
            assert got == want, f"step {n}: {kind} differs from LocalMemory"
