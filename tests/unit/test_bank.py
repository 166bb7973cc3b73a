"""MemoryBank through LocalMemory: round trips, exact NAM ranking, filters, budgets, bad input, reopen."""

from __future__ import annotations

import os
import threading
import shutil

import ml_dtypes
import numpy as np
import pytest

from conftest import DIM, EMB, KV, LAYERS, Clock, make_entry, make_spec
from memory_service import (
    AlreadyExists, Budget, InvalidArgument, KeySpace, KVLayout, LocalMemory, NewEntry, NotFound, ResourceExhausted,
    StreamSpec,
)
from memory_service import bank as bank_module
from memory_service.config import BankConfig
from memory_service.errors import DataLoss


@pytest.fixture
def mem(tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as m:
        yield m


def brute_per_layer(keys: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = np.einsum("nld,ld->ln", keys, q)  # [L, N]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order]


def snapshot_state(m, stream: str) -> tuple:
    """Everything a failed call must leave untouched: stats, entry metadata, all KV, a query."""
    ids = [e.entry_id for e in m.entries(stream)]
    kv = m.fetch(stream, ids).kv.copy() if ids else None
    q = np.ones((LAYERS, DIM), np.float32)
    r = m.query(stream, "nam", q, 3)
    st = m.stats(stream)
    return (st.entries, st.payload_bytes, st.next_entry_id, st.evicted_total, tuple(ids),
            kv.tobytes() if kv is not None else b"", r.ids.tobytes())


def test_put_fetch_round_trip_is_bit_exact(mem):
    mem.create_stream(make_spec())
    entries = [make_entry(i) for i in range(6)]
    ids = mem.put("cam0", entries)
    assert ids == list(range(6))
    got = mem.fetch("cam0", [4, 1], layers=[3, 0])
    assert got.kv.shape == (2, 2, *KV.layer_shape)
    assert np.array_equal(got.kv[0, 0], entries[4].kv[3]) and np.array_equal(got.kv[1, 1], entries[1].kv[0])
    full = mem.fetch("cam0", ids)
    assert np.array_equal(full.kv, np.stack([e.kv for e in entries]))


def test_per_layer_query_equals_brute_force(mem):
    mem.create_stream(make_spec())
    entries = [make_entry(i) for i in range(200)]
    mem.put("cam0", entries)
    keys = np.stack([e.keys["nam"] for e in entries])
    q = np.random.default_rng(7).standard_normal((LAYERS, DIM)).astype(np.float32)
    r = mem.query("cam0", "nam", q, 5)
    assert r.ids.shape == (LAYERS, 5)
    assert np.array_equal(r.ids, brute_per_layer(keys, np.arange(200), q, 5))
    assert np.array_equal(r.frames, r.ids)  # frame_index == seed == id here
    mean = mem.query("cam0", "nam", q, 5, combine="mean")
    expect = np.argsort(-np.einsum("nld,ld->n", keys, q) / LAYERS, kind="stable")[:5]
    assert np.array_equal(mean.ids, expect)
    assert r.trace.scanned == 200 and [name for name, _ in r.trace.steps][-1] == "search"


def test_exclude_frames_pinned_only_and_padding(mem):
    mem.create_stream(make_spec())
    mem.put("cam0", [make_entry(i, pinned=(i == 3)) for i in range(10)])
    q = np.random.default_rng(1).standard_normal((LAYERS, DIM))
    r = mem.query("cam0", "nam", q, 10, exclude_frames=(2, 8))
    kept = r.ids[r.ids >= 0]
    assert set(kept.tolist()) == {0, 1, 8, 9}
    assert (r.ids[:, 4:] == -1).all() and np.isneginf(r.scores[:, 4:]).all()
    pinned = mem.query("cam0", "emb", np.ones(EMB), 3, pinned_only=True)
    assert pinned.ids.tolist() == [3, -1, -1]


def test_streams_are_isolated(mem):
    mem.create_stream(make_spec("a"))
    mem.create_stream(make_spec("b"))
    target = make_entry(99)
    mem.put("b", [target])
    mem.put("a", [make_entry(i) for i in range(5)])
    r = mem.query("a", "emb", target.keys["emb"], 1)
    assert r.scores[0] < 0.99  # a's entries are random; b's exact match must not be visible
    assert mem.query("b", "emb", target.keys["emb"], 1).scores[0] == pytest.approx(1.0, abs=1e-5)


BAD_PUTS = [
    ("wrong key dim", lambda e: NewEntry(0, 0, "", {**e.keys, "nam": np.zeros((LAYERS, DIM + 1), np.float32)}, e.kv),
     InvalidArgument, "expects [4, 32]"),
    ("NaN key", lambda e: NewEntry(0, 0, "", {**e.keys, "emb": np.full(EMB, np.nan, np.float32)}, e.kv),
     InvalidArgument, "NaN"),
    ("kv dtype", lambda e: NewEntry(0, 0, "", e.keys, e.kv.astype(np.float32)), InvalidArgument, "expects bfloat16"),
    ("kv shape", lambda e: NewEntry(0, 0, "", e.keys, e.kv[:2]), InvalidArgument, "expects [4, 2, 5, 2, 8]"),
    ("missing space", lambda e: NewEntry(0, 0, "", {"nam": e.keys["nam"]}, e.kv), InvalidArgument, "emb"),
    ("unknown space", lambda e: NewEntry(0, 0, "", {**e.keys, "zzz": np.ones(3)}, e.kv), InvalidArgument, "zzz"),
    ("negative frame", lambda e: NewEntry(-1, 0, "", e.keys, e.kv), InvalidArgument, "frame_index"),
    ("zero cosine", lambda e: NewEntry(0, 0, "", {**e.keys, "emb": np.zeros(EMB, np.float32)}, e.kv),
     InvalidArgument, "zero vector"),
]


@pytest.mark.parametrize("name,mutate,exc,text", BAD_PUTS, ids=[b[0] for b in BAD_PUTS])
def test_bad_put_is_refused_and_changes_nothing(mem, name, mutate, exc, text):
    mem.create_stream(make_spec(budget=Budget(max_entries=6)))
    mem.put("cam0", [make_entry(i) for i in range(6)])
    before = snapshot_state(mem, "cam0")
    # A good entry first in the same call: all-or-nothing means it must not land either.
    with pytest.raises(exc, match=_re(text)):
        mem.put("cam0", [make_entry(50), mutate(make_entry(51))])
    assert snapshot_state(mem, "cam0") == before


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_batch_limits(tmp_path):
    with LocalMemory(str(tmp_path), BankConfig(max_batch=3)) as m:
        m.create_stream(make_spec())
        with pytest.raises(InvalidArgument, match="empty batch"):
            m.put("cam0", [])
        with pytest.raises(InvalidArgument, match="at most 3"):
            m.put("cam0", [make_entry(i) for i in range(4)])
        assert m.stats("cam0").entries == 0


@pytest.mark.parametrize("kwargs,exc,text", [
    (dict(space="nam", vectors=np.ones((LAYERS, DIM)), k=0), InvalidArgument, "k is 0"),
    (dict(space="nam", vectors=np.ones((LAYERS, DIM)), k=5000), InvalidArgument, "[1, 1024]"),
    (dict(space="nope", vectors=np.ones(3), k=1), InvalidArgument, "no key space 'nope'"),
    (dict(space="nam", vectors=np.ones(DIM), k=1), InvalidArgument, "expects [4, 32]"),
    (dict(space="nam", vectors=np.full((LAYERS, DIM), np.inf), k=1), InvalidArgument, "NaN or inf"),
    (dict(space="nam", vectors=np.ones((LAYERS, DIM)), k=1, combine="max"), InvalidArgument, "combine"),
    (dict(space="nam", vectors=np.ones((LAYERS, DIM)), k=1, exclude_frames=(5, 1)), InvalidArgument, "lo <= hi"),
])
def test_bad_query(mem, kwargs, exc, text):
    mem.create_stream(make_spec())
    mem.put("cam0", [make_entry(0)])
    with pytest.raises(exc, match=_re(text)):
        mem.query("cam0", **kwargs)


def test_not_found_and_already_exists(mem):
    mem.create_stream(make_spec())
    mem.put("cam0", [make_entry(0)])
    with pytest.raises(NotFound, match="stream 'ghost' not found"):
        mem.query("ghost", "nam", np.ones((LAYERS, DIM)), 1)
    with pytest.raises(NotFound, match=r"no entries \[7\]"):
        mem.fetch("cam0", [0, 7])
    with pytest.raises(NotFound):
        mem.delete("cam0", [0, 7])
    assert mem.stats("cam0").entries == 1  # the partial delete did not happen
    with pytest.raises(InvalidArgument, match="distinct ints in"):
        mem.fetch("cam0", [0], layers=[LAYERS])
    with pytest.raises(AlreadyExists, match="already exists"):
        mem.create_stream(make_spec())
    with pytest.raises(InvalidArgument, match="unknown pruning policy 'lru2'"):
        mem.create_stream(make_spec("other", policy="lru2"))
    assert [s.name for s in mem.list_streams()] == ["cam0"]


def test_budget_never_exceeded_and_pins_survive(mem):
    mem.create_stream(make_spec(budget=Budget(max_entries=20), policy="lru"))
    pinned = mem.put("cam0", [make_entry(1000, frame=0, pinned=True)])
    for start in range(0, 300, 7):
        mem.put("cam0", [make_entry(i) for i in range(start, start + 7)])
        assert mem.stats("cam0").entries <= 20
    ids = [e.entry_id for e in mem.entries("cam0")]
    assert pinned[0] in ids
    assert mem.stats("cam0").evicted_total == 1 + 301 - 20  # 302 written (incl. pinned), 20 kept


def test_all_pinned_budget_is_resource_exhausted_and_unchanged(mem):
    mem.create_stream(make_spec(budget=Budget(max_entries=3)))
    mem.put("cam0", [make_entry(i, pinned=True) for i in range(3)])
    before = snapshot_state(mem, "cam0")
    with pytest.raises(ResourceExhausted, match="3 entries are pinned"):
        mem.put("cam0", [make_entry(9)])
    assert snapshot_state(mem, "cam0") == before
    mem.pin("cam0", [0], pinned=False)
    assert mem.put("cam0", [make_entry(9)]) == [3]
    assert [e.entry_id for e in mem.entries("cam0")] == [1, 2, 3]


@pytest.mark.parametrize("beside", [True, False], ids=["adds_beside_the_commit", "adds_after_it"])
def test_a_put_whose_commit_fails_leaves_every_index_as_it_was(tmp_path, monkeypatch, beside):
    """A put refused because LMDB's map (capped at 2 MiB) is full leaves every index as it was, whether its adds
    were to run beside the commit's fsync (BESIDE_MIN_BYTES 0) or after it: the map fills during the puts, before
    the adds start. No query may then see a key of the refused batch, and every answer is the one before it.
    tests/faults/test_disk_full.py fails a commit after its adds started (a full disk at the fsync)."""
    monkeypatch.setattr(bank_module, "BESIDE_MIN_BYTES", 0 if beside else 1 << 62)
    with LocalMemory(str(tmp_path / "bank"), BankConfig(map_size=2 << 20, max_map_size=2 << 20)) as m:
        m.create_stream(make_spec())
        probes = [make_entry(seed) for seed in (3, 50, 10_000)]

        def answers() -> tuple:
            out = [snapshot_state(m, "cam0")]
            for e in probes:
                for space, k in (("nam", 4), ("emb", 4)):
                    r = m.query("cam0", space, e.keys[space], k)
                    out.append((r.ids.tobytes(), r.scores.tobytes()))
            return tuple(out)

        for start in range(0, 100_000, 40):
            batch = [make_entry(10_000 + start + i) for i in range(40)]  # probes[2] is the refused batch's first
            if start:
                before = answers()
            try:
                m.put("cam0", batch)
            except ResourceExhausted as exc:
                assert "map is full" in str(exc)
                break
        else:
            pytest.fail("the 2 MiB map never filled")
        assert start >= 80  # some batches went in first
        assert answers() == before
        committed = m.stats("cam0").next_entry_id
        assert committed == start
        for e in batch:
            r = m.query("cam0", "nam", e.keys["nam"], 3)
            assert r.ids.max() < committed and (r.ids >= 0).all()
        m.delete("cam0", list(range(40)))  # room again: the next put takes the ids the refused one did not use
        assert m.put("cam0", batch[:2]) == [committed, committed + 1]
        assert m.query("cam0", "emb", batch[1].keys["emb"], 1).ids[0] == committed + 1


def test_byte_budget_degrades_to_fp8_before_evicting(mem):
    # 64 tokens per frame: fp8's per-channel scales are then small next to the payload, as with real frames.
    kv = KVLayout(layers=LAYERS, heads=2, head_dim=8, tokens_per_frame=64)
    per_entry = kv.layers * kv.layer_bytes
    mem.create_stream(make_spec(kv=kv, budget=Budget(max_bytes=5 * per_entry), degrade=("fp8",)))
    rng = np.random.default_rng(0)
    entries = [NewEntry(i, i, "p", make_entry(i).keys, rng.standard_normal(kv.shape).astype(ml_dtypes.bfloat16))
               for i in range(8)]
    for e in entries:  # one per call: a put's own entries are never its victims
        mem.put("cam0", [e])
    st = mem.stats("cam0")
    assert st.entries == 8 and st.evicted_total == 0 and st.degraded_total > 0
    assert st.payload_bytes <= 5 * per_entry
    codecs = {e.entry_id: e.codec for e in mem.entries("cam0")}
    assert codecs[0] == "fp8" and codecs[7] == "raw"  # FIFO order: the oldest degrade first
    old = mem.fetch("cam0", [0]).kv[0].astype(np.float32)
    ref = entries[0].kv.astype(np.float32)
    assert np.allclose(old, ref, rtol=0.08, atol=np.abs(ref).max() / 448)


def test_ttl_expires_with_the_clock(tmp_path):
    clock = Clock()
    with LocalMemory(str(tmp_path), clock=clock) as m:
        m.create_stream(make_spec(policy="ttl(seconds=60),then:fifo"))
        m.put("cam0", [make_entry(i) for i in range(3)])
        clock.t += 30
        m.put("cam0", [make_entry(3)])
        clock.t += 31  # the first three are now 61 s old, the last 31 s
        result = m.prune("cam0")
        assert sorted(result.evicted) == [0, 1, 2] and "3 expired" in result.reason
        assert [e.entry_id for e in m.entries("cam0")] == [3]


def test_hits_are_recorded_and_persist(tmp_path):
    d = str(tmp_path)
    with LocalMemory(d) as m:
        m.create_stream(make_spec())
        e = make_entry(5)
        m.put("cam0", [e, make_entry(6)])
        m.query("cam0", "emb", e.keys["emb"], 1)
        m.query("cam0", "emb", e.keys["emb"], 1)
    with LocalMemory(d) as m:
        meta = {x.entry_id: x for x in m.entries("cam0")}
        assert meta[0].hit_count == 2 and meta[0].last_hit is not None and meta[0].importance == 2.0
        assert meta[1].hit_count == 0


def test_a_hit_updates_its_entry_in_place_and_entries_hands_out_copies(tmp_path):
    """A hit's statistics change the bank's own EntryMeta: a new object a hit, living on in the table, moved dozens
    of objects a query into the garbage collector's oldest generation (at 1e5 entries a full collection of 40-140
    ms every ~250 queries). What entries() gave out before the hit keeps its values."""
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(make_spec())
        e = make_entry(5)
        m.put("cam0", [e, make_entry(6)])
        before = m.entries("cam0")
        held = m.bank._streams["cam0"].entries[0]
        m.query("cam0", "emb", e.keys["emb"], 1)
        assert m.bank._streams["cam0"].entries[0] is held and held.hit_count == 1 and held.last_hit is not None
        assert before[0].hit_count == 0 and before[0].last_hit is None and before[0].importance == 0.0
        after = m.entries("cam0")
        assert after[0] is not held and after[0] == held
        m.bank.flush()
        m.query("cam0", "emb", e.keys["emb"], 1)  # after the flush: dirty again, written by the next one
    with LocalMemory(str(tmp_path)) as m:
        assert m.entries("cam0")[0].hit_count == 2


@pytest.mark.parametrize("reopen", ["snapshot", "rebuild", "catch_up"])
def test_reopen_gives_identical_results(tmp_path, reopen):
    d = str(tmp_path / "bank")
    spaces = {"nam": KeySpace(DIM, per_layer=True), "emb": KeySpace(EMB, metric="cosine", index="hnsw"),
              "two": KeySpace(DIM, per_layer=True, index="two_stage")}
    rng = np.random.default_rng(3)
    queries = [(s, rng.standard_normal((LAYERS, DIM) if s != "emb" else EMB)) for s in ("nam", "emb", "two")] * 2

    def entry(i):
        e = make_entry(i)
        return NewEntry(e.frame_index, e.chunk_index, e.prompt, {**e.keys, "two": e.keys["nam"]}, e.kv)

    cfg = BankConfig(snapshot_on_close=reopen != "catch_up")
    with LocalMemory(d, cfg) as m:
        m.create_stream(make_spec(key_spaces=spaces))
        m.put("cam0", [entry(i) for i in range(300)])
        m.delete("cam0", list(range(0, 300, 3)))
        if reopen == "catch_up":
            m.bank.snapshot()  # an old snapshot; later changes must be caught up from LMDB
            m.put("cam0", [entry(i) for i in range(300, 340)])
            m.delete("cam0", [1, 2, 301])
        before = [m.query("cam0", s, q, 4, exclude_frames=(10, 20)) for s, q in queries]
    if reopen == "rebuild":
        shutil.rmtree(os.path.join(d, "snapshots"))
    with LocalMemory(d) as m:
        after = [m.query("cam0", s, q, 4, exclude_frames=(10, 20)) for s, q in queries]
        assert m.stats("cam0").entries == (237 if reopen == "catch_up" else 200)
    for b, a in zip(before, after):
        assert np.array_equal(b.ids, a.ids)
        assert np.allclose(b.scores, a.scores, rtol=1e-5)


def test_drop_stream_removes_everything(mem):
    mem.create_stream(make_spec())
    mem.put("cam0", [make_entry(i) for i in range(4)])
    mem.drop_stream("cam0")
    with pytest.raises(NotFound):
        mem.stats("cam0")
    mem.create_stream(make_spec())
    assert mem.stats("cam0").entries == 0 and mem.put("cam0", [make_entry(0)]) == [0]
    assert mem.query("cam0", "nam", np.ones((LAYERS, DIM)), 2).ids[0].tolist() == [0, -1]


def test_keys_only_stream_and_entries(mem):
    spec = StreamSpec("k", {"e": KeySpace(4)})
    mem.create_stream(spec)
    mem.put("k", [NewEntry(0, 0, "x", {"e": np.ones(4)})])
    assert mem.query("k", "e", np.ones(4), 1).ids.tolist() == [0]
    with pytest.raises(InvalidArgument, match="keys-only"):
        mem.fetch("k", [0])


def test_background_pruner_expires_without_puts(tmp_path):
    clock = Clock()
    with LocalMemory(str(tmp_path), clock=clock) as m:
        m.create_stream(make_spec(policy="ttl(seconds=10)"))
        m.put("cam0", [make_entry(i) for i in range(3)])
        clock.t += 11
        m.bank.start_pruner(interval_s=0.01)
        for _ in range(500):  # bounded wait for the thread's next pass
            if m.stats("cam0").entries == 0:
                break
            threading.Event().wait(0.01)
        assert m.stats("cam0").entries == 0 and m.stats("cam0").evicted_total == 3


def test_closed_bank_refuses_every_call(tmp_path):
    from memory_service import Unavailable

    m = LocalMemory(str(tmp_path / "bank"))
    m.create_stream(make_spec())
    m.put("cam0", [make_entry(0)])
    m.close()
    calls = [lambda: m.list_streams(), lambda: m.stats(), lambda: m.stats("cam0"), lambda: m.create_stream(make_spec("x")),
             lambda: m.query("cam0", "emb", np.ones(EMB), 1), lambda: m.fetch("cam0", [0]), lambda: m.put("cam0", [make_entry(1)]),
             lambda: m.delete("cam0", [0]), lambda: m.pin("cam0", [0])]
    for call in calls:
        with pytest.raises(Unavailable, match="closed"):
            call()


def test_cached_filter_columns_match_a_rebuild_after_puts_evictions_pins(tmp_path):
    """The filter columns are kept current incrementally; they must equal a rebuild from the entry table."""
    m = LocalMemory(str(tmp_path / "bank"))
    m.create_stream(make_spec(budget=Budget(max_entries=7)))
    s = m.bank._streams["cam0"]
    rng = np.random.default_rng(3)
    for step in range(30):
        m.put("cam0", [make_entry(100 * step + j, frame=int(rng.integers(0, 50))) for j in range(int(rng.integers(1, 4)))])
        m.query("cam0", "emb", np.ones(EMB), 2, exclude_frames=(10, 20))  # builds the cache
        if step % 7 == 3:
            m.pin("cam0", [min(e.entry_id for e in m.entries("cam0"))])
        if step % 5 == 4:
            m.delete("cam0", [max(e.entry_id for e in m.entries("cam0"))])
        cached = [c.copy() for c in s.columns()]
        s.invalidate_columns()
        for got, want in zip(cached, s.columns()):
            assert np.array_equal(got, want), step
    m.close()


def test_float16_keys_are_widened_bit_for_bit_as_numpy_casts_them():
    """The rerank widens float16 layer keys by a table: every one of the 65536 values (inf, NaN payloads and
    subnormals included) comes out with the bits numpy's own cast gives."""
    from memory_service.store.lmdb_store import _HALF_TO_FLOAT

    every = np.arange(1 << 16, dtype=np.uint16)
    assert np.array_equal(_HALF_TO_FLOAT.view(np.uint32), every.view(np.float16).astype(np.float32).view(np.uint32))


def test_an_ivfsq_rerank_reading_a_key_record_of_the_wrong_size_is_data_loss(tmp_path):
    """The rerank reads each candidate's layer key out of its stored [L, d] record by offset. A record of another
    size (damage) is DataLoss naming the entry, never another layer's bytes read as its key."""
    from memory_service.config import IndexParams
    from memory_service.store.lmdb_store import _SID_SPACE_EID

    cfg = BankConfig(index=IndexParams(ivf_train_min=64, ivf_nlist=8, ivf_nprobe=8))
    spec = make_spec(key_spaces={"sq": KeySpace(DIM, per_layer=True, index="ivfsq")})
    with LocalMemory(str(tmp_path), cfg) as m:
        m.create_stream(spec)
        keys = [np.full((LAYERS, DIM), 0.01, np.float32) for _ in range(100)]
        keys[7] = np.ones((LAYERS, DIM), np.float32)  # every layer's best match for an all-ones query
        m.put("cam0", [NewEntry(i, i, "p", {"sq": keys[i]}, make_entry(i).kv) for i in range(100)])
        q = np.ones((LAYERS, DIM), np.float32)
        assert (m.query("cam0", "sq", q, 1).ids[:, 0] == 7).all()
        layout = m.bank._streams["cam0"].layout
        record = _SID_SPACE_EID.pack(layout.sid, 0, 7)
        m.bank.store.write(lambda w: w.put("keys", record, bytes(w.get("keys", record)) + b"\0" * 8))
        with pytest.raises(DataLoss, match=r"key records of entries \[7\] are \d+ bytes, expected"):
            m.query("cam0", "sq", q, 1)


def test_an_ivfsq_rerank_missing_a_key_record_names_the_entry(tmp_path):
    """The rerank reads each candidate entry's key record once, whichever layers chose it, and copies each layer's
    key to where that layer asked for it (layers 0, 1, 2 get entries 3, 40, 77). A record that is gone is NotFound
    naming that entry alone."""
    from memory_service.config import IndexParams
    from memory_service.errors import NotFound
    from memory_service.store.lmdb_store import _SID_SPACE_EID

    cfg = BankConfig(index=IndexParams(ivf_train_min=64, ivf_nlist=8, ivf_nprobe=8))
    spec = make_spec(key_spaces={"sq": KeySpace(DIM, per_layer=True, index="ivfsq")})
    rng = np.random.default_rng(9)
    keys = rng.standard_normal((100, LAYERS, DIM)).astype(np.float32)
    with LocalMemory(str(tmp_path), cfg) as m:
        m.create_stream(spec)
        m.put("cam0", [NewEntry(i, i, "p", {"sq": keys[i]}, make_entry(i).kv) for i in range(100)])
        q = np.stack([keys[[3, 40, 77][layer % 3], layer] for layer in range(LAYERS)])
        r = m.query("cam0", "sq", q, 2)
        assert [r.ids[layer, 0] for layer in range(3)] == [3, 40, 77]
        layout = m.bank._streams["cam0"].layout
        m.bank.store.write(lambda w: w.delete("keys", _SID_SPACE_EID.pack(layout.sid, 0, 40)))
        with pytest.raises(NotFound, match=r"no key of entries \[40\]"):
            m.query("cam0", "sq", q, 2)


def test_a_two_stage_rerank_widens_float16_keys_exactly_and_a_record_of_the_wrong_size_is_data_loss(tmp_path):
    """A float16 two-stage space's rerank reads each candidate's whole [L, d] key and widens it by table: the scores
    it returns are those of the stored float16 keys, bit for bit as numpy widens them. A key record of another size
    (damage) is DataLoss naming the entry."""
    from memory_service.store.lmdb_store import _SID_SPACE_EID

    spec = make_spec(key_spaces={"ts": KeySpace(DIM, per_layer=True, index="two_stage", dtype="float16")})
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((40, LAYERS, DIM)).astype(np.float32)
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(spec)
        m.put("cam0", [NewEntry(i, i, "p", {"ts": keys[i]}, make_entry(i).kv) for i in range(40)])
        q = rng.standard_normal((LAYERS, DIM)).astype(np.float32)
        r = m.query("cam0", "ts", q, 3)
        stored = keys.astype(np.float16).astype(np.float32)  # [n, L, d]
        want = np.einsum("nld,ld->ln", stored, q)  # every entry is a candidate of a 40-entry bank
        for layer in range(LAYERS):
            assert r.ids[layer].tolist() == np.argsort(-want[layer], kind="stable")[:3].tolist()
            assert np.allclose(r.scores[layer], want[layer][r.ids[layer]], rtol=1e-5, atol=1e-5)
        layout = m.bank._streams["cam0"].layout
        got = np.empty((2, LAYERS, DIM), np.float32)
        with m.bank.store.view() as v:
            v.read_keys(layout, 0, [3, 11], got)
            v.read_keys(layout, 0, [], np.empty((0, LAYERS, DIM), np.float32))  # nothing asked: nothing read
        assert got.tobytes() == stored[[3, 11]].tobytes()
        record = _SID_SPACE_EID.pack(layout.sid, 0, 11)
        m.bank.store.write(lambda w: w.put("keys", record, bytes(w.get("keys", record))[:-2]))
        with pytest.raises(DataLoss, match=r"key record of entry 11 is \d+ bytes, expected"):
            m.query("cam0", "ts", q, 3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ivfsq_space_through_the_bank_reranks_from_lmdb_and_survives_reopen(tmp_path, dtype):
    """A trained ivfsq space answers per-layer queries with the exact scores of the keys LMDB holds (each layer's
    candidates reranked with that layer's stored key), as a flat space over the same keys does, before and after
    a reopen that rebuilds it; deletes and the excluded window hold."""
    from memory_service.config import IndexParams

    d = str(tmp_path / "bank")
    cfg = BankConfig(index=IndexParams(ivf_train_min=64, ivf_nlist=8, ivf_nprobe=8))  # every list: exact candidates
    spaces = {"nam": KeySpace(DIM, per_layer=True, dtype=dtype), "sq": KeySpace(DIM, per_layer=True, index="ivfsq",
                                                                              dtype=dtype)}

    def entry(i):
        e = make_entry(i)
        return NewEntry(e.frame_index, e.chunk_index, e.prompt, {"nam": e.keys["nam"], "sq": e.keys["nam"]}, e.kv)

    rng = np.random.default_rng(8)
    queries = [rng.standard_normal((LAYERS, DIM)).astype(np.float32) for _ in range(4)]

    def answers(m):
        out = []
        for q in queries:
            flat = m.query("cam0", "nam", q, 3, exclude_frames=(5, 9))
            sq = m.query("cam0", "sq", q, 3, exclude_frames=(5, 9))
            assert np.array_equal(flat.ids, sq.ids)
            assert np.allclose(flat.scores, sq.scores, rtol=1e-5, atol=1e-5)
            out.append(sq)
        return out

    with LocalMemory(d, cfg) as m:
        m.create_stream(make_spec(key_spaces=spaces))
        m.put("cam0", [entry(i) for i in range(150)])
        m.delete("cam0", list(range(0, 150, 4)))
        space = m.bank._streams["cam0"].spaces["sq"]
        assert not any(index.exact for index in space.indexes), "150 keys past ivf_train_min=64: trained"
        before = answers(m)
        assert not any(np.isin(a.ids, np.arange(0, 150, 4)).any() for a in before)
    shutil.rmtree(os.path.join(d, "snapshots"))
    with LocalMemory(d, cfg) as m:
        after = answers(m)
    for b, a in zip(before, after):
        assert np.array_equal(b.ids, a.ids) and np.allclose(b.scores, a.scores, rtol=1e-5)
