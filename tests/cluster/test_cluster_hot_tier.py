"""Cluster mode with the Mooncake hot tier, over real etcd members, a real weed and a real Mooncake master with two
store nodes: one node's frames reach another node without S3, and every hot-tier failure falls through to S3.

- put on node a, fetch on node b (which caches nothing locally): served by Mooncake (the tier counters say so),
  bit-exact;
- a store node killed -9 mid-run: fetches still succeed (a replica, or S3), bit-exact, nothing acknowledged lost;
- the master restarted (it loses every key): fetches fall through to S3, bit-exact;
- a pool too small for the stream (eviction at capacity): the newest entries stay (hard-pinned), the evicted layers
  come from S3, bit-exact.
"""

from __future__ import annotations


import ml_dtypes
import numpy as np

from etcd_servers import etcd_cluster  # noqa: F401 - the fixture, found by pytest through this name
from mooncake_servers import MooncakeCluster, mooncake  # noqa: F401 - the fixture, found by pytest through this name
from nodes import in_process_configs
from s3_server import weed  # noqa: F401 - the fixture, found by pytest through this name
from svc_util import make_entry, make_spec

from memory_service import KVLayout, NewEntry
from memory_service.cluster.node import ClusterBank
from memory_service.config import BankConfig, ClusterConfig


def make_config(etcd_cluster, weed, pool, **kw):
    """`make(node, **fields)`: configs of in-process nodes of one cluster, each with the hot tier on `pool`."""
    base = in_process_configs(etcd_cluster.endpoints, weed.endpoint, "hot")

    def make(node: str, **more) -> ClusterConfig:
        return base(node, mooncake_master=pool.master, mooncake_metadata=pool.metadata, **kw, **more)

    return make


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16)


def check(bank: ClusterBank, stream: str, ids: list[int], seeds: list[int], entry=make_entry) -> None:
    got = bank.fetch(stream, ids)
    for row, seed in zip(got.kv, seeds):
        assert np.array_equal(bits(row), bits(entry(seed).kv)), f"entry of seed {seed} differs"


def tiers(bank: ClusterBank) -> dict[str, int]:
    return {t: s["reads"] for t, s in bank.tier_stats().items()}


def test_frames_move_between_nodes_through_mooncake_and_survive_its_failures(tmp_path, etcd_cluster, weed, mooncake):
    config = make_config(etcd_cluster, weed, mooncake, mooncake_replicas=2)
    a = ClusterBank(str(tmp_path / "a"), BankConfig(), config("a"))
    try:
        a.create_stream(make_spec("cam0"))
        seeds = list(range(8))
        ids = a.put("cam0", [make_entry(s) for s in seeds])
    finally:
        a.close()  # hands cam0 back: b takes it over
    b = ClusterBank(str(tmp_path / "b"), BankConfig(), config("b", local_cache_bytes=0))
    try:
        check(b, "cam0", ids, seeds)
        t = tiers(b)
        assert t["mooncake"] == len(ids) * 4 and t["s3"] == 0, f"a's frames should reach b through Mooncake: {t}"

        mooncake.kill_store(0)  # mid-run: reads never fail, they go to a replica or to S3
        try:
            for _ in range(3):
                check(b, "cam0", ids, seeds)
            more = b.put("cam0", [make_entry(s) for s in range(8, 11)])
            check(b, "cam0", ids + more, seeds + [8, 9, 10])
        finally:
            mooncake.restart_store(0)
            mooncake.wait_ready()

        mooncake.restart_master()  # a master without HA forgets every key
        mooncake.wait_ready()
        before = tiers(b)
        check(b, "cam0", ids, seeds)
        after = tiers(b)
        assert after["s3"] > before["s3"], f"misses after a master restart fall through to S3: {before} -> {after}"
    finally:
        b.close()


BIG = KVLayout(layers=4, heads=2, head_dim=64, tokens_per_frame=1024, dtype="bfloat16")  # 2 MiB an entry


def big_entry(seed: int) -> NewEntry:
    e = make_entry(seed)
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal(BIG.shape).astype(ml_dtypes.bfloat16)
    return NewEntry(frame_index=e.frame_index, chunk_index=e.chunk_index, prompt=e.prompt, keys=e.keys, kv=kv)


