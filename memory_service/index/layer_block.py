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
a faiss IDSelector.

A large float32 inner-product block (ip or cosine, >= PREFILTER_MIN_BYTES) also keeps an int8 copy of its keys
(`Int8Copy`, +25% key RAM; IndexParams.flat_int8_prefilter) and answers most queries from it, exactly, reading a
quarter of the bytes: the copy's scan picks each layer's best candidates, `fvec_inner_products_by_idx` rescores
them from the float32 keys (faiss's fvec_inner_product, as the full scan's, so the scores are bit for bit the
same; tests/unit/test_int8_prefilter.py holds it to that), and an answer stands only where a bound proves that no
entry left out could rank in it - the k-th kept exact score beats the highest float32 score any of them could
have (the copy's own score plus the most int8 rounding can hide), and the top k + 1 hold no equal scores (which
of equal entries a scan keeps is up to faiss's heap). A query with any layer unproven takes the full float32
path, so answers are what they were, and misses back off (`prefilter_stats` counts both).

Snapshots are two parts, the IVF's faiss bytes and the entry ids by position (the int8 copy is rebuilt from
them); `load` also accepts the older per-layer format (one IndexIDMap2 of a flat or fp16 index per layer) and
converts it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

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
# The int8 prefilter (IndexParams.flat_int8_prefilter) is kept for float32 ip/cosine blocks of at least this many
# key bytes: below it the whole scan is a fraction of a millisecond and the copy would only cost RAM.
PREFILTER_MIN_BYTES = POOL_MIN_BYTES
# Candidates past k + len(deny) rescored per layer: the bound compares the k-th exact score with the next
# candidate's ceiling, so a few more give it room (48 of 48 queries proven at 1e3 and 4e3 entries of the baseline
# workload; near-duplicate keys, 64 to a scene, need ~16).
PREFILTER_MARGIN = 16
# ... and the scan keeps this many times that, rescored only for layers the first ones did not prove (random
# keys, whose best scores lie close together, need ~100 candidates of 1e3 at 1536 dims).
PREFILTER_WIDEN = 4
# After a miss that leaves the count at m (a miss adds one, a proven answer takes one off) the next 2^m - 1
# queries (at most this many) skip the copy: keys whose best scores lie closer together than the int8 error
# (random keys and queries) pay for a miss now and then only.
PREFILTER_BACKOFF_MAX = 64


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
    undoable = True  # removing the newest ids restores every list (see _FaissIndex.undoable); the int8 copy's
    # bound only loosens, so answers stay what they were

    def __init__(self, layers: int, dim: int, metric: str, params: IndexParams, dtype: str = "float32") -> None:
        self.layers = layers
        self.dim = dim
        self.metric = metric
        self.params = params
        self.dtype = dtype
        self._ivf = self._new_ivf()
        self._ids = np.zeros(0, np.int64)  # [n]: entry id at each position (every list's labels are positions)
        self._prefilter = params.flat_int8_prefilter and dtype == "float32" and metric != "l2"
        self._copy: Optional[Int8Copy] = None  # None below PREFILTER_MIN_BYTES, or with the prefilter off
        self.prefilter_stats = {"certified": 0, "fallback": 0}  # queries answered from the copy / by the full scan
        self._misses = self._skip = 0  # the backoff's miss count; queries left to send straight to the full scan

    def _new_ivf(self) -> faiss.IndexIVF:
        quantizer = faiss.IndexFlat(self.dim, _faiss_metric(self.metric))
        quantizer.add(np.zeros((self.layers, self.dim), np.float32))  # never consulted: lists are chosen by layer
        if self.dtype == "int8":  # the prefilter's copy: keys already scaled and rounded to integers
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.layers,
                                                faiss.ScalarQuantizer.QT_8bit_direct_signed,
                                                _faiss_metric(self.metric), False)
        elif self.dtype == "float16":
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.layers, faiss.ScalarQuantizer.QT_fp16,
                                                _faiss_metric(self.metric), False)
        else:
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.layers, _faiss_metric(self.metric))
        ivf.is_trained = True  # float32, fp16 and direct int8 codes need no training
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
        if self.dtype == "float32":  # a key's code is its float32 bytes: each layer's keys go to its list as they are
            self._append(ids, lambda layer: np.ascontiguousarray(x[:, layer]))
        else:  # fp16 codes: faiss's own encoder (its rounding is the format's)
            _omp_threads(self.params.faiss_threads)
            by_layer = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(-1, self.dim)  # [L * n, d], layer-major
            labels = np.tile(np.arange(len(self._ids), len(self._ids) + n, dtype=np.int64), self.layers)  # [L * n]
            assign = np.repeat(np.arange(self.layers, dtype=np.int64), n)  # [L * n]: layer l -> list l
            self._ivf.add_core(len(by_layer), faiss.swig_ptr(by_layer), faiss.swig_ptr(labels),
                               faiss.swig_ptr(assign))
            self._ids = np.concatenate([self._ids, ids])
        if self._copy is None or not self._copy.add(ids, x):  # none yet, or keys past its range
            self._rebuild_copy()

    def _append(self, ids: np.ndarray, codes_of: Callable[[int], np.ndarray]) -> None:
        """Append entries whose codes are ready: `codes_of(layer)` is that layer's `[n, code_size]` codes (any
        C-contiguous dtype of that many bytes a row). One add_entries per list - what add_core does per vector,
        without its encoder or OpenMP (a 64-entry put of 30 x 1536: ~1 ms against 3-13 for add_core)."""
        n = len(ids)
        labels = np.arange(len(self._ids), len(self._ids) + n, dtype=np.int64)
        lists = self._ivf.invlists
        for layer in range(self.layers):
            codes = codes_of(layer)
            assert codes.flags.c_contiguous and codes.nbytes == n * self._ivf.code_size
            raw = codes.reshape(-1).view(np.uint8)  # swig takes the codes as bytes
            lists.add_entries(layer, n, faiss.swig_ptr(labels), faiss.swig_ptr(raw))
        self._ivf.ntotal += n * self.layers
        self._ids = np.concatenate([self._ids, ids])

    def _rebuild_copy(self) -> None:
        """The int8 copy of every key, on a scale fitted to them, once the block is large enough for it to pay."""
        self._copy = None
        if self._prefilter and len(self) * self.layers * self._ivf.code_size >= PREFILTER_MIN_BYTES:
            self._copy = Int8Copy(self.layers, self.dim, self.params, self._ids, self._keys())

    def _layer_keys(self, layer: int) -> np.ndarray:
        """A float32 block's list `layer` in place: its `[n * d]` keys, a view of faiss's memory (valid until the
        list next changes)."""
        return faiss.rev_swig_ptr(self._ivf.invlists.get_codes(layer), len(self) * self._ivf.code_size).view(
            np.float32)

    def _keys(self) -> np.ndarray:
        """The float32 keys as stored, `[n, L, d]` (a copy, in position order)."""
        keys = np.empty((len(self), self.layers, self.dim), np.float32)
        for layer in range(self.layers):
            keys[:, layer] = self._layer_keys(layer).reshape(len(self), self.dim)
        return keys

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
        if self._copy is not None:
            self._copy.block.remove(ids)

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        """Entry ids in insertion order."""
        return self._ids.copy()

    def memory_bytes(self) -> int:
        own = len(self) * self.layers * (self._ivf.code_size + 8)
        return own + (self._copy.block.memory_bytes() if self._copy is not None else 0)

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
        kk = k + (0 if deny is None else len(deny)) + PREFILTER_MARGIN
        if self._copy is not None and (deny is None or len(deny) <= OVERFETCH_MAX_DENY) and 4 * kk <= n:
            if self._skip > 0:  # backing off: the last queries' keys defeated the bound
                self._skip -= 1
            else:
                found = self._prefiltered(q, k, kk, deny)
                if found is not None:
                    # one miss off, not all: keys proven one query in five still back off (random keys at 1e3
                    # paid 1.5x the full scan when each proof reset the count)
                    self._misses = max(0, self._misses - 1)
                    self.prefilter_stats["certified"] += 1
                    return found
                self._misses += 1
                self._skip = min(2 ** self._misses - 1, PREFILTER_BACKOFF_MAX)
                self.prefilter_stats["fallback"] += 1
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

    def _prefiltered(self, q: np.ndarray, k: int, kk: int, deny: Optional[np.ndarray]):
        """The exact answer from the int8 copy's top candidates per layer, rescored from the float32 keys, or None
        when some layer's answer is not proven (see the module docstring). The copy's scan keeps `wide` of them;
        the first `kk` are rescored, and the rest only for layers whose answer the first `kk` did not prove."""
        assert self._copy is not None
        n = len(self)
        wide = min(n // 2, PREFILTER_WIDEN * kk)
        pos, ceiling = self._copy.candidates(q, wide)  # ceiling[l, m]: above every entry the copy ranks >= m
        ids = self._ids[pos]  # [L, wide]
        exact = np.empty((self.layers, wide), np.float32)
        top = np.empty((self.layers, k), np.float32)
        top_ids = np.empty((self.layers, k), np.int64)
        todo, lo = np.arange(self.layers), 0
        for m in dict.fromkeys((kk, wide)):  # one stage when wide == kk
            for layer in todo.tolist():
                keys = self._layer_keys(layer)
                faiss.fvec_inner_products_by_idx(faiss.swig_ptr(exact[layer, lo:]), faiss.swig_ptr(q[layer]),
                                                 faiss.swig_ptr(keys), faiss.swig_ptr(pos[layer, lo:]), self.dim,
                                                 1, m - lo)
            got, got_ids = exact[todo, :m], ids[todo, :m]
            if deny is not None:
                got[(got_ids[:, :, None] == deny).any(-1) if len(deny) <= 16 else np.isin(got_ids, deny)] = -np.inf
            order = np.argsort(-got, axis=1, kind="stable")[:, :k + 1]  # k + 1 kept: kk >= k + len(deny) + 1
            best = np.take_along_axis(got, order, 1)
            # The k-th kept score must beat every entry not rescored, and no two of the top k + 1 be equal.
            ok = (best[:, k - 1] > ceiling[todo, m - 1]) & (best[:, :-1] > best[:, 1:]).all(axis=1)
            top[todo[ok]], top_ids[todo[ok]] = best[ok, :k], np.take_along_axis(got_ids, order, 1)[ok, :k]
            todo, lo = todo[~ok], m
            if len(todo) == 0:
                return top, top_ids
        return None

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
        n = len(self)
        knn = faiss.knn_L2sqr if self.metric == "l2" else faiss.knn_inner_product
        extra = (None, sel) if self.metric == "l2" else (sel,)  # knn_L2sqr takes the keys' norms first
        for layer in range(lo, hi):
            keys = self._layer_keys(layer)  # [n * d]
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
            self._rebuild_copy()
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
        self._ivf, self._ids, self._copy = self._new_ivf(), np.zeros(0, np.int64), None
        self._add_prepared(ids, keys)

    def tombstones(self) -> np.ndarray:
        return np.zeros(0, np.int64)


class Int8Copy:
    """A float32 block's keys as int8 (per-layer scale, rounded), in a LayerBlock of its own with the same
    positions, and the bound that says how far a float32 scan score can lie above what this copy scans.

    faiss's `QT_8bit_direct_signed` scan multiplies the codes by the query rounded to int8 too, so the query is
    scaled to [-127, 127] and rounded here first, and the scan is an exact integer dot product. For an entry x with
    dequantized copy x' (||x - x'|| <= R) and the rounded query q' (||q - q'|| = dq), the float32 scan's score
    fl(q.x) <= q'.x' + ||q|| R + dq (X + R) + gamma (||q|| X + ||q'|| (X + R)), with X the layer's largest key
    norm and gamma = 1.01 d 2^-24 the error of a float32 dot product of d terms (also covering a float kernel for
    the copy, or its integer score rounded to float32). R and X only grow (removals leave them), and 1% on top
    covers their own float32 rounding."""

    HEADROOM = 1.25  # the scale leaves room for keys this much larger than the largest seen ...
    REFIT = 2.0  # ... and a key past this many times it has the block rebuild the copy on a new scale

    def __init__(self, layers: int, dim: int, params: IndexParams, ids: np.ndarray, keys: np.ndarray) -> None:
        top = np.maximum(np.abs(keys).max(axis=(0, 2)), np.finfo(np.float32).tiny)  # [L]
        # [L]: code = rint(x * scale), computed in float32; held as float64 of the same values for the bound
        self.scale32 = (127.0 / (self.HEADROOM * top)).astype(np.float32)
        self.scale = self.scale32.astype(np.float64)
        self.limit = self.REFIT * top
        self.norms, self.err = np.zeros(layers), np.zeros(layers)  # [L]: X and R
        self.block = LayerBlock(layers, dim, "ip", params, "int8")
        self.gamma = 1.01 * dim * 2.0 ** -24
        self.add(ids, keys)

    def add(self, ids: np.ndarray, x: np.ndarray) -> bool:
        """Keys `[n, L, d]` in; False (nothing added) when one lies past the scale's range. In float32 scratch (a
        put's keys pass through here): float32's own rounding of x * scale and of the norms' sums is ~1e-5 of what
        they measure, well inside the bound's 1%."""
        n = len(ids)
        if n == 0:
            return True
        layers, dim = self.block.layers, self.block.dim
        codes = np.empty((layers, n, dim), np.uint8)  # [L, n, d]: faiss's direct signed codes, value + 128
        norms, err = np.empty(layers), np.empty(layers)
        scaled, rounded = np.empty((n, dim), np.float32), np.empty((n, dim), np.float32)
        for layer in range(layers):  # a layer at a time: its [n, d] stays in cache (half the time of whole passes)
            xl = x[:, layer]
            np.multiply(xl, self.scale32[layer], out=scaled)
            top = max(float(scaled.max()), -float(scaled.min()))
            if top > self.limit[layer] * self.scale[layer]:
                return False
            np.rint(scaled, out=rounded)
            if top > 127:
                np.clip(rounded, -127, 127, out=rounded)
            np.add(rounded, 128, out=codes[layer], casting="unsafe")  # exact: integers in [1, 255]
            np.subtract(scaled, rounded, out=scaled)  # the rounding error, in code units
            err[layer] = np.einsum("nd,nd->n", scaled, scaled).max()
            norms[layer] = np.einsum("nd,nd->n", xl, xl).max()
        self.norms = np.maximum(self.norms, np.sqrt(norms))
        self.err = np.maximum(self.err, np.sqrt(err) / self.scale)
        self.block._append(ids, codes.__getitem__)
        return True

    def candidates(self, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions `[L, kk]`, ceilings `[L, kk]` float64): each layer's top kk in the copy, best first, and for
        each m a score that no entry the copy ranks m-th or later (0-based) reaches in the float32 scan."""
        top = np.abs(q).max(axis=1).astype(np.float64)
        t = 127.0 / np.where(top > 0, top, 1.0)  # [L]: the query's own scale
        qi = np.rint(q * t[:, None])  # [L, d] integers in [-127, 127]
        scores, pos = self.block._scan_all(np.ascontiguousarray(qi, np.float32), kk, None)
        q_back = qi / t[:, None]
        qn, qbn = np.linalg.norm(q, axis=1), np.linalg.norm(q_back, axis=1)
        dq = np.linalg.norm(q - q_back, axis=1)
        x, r = self.norms, self.err
        slack = 1.01 * (qn * r + dq * (x + r) + self.gamma * (qn * x + qbn * (x + r)))
        return pos, scores / (self.scale * t)[:, None] + slack[:, None]


def _deserialize(data: bytes) -> faiss.Index:
    """faiss bytes -> the index as its own class, owning its C++ object (a downcast proxy does not, and the
    proxy deserialize_index returns frees the object when it is collected)."""
    raw = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    index = faiss.downcast_index(raw)
    if index is not raw:
        raw.this.disown()
        index.this.acquire()
    return index
