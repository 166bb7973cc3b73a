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
- `tier` (also alone: `--only tiers`): the same fetch served by each tier of the read path (cluster/tiers.py), in
  this process, over the same etcd and weed and a MooncakeCluster (tests/cluster/mooncake_servers.py: a master and
  one store node, TCP): Wan2.1-1.3B K/V (1560 tokens x 12 heads x 128 x (K, V) bf16: 9.58 MB a layer) in two
  shapes, `layer` (3 frames of one layer, 28.75 MB a fetch; a 1-layer stream) and `whole` (1 frame of 30 layers,
  287.5 MB). ClusterBank a puts them (its local cache holds them, and they go through to Mooncake) and fetches:
  `local`; b (local_cache_bytes=0, the hot tier) takes the streams over and fetches: `mooncake`, then the same
  layers as objects of its own straight into registered memory: `mooncake_get_into` (MooncakeTier alone, no
  decode); c (local_cache_bytes=0, no hot tier: S3 only) fetches: `s3`. Baselines over the same bytes: `memcpy`
  (np.copyto between warm buffers) and `tcp` (a 127.0.0.1 socket pair, a 1-byte request, then sendall from a
  thread and recv_into a preallocated buffer). Fetches go into one warm buffer; rows: GB/s at the p50 fetch, p50/p99
  per fetch, `ratio_to_tcp` (Mooncake, S3; target: get_into >= 0.5), `ratio_to_memcpy` (local), `tier_reads` (the
  bank's tier_stats() over the timed fetches: which tier served) and `same_bytes` (crc32 equal to local's).
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
import socket
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "cluster"))
sys.path.insert(0, str(HERE.parent / "tests" / "service"))

from common import RESULTS, Results, percentiles, timed  # noqa: E402
from etcd_servers import EtcdCluster  # noqa: E402
from mooncake_servers import MooncakeCluster  # noqa: E402
from nodes import LEASE_TTL_S, Cluster  # noqa: E402
from s3_server import TEST_CREDENTIALS, WeedServer  # noqa: E402
from svc_util import start_serve  # noqa: E402

from memory_service import KeySpace, KVLayout, MemFlowError, MemoryClient, NewEntry, StreamSpec  # noqa: E402
from memory_service.cluster.node import ClusterBank  # noqa: E402
from memory_service.config import BankConfig, ClusterConfig  # noqa: E402
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


# ---- tiers: the same fetch served by each tier ----------------------------------------------------------------

WAN_HEADS, WAN_DIM, WAN_LAYERS, WAN_TOKENS = 12, 128, 30, 1560  # Wan2.1-1.3B: 9.58 MB a layer, 287.5 MB a frame
TIER_SHAPES = {"layer": (1, 3), "whole": (WAN_LAYERS, 1)}  # shape -> (layers per entry, frames fetched)
STAGING = 32 << 20  # MooncakeTier's staging buffer: above one layer span (9.58 MB and its header)



def memcpy(nbytes: int, reps: int) -> list[float]:
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    return timed(lambda: np.copyto(dst, src), reps)


def tcp_loopback(nbytes: int, reps: int) -> list[float]:
    """Raw loopback TCP: a 1-byte request, then nbytes sent back by a thread, recv_into a warm buffer."""
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    view = memoryview(dst)
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        rx = socket.create_connection(lsock.getsockname())
        tx, _ = lsock.accept()

        def serve() -> None:
            while tx.recv(1):
                tx.sendall(src)

        th = threading.Thread(target=serve, daemon=True)
        th.start()

        def one() -> None:
            rx.sendall(b"g")
            got = 0
            while got < nbytes:
                k = rx.recv_into(view[got:])
                if not k:
                    raise ConnectionError(f"loopback peer closed after {got} of {nbytes} bytes")
                got += k

        try:
            return timed(one, reps)
        finally:
            rx.close()  # the server thread's recv answers b"": it ends
            th.join(10)
            tx.close()


def wan_stream(bank: ClusterBank, shape: str, tokens: int) -> list[int]:
    """Create tier-<shape> and put its frames (random bf16, layer by layer: no float32 copy of a whole frame)."""
    import ml_dtypes

    layers, n = TIER_SHAPES[shape]
    layout = KVLayout(layers=layers, heads=WAN_HEADS, head_dim=WAN_DIM, tokens_per_frame=tokens)
    bank.create_stream(StreamSpec(f"tier-{shape}", {"emb": KeySpace(KEY_DIM)}, kv=layout))
    rng, ids = np.random.default_rng(layers), []
    for f in range(n):
        kv = np.empty(layout.shape, ml_dtypes.bfloat16)
        for j in range(layers):
            kv[j] = rng.standard_normal(layout.layer_shape, np.float32)
        ids += bank.put(f"tier-{shape}", [NewEntry(f, f, "bench", {"emb": rng.standard_normal(KEY_DIM)
                                                                  .astype(np.float32)}, kv=kv)])
        del kv
    return ids


def bank_fetches(bank: ClusterBank, stream: str, ids: list[int], reps: int) -> tuple[list[float], dict, int]:
    """Fetches of `ids` into one warm buffer: latencies, reads per tier in the timed ones, crc32 of the bytes."""
    _, _, shape, dtype = bank.fetch_layout(stream, ids)
    out = np.zeros(shape, dtype)
    bank.fetch(stream, ids, out=out)  # warm-up, outside the counters: the take-over (replay from S3) happens here
    before = bank.tier_stats()
    lat = timed(lambda: bank.fetch(stream, ids, out=out), reps, warm=False)
    after = bank.tier_stats()
    crc = zlib.crc32(out.view(np.uint8).reshape(-1))
    return lat, {t: after[t]["reads"] - before[t]["reads"] for t in after}, crc


