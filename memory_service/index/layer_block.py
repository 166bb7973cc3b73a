"""LayerBlock: every layer's keys of one flat per-layer key space, searched by one batched call.

Owns the layout of exact per-layer search on the CPU. A per-layer space holds the same entries in every layer,
so the block is one faiss IndexIVF with one inverted list per layer (`IndexIVFFlat` for float32 keys,
`IndexIVFScalarQuantizer` fp16 for float16 keys, the same codec as FlatIndex's fp16): list `l` holds layer
`l`'s key of every entry, in insertion order, labelled by its position (as IndexIDMap2 over IndexFlat labels
them; positions go through faiss's heaps, so equal scores order exactly as they did per layer), and a query of `[L, d]` is one `search_preassigned` that sends
layer `l`'s query to list `l` only (nprobe 1). That is L exact flat scans in one C++ call - no Python, no
id map, no selector set-up per layer. A large scan (>= POOL_MIN_BYTES) is split into a few groups of layers
per core on the search pool, so it runs at the machine's memory bandwidth; float32 groups scan each list in
place with IndexFlat's own kernel (benchmarks/layer_scan.py measures all of it against the per-layer path
and a bandwidth floor, in the same run).

Promises, the same as L FlatIndexes under the VectorIndex contract (tests/unit/test_index_contract.py):
exact top-k per layer, best first, higher = better (negated squared distance for l2, unit-norm for cosine);
missing slots id -1 / score -inf; `deny` ids never returned; removed ids never returned. Removal keeps the
insertion order of every list (as IndexFlat's does), so equal scores resolve as they did per layer: the entry
added first enters the top-k first. A small deny list (the local window) is handled by fetching `k + len(deny)` and dropping
the denied ids, which is exact for a flat scan and keeps faiss's selector-free scan loop; a large one becomes
a faiss IDSelector. Snapshots are two parts, the IVF's faiss bytes and the entry ids by position; `load` also accepts the older per-layer format (one
IndexIDMap2 of a flat or fp16 index per layer) and converts it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import faiss
import numpy as np

from memory_service.config import IndexParams
from memory_service.errors import InvalidArgument
from memory_service.index.vector_index import (
    _deny_selector,
    _empty,
    _faiss_metric,
    _omp_threads,
    prepare,
)

# A scan of at least this many key bytes is split over the search pool. Below it one call in the caller's
# thread is cheaper than a hand-off (30 x 1536 fp32 at 10 entries, 1.8 MB: ~0.06 ms for the whole query).
POOL_MIN_BYTES = 16 << 20
# Deny lists up to this long are over-fetched and filtered; longer ones use a faiss selector (its per-vector
# check nearly doubled an fp16 scan: 41 vs 74 ms at 30 x 1e4 x 1536).
OVERFETCH_MAX_DENY = 256

_POOL: Optional[ThreadPoolExecutor] = None
TASKS_PER_CORE = 4
# Scans below this many key bytes take one group per core, the caller scanning the first: each hand-off costs
# more than a slow core's share (30 x 1e3 x 1536 fp32, 184 MB: 5.07 vs 5.63 ms with 4 per core, against 4.56 ms
# for the hand-built pool). Kept well under what was measured for 4 per core (30 x 1e4 x 1536, fp32 1.8 GB, fp16
# 0.9 GB), which still take that path.
SPLIT_MIN_BYTES = 256 << 20
CORES = os.cpu_count() or 2  # read once: os.cpu_count() cost ~20 us per call here


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if ids.shape[1] < k:
        pad_s, pad_i = _empty(len(ids), k - ids.shape[1])
        scores, ids = np.hstack([scores, pad_s]), np.hstack([ids, pad_i])
    return scores, ids


def search_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=CORES, thread_name_prefix="memflow-search")
    return _POOL


class LayerBlock:
    def __init__(self, layers: int, dim: int, metric: str, params: IndexParams, dtype: str = "float32") -> None:
        self.layers = layers
        self.dim = dim
        self.metric = metric
        self.params = params
        self.dtype = dtype
        self._ivf = self._new_ivf()
        self._ids = np.zeros(0, np.int64)  # [n]: entry id at each position (every list's labels are positions)

    def _new_ivf(self) -> faiss.IndexIVF:
        quantizer = faiss.IndexFlat(self.dim, _faiss_metric(self.metric))
        quantizer.add(np.zeros((self.layers, self.dim), np.float32))  # never consulted: lists are chosen by layer
        if self.dtype == "float16":
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.layers, faiss.ScalarQuantizer.QT_fp16,
                                                _faiss_metric(self.metric), False)
        else:
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.layers, _faiss_metric(self.metric))
        ivf.is_trained = True  # float32 and fp16 codes need no training
        ivf.nprobe = 1
        ivf.own_fields = True
        quantizer.this.disown()
        return ivf

    # -- mutation --------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """`keys` `[n, L, d]`; every layer's list gets the same ids, appended in the order given."""
        x = prepare(keys, self.metric)
        if x.ndim != 3 or x.shape[1:] != (self.layers, self.dim):
            raise InvalidArgument(f"index expects keys [n, {self.layers}, {self.dim}], got {list(x.shape)}")
        self._add_prepared(np.ascontiguousarray(ids, dtype=np.int64), x)

    def _add_prepared(self, ids: np.ndarray, x: np.ndarray) -> None:
        n = len(ids)
        if n == 0:
            return
        _omp_threads(self.params.faiss_threads)
        by_layer = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(-1, self.dim)  # [L * n, d], layer-major
        labels = np.tile(np.arange(len(self._ids), len(self._ids) + n, dtype=np.int64), self.layers)  # [L * n]
        assign = np.repeat(np.arange(self.layers, dtype=np.int64), n)  # [L * n]: layer l -> list l
        self._ivf.add_core(len(by_layer), faiss.swig_ptr(by_layer), faiss.swig_ptr(labels), faiss.swig_ptr(assign))
        self._ids = np.concatenate([self._ids, ids])

    def remove(self, ids: np.ndarray) -> None:
        """Order-preserving compaction of every list (the cost of IndexFlat.remove_ids on each layer)."""
        have = self._ids
        gone = np.isin(have, np.asarray(ids, np.int64))
        if not gone.any():
            return
        keep = np.flatnonzero(~gone)
        first = int(np.argmax(gone))  # rows before the first removed one stay where they are
        tail = keep[keep > first]
        size, code = len(have), self._ivf.code_size
        lists = self._ivf.invlists
        for layer in range(self.layers):
            codes = faiss.rev_swig_ptr(lists.get_codes(layer), size * code).reshape(size, code)
            codes[first:first + len(tail)] = codes[tail]
            faiss.rev_swig_ptr(lists.get_ids(layer), size)[first:len(keep)] = np.arange(first, len(keep))
            lists.resize(layer, len(keep))
        self._ivf.ntotal = len(keep) * self.layers
        self._ids = have[keep]

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        """Entry ids in insertion order."""
        return self._ids.copy()

    def memory_bytes(self) -> int:
        return len(self) * self.layers * (self._ivf.code_size + 8)

    # -- search ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, deny: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """queries `[L, d]` -> (scores `[L, k]` float32, ids `[L, k]` int64): layer l's top-k for query l."""
        q = prepare(queries, self.metric)
        if q.shape != (self.layers, self.dim):
            raise InvalidArgument(f"index expects queries [{self.layers}, {self.dim}], got {list(q.shape)}")
        n = len(self)
        if n == 0:
            return _empty(self.layers, k)
        deny = None if deny is None or len(deny) == 0 else np.asarray(deny, np.int64)
        if deny is not None and len(deny) <= OVERFETCH_MAX_DENY:
            # One more than the deny list can take away: the k-th kept entry is never the last fetched, so an equal
            # score past the fetch shows as an equal last fetched score.
            scores, pos = self._scan_all(q, min(k + len(deny) + 1, n), None)
            found = self._drop_denied(scores, pos, deny, k, n)
            if found is not None:
                return found
        sel = None
        if deny is not None:
            sel = _deny_selector(np.flatnonzero(np.isin(self._ids, deny)))  # positions, as the lists label them
        scores, pos = self._scan_all(q, min(k, n), sel)
        return _pad(scores, np.where(pos < 0, -1, self._ids[np.maximum(pos, 0)]), k)

    def _scan_all(self, q: np.ndarray, k: int, sel) -> tuple[np.ndarray, np.ndarray]:
        """(scores `[L, k]`, positions `[L, k]`; -inf / -1 where a layer ran out) in one call, or one per core."""
        dist = np.empty((self.layers, k), np.float32)
        pos = np.empty((self.layers, k), np.int64)
        workers = min(CORES, self.layers)
        total = len(self) * self.layers * self._ivf.code_size
        if total >= POOL_MIN_BYTES:
            scan = self._scan_flat if self.dtype == "float32" else self._scan
            # Several groups per core, taken as cores free up: on a shared machine one core is often slower,
            # and a fixed half of the layers per core then waits on it (measured 87 vs 70 ms, 30 x 1e4 x 1536).
            groups = min(self.layers, (TASKS_PER_CORE if total >= SPLIT_MIN_BYTES else 1) * workers)
            bounds = np.linspace(0, self.layers, groups + 1).astype(int)
            spans = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
            if workers > 1 and total < SPLIT_MIN_BYTES:
                # One group per core: the caller scans the first itself instead of waiting on the pool (one
                # hand-off and one wake-up fewer, and the caller's caches are warm for what follows).
                rest = [search_pool().submit(scan, q, k, sel, dist, pos, *span) for span in spans[1:]]
                try:
                    scan(q, k, sel, dist, pos, *spans[0])
                finally:
                    for f in rest:
                        f.result()
            elif workers > 1:
                list(search_pool().map(lambda span: scan(q, k, sel, dist, pos, *span), spans))
            else:
                scan(q, k, sel, dist, pos, 0, self.layers)
        else:
            self._scan(q, k, sel, dist, pos, 0, self.layers)
        scores = -dist if self.metric == "l2" else dist
        scores[pos < 0] = -np.inf
        return scores, pos

    def _drop_denied(self, scores, pos, deny, k: int, n: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The top k of over-fetched rows once `deny` is dropped - what a selector-filtered scan returns - or None
        when equal scores straddle the k-th kept slot: which of the equals a filtered scan keeps is up to faiss's
        heap, so the caller runs that scan (exact ties happen only between identical keys)."""
        # As few numpy calls as will do: after a scan of the whole block every call starts from cold caches
        # (this step cost ~190 us with take_along_axis, 30 x 1e3 x 1536).
        full = pos.min() >= 0  # an unfiltered scan of n >= kk vectors fills every slot
        ids = self._ids[pos] if full else np.where(pos < 0, -1, self._ids[np.maximum(pos, 0)])
        hit = (ids[:, :, None] == deny).any(-1) if len(deny) <= 16 else np.isin(ids, deny)  # [L, kk]
        if not hit.any():  # nothing denied came back (the window ranked low): the fetch is the answer
            kept_s, kept_i = scores, ids
        else:
            dropped = hit if full else (pos < 0) | hit
            order = np.argsort(dropped, axis=1, kind="stable")  # kept first, in faiss's rank order
            rows = np.arange(len(order))[:, None]
            kept_s, kept_i, gone = scores[rows, order], ids[rows, order], dropped[rows, order]
            kept_s[gone], kept_i[gone] = -np.inf, -1
        if scores.shape[1] > k:
            last = kept_s[:, k - 1]
            tied = kept_s[:, k] == last
            if scores.shape[1] < n:  # entries past the fetch may tie the k-th kept score too
                tied |= scores[:, -1] == last
            if (tied & np.isfinite(last)).any():
                return None
        return _pad(np.ascontiguousarray(kept_s[:, :k]), np.ascontiguousarray(kept_i[:, :k]), k)

    def _scan(self, q: np.ndarray, k: int, sel, dist: np.ndarray, ids: np.ndarray, lo: int, hi: int) -> None:
        """Layers [lo, hi): rows lo..hi of `q`, `dist` and `ids` are contiguous, so faiss writes them in place."""
        _omp_threads(self.params.faiss_threads)
        assign = np.arange(lo, hi, dtype=np.int64)[:, None]  # [m, 1]: query row -> its layer's list
        coarse = np.zeros((hi - lo, 1), np.float32)
        params = faiss.SearchParametersIVF(sel=sel, nprobe=1) if sel is not None else None
        self._ivf.search_preassigned_c(hi - lo, faiss.swig_ptr(q[lo:hi]), k, faiss.swig_ptr(assign),
                                       faiss.swig_ptr(coarse), faiss.swig_ptr(dist[lo:hi]),
                                       faiss.swig_ptr(ids[lo:hi]), False, params)

    def _scan_flat(self, q: np.ndarray, k: int, sel, dist: np.ndarray, pos: np.ndarray, lo: int, hi: int) -> None:
        """Layers [lo, hi) of a float32 block, each list scanned in place by the kernel IndexFlat itself uses
        (knn_inner_product / knn_L2sqr over the list's codes, which are the [n, d] float32 keys), so a large scan
        scores bit for bit as the per-layer FlatIndexes did, and never slower than the IVF list scanner (one
        vector at a time: 1.16 vs 1.10 x the read floor, best of 40, 8 x 1e4 x 1536 on one core). A few
        microseconds of Python per layer, against a scan of at least half a megabyte per layer."""
        _omp_threads(self.params.faiss_threads)
        n, lists = len(self), self._ivf.invlists
        knn = faiss.knn_L2sqr if self.metric == "l2" else faiss.knn_inner_product
        extra = (None, sel) if self.metric == "l2" else (sel,)  # knn_L2sqr takes the keys' norms first
        for layer in range(lo, hi):
            keys = faiss.rev_swig_ptr(lists.get_codes(layer), n * self._ivf.code_size).view(np.float32)  # [n * d]
            knn(faiss.swig_ptr(q[layer]), faiss.swig_ptr(keys), self.dim, 1, n, k, faiss.swig_ptr(dist[layer]),
                faiss.swig_ptr(pos[layer]), *extra)

    # -- snapshots -------------------------------------------------------------------------------
    def dump(self) -> list[tuple[bytes, np.ndarray]]:
        none = np.zeros(0, np.int64)
        return [(faiss.serialize_index(self._ivf).tobytes(), none), (self._ids.astype("<i8").tobytes(), none)]

    def load(self, parts: list[tuple[bytes, np.ndarray]]) -> None:
        """Either this block's own dump (the IVF, then the ids) or the per-layer format (one IndexIDMap2 per layer)."""
        first = _deserialize(parts[0][0])
        if isinstance(first, faiss.IndexIVF):
            ivf = first
            if len(parts) != 2:
                raise InvalidArgument(f"a block snapshot has 2 parts (index, ids), got {len(parts)}")
            if (ivf.nlist, ivf.d, ivf.metric_type) != (self.layers, self.dim, _faiss_metric(self.metric)) or \
                    ivf.code_size != (self.dim * (2 if self.dtype == "float16" else 4)):
                raise InvalidArgument(f"snapshot holds an IVF of {ivf.nlist} lists x {ivf.d} dims (code "
                                      f"{ivf.code_size} bytes); expected {self.layers} x {self.dim} {self.dtype}")
            ids = np.frombuffer(parts[1][0], "<i8").astype(np.int64)
            sizes = {ivf.invlists.list_size(layer) for layer in range(self.layers)}
            if sizes != {len(ids)}:
                raise InvalidArgument(f"snapshot layers hold {sorted(sizes)} entries; its id list {len(ids)}")
            ivf.nprobe = 1
            self._ivf, self._ids = ivf, ids
            return
        indexes = [first] + [_deserialize(data) for data, _ in parts[1:]]
        if len(indexes) != self.layers or not all(isinstance(ix, faiss.IndexIDMap2) for ix in indexes):
            raise InvalidArgument(f"snapshot holds {len(indexes)} indexes; expected one block or {self.layers} "
                                  f"per-layer flat indexes")
        ids = faiss.vector_to_array(indexes[0].id_map).astype(np.int64)
        keys = np.empty((len(ids), self.layers, self.dim), np.float32)  # [n, L, d], already metric-prepared
        for layer, ix in enumerate(indexes):
            if ix.d != self.dim or not np.array_equal(faiss.vector_to_array(ix.id_map), ids):
                raise InvalidArgument(f"per-layer snapshot layer {layer} disagrees with layer 0 (dim or ids)")
            if len(ids):
                keys[:, layer] = ix.index.reconstruct_n(0, len(ids))
        self._ivf, self._ids = self._new_ivf(), np.zeros(0, np.int64)
        self._add_prepared(ids, keys)

    def tombstones(self) -> np.ndarray:
        return np.zeros(0, np.int64)


def _deserialize(data: bytes) -> faiss.Index:
    """faiss bytes -> the index as its own class, owning its C++ object (a downcast proxy does not, and the
    proxy deserialize_index returns frees the object when it is collected)."""
    raw = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    index = faiss.downcast_index(raw)
    if index is not raw:
        raw.this.disown()
        index.this.acquire()
    return index
