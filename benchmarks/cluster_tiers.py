"""Cluster benchmark, tier rows: the same fetch served by each tier of a node's read path (cluster/tiers.py).

Run by benchmarks/cluster.py (in a full run, and alone with `--only tiers`), in that process, over its etcd and weed
and a MooncakeCluster (tests/cluster/mooncake_servers.py: a master and one store node, TCP). Wan2.1-1.3B K/V (1560
tokens x 12 heads x 128 x (K, V) bf16: 9.58 MB a layer) in two shapes: `layer` (3 frames of one layer, 28.75 MB a
fetch; a 1-layer stream) and `whole` (1 frame of 30 layers, 287.5 MB). ClusterBank a puts them (its local cache
holds them, and they go through to Mooncake) and fetches: `local`; b (local_cache_bytes=0, the hot tier) takes the
streams over and fetches: `mooncake` (the whole read path: one scattered batch read per entry, raw bodies straight
into the fetch buffer, checksums checked); then the same layers as objects of its own, read in one
MooncakeTier.get_many into a warm buffer: `mooncake_get_into` (the transfer alone), and the same bytes written by
one MooncakeTier.put in the write-through's shape (a header and a layer body per object, from warm unregistered
buffers, written from where they lie): `mooncake_put`; c (local_cache_bytes=0, no hot tier: S3 only) fetches:
`s3`. Every fetch goes into one warm buffer.

Baselines over the same bytes: `memcpy` (np.copyto between warm buffers) and `tcp` (a 127.0.0.1 socket pair: a
1-byte request, then sendall of a warm buffer from a thread, recv_into one warm buffer, the connection kept). The
machine is shared: a tier's fetches alternate with baseline fetches (tcp for mooncake and s3, memcpy for local), so
a ratio compares samples taken side by side (`baseline_gb_per_s` in the row); the `tcp` and `memcpy` rows pool every
baseline sample. Rows: GB/s at the p50 fetch, p50/p99 per fetch, `ratio_to_tcp` (Mooncake, S3; target: get_into
>= 0.5), `ratio_to_memcpy` (local), `tier_reads` (the bank's tier_stats() over the timed fetches: which tier served),
`same_bytes` (crc32 equal to local's) and `client_cpu_s_per_gb` (this process's CPU seconds per GB moved, all
threads: what a fetch costs the node besides the wall time).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
import zlib
from typing import Callable

import numpy as np

from common import Results, percentiles  # benchmarks/ and tests/cluster are on sys.path (cluster.py)
from etcd_servers import EtcdCluster
from mooncake_servers import MooncakeCluster
from nodes import LEASE_TTL_S
from s3_server import WeedServer

from memory_service import KeySpace, KVLayout, NewEntry, StreamSpec
from memory_service.cluster.node import ClusterBank
from memory_service.config import BankConfig, ClusterConfig

WAN_HEADS, WAN_DIM, WAN_LAYERS, WAN_TOKENS = 12, 128, 30, 1560  # Wan2.1-1.3B: 9.58 MB a layer, 287.5 MB a frame
TIER_SHAPES = {"layer": (1, 3), "whole": (WAN_LAYERS, 1)}  # shape -> (layers per entry, frames fetched)
KEY_DIM = 64
TIERS = ("memcpy", "tcp", "local", "mooncake_get_into", "mooncake_put", "mooncake", "s3")


class TcpLoopback:
    """Raw loopback TCP over one kept connection: a 1-byte request, nbytes sent back by a thread, recv_into a warm
    buffer (both buffers pre-touched: the same conditions the tiers get)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.src, self.dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
        self.view = memoryview(self.dst)
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.rx = socket.create_connection(self.lsock.getsockname())
        self.tx, _ = self.lsock.accept()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while self.tx.recv(1):
                self.tx.sendall(self.src)
        except OSError:  # closed under it
            pass

    def one(self) -> None:
        self.rx.sendall(b"g")
        got = 0
        while got < self.nbytes:
            k = self.rx.recv_into(self.view[got:])
            if not k:
                raise ConnectionError(f"loopback peer closed after {got} of {self.nbytes} bytes")
            got += k

    def close(self) -> None:
        self.rx.close()  # the server thread's recv answers b"": it ends
        self.thread.join(10)
        self.tx.close()
        self.lsock.close()


def memcpy_fn(nbytes: int) -> Callable[[], None]:
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    return lambda: np.copyto(dst, src)