def raw_get_into(bank: ClusterBank, layer_bytes: int, count: int, reps: int) -> list[float]:
    """MooncakeTier.get_into alone: `count` objects of one layer each, into registered (zero-copy) memory."""
    buf = np.ones(count * layer_bytes, np.uint8)
    views = [buf[i * layer_bytes:(i + 1) * layer_bytes] for i in range(count)]
    keys = [f"memflow-bench/{uuid.uuid4().hex}/{i}" for i in range(count)]
    bank.hot.register(buf)
    try:
        if bank.hot.put([(k, [v]) for k, v in zip(keys, views)]) != count:
            raise RuntimeError(f"Mooncake stored fewer than {count} objects of {layer_bytes} bytes: {bank.hot.stats()}")

        def one() -> None:
            if not all(bank.hot.get_into(k, v) for k, v in zip(keys, views)):
                raise RuntimeError(f"a get_into of {layer_bytes} bytes missed: {bank.hot.stats()}")

        return timed(one, reps)
    finally:
        bank.hot.remove(keys)
        bank.hot.unregister(buf)


def tiers(res: Results, tmp: str, etcd: EtcdCluster, weed: WeedServer, tokens: int, reps: dict) -> dict:
    """Banks a (puts, local cache), b (local_cache_bytes=0, hot tier: Mooncake), c (local_cache_bytes=0, no hot
    tier: S3) one after another on the same streams (each takes them over from the last), then the baselines."""
    import pytest  # mooncake_servers skips (pytest.skip) where the wheel or libibverbs1 is missing

    layer_bytes = 2 * tokens * WAN_HEADS * WAN_DIM * 2
    segment = ((100 * layer_bytes >> 20) + 16) << 20  # MiB; 66 layers go in: below the eviction mark
    try:
        pool = MooncakeCluster(os.path.join(tmp, "mooncake"), stores=1, segment_bytes=segment)
    except pytest.skip.Exception as e:
        res.add(bench="tier", skipped=str(e))
        return {}
    tag = uuid.uuid4().hex[:8]

    def config(node: str, hot: bool) -> ClusterConfig:
        more = {"mooncake_master": pool.master, "mooncake_metadata": pool.metadata,
                "mooncake_staging_bytes": STAGING} if hot else {}
        return ClusterConfig(etcd=",".join(etcd.endpoints), s3_endpoint=weed.endpoint, s3_bucket=f"memflow-tiers-{tag}",
                             node_id=node, lease_ttl_s=LEASE_TTL_S, prefix=f"memflow-tiers-{tag}/",
                             local_cache_bytes=None if node == "a" else 0, **more)

    lat, served, crcs, ids = {}, {}, {}, {}
    try:
        for node, tier, hot in (("a", "local", True), ("b", "mooncake", True), ("c", "s3", False)):
            bank = ClusterBank(os.path.join(tmp, f"tier-{node}"), BankConfig(), config(node, hot))
            try:
                for shape, (_, n) in TIER_SHAPES.items():
                    if node == "a":
                        ids[shape] = wan_stream(bank, shape, tokens)
                    got = bank_fetches(bank, f"tier-{shape}", ids[shape], reps[shape])
                    lat[shape, tier], served[shape, tier], crcs[shape, tier] = got
                    if node == "b":
                        count = n * TIER_SHAPES[shape][0]
                        lat[shape, "mooncake_get_into"] = raw_get_into(bank, layer_bytes, count, reps[shape])
            finally:
                bank.close()  # hands the streams to the next bank
    finally:
        pool.stop()
    out = {}
    for shape, (layers, n) in TIER_SHAPES.items():
        nbytes = n * layers * layer_bytes
        lat[shape, "memcpy"] = memcpy(nbytes, 3 * reps[shape])  # cheap, and noisy here: more samples
        lat[shape, "tcp"] = tcp_loopback(nbytes, 3 * reps[shape])
        gbps = {t: nbytes / float(np.median(x)) / 1e9 for (s, t), x in lat.items() if s == shape}
        for tier in ("memcpy", "tcp", "local", "mooncake_get_into", "mooncake", "s3"):
            p50, p99 = percentiles(lat[shape, tier])
            extra = {}
            if (shape, tier) in served:
                extra = {"tier_reads": served[shape, tier], "same_bytes": crcs[shape, tier] == crcs[shape, "local"]}
            if tier.startswith("mooncake") or tier == "s3":
                extra["ratio_to_tcp"] = gbps[tier] / gbps["tcp"]
            if tier == "local":
                extra["ratio_to_memcpy"] = gbps[tier] / gbps["memcpy"]
            res.add(bench="tier", shape=shape, tier=tier, frames=n, layers=layers, tokens=tokens,
                    mb_per_fetch=nbytes / 1e6, fetches=len(lat[shape, tier]), gb_per_s=gbps[tier], p50_ms=p50, p99_ms=p99,
                    **extra)
        out.update({f"{shape}_mooncake_to_tcp": round(gbps["mooncake"] / gbps["tcp"], 4),
                    f"{shape}_get_into_to_tcp": round(gbps["mooncake_get_into"] / gbps["tcp"], 4),
                    f"{shape}_local_to_memcpy": round(gbps["local"] / gbps["memcpy"], 4),
                    f"{shape}_s3_gb_per_s": round(gbps["s3"], 4)})
    return out

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
