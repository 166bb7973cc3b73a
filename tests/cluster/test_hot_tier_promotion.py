"""Promotion into the Mooncake hot tier after an S3 read-through (cluster/promotion.py), over real etcd members, a
real weed and a real Mooncake master with two store nodes.

Node a (no hot tier) writes the frames, so the pool never has them; node b (the hot tier, nothing cached locally)
takes the stream over and reads them from S3. What a bug would break:
- the fetch is served and bit-exact while promotions are held (it never waits for the pool), and once they are let
  go, a later fetch is served from Mooncake (the tier counters say so), bit-exact;
- a queue full by bytes drops promotions and counts them: only what fit reaches the pool, the rest is read from
  S3 again;
- a removal (an entry deleted) drops its queued promotions: its layers never come back into the pool;
- closing with promotions queued (and held) ends, dropping and counting them;
- with the master down, a fetch reads S3 bit-exact and its promotion fails, counted, without failing anything.
"""

from __future__ import annotations

import threading

import numpy as np

from etcd_servers import etcd_cluster  # noqa: F401 - the fixture, found by pytest through this name
from mooncake_servers import mooncake  # noqa: F401 - the fixture, found by pytest through this name
from nodes import in_process_configs
from s3_server import weed  # noqa: F401 - the fixture, found by pytest through this name
from svc_util import make_entry, make_spec

from memory_service.cluster.mooncake import MooncakeTier
from memory_service.cluster.node import ClusterBank
from memory_service.cluster.tiers import TAG_BYTES, hot_key
from memory_service.config import BankConfig, ClusterConfig

LAYERS = 4  # make_spec's layout


def _configs(etcd_cluster, weed, pool):  # noqa: F811
    """`make(node, hot, **fields)`: node configs of one cluster; a hot node reads through Mooncake, caching nothing."""
    base = in_process_configs(etcd_cluster.endpoints, weed.endpoint, "promote")

    def make(node: str, hot: bool, **kw) -> ClusterConfig:
        more = {"mooncake_master": pool.master, "mooncake_metadata": pool.metadata, "local_cache_bytes": 0} if hot else {}
        return base(node, **more, **kw)

    return make


def _hot_reader(tmp_path, etcd_cluster, weed, pool, stream: str, seeds: list[int], **kw) -> tuple[ClusterBank, list[int]]:  # noqa: F811
    """Node a writes `seeds` into `stream` without the pool and closes; node b (the hot tier, `kw` its config) takes
    the stream over: (b, the entry ids)."""
    config = _configs(etcd_cluster, weed, pool)
    ids = _written_without_the_pool(tmp_path, config, stream, seeds)
    return ClusterBank(str(tmp_path / "b"), BankConfig(), config("b", hot=True, **kw)), ids


def _written_without_the_pool(tmp_path, config, stream: str, seeds: list[int]) -> list[int]:
    a = ClusterBank(str(tmp_path / "a"), BankConfig(), config("a", hot=False))
    try:
        a.create_stream(make_spec(stream))
        return a.put(stream, [make_entry(s) for s in seeds])
    finally:
        a.close()  # hands the stream back: b takes it over


def _check(bank: ClusterBank, stream: str, ids: list[int], seeds: list[int]) -> None:
    got = bank.fetch(stream, ids)
    for row, seed in zip(got.kv, seeds):
        assert np.array_equal(row.view(np.uint16), make_entry(seed).kv.view(np.uint16)), f"seed {seed} differs"


def _reads(bank: ClusterBank) -> dict[str, int]:
    return {t: s["reads"] for t, s in bank.tier_stats().items()}


def _in_pool(pool, bank: ClusterBank, stream: str, eid: int) -> list[bool]:
    """Whether each layer of entry `eid` is in the pool, asked by a client of its own."""
    at = bank.cluster_store._owned[stream].where[eid]
    with MooncakeTier(pool.master, pool.metadata) as other:
        return other.get_many([(hot_key(at.key, o), [np.empty(TAG_BYTES + h + b, np.uint8)]) for o, h, b in at.layers])


def test_an_s3_read_is_promoted_in_the_background_and_later_served_from_mooncake(tmp_path, etcd_cluster, weed,
                                                                               mooncake):  # noqa: F811
    seeds = [1, 2, 3]
    b, ids = _hot_reader(tmp_path, etcd_cluster, weed, mooncake, "cam0", seeds)
    try:
        tiers = b.cluster_store.tiers
        with tiers.hold_promotions():  # the fetch must not wait for its promotion
            _check(b, "cam0", ids, seeds)
            assert _reads(b) == {"local": 0, "mooncake": 0, "s3": len(ids)}  # one ranged GET per entry
            held = tiers.promotion_stats()
            assert (held.queued, held.promoted) == (len(ids) * LAYERS, 0)
            assert held.queued_bytes > 0
        assert tiers.flush_promotions(timeout_s=60)
        done = tiers.promotion_stats()
        assert (done.promoted, done.dropped, done.failed, done.queued, done.queued_bytes) == \
            (len(ids) * LAYERS, 0, 0, 0, 0)
        _check(b, "cam0", ids, seeds)
        assert _reads(b) == {"local": 0, "mooncake": len(ids) * LAYERS, "s3": len(ids)}, "not served from the pool"
        scrape = _scrape(b)  # what /metrics serves: the service builds its Metrics from the bank the same way
        assert scrape['memflow_hot_promotions_total{outcome="promoted"}'] == len(ids) * LAYERS
        assert scrape['memflow_hot_promotions_total{outcome="dropped"}'] == 0
        assert scrape['memflow_hot_promotion_queue{unit="bytes"}'] == 0
        assert scrape['memflow_tier_reads_total{tier="mooncake"}'] == len(ids) * LAYERS
        assert scrape['memflow_tier_reads_total{tier="s3"}'] == len(ids)
    finally:
        b.close()