def side_by_side(fn: Callable[[], None], baseline: Callable[[], None], reps: int, warm: bool = True,
                 untimed: Callable[[], None] = lambda: None) -> tuple[list[float], list[float], float]:
    """`reps` rounds of one `fn` then one `baseline` call (after a warm-up call of each; of `baseline` only when
    not `warm`): their seconds, and this process's CPU seconds per `fn` call. `untimed` runs before each `fn`."""
    if warm:
        untimed()
        fn()
    baseline()
    took, base, cpu = [], [], 0.0
    for _ in range(reps):
        untimed()
        c, t = time.process_time(), time.perf_counter()
        fn()
        took.append(time.perf_counter() - t)
        cpu += time.process_time() - c
        t = time.perf_counter()
        baseline()
        base.append(time.perf_counter() - t)
    return took, base, cpu / reps


def wan_stream(bank: ClusterBank, shape: str, tokens: int) -> list[int]:
    """Create tier-<shape> and put its frames (random bf16, layer by layer: no float32 copy of a whole frame)."""
    import ml_dtypes

    layers, n = TIER_SHAPES[shape]
    layout = KVLayout(layers=layers, heads=WAN_HEADS, head_dim=WAN_DIM, tokens_per_frame=tokens)
    bank.create_stream(StreamSpec(f"tier-{shape}", {"emb": KeySpace(KEY_DIM)}, kv=layout))
    rng, ids = np.random.default_rng(layers), []
    for f in range(n):
        kv = np.empty(layout.shape, ml_dtypes.bfloat16)  # [L, 2, T, H, D]
        for j in range(layers):
            kv[j] = rng.standard_normal(layout.layer_shape, np.float32)
        ids += bank.put(f"tier-{shape}", [NewEntry(f, f, "bench", {"emb": rng.standard_normal(KEY_DIM)
                                                                  .astype(np.float32)}, kv=kv)])
        del kv
    return ids


def bank_fetches(bank: ClusterBank, stream: str, ids: list[int], reps: int, baseline: Callable[[], None]):
    """Fetches of `ids` into one warm buffer, each followed by a baseline call: latencies, baseline latencies, CPU
    s per fetch, reads per tier in the timed fetches, crc32 of the bytes."""
    _, _, shape, dtype = bank.fetch_layout(stream, ids)
    out = np.zeros(shape, dtype)  # [n, L, 2, T, H, D]
    bank.fetch(stream, ids, out=out)  # warm-up, outside the counters: the take-over (replay from S3) happens here
    before = bank.tier_stats()
    lat, base, cpu = side_by_side(lambda: bank.fetch(stream, ids, out=out), baseline, reps, warm=False)
    after = bank.tier_stats()
    crc = zlib.crc32(out.view(np.uint8).reshape(-1))
    return lat, base, cpu, {t: after[t]["reads"] - before[t]["reads"] for t in after}, crc


def raw_get_into(bank: ClusterBank, layer_bytes: int, count: int, reps: int, baseline: Callable[[], None]):
    """MooncakeTier.get_many alone: `count` objects of one layer each, in one call into a warm buffer."""
    assert bank.hot is not None
    buf = np.ones(count * layer_bytes, np.uint8)
    views = [buf[i * layer_bytes:(i + 1) * layer_bytes] for i in range(count)]
    keys = [f"memflow-bench/{uuid.uuid4().hex}/{i}" for i in range(count)]
    bank.hot.register(buf)  # registered for good (what an arena is): nothing registered per call over RDMA
    try:
        if bank.hot.put([(k, [v]) for k, v in zip(keys, views)]) != count:
            raise RuntimeError(f"Mooncake stored fewer than {count} objects of {layer_bytes} bytes: {bank.hot.stats()}")

        def one() -> None:
            if not all(bank.hot.get_many([(k, [v]) for k, v in zip(keys, views)])):
                raise RuntimeError(f"a get of {layer_bytes} bytes missed: {bank.hot.stats()}")

        return side_by_side(one, baseline, reps)
    finally:
        bank.hot.remove(keys)
        bank.hot.unregister(buf)


def raw_put(bank: ClusterBank, layer_bytes: int, count: int, reps: int, baseline: Callable[[], None]):
    """MooncakeTier.put alone, in the write-through's shape: `count` objects of (a 28-byte header, one layer's
    body) from warm unregistered buffers, in one call; fresh keys each time (the last call's removed, untimed)."""
    assert bank.hot is not None
    hot = bank.hot
    heads = np.ones(count * 28, np.uint8)
    bodies = np.ones(count * layer_bytes, np.uint8)
    parts = [[heads[i * 28:(i + 1) * 28].data, bodies[i * layer_bytes:(i + 1) * layer_bytes].data] for i in range(count)]
    keys: list[str] = []

    def fresh() -> None:
        if keys:
            hot.remove(keys)
        keys[:] = [f"memflow-bench/{uuid.uuid4().hex}/{i}" for i in range(count)]

    def one() -> None:
        if hot.put(list(zip(keys, parts))) != count:
            raise RuntimeError(f"Mooncake stored fewer than {count} objects of {layer_bytes} bytes: {hot.stats()}")

    try:
        return side_by_side(one, baseline, reps, untimed=fresh)
    finally:
        if keys:
            hot.remove(keys)


