"""The VectorIndex contract, checked for every implementation against a numpy brute-force search.

Every index (FlatIndex float32 and float16, HNSWIndex, IVFPQIndex untrained and trained) under every metric
(ip, cosine, l2) promises (memory_service/index/vector_index.py): top-k by score, best first, each score the
true score of its id; exact indexes return the brute-force ids (ties aside); `deny` and `remove`d ids are
never returned; missing slots are id -1 / score -inf; serialize + load answers identically and keeps
working. ANN indexes reach recall@8 >= 0.95 at default IndexParams on 10k vectors. SpaceIndex (per-layer
key spaces, as the bank uses them) answers exact per-layer and mean rankings, and two-stage retrieval is
exact when the first pass keeps every entry and keeps recall >= 0.95 on layer-correlated keys. A flat
per-layer space is one LayerBlock (every layer in one batched search): it answers exactly as today's L
FlatIndexes (ids equal, ties included) under deny lists on both its paths, removals, k past the eligible
count and fp16, and loads its own snapshots and the per-layer ones written before it.
"""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest

from memory_service.config import IndexParams
from memory_service.errors import InvalidArgument
from memory_service.index import layer_block
from memory_service.index import space as space_module
from memory_service.index.layer_block import LayerBlock
from memory_service.index.space import SpaceIndex, _top_k, top_k_rows
from memory_service.index.vector_index import FlatIndex, HNSWIndex, IVFPQIndex, IVFSQIndex, prepare, search_each
from memory_service.types import KeySpace

METRICS = ("ip", "cosine", "l2")
PARAMS = IndexParams()
# Small enough that the 500-vector contract tests below run IVF-PQ trained, not its exact warm-up buffer.
TRAINED = IndexParams(ivf_train_min=256)
KINDS = {
    "flat": lambda d, m: FlatIndex(d, m, PARAMS),
    "flat_fp16": lambda d, m: FlatIndex(d, m, PARAMS, dtype="float16"),
    "hnsw": lambda d, m: HNSWIndex(d, m, PARAMS),
    "ivfpq": lambda d, m: IVFPQIndex(d, m, PARAMS),
    "ivfpq_trained": lambda d, m: IVFPQIndex(d, m, TRAINED),
}
EXACT = {"flat", "flat_fp16", "ivfpq"}  # ivfpq below ivf_train_min answers from a flat buffer
DIM = 32
CASES = [(kind, metric) for kind in KINDS for metric in METRICS]


