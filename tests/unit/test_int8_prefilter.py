"""LayerBlock's int8 prefilter: answers from the int8 copy must be exactly what the full float32 scan returns (ids
and scores bit for bit), the bound it proves them with must hold for every entry, and every way the copy can
fall out of step (adds, removals, snapshots, keys past its scale) must leave answers unchanged."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest

from memory_service.config import IndexParams
from memory_service.index import layer_block
from memory_service.index.layer_block import Int8Copy, LayerBlock
from memory_service.index.vector_index import prepare

L = 4
PARAMS = IndexParams(use_gpu=False)
OFF = dataclasses.replace(PARAMS, flat_int8_prefilter=False)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Copies for blocks of any size, so these tests run on small ones."""
    monkeypatch.setattr(layer_block, "PREFILTER_MIN_BYTES", 0)


def scenes(rng, n: int, dim: int, per_scene: int = 8, noise: float = 0.3) -> np.ndarray:
    """`[n, L, d]`: frames of a scene lie close together, layers share the frame's content."""
    centres = rng.standard_normal((-(-n // per_scene), dim))
    base = np.repeat(centres, per_scene, axis=0)[:n] + noise * rng.standard_normal((n, dim))
    return (base[:, None] + 0.6 * rng.standard_normal((n, L, dim))).astype(np.float32)


def pair(metric: str, dim: int, keys: np.ndarray, ids=None):
    """The same keys in a block with the prefilter and in one without."""
    on, off = LayerBlock(L, dim, metric, PARAMS), LayerBlock(L, dim, metric, OFF)
    ids = np.arange(len(keys)) if ids is None else ids
    for part in np.array_split(np.arange(len(keys)), 3):  # the copy is built at the first add, then kept up
        on.add(ids[part], keys[part])
        off.add(ids[part], keys[part])
    return on, off


def same(on: LayerBlock, off: LayerBlock, q, k, deny=None):
    a, b = on.search(q, k, deny), off.search(q, k, deny)
    assert np.array_equal(a[1], b[1]), "ids differ from the full scan"
    assert np.array_equal(a[0], b[0]), "scores differ from the full scan (not bit for bit)"
    return a


def query_near(rng, keys, noise=0.5):
    return (keys[rng.integers(len(keys))] + noise * rng.standard_normal(keys.shape[1:])).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("dim", [128, 1536])
def test_answers_are_the_full_scans_bit_for_bit(metric, dim):
    rng = np.random.default_rng(1)
    keys = scenes(rng, 600, dim)
    on, off = pair(metric, dim, keys)
    assert on._copy is not None and off._copy is None
    for _ in range(12):
        q = query_near(rng, keys)
        for k, deny in ((1, None), (3, np.arange(591, 600)), (10, rng.choice(600, 20, replace=False))):
            scores, ids = same(on, off, q, k, deny)
            if deny is not None:
                assert not np.isin(ids, deny).any()
    assert on.prefilter_stats["certified"] >= 30, on.prefilter_stats  # the copy answered, not the fallback


def test_the_bound_holds_for_every_entry():
    """`candidates`' ceiling at m is above the float32 scan score of every entry the copy ranks m-th or later:
    checked against faiss's own flat scan of every key, for every m, over queries of several kinds (near an
    entry, random, with a zero layer, tiny and huge scales)."""
    rng = np.random.default_rng(2)
    dim, n, kk = 256, 500, 60
    for keys in (scenes(rng, n, dim), rng.standard_normal((n, L, dim)).astype(np.float32)):
        copy = Int8Copy(L, dim, PARAMS, np.arange(n), keys)
        queries = [query_near(rng, keys) for _ in range(8)] + [rng.standard_normal((L, dim)).astype(np.float32)
                                                               for _ in range(8)]
        queries[-1][2] = 0
        queries += [query_near(rng, keys) * 1e-3, query_near(rng, keys) * 1e3]
        for q in queries:
            pos, ceiling = copy.candidates(q, kk)
            assert (np.diff(ceiling, axis=1) <= 0).all()  # best first
            for layer in range(L):
                scores, ids = faiss.knn(q[layer:layer + 1], np.ascontiguousarray(keys[:, layer]), n,
                                        faiss.METRIC_INNER_PRODUCT)
                by_pos = np.empty(n, np.float32)
                by_pos[ids[0]] = scores[0]
                rank = np.full(n, kk)  # an entry's place among the candidates; kk past them
                rank[pos[layer]] = np.arange(kk)
                best_past = np.array([by_pos[rank >= m].max() for m in range(kk)])  # of the entries ranked >= m
                assert (best_past <= ceiling[layer]).all(), (layer, np.flatnonzero(best_past > ceiling[layer]))


def ceiling_vs_truth(copy: Int8Copy, q: np.ndarray, keys: np.ndarray, entry: int, rank: int):
    """(ceiling at `rank`, `entry`'s float32 score) in every layer, checking the copy ranks `entry` there."""
    pos, ceiling = copy.candidates(q, len(keys))
    assert (pos[:, rank] == entry).all()
    truth = np.einsum("ld,ld->l", q.astype(np.float64), keys[entry])  # exact: the bound covers float32's error too
    return ceiling[:, rank], truth


def test_the_bound_covers_rounding_aligned_with_the_query():
    """Where Cauchy-Schwarz is tight: every coordinate of a key rounds down by nearly half a step (its error lies
    along the query), or every coordinate of the query does. The entry then scores well above what its int8
    copy says; the ceiling at its rank still covers it - and would not without the key's (then the query's) term."""
    dim = 256
    anchor = np.zeros((1, L, dim), np.float32)
    anchor[0, :, 0] = 100.0  # sets the scale: 127 / (1.25 * 100)
    copy = Int8Copy(L, dim, PARAMS, np.array([0]), anchor)
    step = 1.0 / copy.scale[0]
    keys = np.concatenate([anchor, np.full((2, L, dim), step) * np.array([20.0, 10.49])[:, None, None]]).astype(np.float32)
    copy.add(np.array([1, 2]), keys[1:])
    ones = np.ones((L, dim), np.float32)  # rounds to itself: the query adds no error
    ceiling, truth = ceiling_vs_truth(copy, ones, keys, 2, 1)
    assert (truth <= ceiling).all()
    hidden = 0.49 * step * dim  # what the copy's rounding hides of entry 2's score
    assert (ceiling - truth < 0.05 * hidden).all(), "the bound is loose here: this test would not see a term missing"

    copy = Int8Copy(L, dim, PARAMS, np.array([0]), anchor)  # a key on the copy's grid, the query off its own
    keys = np.concatenate([anchor, np.full((1, L, dim), 10 * step)]).astype(np.float32)
    copy.add(np.array([1]), keys[1:])
    q = np.full((L, dim), 0.49 / 127, np.float32) + (np.arange(dim) % 50 / 127.0).astype(np.float32)
    q[:, 0] = 1.0  # the query's scale: 127
    ceiling, truth = ceiling_vs_truth(copy, q, keys, 1, 0)
    assert (truth <= ceiling).all()
    hidden = 0.49 / 127 * 10 * step * (dim - 1)
    assert (ceiling - truth < 0.5 * hidden).all(), "the bound is loose here: this test would not see a term missing"


def test_equal_keys_fall_back_and_resolve_as_the_full_scan():
    """Identical keys tie exactly: the bound cannot prove which of them a scan keeps, so the full scan answers."""
    rng = np.random.default_rng(3)
    base = scenes(rng, 4, 128)
    keys = base[np.arange(200) % 4]
    on, off = pair("ip", 128, keys, rng.permutation(200))
    same(on, off, query_near(rng, base), 5)
    assert on.prefilter_stats == {"certified": 0, "fallback": 1}


def test_misses_back_off_and_a_proven_answer_takes_one_off():
    rng = np.random.default_rng(4)
    base = scenes(rng, 4, 128)
    ties = base[np.arange(200) % 4]
    on, off = pair("ip", 128, ties)
    q = query_near(rng, base)
    for _ in range(1 + 1 + 1 + 3 + 1 + 7 + 1):  # misses 1 to 4, with 1, 3 and 7 queries skipped between them
        same(on, off, q, 5)
    assert on.prefilter_stats == {"certified": 0, "fallback": 4}
    assert on._skip == 15
    # distinct keys again (the ties removed): once the backoff runs out, the copy answers and the count drops
    on.remove(np.arange(4, 200))
    off.remove(np.arange(4, 200))
    fresh = scenes(rng, 300, 128)
    on.add(np.arange(1000, 1300), fresh)
    off.add(np.arange(1000, 1300), fresh)
    for _ in range(16):
        same(on, off, query_near(rng, fresh), 3)
    assert on.prefilter_stats["certified"] == 1 and on._misses == 3  # 15 skipped, then one proven
    for _ in range(40):
        same(on, off, query_near(rng, fresh), 3)
    assert on._misses == 0 and on.prefilter_stats["fallback"] == 4


def test_adds_removals_and_snapshots_keep_the_copy_in_step():
    rng = np.random.default_rng(5)
    keys = scenes(rng, 500, 128)
    on, off = pair("ip", 128, keys[:300])
    for step in range(3):
        victims = rng.choice(on.ids(), 40, replace=False)
        on.remove(victims)
        off.remove(victims)
        new = np.arange(300 + 60 * step, 360 + 60 * step)
        on.add(new, keys[new])
        off.add(new, keys[new])
        assert len(on._copy.block) == len(on)
        for _ in range(4):
            same(on, off, query_near(rng, keys), 3, np.asarray(new[-5:]))
    loaded = LayerBlock(L, 128, "ip", PARAMS)
    loaded.load(on.dump())
    assert loaded._copy is not None and len(loaded._copy.block) == len(on)
    for _ in range(6):
        same(loaded, off, query_near(rng, keys), 4)
    assert loaded.prefilter_stats["certified"] >= 3


def test_keys_past_the_scale_rebuild_the_copy():
    """The scale is fitted to the keys when the copy is built; keys past REFIT times those have it rebuilt, and a
    clipped key (within REFIT) widens the bound, never breaks it."""
    rng = np.random.default_rng(6)
    keys = scenes(rng, 400, 128)
    on, off = pair("ip", 128, keys[:200])
    scale = on._copy.scale.copy()
    louder = keys[200:300] * 1.5  # clipped by the first scale (1.25 headroom), not past REFIT
    on.add(np.arange(200, 300), louder)
    off.add(np.arange(200, 300), louder)
    assert np.array_equal(on._copy.scale, scale)
    for _ in range(6):
        same(on, off, query_near(rng, louder), 3)
    far = keys[300:] * 4
    on.add(np.arange(300, 400), far)
    off.add(np.arange(300, 400), far)
    assert (on._copy.scale < scale).all() and len(on._copy.block) == 400
    for _ in range(6):
        same(on, off, query_near(rng, far), 3)
        same(on, off, query_near(rng, keys[:200]), 3)


def test_where_the_copy_is_kept_and_what_it_costs(monkeypatch):
    rng = np.random.default_rng(7)
    keys = scenes(rng, 200, 128)
    for metric, dtype, params in (("l2", "float32", PARAMS), ("ip", "float16", PARAMS), ("ip", "float32", OFF)):
        b = LayerBlock(L, 128, metric, params, dtype)
        b.add(np.arange(200), keys)
        assert b._copy is None, (metric, dtype)
    b = LayerBlock(L, 128, "cosine", PARAMS)
    b.add(np.arange(200), keys)
    plain = LayerBlock(L, 128, "cosine", OFF)
    plain.add(np.arange(200), keys)
    assert b.memory_bytes() == plain.memory_bytes() + 200 * L * (128 + 8)  # +25% of the float32 keys, and ids
    monkeypatch.setattr(layer_block, "PREFILTER_MIN_BYTES", 201 * L * 128 * 4)
    grown = LayerBlock(L, 128, "ip", PARAMS)
    grown.add(np.arange(200), keys)
    assert grown._copy is None  # below the threshold
    grown.add(np.array([200]), keys[:1])
    assert grown._copy is not None and len(grown._copy.block) == 201
    # a block too small for the k asked (4 * kk > n) answers from the full scan without touching the copy
    q = prepare(query_near(rng, keys), "ip")
    grown.search(q, 60)
    assert grown.prefilter_stats == {"certified": 0, "fallback": 0}


@pytest.mark.parametrize("clip", [False, True])
def test_codes_appended_per_list_are_faiss_own_encoding(clip):
    """The block writes its lists itself (one add_entries per layer, no add_core): the float32 lists must hold the
    keys' own bytes in insertion order, and the int8 copy's lists what faiss's QT_8bit_direct_signed encoder makes
    of the rounded, clipped keys - the codes its scan reads."""
    rng = np.random.default_rng(7)
    dim = 32
    first = rng.standard_normal((20, L, dim)).astype(np.float32)
    block = LayerBlock(L, dim, "ip", PARAMS)
    block.add(np.arange(20), first)
    more = rng.standard_normal((9, L, dim)).astype(np.float32)
    if clip:  # past the headroom, inside the refit limit: rounded values beyond 127 are clipped
        more[3, :, 5] = 1.9 * np.abs(first).max(axis=(0, 2))
    block.add(np.arange(100, 109), more)
    keys = np.concatenate([first, more])
    copy = block._copy
    assert copy is not None
    sq = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_direct_signed)
    lists = copy.block._ivf.invlists
    for layer in range(L):
        np.testing.assert_array_equal(block._layer_keys(layer).reshape(-1, dim), keys[:, layer])
        rounded = np.clip(np.rint(keys[:, layer] * copy.scale32[layer]), -127, 127)
        stored = faiss.rev_swig_ptr(lists.get_codes(layer), len(keys) * dim).reshape(len(keys), dim)
        np.testing.assert_array_equal(stored, sq.compute_codes(np.ascontiguousarray(rounded)))
        np.testing.assert_array_equal(faiss.rev_swig_ptr(lists.get_ids(layer), len(keys)), np.arange(len(keys)))
    assert block._ivf.ntotal == copy.block._ivf.ntotal == len(keys) * L
    assert clip == bool((np.abs(keys * copy.scale32[None, :, None]) > 127).any())
