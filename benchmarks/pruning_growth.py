"""Bank growth under pruning: entries, bytes, RSS and query latency over a long stream, per policy and budget.

One simulated stream of C chunks (1e5; --quick 1e4), one second per chunk on a simulated clock (`clock=`),
runs through a real bank (`LocalMemory`, LMDB, `durable=False`: no fsync, commits still atomic) with its upkeep
thread running, as the service runs it (memory_service/upkeep.py: puts evict inline only what the budget
demands, the policy's ranking and batch evictions run beside them; `--inline-pruning`: no such thread, every
put prunes inline as a bare LocalMemory does). As a
generator would, the bank is queried with the current scene's per-layer key (k=3, the frames still in the local
window excluded), so hits, recency, decayed frequency and importance evolve - before every 6th chunk by
default, i.e. before every other recorded one (`--query-every 1`: every chunk, as a generator does; the
same latencies at ~4x the run time). Every 3rd chunk (MemFlow's default) records one entry: per-layer NAM-like keys
(4 layers x 128-d by default) and a small bf16 KV payload for the first 1e4 entries, keys only beyond (so the
unbounded run fits the disk).

Keys: a handful of recurring scenes (8 by default) in segments of 12-36 chunks, each scene returning after
random gaps (an own schedule: these rows do not move when retrieval_quality's story does). An entry's key is
its scene's centroid plus a slow per-scene drift (an AR(1) walk that persists across visits, so a scene seen
again later looks somewhat different) plus per-frame noise; queries are the centroids (a text-like key). So
policies see structure: redundancy finds near-duplicates within a visit, and a few frames whose drift leans
toward their centroid win query after query - recency/frequency/importance policies keep them, FIFO and TTL
age them out (`hit_age_s` shows which).

Runs: `unbounded` (dashed in the plot; it queries a sixth as often, since no policy reads its hits and its scan
grows to C/3 entries), every policy at each entry budget (--budgets, default 1000), and one payload budget
(lru, `max_bytes` = the raw payload of the smallest entry budget, `degrade=("fp8",)`, plus 2x that entry
budget, since entries past --kv-until carry no payload): 8 runs. Each run is a fresh subprocess, so `rss_mb` is
the process's RSS growth since its bank was opened (`rss_anon_mb`: the part not backed by a file, i.e. indexes
and heap, not LMDB's map) with nothing left over from a previous run. Every `C / --samples` chunks one "sample"
row per run:

    entries, payload_mb, key_mb  the stream's stats (max_bytes bounds payload only; keys are never budgeted)
    disk_mb                      LMDB file size (never shrinks; freed pages are reused)
    query_p50/p99_ms, put_*      latency over the chunks since the previous sample (a put includes what it evicts
                                 inline: all of it with --inline-pruning)
    hit_age_s                    median over queries of the mean age of the retrieved frames (simulated s):
                                 what a policy keeps (FIFO: only the recent past; LFU, redundancy: old scenes too)
    evicted, degraded            totals so far

Then one "summary" row per run: final state, latencies over the last 10% of the stream and `p50_vs_unbounded`
(that p50 over the unbounded run's). Every sample of a bounded run is checked against its budget; a breach
stops the benchmark. Summary rows come first in the results file (they are what report.py's table shows).
Two runs go at once (--jobs 2, one per core): each latency then carries a sibling run's load, alike for
every run, so the ratios hold; --jobs 1 for clean absolute latencies at twice the wall time. On 2 cores at
load ~1 the full form takes ~5 min, --quick ~30 s.

    python benchmarks/pruning_growth.py [--quick] [--layers 4] [--dim 128] [--budgets 1000,5000] [--jobs 2]

Writes OUT/bank_growth_pruning.jsonl (machine line first) and OUT/bank_growth_pruning.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, percentiles  # noqa: E402

POLICIES = {  # run-name prefix -> policy expression
    "fifo": "fifo",
    "lru": "lru",
    "lfu": "lfu(half_life_s=600)",
    "importance": "importance",
    "redundancy": "redundancy",
    "ttl+lfu": "ttl(seconds={ttl:g}),then:lfu(half_life_s=600)",
}
INTERVAL = 3  # record every 3rd chunk (MemFlow's default)
WINDOW_CHUNKS = 3  # chunks still in the local window: their frames are excluded from queries
KV_TOKENS, KV_HEAD_DIM = 16, 16  # payload per layer: [2, 16 tokens, 1 head, 16] bf16 = 1 KiB (fp8: 640 B)


@dataclass(frozen=True)
class Run:
    name: str
    policy: str
    max_entries: Optional[int] = None
    max_bytes: Optional[int] = None
    degrade: tuple[str, ...] = ()
    query_every: int = 2 * INTERVAL

    @property
    def budget(self) -> str:
        parts = [f"entries<={self.max_entries}"] if self.max_entries is not None else []
        if self.max_bytes is not None:
            parts.append(f"payload<={self.max_bytes / 1e6:.1f}MB" + "".join(f"+{d}" for d in self.degrade))
        return ",".join(parts) or "none"


def plan_runs(args) -> list[Run]:
    # The unbounded run queries a sixth as often: no policy reads its hits, and its scan grows to C/3 entries.
    runs = [Run("unbounded", "fifo", query_every=6 * args.query_every)]
    for budget in args.budgets:
        for short, expr in POLICIES.items():
            if short in args.policies:
                runs.append(Run(f"{short}@{budget}", expr.format(ttl=args.ttl_s), max_entries=budget,
                                query_every=args.query_every))
    raw_entry = args.layers * 2 * KV_TOKENS * KV_HEAD_DIM * 2  # bf16 payload bytes of one entry
    budget_bytes = min(args.budgets) * raw_entry
    # A payload budget of the smallest entry budget's raw bytes, fp8 before eviction; past --kv-until entries
    # carry no payload, so an entry budget of 2x bounds the keys.
    runs.append(Run(f"lru@{budget_bytes / 1e6:.1f}MB+fp8", "lru", max_entries=2 * min(args.budgets),
                    max_bytes=budget_bytes, degrade=("fp8",), query_every=args.query_every))
    return runs


def longest_first(runs: list[Run]) -> list[Run]:
    """The order to start runs in, longest first as measured (payload budget, ttl, redundancy, unbounded, the
    rest), so that with --jobs 2 the last run to finish is a short one."""
    def rank(r: Run) -> int:
        if r.max_bytes is not None:
            return 0
        if r.policy.startswith("ttl"):
            return 1
        if r.policy.startswith("redundancy"):
            return 2
        return 3 if r.max_entries is None else 4

    return sorted(runs, key=rank)


# ---- worker: one run in its own process -------------------------------------------------------------

def scene_schedule(chunks: int, scenes: int, seed: int) -> np.ndarray:
    """Scene of every chunk `[C]`: segments of 12-36 chunks, every scene once, then random returns (never twice
    in a row)."""
    rng = np.random.default_rng(seed)
    out = np.empty(chunks, np.int16)
    order, prev, i = list(range(scenes)), -1, 0
    while i < chunks:
        scene = order.pop(0) if order else int(rng.choice([s for s in range(scenes) if s != prev]))
        n = int(rng.integers(12, 37))
        out[i:i + n] = scene
        i, prev = i + n, scene
    return out


class SceneKeys:
    """Deterministic keys for every run: entry keys must be drawn in chunk order (the drift is a walk)."""

    def __init__(self, scenes: np.ndarray, layers: int, dim: int, seed: int, drift: float = 0.5,
                 noise: float = 0.2, rho: float = 0.98) -> None:
        rng = np.random.default_rng(seed)
        n = int(scenes.max()) + 1
        self.scenes = scenes  # [C] scene of each chunk
        self.centroids = (rng.standard_normal((n, layers, dim)) / np.sqrt(dim)).astype(np.float32)  # [S, L, d]
        self.walk = np.zeros((n, layers, dim), np.float32)  # per-scene drift, persists across visits
        self.rng = np.random.default_rng((seed, 1))
        self.rho, self.step = rho, drift * np.sqrt(1 - rho * rho) / np.sqrt(dim)  # stationary |walk| ~ drift
        self.noise = noise / np.sqrt(dim)

    def query(self, chunk: int) -> np.ndarray:
        return self.centroids[self.scenes[chunk]]  # [L, d]

    def entry(self, chunk: int) -> np.ndarray:
        s = self.scenes[chunk]
        shape = self.walk.shape[1:]
        self.walk[s] = self.rho * self.walk[s] + self.step * self.rng.standard_normal(shape, dtype=np.float32)
        return self.centroids[s] + self.walk[s] + self.noise * self.rng.standard_normal(shape, dtype=np.float32)


def worker(cfg: dict) -> None:
    """Stream `cfg["chunks"]` chunks through a fresh bank under `cfg["run"]`; print sample and summary rows."""
    import ml_dtypes
    import psutil

    from bank_growth import release_memory, rss_growth
    from retrieval_quality import SimClock
    from memory_service import Budget, KeySpace, KVLayout, LocalMemory, NewEntry, StreamSpec
    from memory_service.config import BankConfig, IndexParams

    run = Run(**{**cfg["run"], "degrade": tuple(cfg["run"]["degrade"])})
    chunks, layers, dim, k = cfg["chunks"], cfg["layers"], cfg["dim"], cfg["k"]
    every = max(1, chunks // cfg["samples"])
    scenes = scene_schedule(chunks, cfg["scenes"], cfg["seed"])  # [C]
    keys = SceneKeys(scenes, layers, dim, cfg["seed"])
    kv_rng = np.random.default_rng((cfg["seed"], 2))
    layout = KVLayout(layers=layers, heads=1, head_dim=KV_HEAD_DIM, tokens_per_frame=KV_TOKENS)
    spec = StreamSpec("cam0", {"nam": KeySpace(dim, per_layer=True)}, kv=layout,
                      budget=Budget(run.max_entries, run.max_bytes), policy=run.policy, degrade=run.degrade)
    q_ms = np.full(chunks, np.nan)  # preallocated: the harness adds nothing to RSS as the stream grows
    put_ms = np.full(chunks, np.nan)
    age = np.full(chunks, np.nan)  # mean age (s) of each query's distinct hits
    clock = SimClock()
    proc = psutil.Process()
    release_memory()
    info0 = proc.memory_info()
    t_start = time.perf_counter()
    # CPU search on any machine (faiss-gpu would mirror flat indexes on a GPU); no snapshot on close.
    config = BankConfig(durable=False, snapshot_on_close=False, index=IndexParams(use_gpu=False))
    with tempfile.TemporaryDirectory(prefix="pruning_growth_", dir=cfg["tmp"]) as tmp, \
            LocalMemory(tmp, config, clock=clock) as mem:
        mem.create_stream(spec)
        if not cfg["inline_pruning"]:
            mem.bank.start_pruner()
        last = 0
        for c in range(chunks):
            clock.t = float(c)
            lo = max(0, c - WINDOW_CHUNKS) * INTERVAL
            if c % run.query_every == 0:
                t = time.perf_counter()
                r = mem.query("cam0", "nam", keys.query(c), k, exclude_frames=(lo, c * INTERVAL))
                q_ms[c] = (time.perf_counter() - t) * 1e3
                frames = r.frames[r.frames >= 0]  # [L, k] -> hits; recorded frame f was chunk f // INTERVAL
                if len(frames):
                    age[c] = c - float(np.mean(np.unique(frames))) / INTERVAL
            if c % INTERVAL == 0:
                n = c // INTERVAL
                kv = (kv_rng.standard_normal(layout.shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
                      if n < cfg["kv_until"] else None)
                entry = NewEntry(c * INTERVAL, c, f"scene {scenes[c]}", {"nam": keys.entry(c)}, kv)
                t = time.perf_counter()
                mem.put("cam0", [entry])
                put_ms[c] = (time.perf_counter() - t) * 1e3
            if (c + 1) % every == 0 or c + 1 == chunks:
                row = sample(mem, run, c + 1, slice(last, c + 1), q_ms, put_ms, age, proc, info0, rss_growth)
                emit(row)
                last = c + 1
        tail = slice(chunks - max(1, chunks // 10), chunks)
        final = sample(mem, run, chunks, tail, q_ms, put_ms, age, proc, info0, rss_growth)
        final.update(row="summary", window="last 10%", wall_s=time.perf_counter() - t_start,
                     rss_base_mb=info0.rss / 1e6)
    emit(final)


def sample(mem, run: Run, chunk: int, window: slice, q_ms, put_ms, age, proc, info0, rss_growth) -> dict:
    st = mem.stats("cam0")
    if run.max_entries is not None and st.entries > run.max_entries:
        raise SystemExit(f"{run.name}: {st.entries} entries at chunk {chunk}, over its budget of {run.max_entries}")
    if run.max_bytes is not None and st.payload_bytes > run.max_bytes:
        raise SystemExit(f"{run.name}: {st.payload_bytes} payload bytes at chunk {chunk}, over its budget of "
                         f"{run.max_bytes}")
    queries = q_ms[window][~np.isnan(q_ms[window])]
    q50, q99 = percentiles(queries / 1e3)
    puts = put_ms[window][~np.isnan(put_ms[window])]
    p50, p99 = percentiles(puts / 1e3) if len(puts) else (None, None)
    ages = age[window][~np.isnan(age[window])]
    return dict(row="sample", run=run.name, policy=run.policy, budget=run.budget, chunk=chunk, entries=st.entries,
                payload_mb=st.payload_bytes / 1e6, key_mb=st.key_bytes / 1e6, disk_mb=mem.stats().disk_bytes / 1e6,
                **rss_growth(proc, info0), query_p50_ms=q50, query_p99_ms=q99, put_p50_ms=p50, put_p99_ms=p99,
                hit_age_s=float(np.median(ages)) if len(ages) else None, evicted=st.evicted_total,
                degraded=st.degraded_total, within_budget=True)


def emit(row: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


# ---- parent: runs, results, plot --------------------------------------------------------------------

def launch(run: Run, args, on_row) -> dict:
    """Run one worker subprocess; `on_row` gets each sample row as it arrives; returns its summary row."""
    cfg = dict(run=dataclasses.asdict(run), chunks=args.chunks, layers=args.layers, dim=args.dim, k=args.k,
               samples=args.samples, scenes=args.scenes, seed=args.seed, kv_until=args.kv_until, tmp=args.tmp,
               inline_pruning=args.inline_pruning)
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(cfg)], stdout=subprocess.PIPE,
                            text=True)
    summary = None
    for line in proc.stdout:
        row = json.loads(line)
        if row["row"] == "summary":
            summary = row
        else:
            on_row(row)
    if proc.wait() != 0 or summary is None:
        raise SystemExit(f"run {run.name} failed (exit {proc.returncode}); see its error above")
    return summary


def plot(rows: list[dict], runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (  # (row key, title, unit)
        ("entries", "entries", "entries"),
        ("payload_mb", "payload MB (what max_bytes bounds)", "MB"),
        ("hit_age_s", "age of retrieved frames (median over queries of their mean)", "simulated s"),
        ("query_p50_ms", "query p50 (per sample window)", "ms"),
        ("rss_mb", "RSS growth since the bank opened (fresh process per run)", "MB"),
        ("put_p50_ms", "put p50 (evictions included)", "ms"),
    )
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = dict(zip([*POLICIES, "bytes"], palette))
    budgets = sorted({r.max_entries for r in runs if r.max_entries is not None and r.max_bytes is None})
    styles = ["-", "-.", ":"]
    for run in [*runs[1:], runs[0]]:  # unbounded (runs[0]) drawn last, on top
        rs = [r for r in rows if r.get("row") == "sample" and r["run"] == run.name]
        if not rs:
            continue
        if run.max_entries is None and run.max_bytes is None:
            style = dict(color="black", ls="--", lw=2)
        elif run.max_bytes is not None:
            style = dict(color=colors["bytes"], ls="-", lw=1.5)
        else:
            short = run.name.split("@")[0]
            style = dict(color=colors[short], ls=styles[budgets.index(run.max_entries) % len(styles)], lw=1.5)
        xs = [r["chunk"] for r in rs]
        for ax, (key, _, _) in zip(axes.flat, panels):
            ax.plot(xs, [r[key] if r[key] is not None else np.nan for r in rs], label=run.name, **style)
    for ax, (key, name, unit) in zip(axes.flat, panels):
        ax.set_title(name)
        ax.set_xlabel("chunk (1 s each; one entry per 3 chunks)")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1e4 chunks instead of 1e5")
    ap.add_argument("--chunks", type=int, default=0, help="stream length (default 1e5, 1e4 quick)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--query-every", type=int, default=2 * INTERVAL, help="query before every Nth chunk (default "
                    "6: before every other recorded chunk; 1 = every chunk, as a generator does: ~4x the run time)")
    ap.add_argument("--scenes", type=int, default=8, help="recurring scenes the keys cluster around")
    ap.add_argument("--budgets", default="", help="entry budgets, comma list (default 1000; e.g. 1000,5000)")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"some of {', '.join(POLICIES)}")
    ap.add_argument("--ttl-s", type=float, default=3600.0, help="TTL of the ttl+lfu run (simulated seconds)")
    ap.add_argument("--kv-until", type=int, default=10_000, help="entries past this are keys only")
    ap.add_argument("--samples", type=int, default=50, help="sample rows per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, each in its own process (1: latencies "
                    "free of a sibling run's load, twice the wall time)")
    ap.add_argument("--inline-pruning", action="store_true", help="no upkeep thread: every put prunes inline (a "
                    "bare LocalMemory); by default the bank runs it, as the service does")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tmp", default=None, help="where the banks live (default: the system temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.chunks = args.chunks or (10_000 if args.quick else 100_000)
    args.budgets = [int(b) for b in (args.budgets or "1000").split(",")]
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = set(args.policies) - set(POLICIES)
    if unknown:
        ap.error(f"unknown policies {sorted(unknown)}; expected some of {list(POLICIES)}")
    runs = plan_runs(args)

    t_start = time.perf_counter()
    res = Results("bank_growth_pruning", args.out)
    res.header.update(chunks=args.chunks, layers=args.layers, dim=args.dim, k=args.k, scenes=args.scenes,
                      query_every=args.query_every, inline_pruning=args.inline_pruning,
                      jobs=args.jobs, runs=[dataclasses.asdict(r) for r in runs], loadavg_start=os.getloadavg()[0])
    lock = threading.Lock()

    def on_row(row: dict) -> None:
        with lock:
            res.add(**row)

    order = longest_first(runs)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = dict(zip([r.name for r in order], pool.map(lambda run: launch(run, args, on_row), order)))
    summaries = [done[r.name] for r in runs]
    base = summaries[0]["query_p50_ms"]  # runs[0] is unbounded
    samples = list(res.rows)
    res.rows.clear()
    for s in summaries:
        res.add(**s, p50_vs_unbounded=s["query_p50_ms"] / base)
    res.rows.extend(sorted(samples, key=lambda r: ([x.name for x in runs].index(r["run"]), r["chunk"])))
    res.header["loadavg_end"] = os.getloadavg()[0]
    path = res.close()
    plot(res.rows, runs, path.with_suffix(".png"),
         f"bank growth under pruning: {args.chunks} chunks, {args.layers} layers x {args.dim}-d keys, k={args.k}, "
         f"payload for the first {args.kv_until} entries (keys: {args.layers * args.dim * 4 / 1e3:g} KB per entry, "
         f"never budgeted); dashed: unbounded")
    print(json.dumps({"done_s": round(time.perf_counter() - t_start, 1), "results": str(path)}), file=sys.stderr)


if __name__ == "__main__":
    main()