def test_a_pool_smaller_than_the_stream_evicts_and_reads_fall_through_to_s3(tmp_path, etcd_cluster, weed):
    pool = MooncakeCluster(tmp_path / "pool", stores=1, segment_bytes=16 << 20)  # room for ~7 of 14 entries
    try:
        config = make_config(etcd_cluster, weed, pool)
        a = ClusterBank(str(tmp_path / "a"), BankConfig(), config("a", local_cache_bytes=0))
        try:
            a.create_stream(make_spec("big", kv=BIG))
            seeds = list(range(14))
            ids = []
            for s in seeds:
                ids += a.put("big", [big_entry(s)])
            a.cluster_store.tiers.drain()  # the write-throughs are behind the puts
            check(a, "big", ids[-3:], seeds[-3:], big_entry)
            t = tiers(a)
            assert t["mooncake"] == 3 * BIG.layers and t["s3"] == 0, f"the newest 3 are pinned in the pool: {t}"
            check(a, "big", ids, seeds, big_entry)
            t = tiers(a)
            assert t["s3"] > 0, f"the oldest entries were evicted from the pool and read from S3: {t}"
            assert t["local"] == 0
        finally:
            a.close()
    finally:
        pool.stop()


def test_damaged_bytes_in_the_pool_are_a_miss_and_layer_subsets_land_in_place(tmp_path, etcd_cluster, weed, mooncake):
    """Reads land straight in the fetch buffer: a subset of layers in the order asked for, and bytes the pool holds
    that fail their checksum (another client rewrote the object), or that are another layer's whole object (what a
    reader gets from a slot Mooncake reclaimed under it), are read from S3 instead, bit-exact."""
    from memory_service.cluster.mooncake import MooncakeTier
    from memory_service.cluster.tiers import TAG_BYTES, hot_key

    config = make_config(etcd_cluster, weed, mooncake)
    a = ClusterBank(str(tmp_path / "a"), BankConfig(), config("a"))
    try:
        a.create_stream(make_spec("cam1"))
        seeds = [20, 21, 22]
        ids = a.put("cam1", [make_entry(s) for s in seeds])
        a.cluster_store.tiers.drain()  # the write-throughs are behind the puts
    finally:
        a.close()
    b = ClusterBank(str(tmp_path / "b"), BankConfig(), config("b", local_cache_bytes=0))
    try:
        got = b.fetch("cam1", ids, layers=[2, 0])
        for row, seed in zip(got.kv, seeds):
            assert np.array_equal(bits(row), bits(make_entry(seed).kv[[2, 0]]))
        assert tiers(b)["mooncake"] == 2 * len(ids) and tiers(b)["s3"] == 0
        # damage layer 1 of the middle entry in the pool, under its own key (where the store says it lies)
        at = b.cluster_store._owned["cam1"].where[ids[1]]
        offset, head, body = at.layers[1]
        key = hot_key(at.key, offset)
        with MooncakeTier(mooncake.master, mooncake.metadata) as other:
            span = np.empty(TAG_BYTES + head + body, np.uint8)
            assert other.get_into(key, span)
            span[TAG_BYTES + head + body // 2] ^= 0xFF
            assert other.put([(key, [span])]) == 1
        before = tiers(b)
        check(b, "cam1", ids, seeds)
        after = tiers(b)
        assert after["s3"] == before["s3"] + 1, f"the damaged layer should come from S3: {before} -> {after}"
        assert after["mooncake"] == before["mooncake"] + 4 * len(ids) - 1
        assert b.cluster_store.tiers.flush_promotions(timeout_s=60)  # the S3 read put the good bytes back

        # the last entry's layer 3 key now holds the first entry's layer 3, whole and intact (its own tag, header
        # and body, which agree with each other): a valid object, but not this one
        first, last = (b.cluster_store._owned["cam1"].where[ids[n]] for n in (0, 2))
        with MooncakeTier(mooncake.master, mooncake.metadata) as other:
            o, h, b_ = first.layers[3]
            whole = np.empty(TAG_BYTES + h + b_, np.uint8)
            assert other.get_into(hot_key(first.key, o), whole)
            assert other.put([(hot_key(last.key, last.layers[3][0]), [whole])]) == 1
        before = tiers(b)
        check(b, "cam1", ids, seeds)
        after = tiers(b)
        assert after["s3"] == before["s3"] + 1, f"the foreign layer should come from S3: {before} -> {after}"
        assert after["mooncake"] == before["mooncake"] + 4 * len(ids) - 1
    finally:
        b.close()
