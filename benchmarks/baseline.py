"""Baseline: one chunk's memory work, the project against hand-built FAISS/numpy + LMDB, on one workload.

The workload (issue 15, item 8): a bank of N entries with MemFlow's per-layer keys (30 x 1536 float32) and
2-token K/V payloads (30 layers x [2, 2, 12, 128] bf16, 12 KiB a layer); a chunk queries every layer for its
top k=3 with the local window (the newest 9 frames) excluded, then fetches every layer of the union of the
hits into a buffer. Keys are correlated across layers (an entry's layers share a direction), so a query's
union is a handful of entries, as in a real stream. Pages are warm (everything was just written).

Systems, measured in the same run, in rounds (each system a few chunks, then the next) so the noise of a
shared machine falls on all alike. Each system's turn begins with one chunk that is not timed: the turn before
was another system's, over its own copy of the bank, so the caches hold that one's keys. Without it, the first
chunk of every turn ran cold, and shm and stream, which query the same service process, were not alike: the one
whose turn came second found the other's keys cached (at 1e3: shm 5.05 ms and stream 4.68 ms a query in that
order, 4.00 and 5.42 in the other). So their turns are never in a row (TURNS), and stream asks the queries from
half-way down the list, not the ones shm has just asked:
  faiss_pool   the hand-built baseline: 30 faiss IndexFlatIP (one per layer; the window excluded with an id
               selector) searched on a 2-thread pool, then LMDB zero-copy reads (one value per entry, all its
               layers) copied into a preallocated buffer
  numpy        the same fetch after one batched numpy scan of all layers ([L, N, D] @ [L, D])
  local        the project in-process: LocalMemory.query + LocalMemory.fetch of the union
  shm          the same calls through MemoryClient on a real `memflow-service serve`, shared-memory plane
  stream       the same, gRPC streaming plane
Rows `bench=chunk`: `system, entries, p50_ms, p99_ms, query_ms, fetch_ms` (p50 of each half), `union` (mean
entries fetched) and `ratio_to_baseline` (p50 against the faster of faiss_pool and numpy) and
`ratio_to_faiss_pool`. Rows `bench=put`: `system, entries, puts_per_s` (entries a second, 64 a call; the baseline
commits LMDB durably and adds to its 30 indexes) and `ratio_to_baseline`. Goals (issue 15): local <= 1.0x,
shm <= 1.1x, stream <= 1.5x the baseline's time, and puts >= its rate.

    python benchmarks/baseline.py [--quick] [--sizes 1000,10000] [--rounds R] [--out benchmarks/results]

`--quick`: 1e3 entries only (the full form also runs 1e4: ~4 GB of payload per bank, ~8 GB of RAM for keys).
"""

from __future__ import annotations

import argparse
import contextlib
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import lmdb
import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, percentiles, running_service, timed  # noqa: E402

from memory_service import KeySpace, KVLayout, LocalMemory, MemoryClient, NewEntry, StreamSpec  # noqa: E402

LAYERS, DIM, K, WINDOW, BATCH, SCENE = 30, 1536, 3, 9, 64, 6
LAYOUT = KVLayout(layers=LAYERS, heads=12, head_dim=128, tokens_per_frame=2)
STREAM = "baseline"
PAYLOADS = 8  # distinct payloads, reused round-robin (their bytes do not change what a fetch costs)
_KEY = struct.Struct(">Q")
TURNS = ("faiss_pool", "shm", "numpy", "stream", "local")  # shm and stream (one service process) never in a row
QUERIES = 64  # distinct chunk queries, asked in turn (shm and stream start half-way apart: run_size)


