"""Cluster benchmark: cluster mode's costs against the single-node service, all measured in one run.

Starts, on 127.0.0.1, what the cluster tests start (tests/cluster: a 3-member EtcdCluster, one WeedServer as the S3
store, a Cluster of 3 real `memflow-service serve --cluster` processes with lease TTL nodes.LEASE_TTL_S) and a plain
`memflow-service serve` (svc_util.start_serve) as the baseline, then measures:
- `throughput`: put, then fetch, one entry per call (30 layers x 2 heads x 64 x tokens bf16: ~2 MB full, ~180 KB
  `--quick`) from one client process per stream: `single` (the plain service, one stream), `cluster_1` (one
  stream on one cluster node) and `cluster_3` (3 streams at once, each created through - so owned by - another
  node; the 3 client processes start together at a barrier). Cluster clients are routed MemoryClients of all 3
  addresses. Each setup runs 2 (`--quick`) or 3 times, round-robin; rows: entries/s and MB/s over the phase's wall
  time (all streams together, median of the runs), p50/p99 latency per call (all runs), `ratio_to_single`;
- `read_through`: fetch latency, one entry per call, interleaved, from a node started with
  MEMFLOW_CLUSTER__LOCAL_CACHE_BYTES=0 (nothing cached: every fetch is a ranged GET from S3) and from a node with
  the default cache; `ratio_to_cached` (p50 and p99);
- `failover` against bank size (keys-only entries, 30 x 64 per-layer keys, put in batches of 100): SIGKILL the
  stream's owner, time from the kill to the first successful query through a routed client (lease expiry +
  take-over); then `takeover`: stop the new owner with SIGTERM (its close releases the stream at once), time from
  its exit to the first query answered by another node (claim + replay from S3 + index rebuild);
- `tier` (also alone: `--only tiers`): the same fetch served by each tier of the read path (local, Mooncake, S3)
  against memcpy and loopback TCP measured side by side; benchmarks/cluster_tiers.py says how.
Targets are ratios (the machine is shared and noisy). Each row is a JSON line; a `summary` line ends the run; rows go
to OUT/cluster.jsonl and a plot to OUT/cluster.png. Every process started here is stopped by PID in finally blocks.

    python benchmarks/cluster.py [--quick] [--only tiers] [--out benchmarks/results]

`--quick` (about 2 minutes on 2 cores): 12 tokens per entry, 40 puts per stream, banks of 50 and 300 entries, tier
frames of 156 tokens (0.96 MB a layer); the full run (about 4 minutes, the tier rows ~50 s and ~1.4 GB of RAM):
128 tokens, 100 puts per stream, banks of 100, 1000, 4000 and 10000 entries, tier frames of 1560 tokens. Without
the Mooncake wheel (or libibverbs1) the tier phase writes one `skipped` row saying why.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "cluster"))
sys.path.insert(0, str(HERE.parent / "tests" / "service"))

from common import RESULTS, Results, percentiles  # noqa: E402
from etcd_servers import EtcdCluster  # noqa: E402
from nodes import LEASE_TTL_S, Cluster  # noqa: E402
from s3_server import TEST_CREDENTIALS, WeedServer  # noqa: E402
from svc_util import start_serve  # noqa: E402

from cluster_tiers import TIER_SHAPES, WAN_TOKENS, tiers  # noqa: E402 - the tier rows: a module of their own

from memory_service import KeySpace, KVLayout, MemFlowError, MemoryClient, NewEntry, StreamSpec  # noqa: E402
from memory_service.errors import NotOwner  # noqa: E402

LAYERS, HEADS, HEAD_DIM, KEY_DIM, BATCH = 30, 2, 64, 64, 100
SETUPS = ("single", "cluster_1", "cluster_3")


def kv_spec(name: str, tokens: int) -> StreamSpec:
    return StreamSpec(name, {"emb": KeySpace(KEY_DIM)},
                      kv=KVLayout(layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM, tokens_per_frame=tokens))


def keys_spec(name: str) -> StreamSpec:
    return StreamSpec(name, {"nam": KeySpace(KEY_DIM, per_layer=True, layers=LAYERS)})


def kv_entries(tokens: int, n: int, seed: int) -> list[NewEntry]:
    import ml_dtypes

    rng = np.random.default_rng(seed)
    layout = kv_spec("x", tokens).kv
    kv = rng.standard_normal(layout.shape, np.float32).astype(ml_dtypes.bfloat16)  # [L, 2, T, H, D], one for all
    return [NewEntry(f, f // 3, "bench", {"emb": rng.standard_normal(KEY_DIM).astype(np.float32)}, kv=kv)
            for f in range(n)]


# ---- one client process per stream ------------------------------------------------------------------------

_BARRIER = None  # in each worker process: the pool's barrier, so the 3 streams of a phase start together


def _init_worker(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def client_phase(targets: list[str], stream: str, op: str, n: int, tokens: int, together: bool) -> dict:
    """In a worker process: connect and warm up, wait at the pool's barrier when `together` (all 3 workers start
    at once), then `op` ("put" or "fetch") n entries of `stream`, one per call. Returns latencies and the wall
    span."""
    entries = kv_entries(tokens, n + 1, seed=zlib.crc32(stream.encode())) if op == "put" else []
    with MemoryClient(targets if len(targets) > 1 else targets[0], failover_timeout_s=30.0) as client:
        # a warm-up call outside the timing: the client learns the layout and the owner, the node opens the stream
        if op == "put":
            client.put(stream, [entries.pop(0)])
        ids = [m.entry_id for m in client.entries(stream)] if op == "fetch" else []
        if op == "fetch":
            client.fetch(stream, ids[:1])
        if together:
            _BARRIER.wait(120)
        lat, moved, start = [], 0, time.time()
        for i in range(n):
            t = time.perf_counter()
            if op == "put":
                client.put(stream, [entries[i]])
                moved += entries[i].kv.nbytes
            else:
                got = client.fetch(stream, [ids[i % len(ids)]])
                moved += got.kv.nbytes
                del got
            lat.append(time.perf_counter() - t)
        nodes = client.nodes() if hasattr(client, "nodes") else {client.target: client}
        planes = sorted({c.plane for c in nodes.values()})
        return {"lat": lat, "bytes": moved, "planes": planes, "start": start, "end": time.time()}


def warm_worker(seconds: float) -> int:
    """Held by each pool process at once, so all of them are started (spawned, imported) before a timed phase."""
    time.sleep(seconds)
    return os.getpid()


def throughput(res: Results, pool, single_target: str, cl: Cluster, tokens: int, n: int, reps: int) -> dict:
    entry_mb = kv_spec("x", tokens).kv.entry_bytes / 1e6
    plans = {"single": [([single_target], "single")], "cluster_1": [(cl.targets, "one")],
             "cluster_3": [(cl.targets, f"tri-{i}") for i in range(3)]}
    with MemoryClient(single_target) as c:
        c.create_stream(kv_spec("single", tokens))
    for i, stream in ((0, "one"), *((i, f"tri-{i}") for i in range(3))):
        with MemoryClient(cl.target(i)) as c:  # created through node i: node i owns it
            c.create_stream(kv_spec(stream, tokens))
    pids = {f.result() for f in [pool.submit(warm_worker, 1.0) for _ in range(3)]}
    if len(pids) != 3:
        raise RuntimeError(f"the worker pool started {len(pids)} processes, expected 3")
    runs: dict[tuple[str, str], list[dict]] = {(op, setup): [] for op in ("put", "fetch") for setup in SETUPS}
    for _ in range(reps):  # round-robin (single, cluster_1, cluster_3, ...) so drift hits all setups alike
        for op in ("put", "fetch"):
            for setup in SETUPS:
                together = len(plans[setup]) > 1  # the barrier holds exactly one task per pool process
                futures = [pool.submit(client_phase, targets, stream, op, n, tokens, together)
                           for targets, stream in plans[setup]]
                parts = [f.result() for f in futures]
                wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
                runs[(op, setup)].append({"parts": parts, "wall": wall, "rate": n * len(parts) / wall,
                                          "bytes": sum(p["bytes"] for p in parts)})
    ratios = {}
    for (op, setup), got in runs.items():
        rate = float(np.median([r["rate"] for r in got]))
        base = float(np.median([r["rate"] for r in runs[(op, "single")]]))
        lat = [x for r in got for p in r["parts"] for x in p["lat"]]
        p50, p99 = percentiles(lat)
        streams = len(got[0]["parts"])
        row = res.add(bench="throughput", op=op, setup=setup, streams=streams, entries_per_rep=n * streams,
                      reps=reps, entry_mb=entry_mb, entries_per_s=rate, mb_per_s=rate * entry_mb, p50_ms=p50,
                      p99_ms=p99, max_ms=max(lat) * 1e3, ratio_to_single=rate / base,
                      entries_per_s_each=[round(r["rate"], 1) for r in got],
                      plane=sorted({x for r in got for p in r["parts"] for x in p["planes"]}),
                      start_spread_s=max(max(p["start"] for p in r["parts"]) - min(p["start"] for p in r["parts"])
                                         for r in got))
        ratios[f"{op}_{setup}"] = row["ratio_to_single"]
    return ratios


def read_through(res: Results, cl: Cluster, tokens: int, n: int) -> dict:
    """Node 2 restarted with nothing cached; node 0 keeps the default cache. Same shape, interleaved fetches."""
    cl.nodes[2].terminate()
    cl.start(2, env={"MEMFLOW_CLUSTER__LOCAL_CACHE_BYTES": "0"})
    where = {"cached": 0, "uncached": 2}
    clients = {k: MemoryClient(cl.target(i)) for k, i in where.items()}
    try:
        for kind, c in clients.items():
            c.create_stream(kv_spec(f"rt-{kind}", tokens))
            for e in kv_entries(tokens, n, seed=7):
                c.put(f"rt-{kind}", [e])
            c.fetch(f"rt-{kind}", [0])  # warm-up: the layout, the channel
        lat: dict[str, list[float]] = {k: [] for k in clients}
        for i in range(3 * n):
            for kind, c in clients.items():
                t = time.perf_counter()
                c.fetch(f"rt-{kind}", [i % n])
                lat[kind].append(time.perf_counter() - t)
    finally:
        for c in clients.values():
            c.close()
    (c50, c99), out = percentiles(lat["cached"]), {}
    for kind in ("cached", "uncached"):
        p50, p99 = percentiles(lat[kind])
        row = res.add(bench="read_through", node=kind, fetches=len(lat[kind]), entry_mb=kv_spec("x", tokens).kv
                      .entry_bytes / 1e6, p50_ms=p50, p99_ms=p99, ratio_to_cached_p50=p50 / c50,
                      ratio_to_cached_p99=p99 / c99)
        out = {"p50": row["ratio_to_cached_p50"], "p99": row["ratio_to_cached_p99"]}
    return out


def first_query(client: MemoryClient, stream: str, q: np.ndarray, timeout: float = 60.0) -> float:
    """Query until one succeeds; returns the monotonic time it returned."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.query(stream, "nam", q, 1)
            return time.monotonic()
        except MemFlowError:  # NotOwner, Unavailable while the owner's lease runs out
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def failover(res: Results, cl: Cluster, size: int, rounds: int) -> dict:
    """`rounds` times: SIGKILL the owner (failover through a routed client), then SIGTERM the heir (take-over on
    another node). Each stopped node is restarted at once, so every round starts with 3 nodes."""
    stream = f"fo-{size}"
    rng = np.random.default_rng(size)
    q = rng.standard_normal((LAYERS, KEY_DIM)).astype(np.float32)
    with MemoryClient(cl.targets, failover_timeout_s=60.0) as routed:
        routed.create_stream(keys_spec(stream))
        for start in range(0, size, BATCH):
            keys = rng.standard_normal((min(BATCH, size - start), LAYERS, KEY_DIM)).astype(np.float32)
            routed.put(stream, [NewEntry(start + i, (start + i) // 3, "fo", {"nam": k}) for i, k in enumerate(keys)])
    fail, take, stop = [], [], []
    for _ in range(rounds):
        with MemoryClient(cl.targets, failover_timeout_s=60.0) as routed:
            routed.query(stream, "nam", q, 1)  # the client knows the owner; the owner has the stream open
            victim = cl.owner(stream)
            t0 = time.monotonic()
            cl.kill(victim)  # SIGKILL: the lease runs out on its own
            fail.append(first_query(routed, stream, q) - t0)
        heir = cl.owner(stream)
        cl.start(victim)
        # clean handover: the heir's close releases the stream; another node takes it over on its first call
        other = next(i for i in range(3) if i != heir)
        with MemoryClient(cl.target(other), failover_timeout_s=60.0) as direct:
            t_stop = time.monotonic()
            cl.nodes[heir].terminate()
            t0 = time.monotonic()
            stop.append(t0 - t_stop)
            take.append(first_query(direct, stream, q) - t0)
            if cl.owner(stream) != other:
                raise NotOwner(f"stream {stream!r} went to node {cl.owner(stream)}, expected node {other}")
        cl.start(heir)
    return res.add(bench="failover", entries=size, key_bytes=size * LAYERS * KEY_DIM * 4, put_batch=BATCH,
                   rounds=rounds, lease_ttl_s=LEASE_TTL_S, failover_s=float(np.median(fail)),
                   failover_minus_ttl_s=float(np.median(fail)) - LEASE_TTL_S, takeover_s=float(np.median(take)),
                   failover_each_s=[round(x, 3) for x in fail], takeover_each_s=[round(x, 3) for x in take],
                   sigterm_stop_s=float(np.median(stop)))


# ---- the run -------------------------------------------------------------------------------------------

def plot(res: Results) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(19, 4))
    rows = [r for r in res.rows if r["bench"] == "throughput"]
    for j, op in enumerate(("put", "fetch")):
        mine = [r for r in rows if r["op"] == op]
        xs = np.arange(len(mine)) + (j - 0.5) * 0.4
        bars = ax1.bar(xs, [r["mb_per_s"] for r in mine], 0.4, label=op)
        ax1.bar_label(bars, [f"{r['ratio_to_single']:.2f}x" for r in mine], fontsize=7)
    ax1.set_xticks(range(len(SETUPS)), SETUPS)
    ax1.set(ylabel="MB/s (all streams)", title="throughput, ratio to the single-node service")
    if rows:
        ax1.legend(fontsize=7)
    rt = [r for r in res.rows if r["bench"] == "read_through"]
    for j, p in enumerate(("p50_ms", "p99_ms")):
        ax2.bar(np.arange(len(rt)) + (j - 0.5) * 0.4, [r[p] for r in rt], 0.4, label=p)
    ax2.set_xticks(range(len(rt)), [r["node"] for r in rt])
    ax2.set(ylabel="ms per fetch (one entry)", title="read-through on a local miss (S3)")
    if rt:
        ax2.legend(fontsize=7)
    fo = [r for r in res.rows if r["bench"] == "failover"]
    if fo:
        n = [r["entries"] for r in fo]
        ax3.plot(n, [r["failover_s"] for r in fo], "o-", label="failover (SIGKILL -> first query)")
        ax3.plot(n, [r["takeover_s"] for r in fo], "o-", label="take-over (replay + index rebuild)")
        ax3.axhline(fo[0]["lease_ttl_s"], color="grey", ls=":", label="lease TTL")
        ax3.set_xscale("log")
        ax3.set_xticks(n, [str(x) for x in n])
        ax3.minorticks_off()
        ax3.legend(fontsize=7)
    ax3.set(xlabel="entries in the stream", ylabel="s", title="failover and take-over vs bank size")
    ax3.set_ylim(bottom=0)
    tr = [r for r in res.rows if r["bench"] == "tier" and "gb_per_s" in r]
    shapes = [s for s in TIER_SHAPES if any(r["shape"] == s for r in tr)]
    names = list(dict.fromkeys(r["tier"] for r in tr))
    for j, shape in enumerate(shapes):
        mine = {r["tier"]: r for r in tr if r["shape"] == shape}
        xs = np.arange(len(names)) + (j - (len(shapes) - 1) / 2) * 0.4
        bars = ax4.bar(xs, [mine[t]["gb_per_s"] for t in names], 0.4,
                       label=f"{shape}: {next(iter(mine.values()))['mb_per_fetch']:.1f} MB a fetch")
        ax4.bar_label(bars, [f"{mine[t]['gb_per_s']:.2f}" for t in names], fontsize=6)
    ax4.set_xticks(range(len(names)), [t.replace("mooncake_", "mc ") for t in names], fontsize=7)
    ax4.set(ylabel="GB/s (p50 fetch)", title="a fetch from each tier vs memcpy and loopback TCP")
    ax4.set_yscale("log")
    if tr:
        ax4.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(res.path.with_suffix(".png"), dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~180 KB entries, banks of 50 and 300 (about 2 min)")
    parser.add_argument("--only", choices=("tiers",), help="only the tier rows (etcd, weed and Mooncake)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    tokens, n, reps, rt_n, sizes, rounds = ((12, 40, 2, 30, (50, 300), 3) if args.quick else
                                          (128, 100, 3, 40, (100, 1000, 4000, 10000), 3))
    tier_tokens, tier_reps = (156, {"layer": 15, "whole": 8}) if args.quick else (WAN_TOKENS, {"layer": 15, "whole": 5})
    for k, v in TEST_CREDENTIALS.items():  # weed's S3 accepts these; the service nodes inherit them
        os.environ.setdefault(k, v)
    res = Results("cluster", Path(args.out))
    t_run = time.monotonic()
    etcd = weed = cl = single = pool = None
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="memflow-cluster-bench-") as tmp:
        try:
            etcd = EtcdCluster(os.path.join(tmp, "etcd"), n=3)
            weed = WeedServer(os.path.join(tmp, "weed"))
            if args.only is None:
                os.makedirs(os.path.join(tmp, "single"))
                single = start_serve(os.path.join(tmp, "single", "data"), log_dir=os.path.join(tmp, "single"))
                cl = Cluster(Path(tmp) / "cluster", etcd.endpoints, weed.endpoint, n=3)
                ctx = multiprocessing.get_context("spawn")
                pool = concurrent.futures.ProcessPoolExecutor(3, mp_context=ctx, initializer=_init_worker,
                                                              initargs=(ctx.Barrier(3),))
                ratios = throughput(res, pool, single.target, cl, tokens, n, reps)
                single.kill()  # the baseline is done: its CPU goes back to the cluster
                rt = read_through(res, cl, tokens, rt_n)
                fo = [failover(res, cl, size, rounds) for size in sizes]
                pool.shutdown()
                cl.stop()  # the tier phase runs in this process: the nodes' CPU and memory go back to it
                summary = {**{f"ratio_{k}": v for k, v in ratios.items()}, "read_through_ratio_p50": rt["p50"],
                           "read_through_ratio_p99": rt["p99"], "failover_s": {r["entries"]: r["failover_s"] for r in fo},
                           "takeover_s": {r["entries"]: r["takeover_s"] for r in fo}}
            summary["tiers"] = tiers(res, tmp, etcd, weed, tier_tokens, tier_reps)
            res.add(bench="summary", quick=args.quick, only=args.only, lease_ttl_s=LEASE_TTL_S, **summary,
                    wall_s=time.monotonic() - t_run)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            for stop in (cl and cl.stop, single and single.kill, weed and weed.stop, etcd and etcd.stop):
                if stop:
                    stop()
    print(f"wrote {res.close()}", file=sys.stderr)
    plot(res)


if __name__ == "__main__":
    main()
