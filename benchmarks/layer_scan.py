"""Layer scan: one batched search over all layers of a flat per-layer key space, against the per-layer path and
the memory-bandwidth floor, all measured in the same run.

MemFlow's NAM query ranks a bank's frames per layer: L exact scans of N x d keys. For 30 layers x 1536-d keys at
N = 10, 1e3, 1e4 entries, float32 and float16 keys, k = 3 per layer, with and without a small deny list (the local
window), one JSON row per (dtype, N, deny):

    batched_p50/p99_ms  SpaceIndex.search, combine="per_layer": the LayerBlock (one faiss call, or one per core)
    per_layer_p50_ms    the same keys as L FlatIndexes searched one layer at a time (the layout before LayerBlock:
                        serially below 4e6 floats per layer, on the search pool above)
    numpy_p50_ms        float32 only: np.matmul over the keys as one [L, N, d] array plus np.argpartition (timed
                        apart from the rest: OpenBLAS's threads spin after each call and slowed what came next)
    floor_ms            the fastest read of the block's own key bytes: a numpy sum over them (as uint64 words) in
                        one thread, or split over one thread per core, the better p50 of the two - no scan can
                        read them faster. Every variant is sampled in turn, one round at a time, so the load of
                        other processes on a shared machine falls on all of them alike
    vs_per_layer        per_layer_p50_ms / batched_p50_ms;  over_floor: batched_p50_ms / floor_ms
    identical           the batched and per-layer answers have equal ids and scores on every query
    int8_p50/p99_ms     float32 only: the same block answering through its int8 prefilter (IndexParams.
                        flat_int8_prefilter, on by default; `batched` is the full float32 scan beside it), with
                        int8_proven the share of its queries the copy answered (the rest took the full scan, or
                        skipped the copy while backing off), int8_vs_batched = batched_p50_ms / int8_p50_ms, and
                        int8_identical its answers against the full scan's on every query
    keys                random (standard normal keys and queries: close best scores, the prefilter's hard case),
                        or scenes (float32, n >= 1e3: keys in runs of 6 alike frames, queries near a banked frame,
                        as benchmarks/baseline.py's workload; no per-layer column)

and, at N = 10 (--bank-n), the same query end to end through a bank (LocalMemory.query, LMDB in a temp dir,
the window excluded by frame range when deny is 2): bank_batched_p50_ms against bank_per_layer_p50_ms, a
second bank whose spaces are built in the per-layer layout (as on a faiss-gpu machine).

    python benchmarks/layer_scan.py [--quick] [--layers 30] [--dim 1536] [--out benchmarks/results]

Writes OUT/layer_scan.jsonl (machine line first). --quick takes fewer samples, the same grid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, Results, percentiles  # noqa: E402 - after the path set-up above
from memory_service.config import IndexParams  # noqa: E402
from memory_service.index.layer_block import CORES, LayerBlock, search_pool  # noqa: E402
from memory_service.index.space import SpaceIndex  # noqa: E402
from memory_service.index.vector_index import FlatIndex  # noqa: E402
from memory_service.types import KeySpace  # noqa: E402

PARAMS = IndexParams(use_gpu=False)


def floor_fns(space: SpaceIndex) -> list:
    """Two ways to read every byte of the block's lists once - numpy sums over views of faiss's own memory, in one
    thread, and split over one thread per core; the faster is the floor (no scan can read those bytes faster)."""
    ivf = space.block._ivf
    n, code = len(space), ivf.code_size
    lists = [faiss.rev_swig_ptr(ivf.invlists.get_codes(layer), n * code).view(np.uint64)
             for layer in range(space.layers)]
    groups = [lists[i::CORES] for i in range(CORES)]

    def one_thread():
        for a in lists:
            a.sum()

    def pooled():
        list(search_pool().map(lambda g: [a.sum() for a in g], groups))

    return [one_thread, pooled]


def interleaved(fns: dict, reps: int) -> dict:
    """Samples of each function, taken in turn (one of each per round), so that the load other processes put on
    a shared machine falls on every variant alike. Each runs once first to warm."""
    for fn in fns.values():
        fn()
    out: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t)
    return out


class Prefiltered:
    """One block, two ways to search it: through its int8 copy (keeping the copy's backoff state across calls)
    and straight down the full float32 scan (the copy skipped), so both read the same memory."""

    def __init__(self, block: LayerBlock) -> None:
        self.block = block
        self.state = (0, 0)  # the prefilter's (misses, skip) between its own calls

    def int8(self, q, k, deny):
        b = self.block
        b._misses, b._skip = self.state
        before = b.prefilter_stats["certified"]
        found = b.search(q, k, deny)
        self.state = (b._misses, b._skip)
        return found, b.prefilter_stats["certified"] > before

    def full(self, q, k, deny):
        b = self.block
        b._skip = 1 << 62
        return b.search(q, k, deny)


def scene_keys(rng: np.random.Generator, n: int, layers: int, dim: int, reps: int):
    """`[n, L, d]` keys in runs of 6 alike frames sharing content across layers, and `[reps, L, d]` queries near
    banked frames (benchmarks/baseline.py's workload)."""
    scenes = rng.standard_normal((-(-n // 6), dim), dtype=np.float32)
    direction = np.repeat(scenes, 6, axis=0)[:n] + 0.3 * rng.standard_normal((n, dim), dtype=np.float32)
    keys = 0.6 * rng.standard_normal((n, layers, dim), dtype=np.float32) + direction[:, None]
    queries = keys[rng.integers(0, n, reps)] + 0.5 * rng.standard_normal((reps, layers, dim), dtype=np.float32)
    return keys, queries


def per_layer_space(ks: KeySpace, layers: int, ids: np.ndarray, keys: np.ndarray) -> SpaceIndex:
    """A SpaceIndex in the layout before LayerBlock: one FlatIndex per layer, searched one layer at a time."""
    s = SpaceIndex(ks, layers, PARAMS)
    s.block = None
    s.indexes = [FlatIndex(ks.dim, ks.metric, PARAMS, ks.dtype) for _ in range(layers)]
    for layer, index in enumerate(s.indexes):
        index.add(ids, keys[:, layer])
    return s


def bank_rows(res: Results, n: int, layers: int, dim: int, k: int, reps: int) -> None:
    """One flat per-layer space in two real banks, one per layout; queries interleaved, one row per filter."""
    import contextlib
    import tempfile

    from memory_service.index import space as space_module
    from memory_service.local import LocalMemory
    from memory_service.types import NewEntry, StreamSpec

    rng = np.random.default_rng(1)
    keys = rng.standard_normal((n, layers, dim), dtype=np.float32)  # [n, L, d]
    queries = rng.standard_normal((reps, layers, dim), dtype=np.float32)
    with contextlib.ExitStack() as stack:
        banks = {}
        for layout in ("batched", "per_layer"):
            # SpaceIndex builds the per-layer layout where faiss-gpu could take flat search
            space_module.gpu_available = lambda layout=layout: layout == "per_layer"  # type: ignore[assignment]
            m = stack.enter_context(LocalMemory(stack.enter_context(tempfile.TemporaryDirectory())))
            m.create_stream(StreamSpec("s", {"nam": KeySpace(dim, per_layer=True, layers=layers)}))
            m.put("s", [NewEntry(i, i, "p", {"nam": keys[i]}) for i in range(n)])
            banks[layout] = m
        for exclude in (None, (n - 2, n)):
            def query(m, exclude=exclude, it=iter(range(10**9))):  # noqa: B008 - one counter per function
                m.query("s", "nam", queries[next(it) % reps], k, exclude_frames=exclude)
            fns = {layout: (lambda m=m, query=query: query(m)) for layout, m in banks.items()}
            p = {name: percentiles(samples)[0] for name, samples in interleaved(fns, reps).items()}
            res.add(dtype="float32", n=n, layers=layers, dim=dim, k=k, deny=0 if exclude is None else 2,
                    bank_batched_p50_ms=p["batched"], bank_per_layer_p50_ms=p["per_layer"],
                    vs_per_layer=p["per_layer"] / p["batched"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples per point, the same grid (~70 s on 2 cores, most of it building the 1e4 banks)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--grid", default="10,1000,10000")
    ap.add_argument("--bank-n", type=int, default=10, help="entries of the end-to-end bank rows (0: none)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t_start = time.perf_counter()
    res = Results("layer_scan", args.out)
    res.header.update(loadavg_start=os.getloadavg()[0])
    rng = np.random.default_rng(0)
    L, d, k = args.layers, args.dim, args.k
    grid = [int(x) for x in args.grid.split(",")]
    for dtype, kind, n in [(t, "random", n) for t in ("float32", "float16") for n in grid] + \
            [("float32", "scenes", n) for n in grid if n >= 1000]:
        reps = (400 if n <= 100 else 40 if n <= 1000 else 12) // (4 if args.quick else 1)
        ks = KeySpace(d, metric="ip", per_layer=True, index="flat", dtype=dtype)
        ids = np.arange(n, dtype=np.int64) * 3  # ids are not positions
        if kind == "scenes":
            keys, queries = scene_keys(rng, n, L, d, reps)
        else:
            keys = rng.standard_normal((n, L, d), dtype=np.float32)  # [n, L, d]
            queries = rng.standard_normal((reps, L, d), dtype=np.float32)  # [reps, L, d]
        batched = SpaceIndex(ks, L, PARAMS)
        batched.add(ids, keys)
        old = per_layer_space(ks, L, ids, keys) if kind == "random" else None
        block = np.ascontiguousarray(keys.transpose(1, 0, 2)) if kind == "random" and dtype == "float32" else None
        del keys
        assert batched.block is not None  # a flat per-layer space on the CPU is one LayerBlock
        both = Prefiltered(batched.block) if batched.block._copy is not None else None
        floor_one, floor_pooled = floor_fns(batched)
        for deny in (None, ids[-2:]):  # the local window: the newest entries
            identical = int8_identical = True
            for q in queries[:8]:
                a = both.full(q, k, deny) if both else batched.search(q, k, "per_layer", deny, [])[:2]
                if old is not None:
                    b = old.search(q, k, "per_layer", deny, [])
                    identical &= bool(np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]))
                if both:
                    c = both.int8(q, k, deny)[0]
                    int8_identical &= bool(np.array_equal(a[1], c[1]) and np.array_equal(a[0], c[0]))

            def query(search, deny=deny, queries=queries):
                it = iter(range(10**9))
                return lambda: search(queries[next(it) % len(queries)], k, deny)

            proven: list = []
            fns = {"batched": query(both.full if both else lambda q, k, d, s=batched: s.search(q, k, "per_layer", d, [])),
                   "floor_one": floor_one, "floor_pooled": floor_pooled}
            if both:
                fns["int8"] = query(lambda q, k, d, b=both: proven.append(b.int8(q, k, d)[1]))
            if old is not None:
                fns["per_layer"] = query(lambda q, k, d, s=old: s.search(q, k, "per_layer", d, []))
            if block is not None:
                def numpy_scan(block=block, queries=queries, it=iter(range(10**9))):  # noqa: B008 - one per row
                    s = np.matmul(block, queries[next(it) % len(queries)][:, :, None])[:, :, 0]  # [L, n]
                    if s.shape[1] > k:
                        np.argpartition(-s, k - 1, axis=1)[:, :k]
            p = {name: percentiles(samples) for name, samples in interleaved(fns, reps).items()}
            if block is not None:  # on its own: BLAS threads spin after each call and would slow the next
                p["numpy"] = percentiles(interleaved({"numpy": numpy_scan}, reps)["numpy"])
            floor = min(p["floor_one"][0], p["floor_pooled"][0])
            new_p50, new_p99 = p["batched"]
            row: dict = dict(dtype=dtype, keys=kind, n=n, layers=L, dim=d, k=k, deny=0 if deny is None else len(deny),
                       batched_p50_ms=new_p50, batched_p99_ms=new_p99)
            if old is not None:
                row["per_layer_p50_ms"] = p["per_layer"][0]
            if "numpy" in p:
                row["numpy_p50_ms"] = p["numpy"][0]
            row.update(floor_ms=floor, scan_mb=n * L * batched.block._ivf.code_size / 1e6)
            if old is not None:
                row.update(vs_per_layer=p["per_layer"][0] / new_p50)
            row.update(over_floor=new_p50 / floor)
            if old is not None:
                row.update(identical=identical)
            if both:
                row.update(int8_p50_ms=p["int8"][0], int8_p99_ms=p["int8"][1], int8_vs_batched=new_p50 / p["int8"][0],
                           int8_proven=float(np.mean(proven)), int8_identical=int8_identical)
            res.add(**row)
        del batched, old, block, both
    if args.bank_n:
        bank_rows(res, args.bank_n, L, d, k, 300 // (4 if args.quick else 1))
    res.header["loadavg_end"] = os.getloadavg()[0]
    path = res.close()
    print(json.dumps({"done_s": round(time.perf_counter() - t_start, 1), "results": str(path)}), file=sys.stderr)


if __name__ == "__main__":
    main()
