"""VectorIndex: one set of `[n, dim]` vectors keyed by the bank's entry ids, searched by score.

Owns the faiss structures. Every implementation promises the same contract (tests/unit/test_index_contract.py
checks it against numpy brute force): `add` then `search` returns the top-k ids by score, best first,
higher score = better (inner product or cosine; negated squared distance for l2); missing slots are id -1
and score -inf; `deny` ids are never returned; `remove`d ids are never returned again.

- FlatIndex: exact (faiss IndexFlat, or an fp16 scalar-quantized flat), removal in place. The default and
  the ground truth. On a machine with faiss-gpu and a GPU it is moved to the GPU.
- IVFSQIndex: IVF with float16 centroids over 4- or 8-bit scalar-quantized residuals (a 1536-d vector in 768 or
  1536 bytes of RAM), removal in place;
  its scores are approximate, so it serves per-layer spaces only, where SpaceIndex reranks its candidates exactly
  from the stored keys. Exact (a flat buffer) until it holds `ivf_train_min` vectors, then trains once.
- HNSWIndex / IVFPQIndex: approximate. Neither supports removal in faiss (HNSW graphs cannot drop nodes,
  IVF-PQ with exact refinement has no remove_ids), so removal is a tombstone filtered at search time and
  the structure is rebuilt from its own stored vectors once tombstones pass a ratio. IVF-PQ answers
  exactly (from a flat buffer) until it holds `ivf_train_min` vectors, then trains once on what it holds.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import faiss
import numpy as np

from memory_service.config import IndexParams
from memory_service.errors import InvalidArgument


class VectorIndex(Protocol):
    dim: int
    metric: str

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def remove(self, ids: np.ndarray) -> None: ...
    def search(self, queries: np.ndarray, k: int, deny: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]: ...
    def ids(self) -> np.ndarray: ...
    def __len__(self) -> int: ...
    def memory_bytes(self) -> int: ...
    def serialize(self) -> bytes: ...


def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, and unit-norm for cosine (the bank rejects zero vectors for cosine; a zero row, a
    rerank's empty candidate slot, stays zero)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        x = x / np.where(norm > 0, norm, 1)
    return x


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _omp_threads(n: int) -> None:
    """Give faiss `n` OpenMP threads in the calling thread (0: faiss's default). omp_set_num_threads binds only
    the thread that calls it - a thread started later (a gRPC handler, the plugin's worker, the layer pool)
    begins at the process default, one per core - so every call into faiss checks its own thread. Measured: the
    plugin's worker searched a 10-frame bank in 1.6 ms per layer with the default, 0.05 ms with 1 thread."""
    if n > 0 and faiss.omp_get_max_threads() != n:
        faiss.omp_set_num_threads(n)


_LAST_DENY: tuple = (None, None)  # (deny ids as bytes, their selector): a per-layer query asks L times


def _deny_selector(deny: Optional[np.ndarray]) -> Optional[faiss.IDSelector]:
    """A selector that skips `deny`. The last one is reused: selectors are read-only in a search, so threads may
    share one, and a per-layer query passes the same ids to every layer's index (building it cost ~25 us of a
    ~120 us layer search at 1000 x 128). SearchParameters are never shared: IndexIDMap swaps their `sel` for
    the duration of a search."""
    global _LAST_DENY
    if deny is None or len(deny) == 0:
        return None
    ids = np.ascontiguousarray(deny, dtype=np.int64)
    key = ids.tobytes()
    last_key, last_sel = _LAST_DENY
    if last_key == key:
        return last_sel
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(ids))
    _LAST_DENY = (key, sel)
    return sel


class _FaissIndex:
    """Shared plumbing over a faiss IndexIDMap2: scores, padding, selectors, tombstones."""

    approximate = False
    # `remove` of ids just added puts the index back as it answered before them (a put adds its keys beside its
    # commit and takes them out again if the commit fails: Bank.put). Not for kinds that train on their data or
    # leave tombstones.
    undoable = False
    params_shared = True  # `_search_params` depends on (deny, k) and the kind only: indexes of a space may share them
    adds_pooled = False  # whether a space adds to its layers' indexes on the pool (space.POOL_MIN_ADDS); not a flat
    # kind's adds, which copy the keys only (and whose GPU mirror must not be driven from several threads)
    threads_ok = True  # whether a space may search its layers' indexes from several threads at once

    def __init__(self, dim: int, metric: str, params: IndexParams) -> None:
        self.dim = dim
        self.metric = metric
        self.params = params
        self._tombstones: set[int] = set()
        self._index = self._new_index()

    def _new_index(self) -> faiss.Index:  # pragma: no cover - abstract
        raise NotImplementedError

    def _search_params(self, deny: Optional[np.ndarray], k: int) -> Optional[faiss.SearchParameters]:
        sel = _deny_selector(deny)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        _omp_threads(self.params.faiss_threads)
        x = prepare(vectors, self.metric)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InvalidArgument(f"index expects vectors [n, {self.dim}], got {list(x.shape)}")
        self._index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        _omp_threads(self.params.faiss_threads)
        if self.approximate:
            self._tombstones.update(int(i) for i in ids)
            if len(self._tombstones) > self.params.hnsw_rebuild_tombstone_ratio * max(1, self._index.ntotal):
                self._rebuild()
        else:
            self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def _rebuild(self) -> None:
        live = np.array(sorted(set(self._all_ids().tolist()) - self._tombstones), dtype=np.int64)
        vectors = self._index.reconstruct_batch(live) if len(live) else np.zeros((0, self.dim), np.float32)
        self._tombstones.clear()
        self._index = self._new_index()
        if len(live):
            self._index.add_with_ids(vectors, live)

    def _all_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def ids(self) -> np.ndarray:
        all_ids = self._all_ids()
        if self._tombstones:
            all_ids = all_ids[~np.isin(all_ids, np.fromiter(self._tombstones, np.int64))]
        return all_ids

    def __len__(self) -> int:
        return int(self._index.ntotal) - len(self._tombstones)

    def search(self, queries: np.ndarray, k: int, deny: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        _omp_threads(self.params.faiss_threads)
        q = prepare(queries, self.metric)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidArgument(f"index expects queries [q, {self.dim}], got {list(q.shape)}")
        if self._tombstones:
            extra = np.fromiter(self._tombstones, np.int64)
            deny = extra if deny is None else np.concatenate([np.asarray(deny, np.int64), extra])
        n = int(self._index.ntotal)
        if n == 0:
            return _empty(len(q), k)
        kk = min(k, n)
        dist, ids = self._index.search(q, kk, params=self._search_params(deny, kk))
        scores = -dist if self.metric == "l2" else dist
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        if kk < k:
            pad_s, pad_i = _empty(len(q), k - kk)
            scores, ids = np.hstack([scores, pad_s]), np.hstack([ids, pad_i])
        return scores, ids

    def scan_bytes(self) -> int:
        """About how much one search scans, as the bytes of the float32 vectors it compares the query with (what
        decides whether a space's layers search on the pool). A code counts as the vector it decodes to: decoding
        costs about what reading that vector would (a 4-bit ivfsq layer at 1e5 x 1536, nprobe 2, compared ~630
        codes in 0.19 ms; an exact scan reads their 3.9 MB of float32 in about 0.2 ms)."""
        return int(self._index.ntotal) * self.dim * 4

    def memory_bytes(self) -> int:
        return int(faiss.serialize_index(self._index).nbytes) if self._index.ntotal < 4096 else self._estimate()

    def _estimate(self) -> int:
        return int(self._index.ntotal) * self.dim * 4

    def serialize(self) -> bytes:
        return faiss.serialize_index(self._index).tobytes()

    def load(self, data: bytes, tombstones: np.ndarray) -> None:
        self._index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        self._after_load()
        self._tombstones = set(int(i) for i in tombstones)

    def _after_load(self) -> None:
        pass

    def tombstones(self) -> np.ndarray:
        return np.fromiter(sorted(self._tombstones), np.int64, len(self._tombstones))


class FlatIndex(_FaissIndex):
    """Exact search. `dtype="float16"` stores vectors as fp16 (half the memory, ~1e-3 relative score error).

    With faiss-gpu and a GPU (and `IndexParams.use_gpu`), searches run on a GPU mirror of the CPU index;
    the CPU index stays the truth (snapshots, rebuilds, removal).
    """

    undoable = True  # remove_ids compacts in order; the mirror's tombstones are filtered exactly
    # A space's FlatIndexes are per-layer only on a GPU (on the CPU they are a LayerBlock), and their mirrors share
    # one StandardGpuResources, which faiss lets one thread use at a time: their searches stay in the caller's thread.
    threads_ok = False

    def __init__(self, dim: int, metric: str, params: IndexParams, dtype: str = "float32",
                 mirror_factory: Optional[Callable[[faiss.Index], faiss.Index]] = None) -> None:
        self.dtype = dtype
        super().__init__(dim, metric, params)
        factory = mirror_factory or (_to_gpu if params.use_gpu and gpu_available() else None)
        self._mirror = DeviceMirror(self, factory) if factory else None

    def _new_index(self) -> faiss.Index:
        if self.dtype == "float16":
            base = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, _faiss_metric(self.metric))
        else:
            base = faiss.IndexFlat(self.dim, _faiss_metric(self.metric))
        return faiss.IndexIDMap2(base)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        super().add(ids, vectors)
        if self._mirror:
            self._mirror.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> None:
        super().remove(ids)
        if self._mirror:
            self._mirror.remove(ids)

    def load(self, data: bytes, tombstones: np.ndarray) -> None:
        super().load(data, tombstones)
        if self._mirror:
            self._mirror.reset()

    def search(self, queries: np.ndarray, k: int, deny: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        if self._mirror and len(self):
            return self._mirror.search(queries, k, deny)
        return super().search(queries, k, deny)

    def _estimate(self) -> int:
        return int(self._index.ntotal) * (self.dim * (2 if self.dtype == "float16" else 4) + 16)


class DeviceMirror:
    """A copy of a FlatIndex on a device whose faiss index takes neither selectors nor removals (GPU).

    Removals become tombstones; `deny` and tombstones are filtered by over-fetching k + |excluded| and
    dropping them, which is exact for a flat index. Past the tombstone ratio the copy is rebuilt.
    """

    def __init__(self, owner: FlatIndex, factory: Callable[[faiss.Index], faiss.Index]) -> None:
        self.owner = owner
        self.factory = factory
        self.reset()

    def reset(self) -> None:
        self.index = self.factory(self.owner._index)
        self.tombstones: set[int] = set()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(prepare(vectors, self.owner.metric), np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        self.tombstones.update(int(i) for i in ids)
        if len(self.tombstones) > self.owner.params.hnsw_rebuild_tombstone_ratio * max(1, self.index.ntotal):
            self.reset()

    def search(self, queries: np.ndarray, k: int, deny: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        q = prepare(queries, self.owner.metric)
        excluded = set(self.tombstones)
        if deny is not None:
            excluded.update(int(i) for i in deny)
        kk = min(int(self.index.ntotal), k + len(excluded))
        dist, ids = self.index.search(q, kk)
        scores = -dist if self.owner.metric == "l2" else dist
        out_s, out_i = _empty(len(q), k)
        for row in range(len(q)):
            keep = (ids[row] >= 0) & ~np.isin(ids[row], np.fromiter(excluded, np.int64, len(excluded)))
            s, i = scores[row][keep][:k], ids[row][keep][:k]
            out_s[row, :len(s)], out_i[row, :len(i)] = s, i
        return out_s, out_i


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = None


def _to_gpu(index: faiss.Index) -> faiss.Index:
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


class HNSWIndex(_FaissIndex):
    approximate = True
    adds_pooled = True

    def _new_index(self) -> faiss.Index:
        base = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, _faiss_metric(self.metric))
        base.hnsw.efConstruction = self.params.hnsw_ef_construction
        base.hnsw.efSearch = self.params.hnsw_ef_search
        return faiss.IndexIDMap2(base)

    def _search_params(self, deny: Optional[np.ndarray], k: int) -> faiss.SearchParameters:
        # faiss keeps only efSearch candidates while it walks the graph, so k > efSearch starves the result
        # list (two-stage asks for 256 candidates: 77% of the true top-256 at efSearch 128, 95% at 2k).
        ef = max(self.params.hnsw_ef_search, 2 * k)
        return faiss.SearchParametersHNSW(sel=_deny_selector(deny), efSearch=ef)

    def _estimate(self) -> int:
        return int(self._index.ntotal) * (self.dim * 4 + self.params.hnsw_m * 2 * 4 + 16)


class IVFPQIndex(_FaissIndex):
    """IVF-PQ with exact refinement of `k * ivf_refine` PQ candidates; exact until trained."""

    params_shared = False  # a trained one's selector holds its own internal positions of `deny`

    approximate = True
    adds_pooled = True

    def _new_index(self) -> faiss.Index:
        self._trained = False
        return faiss.IndexIDMap2(faiss.IndexFlat(self.dim, _faiss_metric(self.metric)))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        super().add(ids, vectors)
        if not self._trained and self._index.ntotal >= self.params.ivf_train_min:
            self._train()

    def _rebuild(self) -> None:
        super()._rebuild()
        if self._index.ntotal >= self.params.ivf_train_min:
            self._train()

    def _train(self) -> None:
        live = self._all_ids()
        x = self._index.reconstruct_batch(live)
        n = len(x)
        nlist = self.params.ivf_nlist or int(np.clip(np.sqrt(n), 16, 4096))
        m = self.params.ivf_pq_m or max(1, self.dim // 4)
        while self.dim % m:
            m -= 1
        ivf = faiss.IndexIVFPQ(faiss.IndexFlat(self.dim, _faiss_metric(self.metric)), self.dim, nlist, m, 8,
                               _faiss_metric(self.metric))
        ivf.cp.min_points_per_centroid = 1  # small banks train on what they have; faiss only warns
        ivf.train(x)
        refine = faiss.IndexRefineFlat(ivf)
        index = faiss.IndexIDMap2(refine)
        index.add_with_ids(x, live)
        self._index, self._trained = index, True

    def _after_load(self) -> None:
        self._trained = isinstance(faiss.downcast_index(self._index.index), faiss.IndexRefine)

    def _search_params(self, deny: Optional[np.ndarray], k: int) -> Optional[faiss.SearchParameters]:
        if not self._trained:
            return super()._search_params(deny, k)
        # IndexIDMap2 translates only a top-level selector; the IVF stage below the refine sees internal
        # positions, so the deny set is translated here.
        sel = None
        if deny is not None and len(deny):
            internal = np.flatnonzero(np.isin(faiss.vector_to_array(self._index.id_map), deny)).astype(np.int64)
            sel = _deny_selector(internal)
        return faiss.IndexRefineSearchParameters(
            k_factor=float(self.params.ivf_refine),
            base_index_params=faiss.SearchParametersIVF(nprobe=self.params.ivf_nprobe, sel=sel),
        )


class IVFSQIndex(_FaissIndex):
    """IVF, `ivf_sq_bits`-bit scalar-quantized residuals, `ivf_nprobe` lists scanned; `ivf_nlist` lists (0: sqrt of what it
    holds when it trains, within [16, 4096]: set it for the size the space will reach, lists are not re-trained).
    Exact until trained (`exact`); after that its scores are approximate and its callers rerank (SpaceIndex)."""

    adds_pooled = True

    def _new_index(self) -> faiss.Index:
        self._trained = False
        return faiss.IndexIDMap2(faiss.IndexFlat(self.dim, _faiss_metric(self.metric)))

    @property
    def exact(self) -> bool:
        return not self._trained

    @property
    def undoable(self) -> bool:
        """Once trained, `remove` of the ids just added puts every list back as it was: faiss moves a list's last
        code into a removed one's place, and the newest codes are each list's last; the centroids and the scalar
        quantizer's ranges never change after training. Before that, an add may train it."""
        return self._trained

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        super().add(ids, vectors)
        if not self._trained and self._index.ntotal >= self.params.ivf_train_min:
            self._train()

    def _train(self) -> None:
        live = self._all_ids()
        x = self._index.reconstruct_batch(live)  # metric-prepared already
        nlist = self.params.ivf_nlist or int(np.clip(np.sqrt(len(x)), 16, 4096))
        metric = _faiss_metric(self.metric)
        bits = {4: faiss.ScalarQuantizer.QT_4bit, 8: faiss.ScalarQuantizer.QT_8bit}  # IndexParams checks the choice
        trainer = faiss.IndexIVFScalarQuantizer(faiss.IndexFlat(self.dim, metric), self.dim, nlist,
                                                bits[self.params.ivf_sq_bits], metric, True)
        trainer.cp.min_points_per_centroid = 1  # small banks train on what they have; faiss only warns
        trainer.train(x)
        ivf = faiss.IndexIVFScalarQuantizer(self._coarse(trainer.quantizer.reconstruct_n(0, nlist), metric), self.dim,
                                            nlist, bits[self.params.ivf_sq_bits], metric, True)
        ivf.sq, ivf.is_trained = trainer.sq, True  # the scalar quantizer's trained ranges
        ivf.add_with_ids(x, live)  # the IVF keeps the caller's ids itself: no IndexIDMap, whose removal renumbers
        self._index, self._trained = ivf, True

    def _coarse(self, centroids: np.ndarray, metric: int) -> faiss.Index:
        """The quantizer that finds a vector's lists. Its centroids are kept in float16: every query scans them in
        every layer, and at 30 layers x 316 x 1536 float32 they are 58 MB, more than the lists it probes (measured
        through the bank at 1e5 x 30 x 1536, nprobe 2, warm: the search step took 3.9-4.1 ms in float16, 5.0-5.1
        ms in float32). From QUANTIZER_GROUPS_MIN lists they are grouped too: an IVF over the centroids, of
        sqrt(nlist) groups, of which `ivf_quantizer_nprobe` are scanned (measured alone on 30 layers x 1e5 x 1536,
        nlist 316, one core: finding 2 lists took 1.77 ms over every centroid, 0.74 ms over 4 of 18 groups, the
        whole search 5.6-6.1 against 4.9-5.1 ms, and the top 6 held the same share of the exact top 3, 0.956 vs
        0.957). Residuals are taken from these float16 centroids at training and at every add alike, and
        candidates are reranked exactly, so returned scores do not change."""
        nlist = len(centroids)
        probe = self.params.ivf_quantizer_nprobe
        groups = int(round(np.sqrt(nlist)))
        if probe == 0 or nlist < QUANTIZER_GROUPS_MIN or probe >= groups:
            flat = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, metric)
            flat.add(centroids)
            return flat
        grouped = faiss.IndexIVFScalarQuantizer(faiss.IndexFlat(self.dim, metric), self.dim, groups,
                                                faiss.ScalarQuantizer.QT_fp16, metric, False)
        grouped.cp.min_points_per_centroid = 1
        grouped.train(centroids)
        grouped.add(centroids)  # ids 0 .. nlist-1 in order: each centroid's id is its list's number
        grouped.make_direct_map(True)  # residuals reconstruct a list's centroid by its number
        grouped.nprobe = probe  # kept in the snapshot; a search passes no quantizer parameters
        return grouped

    def _after_load(self) -> None:
        self._trained = isinstance(faiss.downcast_index(self._index), faiss.IndexIVF)

    def _all_ids(self) -> np.ndarray:
        if not self._trained:
            return super()._all_ids()
        lists = self._index.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(lists.nlist) if lists.list_size(i)]
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

    def _search_params(self, deny: Optional[np.ndarray], k: int) -> Optional[faiss.SearchParameters]:
        if not self._trained:
            return super()._search_params(deny, k)
        return faiss.SearchParametersIVF(nprobe=self.params.ivf_nprobe, sel=_deny_selector(deny))

    def scan_bytes(self) -> int:
        if not self._trained:
            return super().scan_bytes()
        ivf = self._index
        return int(ivf.ntotal) * min(ivf.nlist, self.params.ivf_nprobe) // ivf.nlist * self.dim * 4 + \
            _quantizer_scan(ivf.quantizer)  # the probed lists' codes, and the centroids compared to find them

    def _estimate(self) -> int:
        if not self._trained:
            return super()._estimate()
        return int(self._index.ntotal) * (self._index.code_size + 8) + _quantizer_bytes(self._index.quantizer)


QUANTIZER_GROUPS_MIN = 256  # ivfsq lists from which the centroids are grouped (see IVFSQIndex._coarse)


def _quantizer_scan(quantizer: faiss.Index) -> int:
    """`scan_bytes` of an IVF's coarse quantizer: every centroid, or the probed groups' and the groups' own."""
    q = faiss.downcast_index(quantizer)
    if isinstance(q, faiss.IndexIVF):
        return int(q.ntotal) * min(q.nlist, q.nprobe) // q.nlist * q.d * 4 + _quantizer_scan(q.quantizer)
    return int(q.ntotal) * q.d * 4


def _quantizer_bytes(quantizer: faiss.Index) -> int:
    """Memory of an IVF's coarse quantizer: flat centroids at their stored width (float16 since they are kept so,
    float32 in older snapshots), or grouped ones (an IVF of their own: codes, ids and the groups' centroids)."""
    q = faiss.downcast_index(quantizer)
    if isinstance(q, faiss.IndexIVF):
        return int(q.ntotal) * (q.code_size + 16) + _quantizer_bytes(q.quantizer)  # an id and a direct-map slot
    return int(q.ntotal) * q.sa_code_size()


def make_index(kind: str, dim: int, metric: str, params: IndexParams, dtype: str = "float32") -> _FaissIndex:
    if kind in ("flat", "two_stage"):
        return FlatIndex(dim, metric, params, dtype)
    if kind == "hnsw":
        return HNSWIndex(dim, metric, params)
    if kind == "ivfpq":
        return IVFPQIndex(dim, metric, params)
    if kind == "ivfsq":
        return IVFSQIndex(dim, metric, params)
    raise InvalidArgument(f"unknown index kind {kind!r}; expected flat, hnsw, ivfpq, ivfsq or two_stage")


def search_each(indexes: Sequence[_FaissIndex], queries: np.ndarray, k: int,
                deny: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What `indexes[i].search(queries[i:i+1], k, deny)` returns, for every i, as (scores, ids) `[n, k]`: the
    per-layer search of a space, in the calling thread. What the calls share is done once (the queries'
    preparation, the selector and parameters, the results' arrays and the score fix-up), and each index's faiss
    search writes its row of them: 30 `search` calls spent ~0.65 ms a query around faiss's own ~1.4 ms (ivfsq,
    30 x 1e4 x 1536). Indexes of different kinds, with tombstones, or of a kind with its own `search` (FlatIndex's
    device mirror) take `search` one by one."""
    first = indexes[0]
    if type(first).search is not _FaissIndex.search or any(type(ix) is not type(first) or ix._tombstones
                                                             for ix in indexes):
        found = [ix.search(queries[i][None, :], k, deny) for i, ix in enumerate(indexes)]
        return np.stack([f[0][0] for f in found]), np.stack([f[1][0] for f in found])
    _omp_threads(first.params.faiss_threads)
    q = prepare(queries, first.metric)
    if q.shape != (len(indexes), first.dim):
        raise InvalidArgument(f"{len(indexes)} indexes expect queries [{len(indexes)}, {first.dim}], got {list(q.shape)}")
    dist = np.full((len(indexes), k), -np.inf, np.float32)
    ids = np.full((len(indexes), k), -1, np.int64)
    # Parameters are shared by the indexes searched in turn with the same k and faiss structure (an IVF kind is
    # flat until it trains), unless an index's parameters are its own (IVF-PQ's translate `deny` into its positions).
    shared: dict[tuple, Optional[faiss.SearchParameters]] = {}
    for i, ix in enumerate(indexes):
        kk = min(k, int(ix._index.ntotal))
        if kk == 0:
            continue
        key = (kk, type(ix._index), None if ix.params_shared else i)
        if key not in shared:
            shared[key] = ix._search_params(deny, kk)
        ix._index.search_c(1, faiss.swig_ptr(q[i]), kk, faiss.swig_ptr(dist[i]), faiss.swig_ptr(ids[i]), shared[key])
    if first.metric == "l2":
        np.negative(dist, out=dist)
    dist[ids < 0] = -np.inf
    return dist, ids


def _empty(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)
