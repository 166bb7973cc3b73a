"""Checkpoints of a stream's log (cluster/checkpoint.py): the log stays bounded by the live state, and a take-over
from a checkpoint rebuilds exactly what the full log would have (real etcd members and a real weed, in this process).
The replay plan's rules (which checkpoint is valid, what is garbage) are checked on listings alone first."""

from __future__ import annotations


import numpy as np
import pytest

from etcd_servers import etcd_cluster  # noqa: F401 - the fixture, found by pytest through this name
from s3_server import weed  # noqa: F401 - the fixture, found by pytest through this name
from nodes import in_process_bank, in_process_configs
from svc_util import make_entry, make_spec

from memory_service.cluster import records
from memory_service.cluster.node import ClusterBank
from memory_service.config import ClusterConfig
from memory_service.errors import DataLoss, InvalidArgument, NotFound

P = "streams/cam/1/"


def names(*items: tuple[int, int, str]) -> list[str]:
    return [f"{P}log/{seq:016d}-{epoch:016d}.{suffix}" for seq, epoch, suffix in items]


def test_a_take_over_starts_from_the_newest_checkpoint_of_the_valid_chain():
    log = names((1, 1, "meta"), (1, 1, "kv"), (2, 1, "meta"), (2, 1, "ckpt"), (3, 1, "meta"), (3, 2, "meta"),
                (3, 1, "ckpt"), (4, 2, "meta"), (5, 2, "meta"), (5, 2, "ckpt"))
    # (3, 1).ckpt is a fenced owner's: seq 3's valid record is epoch 2's; (5, 2) is past the head
    plan = records.replay_plan(P, log, head_seq=4, head_epoch=2)
    assert plan.checkpoint == (2, 1) and plan.records == [(3, 2), (4, 2)]
    assert records.replay_plan(P, log, head_seq=5, head_epoch=2).checkpoint == (5, 2)
    assert records.replay_plan(P, names((1, 1, "meta"), (2, 1, "meta")), 2, 1) == records.ReplayPlan(None,
                                                                                                        [(1, 1), (2, 1)])
    with pytest.raises(DataLoss, match=r"lacks record\(s\) \[4\]"):
        records.replay_plan(P, names((2, 1, "ckpt"), (2, 1, "meta"), (3, 1, "meta"), (5, 1, "meta")), 5, 1)


def test_garbage_behind_a_checkpoint_spares_the_payloads_live_entries_point_into():
    log = names((1, 1, "meta"), (1, 1, "kv"), (2, 1, "meta"), (2, 1, "kv"), (2, 1, "ckpt"), (3, 1, "meta"),
                (3, 1, "kv"), (4, 1, "meta"), (4, 1, "ckpt"))
    live = {f"{P}log/{2:016d}-{1:016d}.kv"}
    assert records.obsolete(P, log, 4, live) == names((1, 1, "meta"), (1, 1, "kv"), (2, 1, "meta"), (2, 1, "ckpt"),
                                                      (3, 1, "meta"), (3, 1, "kv"))


def test_checkpoint_interval_is_checked():
    with pytest.raises(InvalidArgument, match="checkpoint_records is 0; expected >= 1"):
        ClusterConfig(etcd="etcd://127.0.0.1:1", s3_endpoint="http://127.0.0.1:1", s3_bucket="b", node_id="n",
                      checkpoint_records=0)


@pytest.fixture
def config(etcd_cluster, weed):
    return in_process_configs(etcd_cluster.endpoints, weed.endpoint, "ckpt")


def bank(tmp_path, config, node: str, **kw) -> ClusterBank:
    return in_process_bank(tmp_path, config, node, **kw)


def log_objects(b: ClusterBank, suffix: str) -> list[str]:
    return [k for k in b.cluster_store.objects.list("streams/") if k.endswith(suffix)]


def settle(b: ClusterBank, written: int) -> None:
    """Wait for the background checkpoint thread, then check that at least `written` checkpoints were made."""
    ckpts = b.cluster_store.checkpoints
    assert ckpts.wait_idle(30), "a checkpoint was still in flight after 30 s"
    assert ckpts.written >= written


def check_stream(b: ClusterBank, live: dict[int, int], pinned: set[int]) -> None:
    """`live`: entry id -> the seed it was made from; every entry bit-exact, pins kept, found by its own keys."""
    metas = {m.entry_id: m for m in b.entries("cam")}
    assert sorted(metas) == sorted(live)
    assert {e for e, m in metas.items() if m.pinned} == pinned
    ids = sorted(live)
    got = b.fetch("cam", ids).kv
    for row, eid in zip(got, ids):
        assert np.array_equal(row.view(np.uint16), make_entry(live[eid]).kv.view(np.uint16)), f"entry {eid} differs"
    for eid in ids:
        assert (b.query("cam", "nam", make_entry(live[eid]).keys["nam"], 1).ids[:, 0] == eid).all()


def test_the_log_stays_bounded_and_take_overs_from_checkpoints_lose_nothing(tmp_path, config):
    a = bank(tmp_path, config, "a", checkpoint_records=4)
    live: dict[int, int] = {}
    try:
        a.create_stream(make_spec("cam"))
        for seed in range(12):  # one entry per put, as the plugin writes a chunk's record
            (eid,) = a.put("cam", [make_entry(seed)])
            live[eid] = seed
        a.pin("cam", [0])
        for eid in (1, 2, 3, 4, 5):  # their payload objects become garbage at the next checkpoint
            assert a.delete("cam", [eid]) == 1
            del live[eid]
        for seed in range(12, 20):
            (eid,) = a.put("cam", [make_entry(seed)])
            live[eid] = seed
        settle(a, 2)
        records_written = 20 + 1 + 5  # puts, the pin, the deletes
        metas = log_objects(a, ".meta")
        assert len(metas) < records_written // 2, f"{len(metas)} records left of {records_written}: not collected"
        kvs = log_objects(a, ".kv")
        assert len(kvs) <= len(live), "a deleted entry's payload object outlived the checkpoint after it"
        assert len(log_objects(a, ".ckpt")) == 1, "an older checkpoint was not collected behind the newest"
    finally:
        a.close()

    b = bank(tmp_path, config, "b", checkpoint_records=4)
    try:
        check_stream(b, live, {0})  # taken over from the checkpoint: the records before it are gone
        for seed in range(20, 36):  # b took over 15 live entries: its checkpoint is due 15 records on
            (eid,) = b.put("cam", [make_entry(seed)])
            live[eid] = seed
        b.pin("cam", [0], pinned=False)
        settle(b, 1)
    finally:
        b.close()

    c = bank(tmp_path, config, "c")
    try:
        check_stream(c, live, set())  # b's checkpoint (a higher epoch) and the records after it
        with pytest.raises(NotFound):
            c.fetch("cam", [1])
    finally:
        c.close()