def _scrape(bank: ClusterBank) -> dict[str, float]:
    """`name{labels}` -> value of every sample a /metrics scrape of `bank`'s service would show."""
    from prometheus_client import generate_latest

    from memory_service.service.metrics import Metrics

    metrics = Metrics(bank.stats, tier_stats=bank.tier_stats, promotion_stats=bank.promotion_stats)
    lines = generate_latest(metrics.registry).decode().splitlines()
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in lines) if name[:1] not in "#"}


def test_a_queue_full_by_bytes_drops_promotions_and_counts_them(tmp_path, etcd_cluster, weed, mooncake):  # noqa: F811
    seeds = [4, 5, 6]
    # 1 byte: only a promotion that finds the queue empty is taken (one entry's read), every other is dropped
    b, ids = _hot_reader(tmp_path, etcd_cluster, weed, mooncake, "cam1", seeds, mooncake_promote_queue_bytes=1)
    try:
        tiers = b.cluster_store.tiers
        with tiers.hold_promotions():
            _check(b, "cam1", ids, seeds)
            held = tiers.promotion_stats()
            assert (held.queued, held.dropped) == (LAYERS, (len(ids) - 1) * LAYERS)
        assert tiers.flush_promotions(timeout_s=60)
        assert tiers.promotion_stats().promoted == LAYERS
        assert _scrape(b)['memflow_hot_promotions_total{outcome="dropped"}'] == (len(ids) - 1) * LAYERS
        before = _reads(b)
        _check(b, "cam1", ids, seeds)
        after = _reads(b)
        # the first entry's read was the one taken; the other two come from S3 again
        assert after["mooncake"] - before["mooncake"] == LAYERS and after["s3"] - before["s3"] == len(ids) - 1
        assert _in_pool(mooncake, b, "cam1", ids[0]) == [True] * LAYERS
    finally:
        b.close()


def test_a_deleted_entry_loses_its_queued_promotions(tmp_path, etcd_cluster, weed, mooncake):  # noqa: F811
    seeds = [7, 8]
    b, ids = _hot_reader(tmp_path, etcd_cluster, weed, mooncake, "cam2", seeds)
    try:
        tiers = b.cluster_store.tiers
        with tiers.hold_promotions():
            _check(b, "cam2", ids, seeds)
            gone = b.cluster_store._owned["cam2"].where[ids[0]]
            assert b.delete("cam2", [ids[0]]) == 1
            assert tiers.promotion_stats().dropped == LAYERS
        assert tiers.flush_promotions(timeout_s=60)
        tiers.drain()  # the removal, queued behind the write-throughs
        assert tiers.promotion_stats().promoted == LAYERS  # the other entry's
        with MooncakeTier(mooncake.master, mooncake.metadata) as other:
            assert not any(other.get_many([(hot_key(gone.key, o), [np.empty(TAG_BYTES + h + b_, np.uint8)])
                                           for o, h, b_ in gone.layers]))
        assert _in_pool(mooncake, b, "cam2", ids[1]) == [True] * LAYERS
    finally:
        b.close()


def test_closing_with_promotions_queued_and_held_drops_them_and_ends(tmp_path, etcd_cluster, weed,
                                                                     mooncake):  # noqa: F811
    seeds = [9, 10]
    b, ids = _hot_reader(tmp_path, etcd_cluster, weed, mooncake, "cam3", seeds)
    tiers = b.cluster_store.tiers
    closer = threading.Thread(target=b.close)
    with tiers.hold_promotions():
        _check(b, "cam3", ids, seeds)
        assert tiers.promotion_stats().queued == len(ids) * LAYERS
        closer.start()
        closer.join(60)  # a hang guard, not a timing: close must not wait for the hold
        assert not closer.is_alive(), "close waited on held promotions"
    s = tiers.promotion_stats()
    assert (s.promoted, s.dropped, s.queued, s.queued_bytes) == (0, len(ids) * LAYERS, 0, 0)


def test_a_failed_promotion_never_fails_a_fetch(tmp_path, etcd_cluster, weed, mooncake):  # noqa: F811
    seeds = [11, 12]
    b, ids = _hot_reader(tmp_path, etcd_cluster, weed, mooncake, "cam4", seeds)
    try:
        tiers = b.cluster_store.tiers
        mooncake.kill_master()
        try:
            _check(b, "cam4", ids, seeds)  # the hot tier's get fails (-900) and S3 serves
            assert tiers.flush_promotions(timeout_s=60)
            s = tiers.promotion_stats()
            assert (s.promoted, s.failed) == (0, len(ids) * LAYERS)
            _check(b, "cam4", ids, seeds)
        finally:
            mooncake.restart_master()
            mooncake.wait_ready()
        assert _reads(b)["s3"] == 2 * len(ids) and _reads(b)["mooncake"] == 0
    finally:
        b.close()