def clustered(rng: np.random.Generator, n: int, dim: int, centers: int = 32) -> np.ndarray:
    """Gaussian clusters: ANN structures meet the structure they are built for, and ties are improbable."""
    c = rng.standard_normal((centers, dim)) * 1.5
    return (c[rng.integers(0, centers, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def stored(kind: str, x: np.ndarray, metric: str) -> np.ndarray:
    """What the index scores against: metric-prepared vectors, rounded to fp16 for the fp16 flat index."""
    p = prepare(x, metric)
    return p.astype(np.float16).astype(np.float32) if kind == "flat_fp16" else p


def brute(x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """Scores `[Q, n]`, higher is better: inner product, or negated squared distance for l2 (float64)."""
    x64, q64 = x.astype(np.float64), prepare(q, metric).astype(np.float64)
    if metric == "l2":
        return -((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    return q64 @ x64.T


def check(kind, scores, ids, x_by_id: dict, q, metric, k, *, exact, min_recall=0.9):
    """Assert the contract for one search result against brute force over the eligible vectors `x_by_id`."""
    assert scores.shape == ids.shape == (len(q), k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    eligible = np.array(sorted(x_by_id), np.int64)
    m = min(k, len(eligible))
    assert (ids[:, m:] == -1).all() and np.isneginf(scores[:, m:]).all(), "slots past the eligible count pad"
    if not m:
        return
    ref = brute(np.stack([x_by_id[i] for i in eligible.tolist()]), q, metric)  # [Q, n]
    pos = {int(e): j for j, e in enumerate(eligible)}
    hits = 0
    for row in range(len(q)):
        got = ids[row, :m]
        assert (got >= 0).all(), f"{kind}: fewer than {m} hits with {len(eligible)} eligible"
        assert len(set(got.tolist())) == m, f"{kind}: duplicate ids {got}"
        assert set(got.tolist()) <= set(pos), f"{kind}: returned ids outside the eligible set (denied or removed)"
        true = ref[row, [pos[int(i)] for i in got]]
        tol = 1e-4 * max(1.0, float(np.abs(ref[row]).max()))
        assert np.allclose(scores[row, :m], true, atol=tol), f"{kind}: scores are not the ids' true scores"
        assert (np.diff(scores[row, :m]) <= tol).all(), f"{kind}: not best first"
        order = np.argsort(-ref[row], kind="stable")[:m]
        best_ids, best = eligible[order], ref[row, order]
        hits += len(set(got.tolist()) & set(best_ids.tolist()))
        if exact:
            assert np.allclose(true, best, atol=tol), f"{kind}: not the brute-force top-{m}"
            # Ids must match exactly wherever the brute-force score is not within tol of a neighbour's.
            gaps = np.abs(np.diff(ref[row][np.argsort(-ref[row], kind="stable")[: m + 1]]))
            lo = np.concatenate([[np.inf], gaps[: m - 1]])
            hi = gaps[:m] if len(gaps) >= m else np.concatenate([gaps, [np.inf]])
            clear = (lo > tol) & (hi > tol)
            assert np.array_equal(got[clear], best_ids[clear]), f"{kind}: ids differ from brute force"
    if not exact:
        assert hits / (m * len(q)) >= min_recall, f"{kind}: recall {hits / (m * len(q)):.3f}"


def filled(kind: str, metric: str, n: int = 500, seed: int = 0, batches: int = 3):
    rng = np.random.default_rng(seed)
    x = clustered(rng, n, DIM)
    index = KINDS[kind](DIM, metric)
    for part in np.array_split(np.arange(n), batches):  # several adds, as puts arrive
        index.add(part + 1000, x[part])  # ids are not positions
    return index, {1000 + i: v for i, v in enumerate(stored(kind, x, metric))}, rng


@pytest.mark.parametrize("kind,metric", CASES)
@pytest.mark.parametrize("k", [1, 10])
def test_search_matches_brute_force(kind, metric, k):
    index, x_by_id, rng = filled(kind, metric)
    q = clustered(rng, 20, DIM)
    assert len(index) == 500 and sorted(index.ids().tolist()) == sorted(x_by_id)
    check(kind, *index.search(q, k), x_by_id, q, metric, k, exact=kind in EXACT)


@pytest.mark.parametrize("kind,metric", CASES)
def test_deny_is_never_returned(kind, metric):
    index, x_by_id, rng = filled(kind, metric)
    q = clustered(rng, 20, DIM)
    ids = np.array(sorted(x_by_id))
    # Deny a random half, plus each query's own best hits, so a filter that is ignored must show.
    _, best = index.search(q, 5)
    deny = np.union1d(rng.choice(ids, 250, replace=False), best.reshape(-1))
    scores, got = index.search(q, 10, deny)
    assert not np.isin(got, deny).any()
    check(kind, scores, got, {i: v for i, v in x_by_id.items() if i not in set(deny.tolist())}, q, metric, 10,
          exact=kind in EXACT)
    assert index.search(q, 10, np.array([], np.int64))[1].shape == (20, 10)  # an empty deny list is no filter


@pytest.mark.parametrize("kind,metric", CASES)
def test_removed_ids_never_return(kind, metric):
    index, x_by_id, rng = filled(kind, metric)
    q = clustered(rng, 20, DIM)
    _, best = index.search(q, 3)
    # First a few (ANN: tombstones), then past the rebuild ratio (ANN: rebuilt without them).
    for victims in (np.unique(best[:, 0]), rng.choice(sorted(x_by_id), 200, replace=False)):
        victims = np.array([v for v in victims.tolist() if v in x_by_id], np.int64)
        index.remove(victims)
        for v in victims.tolist():
            del x_by_id[v]
        assert len(index) == len(x_by_id) and sorted(index.ids().tolist()) == sorted(x_by_id)
        scores, got = index.search(q, 10)
        assert not np.isin(got, victims).any()
        check(kind, scores, got, x_by_id, q, metric, 10, exact=kind in EXACT)
    fresh = clustered(rng, 50, DIM)  # adds after removals land and are found
    index.add(np.arange(5000, 5050), fresh)
    x_by_id.update({5000 + i: v for i, v in enumerate(stored(kind, fresh, metric))})
    check(kind, *index.search(fresh[:10], 10), x_by_id, fresh[:10], metric, 10, exact=kind in EXACT)


@pytest.mark.parametrize("kind,metric", CASES)
def test_padding_when_k_exceeds_eligible(kind, metric):
    index = KINDS[kind](DIM, metric)
    q = clustered(np.random.default_rng(1), 3, DIM)
    scores, ids = index.search(q, 4)  # empty index
    assert (ids == -1).all() and np.isneginf(scores).all() and ids.shape == (3, 4)
    x = clustered(np.random.default_rng(2), 5, DIM)
    index.add(np.arange(5), x)
    x_by_id = dict(enumerate(stored(kind, x, metric)))
    check(kind, *index.search(q, 8), x_by_id, q, metric, 8, exact=True)  # 5 vectors: every index is exact
    scores, ids = index.search(q, 8, deny=np.array([0, 3]))
    assert ((ids >= 0).sum(axis=1) == 3).all()
    check(kind, scores, ids, {i: x_by_id[i] for i in (1, 2, 4)}, q, metric, 8, exact=True)
    index.remove(np.array([1, 2]))
    scores, ids = index.search(q, 8, deny=np.array([0]))
    assert all(set(row[:2].tolist()) == {3, 4} for row in ids)
    assert (ids[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()


@pytest.mark.parametrize("kind,metric", CASES)
def test_serialize_load_round_trip(kind, metric):
    index, x_by_id, rng = filled(kind, metric)
    victims = rng.choice(sorted(x_by_id), 20, replace=False)  # ANN: tombstones travel beside the bytes
    index.remove(victims)
    q = clustered(rng, 20, DIM)
    copy = KINDS[kind](DIM, metric)
    copy.load(index.serialize(), index.tombstones())
    assert len(copy) == len(index) and sorted(copy.ids().tolist()) == sorted(index.ids().tolist())
    deny = rng.choice(sorted(x_by_id), 100, replace=False)
    for d in (None, deny):
        a, b = index.search(q, 10, d), copy.search(q, 10, d)
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
        assert not np.isin(b[1], victims).any()
    # The loaded copy keeps working: the same mutations give the same answers as the original.
    # The loaded copy keeps working (adds, removals past the rebuild ratio); HNSW builds in parallel, so
    # the copy is held to the contract rather than to the original's graph.
    more = clustered(rng, 100, DIM)
    gone = np.array(sorted(x_by_id))[:150]
    for ix in (index, copy):
        ix.add(np.arange(9000, 9100), more)
        ix.remove(gone)
    live = {i: v for i, v in x_by_id.items() if i not in set(gone.tolist()) | set(victims.tolist())}
    live.update({9000 + i: v for i, v in enumerate(stored(kind, more, metric))})
    for ix in (index, copy):
        assert len(ix) == len(live) and sorted(ix.ids().tolist()) == sorted(live)
        check(kind, *ix.search(q, 10), live, q, metric, 10, exact=kind in EXACT)


@pytest.mark.parametrize("kind", list(KINDS))
def test_wrong_dims_are_refused(kind):
    index = KINDS[kind](DIM, "ip")
    with pytest.raises(InvalidArgument, match=f"expects vectors \\[n, {DIM}\\]"):
        index.add(np.arange(2), np.ones((2, DIM + 1), np.float32))
    index.add(np.arange(2), np.ones((2, DIM), np.float32))
    with pytest.raises(InvalidArgument, match=f"expects queries \\[q, {DIM}\\]"):
        index.search(np.ones((1, DIM - 1), np.float32), 1)
    assert len(index) == 2


# -- 10k vectors at default parameters ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
@pytest.mark.parametrize("metric", METRICS)
def test_ann_recall_at_10k(kind, metric):
    n, dim = 10_000, 64
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    x = (centers[rng.integers(0, 64, n)] + 0.7 * rng.standard_normal((n, dim))).astype(np.float32)
    q = (centers[rng.integers(0, 64, 100)] + 0.7 * rng.standard_normal((100, dim))).astype(np.float32)
    index = KINDS[kind](dim, metric)
    for part in np.array_split(np.arange(n), 4):  # IVF-PQ trains once, on the first 2.5k, as in a growing bank
        index.add(part, x[part])
    ref = brute(prepare(x, metric), q, metric)
    deny = rng.choice(n, n // 4, replace=False)
    # k = 256 is what a two-stage first pass asks for: an HNSW walk with fewer candidates than k starves.
    for k, d in [(8, None), (8, deny), (256, None)]:
        scores, ids = index.search(q, k, d)
        masked = ref.copy()
        if d is not None:
            masked[:, d] = -np.inf
            assert not np.isin(ids, d).any()
        truth = np.argsort(-masked, axis=1)[:, :k]
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids, truth)])
        assert recall >= 0.95, f"{kind}/{metric} recall@{k} {recall:.3f} (deny={d is not None})"
        true = np.take_along_axis(ref, ids, axis=1)
        assert np.allclose(scores, true, rtol=1e-4, atol=1e-3)


# -- SpaceIndex: per-layer spaces ------------------------------------------------------------------

LAYERS = 6


def layered(rng: np.random.Generator, n: int, dim: int, noise: float = 0.5) -> np.ndarray:
    """`[n, L, d]` keys whose layers share the entry's content (as a frame's layers do), plus per-layer noise."""
    base = clustered(rng, n, dim)
    return (base[:, None, :] + noise * rng.standard_normal((n, LAYERS, dim))).astype(np.float32)


def exact_per_layer(keys: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """`[L, n]` float64 brute-force scores of query `[L, d]` against keys `[n, L, d]`."""
    return np.stack([brute(prepare(keys[:, layer], metric), q[layer:layer + 1], metric)[0] for layer in range(LAYERS)])


def layer_keys(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """What the bank's layer loader reads: layer l of entry ids[l, w] at [l, w] (zeros for -1)."""
    out = np.zeros((*ids.shape, keys.shape[-1]), np.float32)
    for layer, row in enumerate(ids):
        ok = row >= 0
        out[layer, ok] = keys[row[ok], layer]
    return out


def space(index: str, metric: str, keys: np.ndarray, params: IndexParams = PARAMS, dtype="float32") -> SpaceIndex:
    ks = KeySpace(keys.shape[-1], metric=metric, per_layer=True, index=index, dtype=dtype)
    # The bank's loader reads keys from LMDB; here the same keys come from memory.
    s = SpaceIndex(ks, LAYERS, params, key_loader=lambda ids: keys[ids], layer_loader=lambda ids: layer_keys(keys, ids))
    for part in np.array_split(np.arange(len(keys)), 3):
        s.add(part, keys[part])
    return s


@pytest.mark.parametrize("pooled", [False, True], ids=["serial", "pooled"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("metric", METRICS)
def test_flat_space_is_exact_per_layer_and_mean(metric, dtype, pooled, monkeypatch):
    # Small scans run in the caller's thread, large ones split over the pool: both paths must agree.
    monkeypatch.setattr(layer_block, "POOL_MIN_BYTES", 0 if pooled else 1 << 62)
    rng = np.random.default_rng(11)
    keys = layered(rng, 400, DIM)
    s = space("flat", metric, keys, dtype=dtype)
    kept = keys.astype(np.float16).astype(np.float32) if dtype == "float16" and metric != "cosine" else keys
    deny = np.arange(0, 400, 3)
    for _ in range(3):
        q = layered(rng, 1, DIM)[0]
        ref = exact_per_layer(kept, q, metric)
        for d in (None, deny):
            scores, ids, scanned = s.search(q, 5, "per_layer", d, [])
            assert ids.shape == (LAYERS, 5) and scanned == 400
            masked = ref.copy()
            if d is not None:
                masked[:, d] = -np.inf
            tol = 5e-3 * np.abs(ref).max() if dtype == "float16" else 1e-4 * np.abs(ref).max()
            best = -np.sort(-masked, axis=1)[:, :5]
            assert np.allclose(np.take_along_axis(ref, ids, 1), best, atol=tol)
            assert np.allclose(scores, best, atol=tol)
        mean_s, mean_ids, _ = s.search(q, 5, "mean", deny, [])
        mref = ref.mean(axis=0)
        mref[deny] = -np.inf
        assert np.allclose(mref[mean_ids], -np.sort(-mref)[:5], atol=tol) and not np.isin(mean_ids, deny).any()


@pytest.mark.parametrize("metric", METRICS)
def test_two_stage_is_exact_when_the_first_pass_keeps_everything(metric):
    rng = np.random.default_rng(12)
    keys = layered(rng, 200, DIM)  # 200 <= two_stage_candidates: the rerank sees every entry
    exact, two = space("flat", metric, keys), space("two_stage", metric, keys)
    deny = np.arange(0, 200, 4)
    for _ in range(3):
        q = layered(rng, 1, DIM)[0]
        for combine in ("per_layer", "mean"):
            a, b = exact.search(q, 6, combine, deny, []), two.search(q, 6, combine, deny, [])
            assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0], rtol=1e-4, atol=1e-4)
    two.remove(np.arange(1, 200, 4))
    exact.remove(np.arange(1, 200, 4))
    q = layered(rng, 1, DIM)[0]
    assert np.array_equal(exact.search(q, 6, "per_layer", None, [])[1], two.search(q, 6, "per_layer", None, [])[1])


@pytest.mark.slow
# IVF-PQ trains once per layer (seconds each); one metric covers its per-layer wiring, the 10k test the rest.
@pytest.mark.parametrize("index,metric", [(i, m) for i in ("two_stage", "hnsw") for m in METRICS] + [("ivfpq", "ip")])
def test_per_layer_ann_recall_vs_exact(index, metric):
    """Recall@8 of each layer's top-8 against exact per-layer search, 5k entries x 6 layers."""
    rng = np.random.default_rng(13)
    keys = layered(rng, 5000, DIM)
    s = space(index, metric, keys)
    steps: list = []
    recalls = []
    for _ in range(20):
        q = layered(rng, 1, DIM)[0]
        _, ids, _ = s.search(q, 8, "per_layer", None, steps)
        truth = np.argsort(-exact_per_layer(keys, q, metric), axis=1)[:, :8]
        recalls += [len(set(a.tolist()) & set(b.tolist())) / 8 for a, b in zip(ids, truth)]
    assert np.mean(recalls) >= 0.95, f"{index}/{metric} per-layer recall@8 {np.mean(recalls):.3f}"
    if index == "two_stage":
        assert [name for name, _ in steps[:3]] == ["first_pass", "load_keys", "rerank"]


# -- LayerBlock: a flat per-layer space searched in one batched call --------------------------------

def per_layer_flats(metric: str, dtype: str, dim: int = DIM) -> list[FlatIndex]:
    """Today's reference layout: one FlatIndex per layer, each searched on its own."""
    return [FlatIndex(dim, metric, IndexParams(use_gpu=False), dtype=dtype) for _ in range(LAYERS)]


def flats_search(flats, q, k, deny):
    found = [ix.search(q[layer][None], k, deny) for layer, ix in enumerate(flats)]
    return np.stack([s[0] for s, _ in found]), np.stack([i[0] for _, i in found])


def block_space(metric: str, dtype: str) -> SpaceIndex:
    s = SpaceIndex(KeySpace(DIM, metric=metric, per_layer=True, dtype=dtype), LAYERS, IndexParams(use_gpu=False))
    assert isinstance(s.block, LayerBlock)
    return s


def check_layers(scores, ids, keys_by_id: dict, q, metric, k, dtype):
    """Each layer's row against brute force over `keys_by_id` (id -> [L, d] stored keys), via `check`."""
    for layer in range(LAYERS):
        x_by_id = {i: v[layer] for i, v in keys_by_id.items()}
        kind = "flat_fp16" if dtype == "float16" else "flat"
        check(kind, scores[layer:layer + 1], ids[layer:layer + 1], x_by_id, q[layer:layer + 1], metric, k, exact=True)


def stored_layers(keys: np.ndarray, metric: str, dtype: str) -> np.ndarray:
    return stored("flat_fp16" if dtype == "float16" else "flat", keys, metric)


@pytest.mark.parametrize("pooled", [False, True], ids=["one_call", "pooled"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("metric", METRICS)
def test_layer_block_answers_as_per_layer_flat_indexes(metric, dtype, pooled, monkeypatch):
    """Against brute force and against today's L FlatIndexes, through adds, removals, small and large deny
    lists (over-fetch and selector paths), k past the eligible count and an emptied space."""
    monkeypatch.setattr(layer_block, "POOL_MIN_BYTES", 0 if pooled else 1 << 62)
    monkeypatch.setattr(layer_block, "PREFILTER_MIN_BYTES", 0 if pooled else 1 << 62)  # with the int8 copy, and without
    rng = np.random.default_rng(21)
    s, flats = block_space(metric, dtype), per_layer_flats(metric, dtype)
    keys = layered(rng, 300, DIM)
    live: dict = {}
    q = layered(rng, 1, DIM)[0]
    assert s.search(q, 4, "per_layer", None, [])[1].tolist() == [[-1] * 4] * LAYERS  # empty
    for part in np.array_split(np.arange(300), 3):
        s.add(part + 7, keys[part])
        for layer, ix in enumerate(flats):
            ix.add(part + 7, keys[part, layer])
        live.update({7 + i: v for i, v in zip(part.tolist(), stored_layers(keys[part], metric, dtype))})

    def agree(k, deny):
        scores, ids, scanned = s.search(q, k, "per_layer", deny, [])
        assert scanned == len(live) and ids.shape == scores.shape == (LAYERS, k)
        assert scores.dtype == np.float32 and ids.dtype == np.int64
        ref_s, ref_i = flats_search(flats, q, k, deny)
        assert np.array_equal(ids, ref_i), "ids differ from the per-layer FlatIndexes"
        assert np.allclose(scores, ref_s, rtol=1e-6, atol=1e-5) and np.array_equal(np.isneginf(scores),
                                                                                   np.isneginf(ref_s))
        eligible = {i: v for i, v in live.items() if deny is None or i not in set(deny.tolist())}
        check_layers(scores, ids, eligible, q, metric, k, dtype)

    def ids_now():
        return np.array(sorted(live), np.int64)
    for _ in range(2):
        q = layered(rng, 1, DIM)[0]
        for k in (1, 5, 40):
            agree(k, None)
            best = s.search(q, k, "per_layer", None, [])[1]
            agree(k, np.unique(best))  # deny each layer's own best: an ignored deny list must show
            agree(k, rng.choice(ids_now(), 150, replace=False))  # a large deny list, filtered after the scan
        victims = rng.choice(ids_now(), 60, replace=False)
        s.remove(victims)
        for ix in flats:
            ix.remove(victims)
        for v in victims.tolist():
            del live[v]
        assert len(s) == len(live) and s.ids().tolist() == sorted(live)  # removal keeps insertion order
    monkeypatch.setattr(layer_block, "OVERFETCH_MAX_DENY", 0)  # every deny list through the faiss selector
    agree(10, rng.choice(ids_now(), 100, replace=False))
    agree(500, rng.choice(ids_now(), 100, replace=False))  # k > eligible: the tail pads with -1 / -inf
    mean_s, _, _ = s.search(q, 5, "mean", None, [])
    ref = np.mean([brute(np.stack([live[i][layer] for i in sorted(live)]), q[layer:layer + 1], metric)[0]
                   for layer in range(LAYERS)], axis=0)
    tol = 5e-3 * np.abs(ref).max() if dtype == "float16" else 1e-4 * np.abs(ref).max()
    assert np.allclose(mean_s, -np.sort(-ref)[:5], atol=tol)
    s.remove(ids_now())
    assert len(s) == 0 and (s.search(q, 3, "per_layer", None, [])[1] == -1).all()
    s.add(np.array([900]), keys[:1])  # an emptied block takes adds again
    assert s.search(q, 2, "per_layer", None, [])[1].tolist() == [[900, -1]] * LAYERS


@pytest.mark.parametrize("pooled", [False, True], ids=["one_call", "pooled"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("metric", METRICS)
def test_layer_block_ties_resolve_as_before(metric, dtype, pooled, monkeypatch):
    """Entries with identical keys (a static scene) tie exactly; they resolve as in the per-layer FlatIndexes
    (which of the equals enter the top-k, and their order), also after removals in the middle of the block and
    with a deny list (k = 12 puts the boundary inside a run of equals: the over-fetch path hands it to faiss)."""
    monkeypatch.setattr(layer_block, "POOL_MIN_BYTES", 0 if pooled else 1 << 62)
    monkeypatch.setattr(layer_block, "PREFILTER_MIN_BYTES", 0 if pooled else 1 << 62)
    rng = np.random.default_rng(22)
    s, flats = block_space(metric, dtype), per_layer_flats(metric, dtype)
    base = layered(rng, 4, DIM)
    keys = base[np.arange(40) % 4]  # [40, L, d]: ten copies of each of 4 keys
    order = rng.permutation(40)  # ids not in key order; insertion order is id order
    for part in np.array_split(order, 4):
        s.add(part, keys[part])
        for layer, ix in enumerate(flats):
            ix.add(part, keys[part, layer])
    q = layered(rng, 1, DIM)[0]
    for step in range(3):
        for deny in (None, np.array([int(order[0]), int(order[5])])):
            for k in (3, 12):
                got, ref = s.search(q, k, "per_layer", deny, []), flats_search(flats, q, k, deny)
                assert np.array_equal(got[1], ref[1]), f"tie order differs (step {step}, k {k})"
                assert np.array_equal(got[0], ref[0])
        victims = order[10 * step + 1:10 * step + 4]
        s.remove(victims)
        for ix in flats:
            ix.remove(victims)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("metric", METRICS)
def test_layer_block_snapshots_round_trip_and_old_snapshots_load(metric, dtype):
    rng = np.random.default_rng(23)
    keys = layered(rng, 120, DIM)
    s, flats = block_space(metric, dtype), per_layer_flats(metric, dtype)
    s.add(np.arange(120) * 2, keys)
    for layer, ix in enumerate(flats):
        ix.add(np.arange(120) * 2, keys[:, layer])
    s.remove(np.arange(0, 240, 6))
    for ix in flats:
        ix.remove(np.arange(0, 240, 6))
    old_format = [(ix.serialize(), ix.tombstones()) for ix in flats]  # what SpaceIndex.dump wrote before
    q = layered(rng, 1, DIM)[0]
    deny = np.arange(0, 240, 10)
    for parts in (s.dump(), old_format):
        copy = block_space(metric, dtype)
        copy.load(parts)
        assert copy.ids().tolist() == s.ids().tolist()
        for d in (None, deny):
            a, b = s.search(q, 7, "per_layer", d, []), copy.search(q, 7, "per_layer", d, [])
            assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
        copy.add(np.array([1001]), keys[:1])  # the loaded copy keeps working
        copy.remove(np.array([2]))
        assert 1001 in copy.ids().tolist() and 2 not in copy.ids().tolist()
    for bad in ([(b"not faiss", np.zeros(0, np.int64))], old_format[:2],
                block_space(metric, "float16" if dtype == "float32" else "float32").dump()):
        with pytest.raises((RuntimeError, InvalidArgument)):  # the stream loader then rebuilds from LMDB
            block_space(metric, dtype).load(bad)


def test_layer_block_refuses_wrong_shapes():
    s = block_space("ip", "float32")
    with pytest.raises(InvalidArgument, match=f"expects keys \\[n, {LAYERS}, {DIM}\\]"):
        s.add(np.arange(2), np.ones((2, LAYERS, DIM + 1), np.float32))
    s.add(np.arange(2), np.ones((2, LAYERS, DIM), np.float32))
    with pytest.raises(InvalidArgument, match=f"expects queries \\[{LAYERS}, {DIM}\\]"):
        s.search(np.ones((LAYERS - 1, DIM), np.float32), 1, "per_layer", None, [])
    assert len(s) == 2


# -- ivfsq: 4-bit IVF codes per layer, each layer's candidates reranked exactly from the stored keys ------------

IVFSQ = IndexParams(ivf_train_min=256, ivf_nlist=16, ivf_nprobe=8)  # half the lists: IVF routes by inner product poorly


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("metric", METRICS)
def test_ivfsq_space_returns_true_scores_recall_deny_remove_and_snapshots(metric, bits):
    """Untrained it is exact; trained, every returned score is the key's exact score (the rerank), per-layer recall@6
    against exact search is >= 0.95, denied and removed ids never come back, and a snapshot answers the same."""
    params = dataclasses.replace(IVFSQ, ivf_sq_bits=bits)
    rng = np.random.default_rng(21)
    small = layered(rng, 100, DIM)  # below ivf_train_min: the flat buffer answers
    exact, approx = space("flat", metric, small), space("ivfsq", metric, small, params)
    q = layered(rng, 1, DIM)[0]
    a, b = exact.search(q, 6, "per_layer", None, []), approx.search(q, 6, "per_layer", None, [])
    assert np.array_equal(a[1], b[1])

    keys = layered(rng, 2000, DIM)
    s = space("ivfsq", metric, keys, params)
    assert not any(index.exact for index in s.indexes)
    deny = np.arange(0, 2000, 3)
    s.remove(np.arange(1, 2000, 7))
    gone = np.arange(1, 2000, 7)
    recalls = []
    for _ in range(10):
        q = layered(rng, 1, DIM)[0]
        steps: list = []
        scores, ids, _ = s.search(q, 6, "per_layer", deny, steps)
        assert [name for name, _ in steps] == ["search", "load_keys", "rerank"]
        assert not np.isin(ids, deny).any() and not np.isin(ids, gone).any() and (ids >= 0).all()
        ref = exact_per_layer(keys, q, metric)  # [L, n]
        true = np.take_along_axis(ref, ids, axis=1)
        assert np.allclose(scores, true, rtol=1e-4, atol=1e-3)
        assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
        ref[:, deny], ref[:, gone] = -np.inf, -np.inf
        truth = np.argsort(-ref, axis=1)[:, :6]
        recalls += [len(set(x.tolist()) & set(y.tolist())) / 6 for x, y in zip(ids, truth)]
    assert np.mean(recalls) >= 0.95, f"ivfsq/{metric} per-layer recall@6 {np.mean(recalls):.3f}"

    again = SpaceIndex(s.space, LAYERS, params, key_loader=lambda ids: keys[ids],
                       layer_loader=lambda ids: layer_keys(keys, ids))
    again.load(s.dump())
    assert not any(index.exact for index in again.indexes)
    assert np.array_equal(np.sort(again.ids()), np.sort(s.ids())) and len(again) == 2000 - len(gone)
    q = layered(rng, 1, DIM)[0]
    assert np.array_equal(s.search(q, 6, "per_layer", deny, [])[1], again.search(q, 6, "per_layer", deny, [])[1])
    m1, m2 = s.search(q, 4, "mean", None, []), space("flat", metric, keys).search(q, 4, "mean", None, [])
    assert np.allclose(m1[0][0], m2[0][0], rtol=1e-4, atol=1e-3)  # mean: candidates reranked with all layers


def test_ivfsq_keeps_float16_centroids_and_loads_snapshots_of_float32_ones():
    """A trained ivfsq layer's coarse quantizer holds float16 centroids. An index in the form written before that
    (float32 IndexFlat centroids) still loads from its snapshot, answers with exact scores at recall >= 0.9, counts its
    centroids at their width and takes adds."""
    rng = np.random.default_rng(5)
    keys = layered(rng, 1000, DIM)
    s = space("ivfsq", "ip", keys, IVFSQ)
    quantizer = faiss.downcast_index(s.indexes[0]._index.quantizer)
    assert isinstance(quantizer, faiss.IndexScalarQuantizer) and quantizer.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    assert s.indexes[0].memory_bytes() < len(keys) * (DIM // 2 + 8) + IVFSQ.ivf_nlist * DIM * 4

    parts = []
    for layer in range(LAYERS):  # the form trained before float16 centroids
        old = faiss.IndexIVFScalarQuantizer(faiss.IndexFlat(DIM, faiss.METRIC_INNER_PRODUCT), DIM, IVFSQ.ivf_nlist,
                                            faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_INNER_PRODUCT, True)
        old.train(keys[:, layer])
        old.add_with_ids(keys[:, layer], np.arange(len(keys), dtype=np.int64))
        parts.append((faiss.serialize_index(old).tobytes(), np.zeros(0, np.int64)))
    loaded = SpaceIndex(s.space, LAYERS, IVFSQ, key_loader=lambda ids: keys[ids],
                        layer_loader=lambda ids: layer_keys(keys, ids))
    loaded.load(parts)
    assert not any(index.exact for index in loaded.indexes) and len(loaded) == len(keys)
    # the estimate used from 4096 vectors on (below, memory_bytes measures the serialized index) counts its float32
    # centroids as such
    assert [a._estimate() - b._estimate() for a, b in zip(loaded.indexes, s.indexes)] == [IVFSQ.ivf_nlist * DIM * 2] * LAYERS
    for _ in range(5):
        q = layered(rng, 1, DIM)[0]
        scores, ids, _ = loaded.search(q, 6, "per_layer", None, [])
        exact = exact_per_layer(keys, q, "ip")
        assert np.allclose(scores, np.take_along_axis(exact, ids, axis=1), rtol=1e-4, atol=1e-3)
        ref = np.argsort(-exact, axis=1)[:, :6]
        assert np.mean([len(set(a.tolist()) & set(b.tolist())) / 6 for a, b in zip(ids, ref)]) >= 0.9
    loaded.add(np.arange(len(keys), len(keys) + 10), keys[:10])  # adds to the old form take its residuals
    assert len(loaded) == len(keys) + 10


def test_ivfsq_needs_per_layer_keys_and_4_or_8_bits():
    with pytest.raises(InvalidArgument, match="'ivfsq' needs per_layer=True"):
        KeySpace(DIM, index="ivfsq")
    with pytest.raises(InvalidArgument, match="config index.ivf_sq_bits is 6; expected 4 or 8"):
        dataclasses.replace(IVFSQ, ivf_sq_bits=6)


@pytest.mark.parametrize("metric", METRICS)
def test_ivfsq_groups_the_centroids_of_256_lists_and_answers_as_the_whole_scan_does(metric):
    """With `ivf_quantizer_nprobe` and 256 lists or more, a layer's centroids are an IVF of their own (sqrt(nlist)
    groups, that many scanned). Each centroid keeps its list's number: with every group scanned the lists found are
    those of a scan over every centroid, and the answers agree with the ungrouped space's in >= 95% of slots (two
    lists whose scores differ in the last bits may swap); with fewer groups, scores stay exact. Adds after training land, a snapshot keeps the
    groups and answers the same, and the estimate counts them."""
    rng = np.random.default_rng(23)
    every = layered(rng, 3020, DIM)  # the last 20 are added after training
    keys = every[:3000]
    params = IndexParams(ivf_train_min=2048, ivf_nlist=256, ivf_nprobe=4, ivf_quantizer_nprobe=4)
    assert IndexParams().ivf_quantizer_nprobe == 0  # opt-in: a wide ivf_nprobe needs every centroid
    whole = space("ivfsq", metric, keys, dataclasses.replace(params, ivf_quantizer_nprobe=0))
    grouped = SpaceIndex(whole.space, LAYERS, params, key_loader=lambda ids: every[ids],
                         layer_loader=lambda ids: layer_keys(every, ids))
    grouped.add(np.arange(3000), keys)
    quantizers = [faiss.downcast_index(index._index.quantizer) for index in grouped.indexes]
    assert all(isinstance(q, faiss.IndexIVFScalarQuantizer) and (q.nlist, q.nprobe) == (16, 4) for q in quantizers)
    assert isinstance(faiss.downcast_index(whole.indexes[0]._index.quantizer), faiss.IndexScalarQuantizer)
    queries = layered(rng, 5, DIM)
    for q in queries:
        scores, ids, _ = grouped.search(q, 6, "per_layer", None, [])
        assert np.allclose(scores, np.take_along_axis(exact_per_layer(keys, q, metric), ids, axis=1),
                           rtol=1e-4, atol=1e-3)
    # every group scanned: the lists found are those of a scan over every centroid (list numbers kept), and the
    # answers are the ungrouped space's (but where two lists' scores differ in the last bits: the two scan in
    # different orders)
    flat = faiss.IndexFlat(DIM, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    flat.add(quantizers[0].reconstruct_n(0, 256))
    probe = prepare(layered(rng, 50, DIM)[:, 0], metric)
    for quantizer in quantizers:
        quantizer.nprobe = 16
    assert np.array_equal(quantizers[0].search(probe, 3)[1], flat.search(probe, 3)[1])
    same = [np.mean(grouped.search(q, 6, "per_layer", None, [])[1] == whole.search(q, 6, "per_layer", None, [])[1])
            for q in queries]
    assert np.mean(same) >= 0.95
    for quantizer in quantizers:
        quantizer.nprobe = 4

    grouped.add(np.arange(3000, 3020), every[3000:])
    keys = every
    assert len(grouped) == 3020 and np.array_equal(np.sort(grouped.ids()), np.arange(3020))
    if metric != "ip":  # a key is its own best match: an add lands in the list a search for it scans first
        for i in (3000, 3007, 3019):
            assert (grouped.search(keys[i], 1, "per_layer", None, [])[1][:, 0] == i).all()

    again = SpaceIndex(grouped.space, LAYERS, params, key_loader=lambda ids: keys[ids],
                       layer_loader=lambda ids: layer_keys(keys, ids))
    again.load(grouped.dump())
    assert faiss.downcast_index(again.indexes[0]._index.quantizer).nprobe == 4
    q = layered(rng, 1, DIM)[0]
    assert np.array_equal(grouped.search(q, 6, "per_layer", None, [])[1], again.search(q, 6, "per_layer", None, [])[1])
    index = grouped.indexes[0]._index
    assert grouped.indexes[0]._estimate() == index.ntotal * (index.code_size + 8) + 256 * (DIM * 2 + 16) + 16 * DIM * 4


def test_ivf_quantizer_nprobe_must_not_be_negative():
    with pytest.raises(InvalidArgument, match="config index.ivf_quantizer_nprobe is -1; expected 0"):
        IndexParams(ivf_quantizer_nprobe=-1)


def test_top_k_rows_is_top_k_of_each_row():
    """The rerank's top-k of all layers at once equals `_top_k` of each layer's valid candidates (-1: none): the same
    scores, and the same ids wherever no tie in score leaves the choice open."""
    rng = np.random.default_rng(24)
    for _ in range(500):
        rows, width, k = rng.integers(1, 6), rng.integers(0, 12), rng.integers(1, 8)
        scores = rng.integers(-3, 3, (rows, width)).astype(np.float32)  # ties on purpose
        ids = np.stack([rng.permutation(50)[:width] for _ in range(rows)]).astype(np.int64)
        ids[rng.random((rows, width)) < 0.2] = -1
        got_s, got_i = top_k_rows(scores, ids, k)
        assert got_s.shape == got_i.shape == (rows, k)
        for r in range(rows):
            valid = ids[r] >= 0
            want_s, want_i = _top_k(scores[r][valid], ids[r][valid], k)
            assert np.array_equal(got_s[r], want_s)
            if len(set(scores[r][valid].tolist())) == valid.sum():
                assert np.array_equal(got_i[r], want_i)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["flat", "hnsw", "hnsw_tombstones", "ivfpq_trained", "ivfsq"])
def test_search_each_answers_as_each_index_alone(kind, metric):
    """A space's layers searched in one loop (`search_each`: shared preparation and parameters) answer what each
    index's own `search` does: ids and scores equal, under deny and with k past the count. Flat (its own `search`)
    and tombstones take each index's `search`, and answer the same too."""
    rng = np.random.default_rng(25)
    make = KINDS.get(kind.removesuffix("_tombstones")) or (lambda d, m: IVFSQIndex(d, m, IVFSQ))
    indexes = [make(DIM, metric) for _ in range(3)]
    for n, index in zip((600, 5, 600), indexes):  # one holds fewer than k
        index.add(np.arange(n), clustered(rng, n, DIM))
    if kind == "hnsw_tombstones":
        indexes[2].remove(np.arange(0, 600, 5))
    queries = clustered(rng, 3, DIM)
    for deny in (None, np.arange(0, 600, 3)):
        for k in (1, 8):
            got_s, got_i = search_each(indexes, queries, k, deny)
            for layer, index in enumerate(indexes):
                want_s, want_i = index.search(queries[layer][None], k, deny)
                assert np.array_equal(got_i[layer], want_i[0]) and np.array_equal(got_s[layer], want_s[0])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "ivfsq", "ivfsq_exact"])
def test_a_per_layer_space_split_over_the_pool_answers_as_in_the_callers_thread(kind, metric, monkeypatch):
    """A large per-layer query of an ANN kind is cut into one span of layers a core, the caller taking the first
    (SpaceIndex._search_layers). Every span count, even ones that leave spans of one layer or of unequal sizes,
    answers bit for bit what one loop in the caller's thread does: per layer and mean, under deny, with k past
    what a layer holds."""
    rng = np.random.default_rng(31)
    params = TRAINED if kind == "ivfpq" else IVFSQ
    keys = layered(rng, 100 if kind == "ivfsq_exact" else 600, DIM)
    s = space(kind.removesuffix("_exact"), metric, keys, params)
    assert kind != "ivfsq" or not any(index.exact for index in s.indexes)
    queries = layered(rng, 3, DIM)
    for deny in (None, np.arange(0, len(keys), 3)):
        for k, combine in ((1, "per_layer"), (8, "per_layer"), (4, "mean"), (200, "per_layer")):
            monkeypatch.setattr(space_module, "POOL_MIN_BYTES_SPLIT", 1 << 62)
            want = [s.search(q, k, combine, deny, []) for q in queries]
            monkeypatch.setattr(space_module, "POOL_MIN_BYTES_SPLIT", 0)
            for cores in (2, 4, LAYERS):
                monkeypatch.setattr(space_module, "CORES", cores)
                for q, (want_s, want_i, _) in zip(queries, want):
                    got_s, got_i, _ = s.search(q, k, combine, deny, [])
                    assert np.array_equal(got_i, want_i) and np.array_equal(got_s, want_s), (cores, k, combine)
            monkeypatch.setattr(space_module, "CORES", 1)  # one core: the caller's loop whatever the size
            assert np.array_equal(s.search(queries[0], k, combine, deny, [])[1], want[0][1])


UNDOABLE = {
    "flat": KINDS["flat"],
    "flat_fp16": KINDS["flat_fp16"],
    "ivfsq_trained": lambda d, m: IVFSQIndex(d, m, IndexParams(ivf_nlist=8, ivf_train_min=256)),
    "ivfsq_trained_grouped": lambda d, m: IVFSQIndex(d, m, IndexParams(ivf_nlist=256, ivf_train_min=256,
                                                                       ivf_quantizer_nprobe=4)),
}


@pytest.mark.parametrize("kind", list(UNDOABLE))
@pytest.mark.parametrize("metric", METRICS)
def test_an_undoable_index_is_byte_for_byte_itself_after_an_add_is_removed(kind, metric):
    """`undoable` (a put's adds run beside its commit and come out if it fails: Bank.put) means `remove` of the
    ids of the last add restores the index exactly: its serialized bytes, so its lists' order and codes too, and
    its answers. An IVF-SQ says so only once trained (an add may train it before); after training, adds and
    removals of several batches, in any list, leave each list's older codes in their order."""
    rng = np.random.default_rng(3)
    index = UNDOABLE[kind](DIM, metric)
    x = clustered(rng, 900, DIM)
    if kind.startswith("ivfsq"):
        index.add(np.arange(200), x[:200])
        assert not index.undoable  # 200 < ivf_train_min: the next add trains it
        index.add(np.arange(200, 300), x[200:300])
        assert not index.exact
    else:
        index.add(np.arange(300), x[:300])
    assert index.undoable
    q = clustered(np.random.default_rng(4), 5, DIM)
    for lo in range(300, 900, 200):  # a batch stays, the next is added and taken out again
        held, answers = index.serialize(), index.search(q, 10)
        index.add(np.arange(lo, lo + 100), x[lo:lo + 100])
        assert index.serialize() != held
        index.remove(np.arange(lo, lo + 100))
        assert index.serialize() == held
        s, i = index.search(q, 10)
        assert np.array_equal(i, answers[1]) and np.array_equal(s, answers[0])
        index.add(np.arange(lo + 100, lo + 200), x[lo + 100:lo + 200])
