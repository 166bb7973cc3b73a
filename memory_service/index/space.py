"""SpaceIndex: the search structure of one key space of one stream.

Owns the layout decision for per-layer spaces. An exact (flat) per-layer space on the CPU is one LayerBlock:
every layer's keys in one faiss structure, so MemFlow's NAM query (each layer ranks frames by its own text key)
is one batched call over all layers, not L calls with Python around each (benchmarks/layer_scan.py, 30 x 1536
keys, 10 entries: 0.11 ms against 0.51 ms as 30 FlatIndexes; through LocalMemory.query 0.28 vs 0.82 ms; at
1e4 entries both sit at the memory-bandwidth floor). The ANN kinds (and flat on a GPU, which keeps
FlatIndex's device mirror) stay one VectorIndex per layer, searched on a thread pool when layers are large.
One index over the concatenated `[layers * dim]` vector would answer only the mean ranking, not per layer.

Modes:
- single vector (`per_layer=False`): one VectorIndex; results `[k]`.
- per layer, flat: one LayerBlock; hnsw/ivfpq: L VectorIndexes. `combine="per_layer"` gives each layer's
  top-k `[L, k]`; `combine="mean"` ranks entries by the mean score over layers (exact for flat; ANN kinds
  gather per-layer candidates and rerank them exactly).
- per layer, ivfsq: L IVFSQIndexes (4-bit codes in RAM); once trained, each layer's top `k * ivf_refine` by code
  score are reranked exactly with that layer's stored keys, read through `layer_loader` (only those layers' bytes
  of each candidate's key), so every returned score is exact and only the ranking before the rerank is not.
- per layer, two_stage: RAM holds only an HNSW index of each entry's mean-over-layers key; a query takes
  `two_stage_candidates` (at least 16k) from it and reranks them exactly per layer, reading their keys
  from the store through `key_loader`. Recall against exact per-layer search is reported by the benchmark.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from memory_service.config import IndexParams
from memory_service.index.layer_block import CORES, LayerBlock, search_pool
from memory_service.index.vector_index import HNSWIndex, gpu_available, make_index, prepare, search_each
from memory_service.types import KeySpace

KeyLoader = Callable[[np.ndarray], np.ndarray]  # ids [n] -> keys [n, L, d] float32
LayerKeyLoader = Callable[[np.ndarray], np.ndarray]  # ids [L, W] (-1: none) -> layer l's keys [L, W, d] float32


class SpaceIndex:
    def __init__(self, space: KeySpace, layers: int, params: IndexParams, key_loader: Optional[KeyLoader] = None,
                 layer_loader: Optional[LayerKeyLoader] = None):
        self.space = space
        self.layers = layers
        self.params = params
        self.key_loader = key_loader
        self.layer_loader = layer_loader
        self.two_stage = space.index == "two_stage"
        self.block: Optional[LayerBlock] = None
        if self.two_stage:
            self.indexes: list = [HNSWIndex(space.dim, space.metric, params)]
        elif space.per_layer and space.index == "flat" and not (params.use_gpu and gpu_available()):
            self.block = LayerBlock(layers, space.dim, space.metric, params, space.dtype)
            self.indexes = [self.block]
        else:
            count = layers if space.per_layer else 1
            self.indexes = [make_index(space.index, space.dim, space.metric, params, space.dtype) for _ in range(count)]

    # -- mutation --------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """`keys` is `[n, L, d]` for per-layer spaces, `[n, d]` otherwise (float32, validated)."""
        if self.two_stage:
            self.indexes[0].add(ids, compact(keys, self.space.metric))
        elif self.block is not None:
            self.block.add(ids, keys)
        elif self.space.per_layer:
            def one(layer: int) -> None:
                self.indexes[layer].add(ids, keys[:, layer, :])

            if CORES > 1 and len(ids) >= POOL_MIN_ADDS and getattr(self.indexes[0], "adds_pooled", False):
                list(search_pool().map(one, range(self.layers)))  # the first failure is raised, as serially
            else:
                for layer in range(self.layers):
                    one(layer)
        else:
            self.indexes[0].add(ids, keys)

    def remove(self, ids: np.ndarray) -> None:
        for index in self.indexes:
            index.remove(ids)

    @property
    def undoable(self) -> bool:
        """Whether `remove` of the ids of one `add` restores the space as it answered before it."""
        return not self.two_stage and all(getattr(index, "undoable", False) for index in self.indexes)

    def __len__(self) -> int:
        return len(self.indexes[0])

    def ids(self) -> np.ndarray:
        return self.indexes[0].ids()

    def memory_bytes(self) -> int:
        return sum(index.memory_bytes() for index in self.indexes)

    # -- search ----------------------------------------------------------------------------------
    def search(
        self, query: np.ndarray, k: int, combine: str, deny: Optional[np.ndarray], steps: list
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Returns (scores, ids, scanned); shapes `[L, k]` for per-layer combine, `[k]` otherwise."""
        n = len(self)
        if not self.space.per_layer:
            t = time.perf_counter()
            scores, ids = self.indexes[0].search(query[None, :], k, deny)
            steps.append(("search", _ms(t)))
            return scores[0], ids[0], n
        if self.two_stage:
            t = time.perf_counter()
            c = min(n, max(self.params.two_stage_candidates, 16 * k))
            _, cand = self.indexes[0].search(compact(query[None], self.space.metric), c, deny)
            steps.append(("first_pass", _ms(t)))
            return (*self._rerank(cand[0][cand[0] >= 0], query, k, combine, steps), n)
        if combine == "per_layer":
            reranked = self.space.index == "ivfsq" and not all(index.exact for index in self.indexes)
            t = time.perf_counter()
            scores, ids = self._search_layers(query, min(n, k * self.params.ivf_refine) if reranked else k, deny)
            steps.append(("search", _ms(t)))
            if reranked:
                return (*self._rerank_layers(ids, query, k, steps), n)
            return scores, ids, n
        # combine == "mean"
        t = time.perf_counter()
        width = n if self.space.index == "flat" else min(n, 4 * k)
        layer_s, layer_i = self._search_layers(query, width, deny)  # [L, width] each
        steps.append(("search", _ms(t)))
        if self.space.index == "flat":
            t = time.perf_counter()
            ids, scores = layer_i.reshape(-1), layer_s.reshape(-1)
            keep = ids >= 0
            uniq, inv = np.unique(ids[keep], return_inverse=True)
            total = np.zeros(len(uniq), np.float64)
            np.add.at(total, inv, scores[keep])
            s, i = _top_k(total / self.layers, uniq, k)
            steps.append(("combine", _ms(t)))
            return s, i, n
        cand = np.unique(layer_i)
        return (*self._rerank(cand[cand >= 0], query, k, combine, steps), n)

    def _search_layers(self, query: np.ndarray, k: int, deny: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Each layer's top-k: (scores `[L, k]`, ids `[L, k]`). A flat space is one batched LayerBlock search.
        Otherwise one search per layer, in one loop (`search_each`). When all layers together scan enough
        (`scan_bytes`, POOL_MIN_BYTES_SPLIT) they are cut into one span a core, each span its own loop, the caller
        taking the first: faiss releases the GIL and scans a single query on one core, so the spans run side by
        side. One hand-off a core, not one a layer: on 2 cores, 30 layers, split in two was faster than a task a
        layer or four spans a core at every size measured (ivfsq 4-bit at 1e4 x 1536, nprobe 32: 35 ms in the
        caller, 18.4 split in two, 19.7 in eight; hnsw at 3000 x 1536: 15.3, 8.5, 9.1), and at 1e5 x 1536, nprobe 2,
        0.2 ms a layer, 5.7 ms against 3.2-3.4. Below the threshold a hand-off costs more than it saves (the pool
        thread's loop also waits for the GIL the caller's holds between faiss calls). GPU mirrors stay in the
        caller's thread (`threads_ok`)."""
        if self.block is not None:
            return self.block.search(query, k, deny)
        if CORES < 2 or self.indexes[0].scan_bytes() * self.layers < POOL_MIN_BYTES_SPLIT or \
                not self.indexes[0].threads_ok:
            return search_each(self.indexes, query, k, deny)
        bounds = np.linspace(0, self.layers, min(CORES, self.layers) + 1).astype(int).tolist()
        spans = list(zip(bounds[:-1], bounds[1:]))

        def span(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
            return search_each(self.indexes[a:b], query[a:b], k, deny)

        rest = [search_pool().submit(span, *ab) for ab in spans[1:]]
        try:
            parts = [span(*spans[0])]
        finally:
            parts += [f.result() for f in rest]  # the first failure is raised, as serially
        return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])

    def _rerank(self, cand: np.ndarray, query: np.ndarray, k: int, combine: str, steps: list):
        t = time.perf_counter()
        keys = self.key_loader(cand) if len(cand) else np.zeros((0, self.layers, self.space.dim), np.float32)
        steps.append(("load_keys", _ms(t)))
        t = time.perf_counter()
        scores = layer_scores(query, keys, self.space.metric)  # [L, C]
        if combine == "mean":
            out = _top_k(scores.mean(axis=0), cand, k)
        else:
            out = top_k_rows(scores, np.broadcast_to(cand, scores.shape), k)
        steps.append(("rerank", _ms(t)))
        return out

    def _rerank_layers(self, cand: np.ndarray, query: np.ndarray, k: int, steps: list):
        """Each layer's candidates `[L, W]` (-1: none) scored exactly with that layer's stored keys; top-k each."""
        assert self.layer_loader is not None, "an ivfsq space reranks through the store's keys"
        t = time.perf_counter()
        keys = self.layer_loader(cand)  # [L, W, d]
        steps.append(("load_keys", _ms(t)))
        t = time.perf_counter()
        q, x = prepare(query, self.space.metric), prepare(keys, self.space.metric)
        scores = np.einsum("lwd,ld->lw", x, q)
        if self.space.metric == "l2":
            scores = 2 * scores - np.einsum("lwd,lwd->lw", x, x) - np.einsum("ld,ld->l", q, q)[:, None]
        out = top_k_rows(scores.astype(np.float32), cand, k)
        steps.append(("rerank", _ms(t)))
        return out

    # -- snapshots -------------------------------------------------------------------------------
    def dump(self) -> list[tuple[bytes, np.ndarray]]:
        if self.block is not None:
            return self.block.dump()
        return [(index.serialize(), index.tombstones()) for index in self.indexes]

    def load(self, parts: list[tuple[bytes, np.ndarray]]) -> None:
        """Raises on parts this space cannot hold (the stream then rebuilds it from LMDB: a block snapshot opened
        on a GPU machine, say). A flat per-layer space also loads the per-layer snapshots written before LayerBlock."""
        if self.block is not None:
            self.block.load(parts)
            return
        if len(parts) != len(self.indexes):
            raise ValueError(f"snapshot holds {len(parts)} indexes; this space has {len(self.indexes)}")
        for index, (data, tombstones) in zip(self.indexes, parts):
            index.load(data, tombstones)


