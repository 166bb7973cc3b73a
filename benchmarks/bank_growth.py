"""Bank growth: put rate, per-layer query latency, recall, memory and disk as a bank grows from 1e2 to 1e5 entries.

Each index kind gets its own real bank (`LocalMemory`, LMDB in a temp dir) with one MemFlow-shaped NAM key
space (per layer: 30 layers x 1536-d float32 by default) and a small KV payload (keys only beyond 1e4 entries,
so the full run fits the disk). The bank grows through N = 1e2, 1e3, 1e4 (--quick stops here), 1e5; at every
N one JSON row per index:

    put_per_s        entries per second over the growth step (validation, LMDB commit, index add; 64 per put)
    query_p50/p99_ms LocalMemory.query latency, `combine="per_layer"`, top-k per layer (p99 of --queries samples)
    query_again_p50/p99_ms  two_stage and ivfsq: the same queries once more, right after. Their exact rerank reads
                     candidates' keys from LMDB, and the first pass may have read them from disk (a bank whose keys
                     pass the page cache); this pass finds those pages cached. steps_again_p50_ms: its steps
    steps_p50_ms     the median of each step the query's trace names (search, load_keys, rerank, ...)
    gc_full          Python's full garbage collections during the timed queries of both passes, and the longest
                     (gc_full_max_ms): a query that met one waited for all of it, 0.3-1 us per object the
                     process's collector tracks (a bank holds one per entry)
    brute_p50_ms     numpy brute-force per-layer search over the same keys, each run right after the bank's
                     query (null where the keys do not fit in RAM)
    recall_at_k      mean over queries and layers of (returned ids that belong in the exact top-k) / k. An id
                     belongs when its exact float32 score reaches the true k-th score within float tolerance
                     (scores, never id identity: two keys whose scores tie to the last bits may come back in
                     either order). Flat rows must be 1.0 (checked)
    bound_ms         bytes an exact per-layer scan must read (N x layers x dim x key itemsize) / memcpy
                     bandwidth measured in this run (np.copyto, one thread): the floor for exact search on this
                     machine (a read-only scan on several threads can beat it: memcpy also writes each byte)
    rss_mb, disk_mb  process RSS growth since the bank was opened; LMDB file size. rss_anon_mb: the part not
                     backed by a file (indexes, heap) - the rest is LMDB's memory map, reclaimable page cache
                     (two-stage reranks read candidate keys through it); index_mb: the indexes' own estimate

Index kinds: flat (exact, float32 keys), flat_fp16 (KeySpace dtype float16), two_stage (HNSW over each
entry's mean-over-layers key, exact per-layer rerank of 256 candidates read from LMDB), ivfsq (per layer an IVF
over 4-bit codes in RAM with --ivf-nlist lists, --ivf-nprobe scanned, trained at 16 x nlist entries; each layer's
top k x --ivf-refine reranked exactly with that layer's key read from LMDB; keys stored in --ivf-dtype, float16
by default, as a 1e5 bank keeps them on disk (two_stage's in --two-stage-dtype, float32 by default: its reranks
read whole keys, whose widening from float16 cost more than reading twice the bytes); with 256 lists or more,
--ivf-quantizer-nprobe of sqrt(nlist) groups of centroids scanned, 4 by default, which the full form's 316 lists
use), hnsw and ivfpq (one ANN index per
layer; IVF-PQ is the exact warm-up buffer below `ivf_train_min`). A kind stops growing, with a JSON "skipped" line
saying why, when its next step would not fit in RAM or would take longer than the step budget (estimated from
the put rate of the second half of its last step; IVF-PQ from its training cost).

Keys are random with cluster structure (256 clusters): entry n in cluster c has key[l] = center[c, l] + unit
uniform noise, queries likewise, so ANN recall means something. Each layer ranks on its own (its centers and
noise are independent of the other layers'), which is what two-stage (one mean-over-layers first pass) must
survive: its recall is high while each layer's top-k lies inside the query's cluster and the cluster fits in
its 256 candidates (N ~ 1e4), and falls when the top-k spills into other clusters by per-layer chance (small
N: ~4 entries per cluster) or a cluster outgrows the candidates (past ~256 x 256 entries). Real NAM keys
decide which case holds; these rows show the mechanism, not MemFlow's recall.

    python benchmarks/bank_growth.py [--quick] [--dim 1536] [--layers 30] [--out benchmarks/results]

Writes OUT/bank_growth.jsonl (machine line first) and OUT/bank_growth.png.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, FullCollections, Results, memcpy_gbps, percentiles, progress  # noqa: E402

from memory_service import KeySpace, KVLayout, LocalMemory, NewEntry, StreamSpec  # noqa: E402
from memory_service.config import BankConfig, IndexParams  # noqa: E402

INT8_STD = 256 / 12**0.5  # standard deviation of uniform int8 values
KINDS = ("flat", "flat_fp16", "two_stage", "ivfsq", "hnsw", "ivfpq")
BATCH = 64  # entries per put (and per generated block)
KV_UNTIL = 10_000  # entries past this are keys only
# Measured on a 2-core box: IVF-PQ trains dim/4 sub-quantizers per layer, ~26 s per 1536-d layer at 2048
# vectors. Used only to decide whether the training step fits the budget.
IVFPQ_TRAIN_S_PER_DIM = 26.0 / 1536
HNSW_SLOWDOWN = 3.5  # put-rate drop of HNSW from the 1e3 step to the 1e4 step (measured at 30 x 1536)
# Two float32 dot products of the same vectors, summed in different orders (BLAS gemm here, faiss in the bank),
# differ by a few ulps of |q| |key|; 1e-5 of that bound is far above rounding and far below a real miss.
SCORE_RTOL = 1e-5
FULL = FullCollections()  # the garbage collector's full collections the timed queries met


class Data:
    """Deterministic keys: block b (entries b*BATCH ...) is regenerated bit for bit from (seed, b)."""

    def __init__(self, layers: int, dim: int, seed: int, clusters: int = 256, noise: float = 1.0) -> None:
        self.layers, self.dim, self.seed, self.noise = layers, dim, seed, noise
        rng = np.random.default_rng(seed)
        self.centers = rng.standard_normal((clusters, layers, dim), dtype=np.float32)  # [C, L, d]

    def block(self, b: int) -> np.ndarray:
        """Keys `[BATCH, L, d]` float32 of entries b*BATCH .. b*BATCH+BATCH-1."""
        rng = np.random.default_rng((self.seed, b))
        c = rng.integers(0, len(self.centers), BATCH)
        # Uniform noise from random bytes: 7x cheaper than normals, and what matters here is cluster structure.
        out = np.frombuffer(rng.bytes(BATCH * self.layers * self.dim), np.int8).astype(np.float32)
        out = out.reshape(BATCH, self.layers, self.dim)
        out *= self.noise / INT8_STD
        out += self.centers[c]
        return out

    def queries(self, q: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, 1 << 40))  # apart from every block
        c = rng.integers(0, len(self.centers), q)
        return (self.centers[c] + self.noise * rng.standard_normal((q, self.layers, self.dim))).astype(np.float32)


def pieces(i0: int, i1: int, cuts=()):
    """(block, lo, hi) pieces covering entries [i0, i1), split at block boundaries and at `cuts`."""
    bounds = sorted({i0, i1, *[c for c in cuts if i0 < c < i1], *range((i0 // BATCH + 1) * BATCH, i1, BATCH)})
    for a, b in zip(bounds, bounds[1:]):
        yield a // BATCH, a % BATCH, a % BATCH + (b - a)


class Truth:
    """Exact per-layer top-k at one N: ids `[Q, L, k]` and the k-th best score `[Q, L]` (float32)."""

    def __init__(self, ids: np.ndarray, scores: np.ndarray) -> None:
        self.ids = ids
        self.kth = scores.min(axis=2)


def ground_truth(data: Data, queries: np.ndarray, grid: list[int], k: int, keep_upto: int):
    """One pass over all keys: exact per-layer top-k at every N of the grid ({N: Truth}), and the keys
    `[L, keep_upto, d]` for timing brute force and scoring returned ids (float32 scores, as faiss computes them)."""
    q_n, layers, dim = queries.shape
    q_t = np.ascontiguousarray(queries.transpose(1, 2, 0))  # [L, d, Q]
    best_s = np.full((q_n, layers, k), -np.inf, np.float32)
    best_i = np.full((q_n, layers, k), -1, np.int64)
    kept = np.empty((layers, keep_upto, dim), np.float32) if keep_upto else None
    truth = {}
    cached = (-1, None)
    for b, lo, hi in progress(list(pieces(0, grid[-1], grid)), desc="ground truth", unit="blk", leave=False):
        if cached[0] != b:
            cached = (b, data.block(b))
        keys_t = np.ascontiguousarray(cached[1][lo:hi].transpose(1, 0, 2))  # [L, B, d]: one gemm per layer
        start, end = b * BATCH + lo, b * BATCH + hi
        ids = np.arange(start, end)
        scores = np.matmul(keys_t, q_t).transpose(2, 0, 1)  # [Q, L, B]
        s = np.concatenate([best_s, scores], axis=2)
        i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=2)
        top = np.argpartition(-s, k - 1, axis=2)[:, :, :k]
        best_s, best_i = np.take_along_axis(s, top, 2), np.take_along_axis(i, top, 2)
        if kept is not None and end <= keep_upto:
            kept[:, start:end] = keys_t
        if end in grid:
            truth[end] = Truth(best_i.copy(), best_s.copy())
    return truth, kept


def brute_s(kept: np.ndarray, n: int, q: np.ndarray, k: int) -> float:
    """Seconds of one numpy per-layer exact search over the first n entries (BLAS gemv + argpartition per layer)."""
    t = time.perf_counter()
    for layer in range(len(q)):
        s = kept[layer, :n] @ q[layer]
        np.argpartition(-s, k - 1)[:k]
    return time.perf_counter() - t


class Keys:
    """Float32 keys of any entry by id: from the truth pass's `kept` copy, else regenerated from its block."""

    def __init__(self, data: Data, kept) -> None:
        self.data, self.kept = data, kept
        self._blocks: dict[int, np.ndarray] = {}

    def key(self, entry: int, layer: int) -> np.ndarray:
        if self.kept is not None and entry < self.kept.shape[1]:
            return self.kept[layer, entry]
        b = entry // BATCH
        if b not in self._blocks:
            if len(self._blocks) > 256:  # ~24 MB per block at 30 x 1536: keep the cache bounded
                self._blocks.clear()
            self._blocks[b] = self.data.block(b)
        return self._blocks[b][entry % BATCH, layer]