class Workload:
    """Keys `[L, N, D]` (float32, correlated across layers), payloads, and the queries chunks ask."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        # [N, D]: what an entry's layers share; entries of one scene (SCENE consecutive frames) lie close together,
        # so a chunk's per-layer top k are mostly the same few entries (its union is a handful, as in a real stream)
        scenes = rng.standard_normal((-(-n // SCENE), DIM), dtype=np.float32)
        direction = np.repeat(scenes, SCENE, axis=0)[:n] + 0.3 * rng.standard_normal((n, DIM), dtype=np.float32)
        self.keys = rng.standard_normal((LAYERS, n, DIM), dtype=np.float32)  # [L, N, D]
        self.keys *= 0.6
        self.keys += direction[None]
        self.payloads = [rng.standard_normal(LAYOUT.shape, np.float32).astype(ml_dtypes.bfloat16)
                         for _ in range(PAYLOADS)]  # each [L, 2, T, H, D]
        targets = rng.integers(0, max(1, n - WINDOW), QUERIES)
        self.queries = [self.keys[:, t] + 0.5 * rng.standard_normal((LAYERS, DIM), dtype=np.float32)
                        for t in targets]  # each [L, D]
        self.window = (n - WINDOW, n)  # frames lo <= f < hi are in the local window: never retrieved

    def entries(self, start: int, stop: int) -> list[NewEntry]:
        return [NewEntry(i, i // 3, "baseline", {"nam": np.ascontiguousarray(self.keys[:, i])},
                         kv=self.payloads[i % PAYLOADS]) for i in range(start, stop)]


def union_of(ids: np.ndarray) -> list[int]:
    """Distinct hit ids of a `[L, k]` ranking, in order of first appearance (-1 padding skipped)."""
    return [int(i) for i in dict.fromkeys(ids.reshape(-1).tolist()) if i >= 0]


class HandBuilt:
    """The afternoon baseline: an LMDB environment (one value per entry, durable commits) and per-layer keys held
    as 30 faiss IndexFlatIP and as one numpy array; both answer a chunk into one preallocated buffer."""

    def __init__(self, path: str, w: Workload) -> None:
        entry_bytes = int(w.payloads[0].nbytes)
        self.env = lmdb.open(path, map_size=2 * w.n * (entry_bytes + LAYERS * DIM * 4) + (256 << 20),
                             max_dbs=2, sync=True)
        self.kv_db, self.key_db = self.env.open_db(b"kv"), self.env.open_db(b"keys")
        self.indexes = [faiss.IndexFlatIP(DIM) for _ in range(LAYERS)]
        self.w = w
        self.keys = w.keys  # [L, N, D]: the numpy scan reads the workload's own array
        self.pool = ThreadPoolExecutor(2)
        self.out = np.empty((LAYERS * K, *LAYOUT.shape), ml_dtypes.bfloat16)  # [L*k, L, 2, T, H, D]
        self.flat = self.out.reshape(LAYERS * K, -1).view(np.uint8)
        self.params = faiss.SearchParameters(sel=faiss.IDSelectorRange(0, w.window[0]))

    def put(self, start: int, stop: int) -> None:
        with self.env.begin(write=True) as txn:
            for i in range(start, stop):
                txn.put(_KEY.pack(i), memoryview(self.w.payloads[i % PAYLOADS].reshape(-1).view(np.uint8)),
                        db=self.kv_db)
                txn.put(_KEY.pack(i), memoryview(np.ascontiguousarray(self.w.keys[:, i]).reshape(-1).view(np.uint8)),
                        db=self.key_db)
        for layer, index in enumerate(self.indexes):
            index.add(np.ascontiguousarray(self.w.keys[layer, start:stop]))

    def fetch(self, union: list[int]) -> None:
        with self.env.begin(buffers=True) as txn:
            for n, eid in enumerate(union):
                self.flat[n] = np.frombuffer(txn.get(_KEY.pack(eid), db=self.kv_db), np.uint8)

    def search_faiss(self, q: np.ndarray) -> np.ndarray:
        """[L, k] ids: the layers split between the pool's two threads (faiss lets go of the GIL)."""
        def part(layers: range) -> list[np.ndarray]:
            return [self.indexes[lay].search(q[lay:lay + 1], K, params=self.params)[1][0] for lay in layers]

        halves = self.pool.map(part, (range(0, LAYERS // 2), range(LAYERS // 2, LAYERS)))
        return np.array([row for half in halves for row in half])

    def search_numpy(self, q: np.ndarray) -> np.ndarray:
        scores = np.einsum("lnd,ld->ln", self.keys, q)  # [L, N]: one pass over all layers (faster than matmul here)
        lo, hi = self.w.window
        scores[:, lo:hi] = -np.inf
        top = np.argpartition(-scores, K, axis=1)[:, :K]  # [L, k], unordered
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        return np.take_along_axis(top, order, 1)

    def close(self) -> None:
        self.pool.shutdown()
        self.env.close()


class Chunks:
    """Runs chunks of one system, keeping each one's query and fetch halves apart."""

    def __init__(self, search, fetch, first: int = 0) -> None:
        self.search, self.fetch = search, fetch
        self.query_s: list[float] = []
        self.fetch_s: list[float] = []
        self.unions: list[int] = []
        self.turn = first  # the index of the next query

    def __call__(self, queries: list[np.ndarray], record: bool = True) -> None:
        q = queries[self.turn % len(queries)]
        self.turn += 1
        t0 = time.perf_counter()
        union = union_of(self.search(q))
        t1 = time.perf_counter()
        self.fetch(union)
        t2 = time.perf_counter()
        if not record:  # a turn's first chunk (run_size)
            return
        self.query_s.append(t1 - t0)
        self.fetch_s.append(t2 - t1)
        self.unions.append(len(union))


def project(memory, w: Workload, first: int = 0) -> Chunks:
    def search(q: np.ndarray) -> np.ndarray:
        return memory.query(STREAM, "nam", q, K, exclude_frames=w.window).ids

    def fetch(union: list[int]) -> None:
        memory.fetch(STREAM, union)  # the result is the buffer the caller reads (shm: a view of its arena)

    return Chunks(search, fetch, first)


def fill(puts: dict, n: int, few: dict) -> dict[str, float]:
    """Entries a second of each system's `put(start, stop)`, BATCH entries a call, the systems taking turns
    batch by batch over the bank (`few[name]` entries for a system that fills less of it), each turn begun by the
    next system. In turns, because a cloud disk's write budget is shared: filled one after another, whichever
    system wrote second ran into the throttle that the first system's fsynced gigabyte had earned (0.9 GB/s,
    then 0.3); and the commit that meets an empty budget pays for the writes before it, so no system always
    goes first."""
    spent, names = dict.fromkeys(puts, 0.0), list(puts)
    for turn, start in enumerate(range(0, n, BATCH)):
        for name in names[turn % len(names):] + names[:turn % len(names)]:  # each system first as often
            put = puts[name]
            if start < few.get(name, n):
                t = time.perf_counter()
                put(start, min(few.get(name, n), start + BATCH))
                spent[name] += time.perf_counter() - t
    return {name: few.get(name, n) / s for name, s in spent.items()}


def run_size(res: Results, n: int, rounds: int, per_round: int, tmp: str) -> None:
    w = Workload(n)
    spec = StreamSpec(STREAM, {"nam": KeySpace(DIM, per_layer=True, layers=LAYERS)}, kv=LAYOUT)
    with contextlib.ExitStack() as stack:
        base = HandBuilt(f"{tmp}/hand-{n}", w)
        stack.callback(base.close)
        local = stack.enter_context(LocalMemory(f"{tmp}/local-{n}"))
        target = stack.enter_context(running_service(f"{tmp}/svc-{n}"))
        shm = stack.enter_context(MemoryClient(target, plane="shm"))
        stream = stack.enter_context(MemoryClient(target, plane="stream"))
        local.create_stream(spec)
        shm.create_stream(spec)
        stream.list_streams()  # learn the layout
        side = StreamSpec("put-stream", spec.key_spaces, kv=LAYOUT)  # the stream plane's puts, a smaller bank
        stream.create_stream(side)
        few = {"stream": min(n, 4 * BATCH)}
        rates = fill({"baseline": base.put, "local": lambda a, b: local.put(STREAM, w.entries(a, b)),
                      "shm": lambda a, b: shm.put(STREAM, w.entries(a, b)),
                      "stream": lambda a, b: stream.put(side.name, w.entries(a, b))}, n, few)
        stream.drop_stream(side.name)
        for system, rate in rates.items():
            res.add(bench="put", system=system, entries=few.get(system, n), puts_per_s=rate,
                    ratio_to_baseline=rate / rates["baseline"])

        systems = {"faiss_pool": Chunks(base.search_faiss, base.fetch), "numpy": Chunks(base.search_numpy, base.fetch),
                   "local": project(local, w), "shm": project(shm, w),
                   "stream": project(stream, w, first=QUERIES // 2)}  # not the query shm just asked of the same process
        samples: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(rounds):
            for name in TURNS:
                chunks = systems[name]
                chunks(w.queries, record=False)  # the turn's first chunk warms this system's caches (module doc)
                samples[name] += timed(lambda: chunks(w.queries), per_round, warm=False)
        p50 = {name: percentiles(s)[0] for name, s in samples.items()}
        best = min(p50["faiss_pool"], p50["numpy"])
        for name, chunks in systems.items():
            lo, hi = percentiles(samples[name])
            res.add(bench="chunk", system=name, entries=n, p50_ms=lo, p99_ms=hi,
                    query_ms=percentiles(chunks.query_s)[0], fetch_ms=percentiles(chunks.fetch_s)[0],
                    union=float(np.mean(chunks.unions)), ratio_to_baseline=lo / best,
                    ratio_to_faiss_pool=lo / p50["faiss_pool"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e3 entries only, fewer chunks")
    parser.add_argument("--sizes", default=None, help="comma-separated bank sizes (default 1000,10000)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    sizes = [int(x) for x in (args.sizes or ("1000" if args.quick else "1000,10000")).split(",")]
    rounds = args.rounds or (4 if args.quick else 6)
    res = Results("baseline", Path(args.out))
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="memflow-baseline-") as tmp:  # each size's banks go when it ends
            run_size(res, n, rounds, 5, tmp)
    print(f"wrote {res.close()}", file=sys.stderr)


if __name__ == "__main__":
    main()