def tiers(res: Results, tmp: str, etcd: EtcdCluster, weed: WeedServer, tokens: int, reps: dict) -> dict:
    """Banks a (puts, local cache), b (local_cache_bytes=0, hot tier: Mooncake), c (local_cache_bytes=0, no hot
    tier: S3) one after another on the same streams (each takes them over from the last); see the module doc."""
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
        more = {"mooncake_master": pool.master, "mooncake_metadata": pool.metadata} if hot else {}
        return ClusterConfig(etcd=",".join(etcd.endpoints), s3_endpoint=weed.endpoint, s3_bucket=f"memflow-tiers-{tag}",
                             node_id=node, lease_ttl_s=LEASE_TTL_S, prefix=f"memflow-tiers-{tag}/",
                             local_cache_bytes=None if node == "a" else 0, **more)

    nbytes = {shape: n * layers * layer_bytes for shape, (layers, n) in TIER_SHAPES.items()}
    tcp = {shape: TcpLoopback(nbytes[shape]) for shape in TIER_SHAPES}
    copy = {shape: memcpy_fn(nbytes[shape]) for shape in TIER_SHAPES}
    lat, base, cpu, served, crcs, ids = {}, {}, {}, {}, {}, {}
    try:
        for node, tier, hot in (("a", "local", True), ("b", "mooncake", True), ("c", "s3", False)):
            bank = ClusterBank(os.path.join(tmp, f"tier-{node}"), BankConfig(), config(node, hot))
            try:
                for shape, (layers, n) in TIER_SHAPES.items():
                    if node == "a":
                        ids[shape] = wan_stream(bank, shape, tokens)
                    baseline = copy[shape] if tier == "local" else tcp[shape].one
                    lat[shape, tier], base[shape, tier], cpu[shape, tier], served[shape, tier], crcs[shape, tier] = \
                        bank_fetches(bank, f"tier-{shape}", ids[shape], reps[shape], baseline)
                    if node == "b":
                        got = raw_get_into(bank, layer_bytes, n * layers, reps[shape], tcp[shape].one)
                        lat[shape, "mooncake_get_into"], base[shape, "mooncake_get_into"], \
                            cpu[shape, "mooncake_get_into"] = got
                        got = raw_put(bank, layer_bytes, n * layers, reps[shape], tcp[shape].one)
                        lat[shape, "mooncake_put"], base[shape, "mooncake_put"], cpu[shape, "mooncake_put"] = got
            finally:
                bank.close()  # hands the streams to the next bank
    finally:
        pool.stop()
        for t in tcp.values():
            t.close()
    out = {}
    for shape, (layers, n) in TIER_SHAPES.items():
        size = nbytes[shape]
        lat[shape, "memcpy"] = base[shape, "local"]
        lat[shape, "tcp"] = [x for t in ("mooncake_get_into", "mooncake_put", "mooncake", "s3") for x in base[shape, t]]
        gbps = {t: size / float(np.median(lat[shape, t])) / 1e9 for t in TIERS}
        for tier in TIERS:
            p50, p99 = percentiles(lat[shape, tier])
            extra: dict = {}
            if (shape, tier) in served:
                extra = {"tier_reads": served[shape, tier], "same_bytes": crcs[shape, tier] == crcs[shape, "local"]}
            if (shape, tier) in base:
                alongside = size / float(np.median(base[shape, tier])) / 1e9
                key = "ratio_to_memcpy" if tier == "local" else "ratio_to_tcp"
                extra.update({key: gbps[tier] / alongside, "baseline_gb_per_s": alongside,
                              "client_cpu_s_per_gb": cpu[shape, tier] / (size / 1e9)})
            res.add(bench="tier", shape=shape, tier=tier, frames=n, layers=layers, tokens=tokens, mb_per_fetch=size / 1e6,
                    fetches=len(lat[shape, tier]), gb_per_s=gbps[tier], p50_ms=p50, p99_ms=p99, **extra)
        rows = {r["tier"]: r for r in res.rows if r.get("bench") == "tier" and r.get("shape") == shape}
        out.update({f"{shape}_mooncake_to_tcp": round(rows["mooncake"]["ratio_to_tcp"], 4),
                    f"{shape}_get_into_to_tcp": round(rows["mooncake_get_into"]["ratio_to_tcp"], 4),
                    f"{shape}_put_to_tcp": round(rows["mooncake_put"]["ratio_to_tcp"], 4),
                    f"{shape}_local_to_memcpy": round(rows["local"]["ratio_to_memcpy"], 4),
                    f"{shape}_s3_gb_per_s": round(gbps["s3"], 4)})
    return out