# All layers' `scan_bytes` together from which a per-layer query of an ANN kind is split over the search pool
# (see SpaceIndex._search_layers). Measured on 2 cores, 30 layers, p50 in the caller vs split in two: ivfsq trained
# at 2048 x 1536 (23.9 MB) 1.03 vs 0.76 ms; exact below training, 1000 x 128 (14.6 MB) 0.48 vs 0.42 ms with a worse
# p99, 300 x 128 (4.4 MB) 0.23 vs 0.33 ms.
POOL_MIN_BYTES_SPLIT = 16 << 20
# Per-layer adds of kinds that compute for each key (`adds_pooled`: IVF assignment and encoding, HNSW links) run
# on the pool from this many entries a put: faiss lets go of the GIL, and in a put they run beside the commit's
# fsync (Bank.put), which leaves the cores idle. Fewer than this, a layer's add is cheaper than its hand-off.
POOL_MIN_ADDS = 8


def compact(keys: np.ndarray, metric: str) -> np.ndarray:
    """One vector per entry for the first pass: the mean over layers of the (metric-prepared) keys."""
    return prepare(keys, metric).mean(axis=-2)


def layer_scores(query: np.ndarray, keys: np.ndarray, metric: str) -> np.ndarray:
    """Exact per-layer scores: query `[L, d]`, keys `[C, L, d]` -> `[L, C]` (higher is better)."""
    q = prepare(query, metric)
    x = prepare(keys, metric)
    scores = np.einsum("cld,ld->lc", x, q, optimize=True)
    if metric == "l2":
        scores = 2 * scores - np.einsum("cld,cld->lc", x, x) - np.einsum("ld,ld->l", q, q)[:, None]
    return scores.astype(np.float32)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_s = np.full(k, -np.inf, np.float32)
    out_i = np.full(k, -1, np.int64)
    if len(scores):
        m = min(k, len(scores))
        part = np.argpartition(-scores, m - 1)[:m] if m < len(scores) else np.arange(len(scores))
        order = part[np.lexsort((ids[part], -scores[part]))]
        out_s[:m], out_i[:m] = scores[order], ids[order]
    return out_s, out_i


def top_k_rows(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`_top_k` of every row at once: scores and ids `[R, W]` (id -1: no candidate, never returned) -> `[R, k]`
    each, best first, a tie in score by the smaller id, padded with -inf / -1. One numpy pass, not a call a row
    (a 30-layer rerank's per-row calls took ~0.5 ms)."""
    rows, width = scores.shape
    out_s = np.full((rows, k), -np.inf, np.float32)
    out_i = np.full((rows, k), -1, np.int64)
    m = min(k, width)
    if m == 0:
        return out_s, out_i
    order_key = np.where(ids >= 0, -scores, np.nan)  # NaN sorts last: an empty slot after every candidate
    part = np.argpartition(order_key, m - 1, axis=1)[:, :m] if m < width else np.broadcast_to(np.arange(width), ids.shape)
    key, pid = np.take_along_axis(order_key, part, 1), np.take_along_axis(ids, part, 1)
    order = np.lexsort((pid, key), axis=1)
    key, pid = np.take_along_axis(key, order, 1), np.take_along_axis(pid, order, 1)
    found = ~np.isnan(key)
    out_s[:, :m] = np.where(found, -key, -np.inf)
    out_i[:, :m] = np.where(found, pid, -1)
    return out_s, out_i


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
