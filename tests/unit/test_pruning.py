"""Pruning policies on hand-built metadata (pure functions), the planner, and budgets over long streams."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import Clock, make_entry, make_spec
from memory_service import Budget, EntryMeta, InvalidArgument, LocalMemory, ResourceExhausted
from memory_service.pruning import FIFO, LFU, LRU, TTL, Composite, Importance, PruneView, Redundancy, parse_policy
from memory_service.pruning.planner import plan


def meta(eid: int, created: float = 0.0, **kw) -> EntryMeta:
    return EntryMeta(entry_id=eid, frame_index=eid, chunk_index=eid, prompt="", created=created, **kw)


def view(entries, now=100.0, need=1, vectors=None) -> PruneView:
    return PruneView(tuple(entries), now, need, vectors)


def test_fifo_oldest_first():
    assert FIFO().choose(view([meta(3), meta(1), meta(2)])).order == (1, 2, 3)


def test_lru_by_last_hit_never_hit_counts_from_creation():
    entries = [meta(1, created=0, last_hit=90), meta(2, created=50), meta(3, created=10, last_hit=20)]
    assert LRU().choose(view(entries)).order == (3, 2, 1)


def test_lfu_decays_old_hits():
    # 8 hits long ago (10 half-lives) weigh less than 2 recent ones.
    entries = [meta(1, lfu=8.0, last_hit=0.0), meta(2, lfu=2.0, last_hit=99.0), meta(3, lfu=0.0, last_hit=None)]
    order = LFU(half_life_s=10).choose(view(entries, now=100.0)).order
    assert order == (3, 1, 2)


def test_ttl_marks_only_expired():
    c = TTL(seconds=50).choose(view([meta(1, created=10), meta(2, created=60), meta(3, created=50)], now=100))
    assert c.expired == (1, 3) and c.order == ()


def test_importance_lowest_first():
    entries = [meta(1, importance=2.0), meta(2, importance=0.5), meta(3, importance=1.0)]
    assert Importance().choose(view(entries)).order == (2, 3, 1)


def test_redundancy_evicts_older_of_near_duplicates_and_keeps_distinct():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 16))
    vecs = np.stack([base[0], base[1], base[0] + 1e-3, base[2], base[1] + 1e-3, base[3]])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    entries = [meta(i) for i in range(6)]  # pairs (0, 2) and (1, 4) are duplicates; 3 and 5 unique
    order = Redundancy().choose(view(entries, need=2, vectors=vecs)).order
    assert sorted(order) == [0, 1]  # the older of each pair, never both members of a pair


def test_composite_expired_then_order():
    policy = parse_policy("ttl(seconds=50),then:lru")
    assert isinstance(policy, Composite)
    entries = [meta(1, created=0), meta(2, created=80, last_hit=81), meta(3, created=70)]
    c = policy.choose(view(entries, now=100))
    assert c.expired == (1,) and c.order == (3, 2)


@pytest.mark.parametrize("text,msg", [
    ("lru2", "unknown pruning policy 'lru2'"),
    ("lfu(half_life=3)", "has no parameter"),
    ("ttl(seconds=abc)", "must be a number"),
    ("ttl(seconds=-1)", "must be > 0"),
    ("", "non-empty"),
])
def test_parse_errors_say_what_is_expected(text, msg):
    with pytest.raises(InvalidArgument, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(text)


def test_planner_never_picks_pinned_and_refuses_what_cannot_fit():
    entries = [meta(0, pinned=True), meta(1), meta(2)]
    candidates = [m for m in entries if not m.pinned]
    p = plan("s", Budget(max_entries=3), len(entries), 0, candidates, 1, 0, FIFO().choose(view(candidates)), (), None)
    assert p.evict == (1,)
    with pytest.raises(ResourceExhausted, match="1 entries are pinned"):
        plan("s", Budget(max_entries=1), len(entries), 0, candidates, 1, 0, FIFO().choose(view(candidates)), (), None)


@pytest.mark.parametrize("policy", ["fifo", "lru", "lfu", "importance", "redundancy", "ttl(seconds=5),then:lru"])
def test_long_stream_stays_within_budget(tmp_path, policy):
    clock = Clock()
    budget = Budget(max_entries=25, max_bytes=30 * 1280)
    with LocalMemory(str(tmp_path), clock=clock) as m:
        m.create_stream(make_spec(budget=budget, policy=policy))
        m.put("cam0", [make_entry(10_000, pinned=True)])
        for i in range(0, 240, 3):
            clock.t += 1.0
            m.put("cam0", [make_entry(j) for j in range(i, i + 3)])
            m.query("cam0", "emb", make_entry(i % 30).keys["emb"], 2)  # hits feed LRU / LFU / importance
            st = m.stats("cam0")
            assert st.entries <= 25 and st.payload_bytes <= budget.max_bytes
        assert 0 in [e.entry_id for e in m.entries("cam0")]  # the pinned sink survives every policy
        kept = m.stats("cam0")
        assert kept.payload_bytes == sum(e.nbytes for e in m.entries("cam0"))  # the running total is exact
    with LocalMemory(str(tmp_path), clock=clock) as m:  # and equals what a reopen recounts from LMDB
        assert m.stats("cam0").payload_bytes == kept.payload_bytes


@pytest.mark.parametrize("fraction,after", [(0.1, [90, 91, 100, 90]), (0.0, [100, 100, 100, 100])])
def test_batch_fraction_evicts_past_the_budget_once(tmp_path, fraction, after):
    """At budget, a batch policy evicts `fraction` x max_entries more in one go, then puts fill the gap."""
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(make_spec(budget=Budget(max_entries=100), policy=f"lru(batch_fraction={fraction})"))
        m.put("cam0", [make_entry(i, kv=False) for i in range(100)])
        seen = []
        for n, puts in enumerate((1, 1, 9, 1)):
            for j in range(puts):
                m.put("cam0", [make_entry(1000 + 10 * n + j, kv=False)])
            seen.append(m.stats("cam0").entries)
        assert seen == after
        oldest = min(e.entry_id for e in m.entries("cam0"))
        assert oldest == (22 if fraction else 12)  # never retrieved: LRU falls back to creation order


def test_batch_fraction_out_of_range_is_refused():
    with pytest.raises(InvalidArgument, match=r"lfu batch_fraction must be in \[0, 1\), got 1.5"):
        parse_policy("lfu(batch_fraction=1.5)")


def test_byte_budget_never_evicts_keys_only_entries(tmp_path):
    """Evicting an entry without payload frees no payload bytes: a byte budget must take entries that have one."""
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(make_spec(policy="fifo(batch_fraction=0)"))
        m.put("cam0", [make_entry(0)])
        per_entry = m.stats("cam0").payload_bytes
        m.drop_stream("cam0")
        m.create_stream(make_spec(budget=Budget(max_bytes=5 * per_entry), policy="fifo(batch_fraction=0)"))
        keys_only = m.put("cam0", [make_entry(i, kv=False) for i in range(3)])  # the oldest: FIFO's first choice
        with_kv = [m.put("cam0", [make_entry(10 + i)])[0] for i in range(8)]
        left = [e.entry_id for e in m.entries("cam0")]
        assert left == keys_only + with_kv[3:]
        assert m.stats("cam0").payload_bytes == 5 * per_entry


def test_neighbours_kept_current_equal_a_scan_from_scratch():
    """The stream's neighbour graph after adds, evictions and re-adds ranks exactly as a full O(n^2 d) scan."""
    from memory_service.pruning.neighbours import Neighbours
    from memory_service.pruning.policies import _nearest

    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((300, 24)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    nb, live = Neighbours(24), []
    for step in range(40):
        new = list(range(step * 7, step * 7 + 7)) if step * 7 + 7 <= 300 else []
        nb.add(np.array(new, np.int64), vecs[new])
        live += new
        gone = rng.choice(live, size=min(len(live) - 2, int(rng.integers(0, 6))), replace=False).tolist()
        nb.remove(gone)
        live = [e for e in live if e not in gone]
        if step % 9 == 4:  # an entry pinned then unpinned leaves and rejoins out of id order
            back = live[len(live) // 2]
            nb.remove([back])
            nb.add(np.array([back], np.int64), vecs[[back]])
        view = nb.snapshot()
        ids = np.array(sorted(live), np.int64)
        sim, idx = _nearest(vecs[ids])
        assert np.array_equal(view.ids, ids)
        assert np.allclose(view.sim, sim, atol=1e-6)
        assert np.array_equal(view.nn, idx)
        entries = tuple(meta(int(i)) for i in ids)
        kept = Redundancy().choose(PruneView(entries, 100.0, 5, vecs[ids], view)).order
        assert kept == Redundancy().choose(PruneView(entries, 100.0, 5, vecs[ids])).order