def recall(ids: np.ndarray, exact_ids: np.ndarray, kth: np.ndarray, q: np.ndarray, keys: Keys) -> float:
    """Mean per-layer fraction of the k returned ids that belong in the exact top-k; ids, exact_ids `[L, k]`, kth
    `[L]`, q `[L, d]`. An id outside the exact set still belongs when its own exact score reaches the k-th best
    within SCORE_RTOL (a tie broken the other way); a repeated or missing (-1) id never does."""
    k = exact_ids.shape[1]
    fractions = []
    for layer, (got, exact) in enumerate(zip(ids, exact_ids)):
        exact_set = set(exact.tolist())
        right = 0
        for i in dict.fromkeys(got.tolist()):  # distinct, in order
            if i in exact_set:
                right += 1
            elif i >= 0:
                key = keys.key(i, layer)
                score = np.float32(key @ q[layer])
                tol = SCORE_RTOL * float(np.linalg.norm(key) * np.linalg.norm(q[layer]))
                right += bool(score >= kth[layer] - tol)
        fractions.append(right / k)
    return float(np.mean(fractions))


def spec(kind: str, layers: int, dim: int, stored_dtype: str = "float32") -> StreamSpec:
    """The stream of one kind's bank; `stored_dtype`: the stored keys of two_stage and ivfsq (--two-stage-dtype,
    --ivf-dtype)."""
    index = "flat" if kind == "flat_fp16" else kind
    dtype = "float16" if kind == "flat_fp16" else stored_dtype if kind in ("two_stage", "ivfsq") else "float32"
    kv = KVLayout(layers=layers, heads=1, head_dim=16, tokens_per_frame=4)  # 256 B per layer: "small"
    return StreamSpec("bench", {"nam": KeySpace(dim, per_layer=True, index=index, dtype=dtype)}, kv=kv)


