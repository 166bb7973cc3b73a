"""Node load: 1, 2, 4 and 8 generator processes sharing one memory service over the shared-memory data plane.

A GPU node runs one generator per GPU (8 GPUs, 8 streams) against one `memflow-service serve` on the host. This
benchmark replays a MemFlow generator's memory calls at Wan2.1-1.3B's shape (30 layers x 12 heads x 128, bf16;
1560 tokens per latent frame, 156 with `--quick`) from N worker processes, each with its own stream on one
service process:
  per chunk   Query of 30 per-layer 1536-d NAM keys (k=3 per layer, window excluded) -> Fetch of the 3 frames the
              query ranks first, all 30 layers, into the worker's shm arena (the plugin's worst case: no frame
              already resident). `before_ms` is query + fetch, what a generator waits for before its chunk.
  calls       `query+fetch`: the two RPCs above; `query_fetch`: one QueryFetch round trip (each layer's top-3
              (entry, layer) pairs come back with the ranking through the same arena: the same bytes).
  modes       `saturated`: each worker issues its next chunk as soon as the last returns (the service's ceiling);
              `paced`: each waits a GPU chunk between calls (640 ms at Wan's shape, scaled by the token count, so
              the bytes asked per second are a real node's), as a generator whose GPU does the chunk does.
The banks: `--kv-frames` frames with K/V per stream and `--distractors` keys-only entries whose keys are 1/1000 the
norm (scanned by every query, never ranked first, as in overhead.py).

Rows (one per mode, call and process count): `agg_fetch_gbps` (all workers' fetched bytes over the phase's wall time),
`memcpy_gbps` (np.copyto of one fetch's bytes between warm buffers, one thread, measured in this run) and
`memcpy_n_gbps` (the same N workers copying at once, what the node's cores and memory can move), their ratios
(saturated mode only: a paced phase moves what its generators ask for), `before_p50_ms` / `before_p99_ms` pooled
and per process (lists), `p99_growth` against 1 process in the same mode, `query_p99_ms` and `fetch_p99_ms` under
contention, `fetch_call_gbps` (one Fetch's bytes over the median Fetch time: the plane's speed inside a call,
without the query between calls), `service_cpu_cores` (psutil: the server process's CPU seconds over the phase's
wall time) and `worker_cpu_cores` (the generators' together). Goals: aggregate >= 0.6 of memcpy; p99 before_ms
grows <= 2x from 1 to 8 processes.

    python benchmarks/node_load.py [--quick] [--procs 1,2,4,8] [--seconds S] [--out benchmarks/results]

`--quick` (about a minute): 156 tokens per frame (0.96 MB per layer, 86 MB per chunk's fetch), 3 s per phase;
`make bench` runs it. The full form (862 MB per fetch) holds ~17 GB at 8 processes (8 arenas of 0.9 GB, 8 banks
of 4 x 287.5 MB): a GPU node's run, not a 2-core CPU box's. `--py-spy [PATH]` (pip install py-spy) profiles the
service in the saturated phases at the most processes: `service_gil_frac` (the share of wall time some thread
holds the GIL), `service_busy_threads` and `service_top` (the busiest leaf frames, in the JSON lines).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, memcpy_gbps, percentiles, service_process  # noqa: E402

LAYERS, HEADS, HEAD_DIM, KEY_DIM, K = 30, 12, 128, 1536, 3
WAN_TOKENS, WAN_CHUNK_MS = 1560, 640.0
MODES = ("saturated", "paced")
CALLS = ("query+fetch", "query_fetch")


# ---- the worker: one generator's memory calls ------------------------------------------------------------

def worker_main(target: str, index: int, tokens: int, kv_frames: int, distractors: int) -> None:
    """Set up stream `node-<index>`, say `ready`, then answer commands on stdin with one JSON line each:
    `run T0 SECONDS GPU_MS CALL` (chunks from wall time T0 for SECONDS) and `memcpy T0 SECONDS` (copies alone)."""
    import ml_dtypes

    from memory_service import KeySpace, KVLayout, MemoryClient, NewEntry, StreamSpec

    layout = KVLayout(layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM, tokens_per_frame=tokens)
    fetch_bytes = K * int(layout.layer_bytes) * LAYERS
    rng = np.random.default_rng(index)
    name = f"node-{index}"
    with MemoryClient(target, plane="shm", arena_bytes=fetch_bytes + (64 << 20)) as client:
        client.create_stream(StreamSpec(name, {"nam": KeySpace(KEY_DIM, per_layer=True, layers=LAYERS)}, kv=layout))
        # one scene's frames: a shared direction plus each frame's own, so each scores far above the distractors
        keys = rng.standard_normal((LAYERS, KEY_DIM), dtype=np.float32) + 0.5 * rng.standard_normal(
            (kv_frames, LAYERS, KEY_DIM), dtype=np.float32)
        kv_ids: list[int] = []
        for f in range(kv_frames):  # one frame per put keeps the staging arena at one frame
            kv = client.arena_array(layout.shape, ml_dtypes.bfloat16)
            kv[...] = rng.standard_normal(layout.shape[-1], np.float32).astype(ml_dtypes.bfloat16)
            kv_ids += client.put(name, [NewEntry(f, f // 3, "node", {"nam": keys[f]}, kv=kv)])
            del kv
        for start in range(0, distractors, 64):
            count = min(64, distractors - start)
            small = 1e-3 * rng.standard_normal((count, LAYERS, KEY_DIM), dtype=np.float32)
            client.put(name, [NewEntry(kv_frames + start + i, (kv_frames + start + i) // 3, "distractor",
                                       {"nam": small[i]}) for i in range(count)])
        last = kv_frames + distractors
        window = (last, last + 9)
        chunk = 0
        # warm-up, not measured: the service's first touch of this arena's pages and of the frames' pages in LMDB's
        # map (page faults) would otherwise land in the first phase's p99, the baseline of p99_growth
        for _ in range(2):
            client.fetch(name, kv_ids[:K])  # the views die here: the arena range is free again
            client.query_fetch(name, "nam", keys[0], K, exclude_frames=window)
        print(json.dumps({"ready": index, "fetch_bytes": fetch_bytes}), flush=True)
        for line in sys.stdin:
            cmd, *rest = line.split()
            t0, seconds = float(rest[0]), float(rest[1])
            while time.time() < t0:
                time.sleep(min(0.01, max(0.0, t0 - time.time())))
            if cmd == "memcpy":
                src, dst = np.ones(fetch_bytes, np.uint8), np.zeros(fetch_bytes, np.uint8)
                np.copyto(dst, src)  # first-touch faults outside the timed copies
                t_start, copies = time.perf_counter(), 0
                while time.perf_counter() - t_start < seconds:
                    np.copyto(dst, src)
                    copies += 1
                wall = time.perf_counter() - t_start
                print(json.dumps({"bytes": copies * fetch_bytes, "wall_s": wall}), flush=True)
                continue
            gpu_s, one_call = float(rest[2]) / 1e3, rest[3] == "query_fetch"
            before, query, fetch = [], [], []
            moved = 0
            start_wall = time.time()
            t_start = time.perf_counter()
            while time.perf_counter() - t_start < seconds:
                q = keys[chunk % kv_frames] + 0.1 * rng.standard_normal((LAYERS, KEY_DIM), dtype=np.float32)
                t = time.perf_counter()
                if one_call:  # one round trip: each layer's top-k (entry, layer) pairs come back with the ranking
                    both = client.query_fetch(name, "nam", q, K, exclude_frames=window)
                    t1 = t2 = time.perf_counter()
                    moved += sum(group.kv.nbytes for group in both.fetched)
                    del both
                else:
                    hits = client.query(name, "nam", q, K, exclude_frames=window)
                    t1 = time.perf_counter()
                    ids = [i for i, _ in Counter(hits.ids.reshape(-1).tolist()).most_common() if i >= 0][:K]
                    got = client.fetch(name, ids)
                    t2 = time.perf_counter()
                    moved += got.kv.nbytes
                    del got  # the arena range is free again for the next chunk
                    query.append(t1 - t)
                    fetch.append(t2 - t1)
                before.append(t2 - t)
                chunk += 1
                if gpu_s:
                    time.sleep(gpu_s)  # the GPU runs the chunk; this process's CPU is idle meanwhile
            wall = time.perf_counter() - t_start
            print(json.dumps({"bytes": moved, "wall_s": wall, "start": start_wall, "end": start_wall + wall,
                              "before": before, "query": query, "fetch": fetch}), flush=True)


class Worker:
    def __init__(self, target: str, index: int, args) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", target, str(index), "--tokens", str(args.tokens),
             "--kv-frames", str(args.kv_frames), "--distractors", str(args.distractors)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.index = index
        import psutil

        self.watched = psutil.Process(self.proc.pid)

    def answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"node_load worker {self.index} exited (code {self.proc.wait()})")
        return json.loads(line)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the parent: phases and rows ---------------------------------------------------------------------------

def phase(workers: list[Worker], command: str, seconds: float) -> list[dict]:
    """Every worker runs `command` from one common start time; their answers, in order."""
    t0 = time.time() + 0.2
    for w in workers:
        w.send(f"{command.split()[0]} {t0} {seconds} {' '.join(command.split()[1:])}".strip())
    return [w.answer() for w in workers]


def summarize(mode: str, call: str, answers: list[dict], cpu_s: float, worker_cpu_s: float, wall_s: float, memcpy: float,
              memcpy_n: float, fetch_bytes: int, gpu_ms: float) -> dict:
    before = [a["before"] for a in answers]
    pooled = [x for b in before for x in b]
    p50, p99 = percentiles(pooled)
    per_proc = [percentiles(b) for b in before]
    agg = sum(a["bytes"] for a in answers) / wall_s / 1e9
    row = dict(mode=mode, call=call, procs=len(answers), gpu_ms=gpu_ms, fetch_mb=fetch_bytes / 1e6, chunks=len(pooled),
               moved_mb_per_chunk=sum(a["bytes"] for a in answers) / max(1, len(pooled)) / 1e6,
               agg_fetch_gbps=agg, memcpy_gbps=memcpy, memcpy_n_gbps=memcpy_n, ratio_to_memcpy=agg / memcpy,
               ratio_to_memcpy_n=agg / memcpy_n, before_p50_ms=p50, before_p99_ms=p99,
               before_p99_max_ms=max(p for _, p in per_proc),
               service_cpu_cores=cpu_s / wall_s, worker_cpu_cores=worker_cpu_s / wall_s,
               before_p50_ms_per_proc=[round(p, 3) for p, _ in per_proc],
               before_p99_ms_per_proc=[round(p, 3) for _, p in per_proc])
    if call == "query+fetch":  # two calls: each timed on its own
        fetch = [x for a in answers for x in a["fetch"]]
        row.update(query_p50_ms=percentiles(x for a in answers for x in a["query"])[0],
                   query_p99_ms=percentiles(x for a in answers for x in a["query"])[1],
                   fetch_p99_ms=percentiles(fetch)[1], fetch_call_gbps=fetch_bytes / float(np.median(fetch)) / 1e9)
    return row


class Profile:
    """py-spy on the service for one phase, twice at once: every sample of a busy thread (where the service's time
    goes) and only samples holding the GIL (how much of the wall time the GIL is taken: near 1.0, it is the limit)."""

    RATE = 100

    def __init__(self, py_spy: str, pid: int, seconds: float) -> None:
        self.seconds = max(1, int(seconds))
        self.paths = {kind: os.path.join(tempfile.gettempdir(), f"py-spy-{kind}-{pid}-{time.monotonic_ns()}.txt") for kind in ("busy", "gil")}
        self.procs = [subprocess.Popen([py_spy, "record", "-p", str(pid), "-d", str(self.seconds), "-r", str(self.RATE),
                                        "-f", "raw", "-o", path, "--nonblocking", *(["--gil"] if kind == "gil" else [])],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for kind, path in self.paths.items()]

    @staticmethod
    def _read(path: str) -> Counter:
        leaves: Counter = Counter()
        with contextlib.suppress(FileNotFoundError):
            for line in open(path):
                stack, _, count = line.rstrip().rpartition(" ")
                leaves[stack.split(";")[-1]] += int(count)
            os.remove(path)
        return leaves

    def result(self) -> dict:
        for proc in self.procs:
            proc.wait(self.seconds + 30)
        busy, gil = self._read(self.paths["busy"]), self._read(self.paths["gil"])
        possible = self.RATE * self.seconds
        if not busy:
            return {"py_spy": "no samples (py-spy needs ptrace rights on the service process)"}
        total = sum(busy.values())
        return {"service_gil_frac": sum(gil.values()) / possible, "service_busy_threads": total / possible,
                "service_top": [[leaf, round(n / total, 3)] for leaf, n in busy.most_common(8)]}


def _cpu(process) -> float:
    t = process.cpu_times()
    return t.user + t.system


def run(args) -> Results:
    import psutil

    res = Results(args.name, Path(args.out))
    procs = sorted(int(x) for x in args.procs.split(","))
    gpu_ms = WAN_CHUNK_MS * args.tokens / WAN_TOKENS if args.gpu_ms is None else args.gpu_ms
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="memflow-node-") as tmp, \
            service_process(tmp, "--workers", str(args.service_workers), env=env) as (target, server):
        watched = psutil.Process(server.pid)
        workers = [Worker(target, i, args) for i in range(max(procs))]
        try:
            t = time.perf_counter()
            fetch_bytes = [w.answer() for w in workers][0]["fetch_bytes"]
            print(f"{len(workers)} generators set up in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            base: dict[str, float] = {}
            for n in procs:
                memcpy = memcpy_gbps(fetch_bytes)  # again for each count: a shared machine's bandwidth drifts
                copies = phase(workers[:n], "memcpy", min(1.0, args.seconds))
                memcpy_n = sum(a["bytes"] for a in copies) / max(a["wall_s"] for a in copies) / 1e9
                for mode, call in [(m, c) for c in args.calls for m in args.modes]:
                    spy = None
                    if args.py_spy and n == max(procs) and mode == "saturated":
                        spy = Profile(args.py_spy, server.pid, args.seconds)
                    cpu0, wcpu0 = _cpu(watched), sum(_cpu(w.watched) for w in workers[:n])
                    answers = phase(workers[:n], f"run {gpu_ms if mode == 'paced' else 0.0} {call}", args.seconds)
                    cpu_s, wcpu_s = _cpu(watched) - cpu0, sum(_cpu(w.watched) for w in workers[:n]) - wcpu0
                    wall = max(a["end"] for a in answers) - min(a["start"] for a in answers)
                    row = summarize(mode, call, answers, cpu_s, wcpu_s, wall, memcpy, memcpy_n, fetch_bytes,
                                    gpu_ms if mode == "paced" else 0.0)
                    if mode != "saturated":  # a paced phase moves what its generators ask for, not what it can
                        row.pop("ratio_to_memcpy")
                        row.pop("ratio_to_memcpy_n")
                    base.setdefault(mode + call, row["before_p99_ms"])
                    row["p99_growth"] = row["before_p99_ms"] / base[mode + call]
                    if spy is not None:
                        row.update(spy.result())
                    res.add(**row, tokens=args.tokens)
        finally:
            for w in workers:
                w.close()
    return res


def plot(res: Results) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = iter(("tab:blue", "tab:orange", "tab:green", "tab:red"))
    for mode, call in [(m, c) for c in CALLS for m in MODES]:
        rows = [r for r in res.rows if r["mode"] == mode and r["call"] == call]
        if not rows:
            continue
        n, color, what = [r["procs"] for r in rows], next(colors), f"{call}, {mode}"
        ax1.plot(n, [r["agg_fetch_gbps"] for r in rows], "o-", color=color, label=what)
        ax2.plot(n, [r["before_p99_ms"] for r in rows], "o-", color=color, label=f"p99, {what}")
        ax2.plot(n, [r["before_p50_ms"] for r in rows], "x--", color=color, label=f"p50, {what}")
    first = res.rows[0]
    rows = [r for r in res.rows if r["mode"] == first["mode"] and r["call"] == first["call"]]
    n = [r["procs"] for r in rows]
    ax1.plot(n, [r["memcpy_n_gbps"] for r in rows], "k:", label="memcpy, N processes at once")
    ax1.plot(n, [r["memcpy_gbps"] for r in rows], "--", color="grey", label="memcpy, 1 thread")
    ax1.set(xlabel="generator processes", ylabel="GB/s", title="aggregate fetch over shm (same run's memcpy)")
    ax2.set(xlabel="generator processes", ylabel="ms", title="before_ms per chunk (query + fetch)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(x) for x in n])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(res.path.with_suffix(".png"), dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="156 tokens per frame, 3 s per phase")
    parser.add_argument("--procs", default="1,2,4,8", help="comma-separated generator process counts")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--calls", default=",".join(CALLS), help="per chunk: query then fetch, or one query_fetch")
    parser.add_argument("--seconds", type=float, default=None, help="length of each phase (default 3 quick, 10)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per latent frame (default 156 quick, 1560)")
    parser.add_argument("--gpu-ms", type=float, default=None,
                        help="paced mode's wait per chunk (default 640 ms x tokens / 1560)")
    parser.add_argument("--kv-frames", type=int, default=4, help="frames with K/V per stream")
    parser.add_argument("--distractors", type=int, default=None, help="keys-only entries per stream (100 quick, 1000)")
    parser.add_argument("--service-workers", type=int, default=16, help="the service's request threads")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--name", default="node_load", help="results file name (a second run beside the first)")
    parser.add_argument("--py-spy", nargs="?", const=shutil.which("py-spy") or "py-spy", default=None, metavar="PATH",
                        help="profile the service with py-spy (pip install py-spy) in the saturated phases of the "
                             "largest process count: service_gil_frac, service_busy_threads, service_top")
    parser.add_argument("--worker", nargs=2, metavar=("TARGET", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (156 if args.quick else WAN_TOKENS)
    args.distractors = args.distractors if args.distractors is not None else (100 if args.quick else 1000)
    if args.worker:
        return worker_main(args.worker[0], int(args.worker[1]), args.tokens, args.kv_frames, args.distractors)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.modes = [m for m in args.modes.split(",") if m]
    args.calls = [c for c in args.calls.split(",") if c]
    res = run(args)
    if not args.no_plot:
        plot(res)
    print(f"wrote {res.close()}", file=sys.stderr)


if __name__ == "__main__":
    main()