def key_itemsize(kind: str, stored_dtype: str = "float32") -> int:
    """Bytes of a stored key value: flat_fp16 always half, two_stage and ivfsq as `stored_dtype` says."""
    return 2 if kind == "flat_fp16" or (kind in ("two_stage", "ivfsq") and stored_dtype == "float16") else 4


def index_bytes(kind: str, n: int, layers: int, dim: int, sq_bits: int = 4) -> int:
    """Memory a kind's indexes need at n entries (what decides whether the next step fits in RAM)."""
    if kind == "two_stage":
        return n * (dim * 4 + 32 * 8)
    if kind == "hnsw":
        return n * layers * (dim * 4 + 32 * 8)
    if kind == "ivfsq":  # codes and an id per layer (the flat warm-up buffer is gone by 1e4)
        return n * layers * (dim * sq_bits // 8 + 8)
    return n * layers * dim * key_itemsize(kind)


def skip_reason(kind, n, prev_n, rate, params, layers, dim, kept_bytes, budget_s, where,
                stored_dtype: str = "float32") -> str | None:
    disk_need = (n - prev_n) * layers * dim * key_itemsize(kind, stored_dtype) * 1.2  # LMDB pages: ~20% over the keys
    free = shutil.disk_usage(where).free
    if disk_need > free:
        return f"keys need ~{disk_need / 1e9:.1f} GB more disk at N={n}; {free / 1e9:.1f} GB free under {where}"
    avail = psutil.virtual_memory().available
    need, had = (index_bytes(kind, m, layers, dim, params.ivf_sq_bits) for m in (n, prev_n))
    if need > 0.7 * (avail + had):  # the bank's pages are reclaimable
        return f"indexes need ~{need / 1e9:.1f} GB at N={n}; {avail / 1e9:.1f} GB available (truth keys hold " \
               f"{kept_bytes / 1e9:.1f} GB)"
    if kind == "ivfpq" and prev_n < params.ivf_train_min <= n:
        est = layers * dim * IVFPQ_TRAIN_S_PER_DIM
        if est > budget_s:
            return f"IVF-PQ trains {layers} per-layer indexes of {dim // 4} sub-quantizers at " \
                   f"N={params.ivf_train_min}: ~{est:.0f} s on 2 cores, over the {budget_s:.0f} s step budget"
    if rate:
        # At the last step's put rate (its second half); HNSW inserts slow as the graph grows (1e3 -> 1e4 at 30 x
        # 1536 took 3.5x the estimate from the whole 1e3 step's rate), so its estimate carries that factor, which
        # errs long now that the rate is the second half's.
        slowdown = HNSW_SLOWDOWN if kind == "hnsw" else 1.0
        est = (n - prev_n) / rate * slowdown
        if est > budget_s:
            return f"growing {prev_n} -> {n} estimated {est:.0f} s (the last step's second half: {rate:.0f} puts/s" + \
                   (f", x{slowdown:g} for a larger graph" if slowdown != 1.0 else "") + \
                   f"), over the {budget_s:.0f} s step budget"
    return None


def run_kind(kind, args, data, queries, truth, kept, gbps, res, bar) -> None:
    # a CPU benchmark; faiss-gpu machines get their own rows later
    params = IndexParams(use_gpu=False, two_stage_candidates=args.two_stage_candidates, ivf_nlist=args.ivf_nlist,
                         ivf_nprobe=args.ivf_nprobe, ivf_refine=args.ivf_refine, ivf_sq_bits=args.ivf_sq_bits,
                         ivf_quantizer_nprobe=args.ivf_quantizer_nprobe,
                         ivf_train_min=16 * args.ivf_nlist) if kind == "ivfsq" else \
        IndexParams(use_gpu=False, two_stage_candidates=args.two_stage_candidates)
    proc = psutil.Process()
    kept_n = 0 if kept is None else kept.shape[1]
    with tempfile.TemporaryDirectory(prefix=f"bank_growth_{kind}_", dir=args.tmp) as tmp:
        release_memory()
        info0 = proc.memory_info()
        mem = LocalMemory(tmp, BankConfig(index=params, snapshot_on_close=False))
        stored = args.two_stage_dtype if kind == "two_stage" else args.ivf_dtype
        mem.create_stream(spec(kind, args.layers, args.dim, stored))
        kv_rng = np.random.default_rng(args.seed + 7)
        kv_shape = (args.layers, 2, 4, 1, 16)
        done, rate_next = 0, 0.0
        for n in args.grid:
            reason = skip_reason(kind, n, done, rate_next, params, args.layers, args.dim,
                                 0 if kept is None else kept.nbytes, args.step_budget_s, tmp, stored)
            if reason:
                res.skip(kind, n, reason)
                break
            t0 = time.perf_counter()
            half, t_half = (done + n) // 2, None
            for b, lo, hi in pieces(done, n, cuts=(half,)):
                if t_half is None and b * BATCH + lo >= half:
                    t_half = time.perf_counter()
                first = b * BATCH + lo
                # The truth pass kept these keys ([L, N, d]) when they fit: no second generation.
                keys = (kept[:, first:first + hi - lo].transpose(1, 0, 2) if first + hi - lo <= kept_n
                        else data.block(b)[lo:hi])
                kv = (kv_rng.standard_normal((hi - lo, *kv_shape), dtype=np.float32).astype(ml_dtypes.bfloat16)
                      if first < KV_UNTIL else [None] * (hi - lo))
                mem.put("bench", [NewEntry(first + j, (first + j) // 3, "p", {"nam": keys[j]}, kv[j])
                                  for j in range(hi - lo)])
                bar.update(hi - lo)
            t_end = time.perf_counter()
            put_rate = (n - done) / (t_end - t0)
            # The next step's estimate: the second half's rate. The first half may hold a one-off (IVF training)
            # and the K/V payloads stop at KV_UNTIL; the second half is nearer what the next step does.
            rate_next = (n - half) / (t_end - t_half)
            done = n
            FULL.reset()
            p50, p99, rec, brute, where = timed_queries(mem, queries, truth[n], args.k, kept if n <= kept_n else None, n,
                                                 Keys(data, kept))
            if kind == "flat" and rec != 1.0:
                raise SystemExit(f"flat index disagrees with brute force at N={n}: recall {rec}")
            scan = n * args.layers * args.dim * key_itemsize(kind)
            row = dict(n=n, index=kind, put_per_s=put_rate, query_p50_ms=p50, query_p99_ms=p99,
                       brute_p50_ms=brute, recall_at_k=rec, k=args.k, bound_ms=scan / (gbps * 1e9) * 1e3,
                       scan_mb=scan / 1e6, **rss_growth(proc, info0),
                       index_mb=mem.bank._streams["bench"].spaces["nam"].memory_bytes() / 1e6,
                       disk_mb=mem.stats().disk_bytes / 1e6,
                       layers=args.layers, dim=args.dim, queries=len(queries), steps_p50_ms=where)
            if kind in ("two_stage", "ivfsq"):  # their rerank reads keys from LMDB: once more, those pages cached
                row["query_again_p50_ms"], row["query_again_p99_ms"], row["steps_again_p50_ms"] = timed_again(
                    mem, queries, args.k)
            row.update(gc_full=FULL.count, gc_full_max_ms=FULL.max_ms)  # in the timed queries of both passes
            if kind == "flat":
                row["recall_checked"] = True
            if kind in ("ivfpq", "ivfsq"):
                row["trained"] = n >= params.ivf_train_min
            if kind == "ivfsq":
                row.update(ivf_nlist=params.ivf_nlist, ivf_nprobe=params.ivf_nprobe, ivf_refine=params.ivf_refine,
                           ivf_sq_bits=params.ivf_sq_bits, ivf_quantizer_nprobe=params.ivf_quantizer_nprobe)
            res.add(**row)
        mem.close()
        del mem
    release_memory()


def release_memory() -> None:
    """Free what the previous bank left (Python garbage, glibc's free lists) so RSS deltas are the bank's own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: deltas are noisier, nothing else changes
        pass


def rss_growth(proc: psutil.Process, info0) -> dict:
    info = proc.memory_info()
    anon = (info.rss - info.shared) - (info0.rss - info0.shared)  # Linux: shared = file-backed resident pages
    return {"rss_mb": (info.rss - info0.rss) / 1e6, "rss_anon_mb": anon / 1e6}


def run_queries(mem: LocalMemory, queries: np.ndarray, k: int, after=None):
    """(times in s, median ms of each traced step, ids of each answer) of the queries run one after another, with
    `after(q)` (if given) run right after each one, untimed. FULL counts the full collections they met."""
    times, steps, answers = [], {}, []
    for q in queries:
        with FULL:  # the query alone: a collection in `after` is not one a query met
            t = time.perf_counter()
            r = mem.query("bench", "nam", q, k)
            times.append(time.perf_counter() - t)
        for name, ms in r.trace.steps:
            steps.setdefault(name, []).append(ms)
        answers.append(r.ids)
        if after is not None:
            after(q)
    return times, {name: round(float(np.median(ms)), 3) for name, ms in steps.items()}, answers


def timed_again(mem: LocalMemory, queries: np.ndarray, k: int):
    """(p50 ms, p99 ms, median of each traced step) of the queries run back to back, nothing between them."""
    times, where, _ = run_queries(mem, queries, k)
    return (*percentiles(times), where)


def timed_queries(mem: LocalMemory, queries: np.ndarray, truth: Truth, k: int, kept, n: int, keys: Keys):
    """(p50 ms, p99 ms, recall, brute p50 ms or None) of per-layer queries through the bank against `truth`.

    Each bank query is followed by the same query as numpy brute force over `kept`, so both see the same
    machine (on a shared box a baseline timed minutes apart measures someone else's load). Recall is checked after
    the timed queries: past `kept` it regenerates the returned entries' key blocks (24 MB each), which between
    queries evicted the caches the next one found (at 1e5, ivfsq: a first-pass p99 of 20-37 ms against 10 warm)."""
    for q in queries[:2]:  # warm: thread pool, page faults
        mem.query("bench", "nam", q, k)
    brute: list[float] = []
    times, where, answers = run_queries(mem, queries, k,
                                        None if kept is None else lambda q: brute.append(brute_s(kept, n, q, k)))
    recalls = [recall(ids, exact, kth, q, keys) for ids, q, exact, kth in zip(answers, queries, truth.ids, truth.kth)]
    p50, p99 = percentiles(times)
    return p50, p99, float(np.mean(recalls)), (percentiles(brute)[0] if brute else None), where


class Growth(Results):
    def skip(self, kind: str, n: int, reason: str) -> None:
        self.add(n=n, index=kind, skipped=reason)


def first_k(rows: list[dict]):
    return rows[0]["k"] if rows else "k"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows if "query_p50_ms" in r]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [3, 3, 2]})
    colors = dict(zip(KINDS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for kind in KINDS:
        rs = sorted((r for r in data if r["index"] == kind), key=lambda r: r["n"])
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        ax1.plot(ns, [r["query_p50_ms"] for r in rs], "o-", color=colors[kind], label=f"{kind} p50")
        ax1.plot(ns, [r["query_p99_ms"] for r in rs], "x--", color=colors[kind], alpha=0.6, label=f"{kind} p99")
        ax2.plot(ns, [r["rss_anon_mb"] for r in rs], "o-", color=colors[kind], label=f"{kind} anon RSS")
        ax2.plot(ns, [r["disk_mb"] for r in rs], "s:", color=colors[kind], label=f"{kind} disk")
        ax3.plot(ns, [r["recall_at_k"] for r in rs], "o-", color=colors[kind], label=kind)
    exact = sorted({(r["n"], r["bound_ms"]) for r in data if r["index"] == "flat"})
    if exact:
        ax1.plot(*zip(*exact), "k:", lw=2, label="bound: fp32 scan / memcpy")
    by_n: dict[int, list[float]] = {}
    for r in data:
        if r.get("brute_p50_ms") is not None:
            by_n.setdefault(r["n"], []).append(r["brute_p50_ms"])
    brute = sorted((n, float(np.median(v))) for n, v in by_n.items())  # one per kind, measured beside it
    if brute:
        ax1.plot(*zip(*brute), "-", color="gray", lw=3, alpha=0.5, label="numpy brute force p50")
    for ax, title, unit in ((ax1, "per-layer query latency", "ms"),
                            (ax2, "bank memory (RSS not file-backed) and LMDB disk", "MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("entries (N)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    ax3.set_xscale("log")
    ax3.set_ylim(0, 1.05)
    ax3.set_xlabel("entries (N)")
    ax3.set_title(f"recall@{first_k(data)} vs exact per-layer")
    ax3.grid(True, which="both", alpha=0.3)
    ax3.legend(fontsize=7)
    first = data[0] if data else {}
    fig.suptitle(f"bank growth: {first.get('layers')} layers x {first.get('dim')}-d keys, k={first.get('k')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="up to 1e4 entries, tight step budget (< 2 min, 2 cores)")
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--queries", type=int, default=0, help="queries per point (default 20 quick, 50 full)")
    ap.add_argument("--indexes", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    ap.add_argument("--max-n", type=int, default=0, help="largest N (default 1e4 quick, 1e5 full)")
    ap.add_argument("--step-budget-s", type=float, default=0.0, help="skip a growth step estimated longer "
                    "(default 40 quick, 90 full; e.g. 1200 to grow the ANN kinds to 1e4 at full shape)")
    ap.add_argument("--two-stage-candidates", type=int, default=IndexParams().two_stage_candidates,
                    help="first-pass candidates of the two_stage kind (at least 16 x k are taken)")
    ap.add_argument("--two-stage-dtype", default="float32", choices=("float32", "float16"),
                    help="stored key dtype of the two_stage kind (float16: half the disk, but its whole-key reranks "
                    "then widen 256 keys a query)")
    ap.add_argument("--ivf-dtype", default="float16", choices=("float32", "float16"),
                    help="stored key dtype of the ivfsq kind (float16, the default: half the disk and rerank reads of "
                    "float32; at 1e5, 9.2 GB against 18.4)")
    ap.add_argument("--ivf-nlist", type=int, default=0, help="IVF lists of the ivfsq kind (default: sqrt of the "
                    "largest N)")
    ap.add_argument("--ivf-nprobe", type=int, default=2, help="IVF lists the ivfsq kind scans per layer")
    ap.add_argument("--ivf-sq-bits", type=int, default=4, choices=(4, 8), help="code bits a dimension, ivfsq kind")
    ap.add_argument("--ivf-refine", type=int, default=4, help="the ivfsq kind reranks k x this many candidates a layer")
    ap.add_argument("--ivf-quantizer-nprobe", type=int, default=4,
                    help="ivfsq with 256 lists or more: scan this many of sqrt(nlist) groups of centroids (0: all; "
                    "IndexParams' default is 0, for small clusters probed widely: see README)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tmp", default=None, help="where the banks live (default: the system temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    kinds = [k.strip() for k in args.indexes.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown index kinds {sorted(unknown)}; expected some of {KINDS}")
    max_n = args.max_n or (10_000 if args.quick else 100_000)
    args.grid = [n for n in (100, 1_000, 10_000, 100_000) if n <= max_n]
    args.step_budget_s = args.step_budget_s or (40.0 if args.quick else 90.0)
    args.ivf_nlist = args.ivf_nlist or int(round(max_n ** 0.5))
    q_count = args.queries or (20 if args.quick else 50)

    t_start = time.perf_counter()
    res = Growth("bank_growth", args.out)
    gbps = memcpy_gbps(256 << 20)
    # Timings on a shared box mean little without the load they were taken under.
    res.header.update(memcpy_gbps=round(gbps, 2), grid=args.grid, loadavg_start=os.getloadavg()[0],
                      two_stage_candidates=args.two_stage_candidates, two_stage_dtype=args.two_stage_dtype,
                      ivf_dtype=args.ivf_dtype)
    data = Data(args.layers, args.dim, args.seed)
    queries = data.queries(q_count)
    per_entry = args.layers * args.dim * 4
    keep = max([n for n in args.grid if n * per_entry < 0.25 * psutil.virtual_memory().available], default=0)
    truth, kept = ground_truth(data, queries, args.grid, args.k, keep)
    for n in args.grid:
        if n > keep:
            res.skip("brute_force", n, f"{n * per_entry / 1e9:.1f} GB of keys do not fit in a quarter of RAM; "
                                       "recall still uses exact top-k computed while generating")
    for kind in kinds:
        with progress(total=args.grid[-1], desc=kind, unit="entry", leave=False) as bar:
            run_kind(kind, args, data, queries, truth, kept, gbps, res, bar)
    res.header["loadavg_end"] = os.getloadavg()[0]
    path = res.close()
    plot(res.rows, path.with_suffix(".png"))
    print(json.dumps({"done_s": round(time.perf_counter() - t_start, 1), "results": str(path)}), file=sys.stderr)


if __name__ == "__main__":
    main()
