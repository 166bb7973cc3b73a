"""ClusterBank / ClusterStore in this process, over real etcd members and a real weed: durability in S3, take-over
by another node, read-through past a small local cache, and fencing of a node whose lease is gone.

The multi-process stories (SIGKILL under load, SIGSTOP past the lease, routing clients) are test_cluster.py's.
"""

from __future__ import annotations

import dataclasses
import time

import etcd3gw
import numpy as np
import pytest

from etcd_servers import etcd_cluster  # noqa: F401 - the fixture, found by pytest through this name
from s3_server import weed  # noqa: F401 - the fixture, found by pytest through this name
from nodes import in_process_bank, in_process_configs
from svc_util import make_entry, make_spec

from memory_service.cluster.node import ClusterBank
from memory_service.errors import AlreadyExists, NotFound, NotOwner
from memory_service.store.base import Commit


@pytest.fixture
def config(etcd_cluster, weed):
    return in_process_configs(etcd_cluster.endpoints, weed.endpoint, "unit")


def bank(tmp_path, config, node: str, **kw) -> ClusterBank:
    return in_process_bank(tmp_path, config, node, **kw)


def assert_bit_exact(got_kv: np.ndarray, seeds: list[int]) -> None:
    for row, seed in zip(got_kv, seeds):
        want = make_entry(seed).kv
        assert np.array_equal(row.view(np.uint16), want.view(np.uint16)), f"entry of seed {seed} differs"


def etcd_client(etcd_cluster) -> etcd3gw.client:
    host, port = etcd_cluster.endpoints[0].split("://")[1].rsplit(":", 1)
    return etcd3gw.client(host=host, port=int(port))


def test_take_over_replays_the_log_and_reads_past_a_small_cache(tmp_path, config):
    one = make_entry(0).kv.nbytes
    a = bank(tmp_path, config, "a", local_cache_bytes=3 * one)  # 3 of the 12 payloads stay local
    try:
        a.create_stream(make_spec("cam0"))
        seeds = list(range(12))
        ids = a.put("cam0", [make_entry(s) for s in seeds[:6]]) + a.put("cam0", [make_entry(s) for s in seeds[6:]])
        assert_bit_exact(a.fetch("cam0", ids).kv, seeds)
        assert a.cluster_store.s3_reads >= 9, "payloads beyond the local cache are read through from S3"
        a.pin("cam0", ids[:1])
        assert a.delete("cam0", ids[-2:]) == 2
        with pytest.raises(AlreadyExists):
            a.create_stream(make_spec("cam0"))
    finally:
        a.close()  # hands cam0 back: b claims it at once

    b = bank(tmp_path, config, "b", local_cache_bytes=0)
    try:
        assert [s.name for s in b.list_streams()] == ["cam0"]
        live = ids[:-2]
        got = b.fetch("cam0", live)
        assert_bit_exact(got.kv, seeds[:-2])
        metas = {m.entry_id: m for m in b.entries("cam0")}
        assert sorted(metas) == live and metas[ids[0]].pinned and not metas[ids[1]].pinned
        # the indexes were rebuilt on b: each entry is found by its own keys
        for eid, seed in zip(live, seeds):
            q = make_entry(seed).keys["nam"]
            res = b.query("cam0", "nam", q, 1)
            assert (res.ids[:, 0] == eid).all()
        with pytest.raises(NotFound):
            b.fetch("cam0", ids[-1:])
    finally:
        b.close()


def test_a_node_whose_lease_is_gone_can_never_write_again(tmp_path, config, etcd_cluster):
    a = bank(tmp_path, config, "a")
    b = bank(tmp_path, config, "b")
    try:
        a.create_stream(make_spec("cam1"))
        a.put("cam1", [make_entry(1)])
        with pytest.raises(NotOwner) as err:
            b.put("cam1", [make_entry(2)])  # a owns it: b refuses before executing, and names a
        assert err.value.owner == a.cluster_store.address
        # a's lease vanishes under it (as when a is partitioned past its TTL) and b takes the stream over
        other = etcd_client(etcd_cluster)
        other.post(other.get_url("/kv/lease/revoke"), json={"ID": a.coord.lease_id})
        assert b.put("cam1", [make_entry(3)]) == [1]
        with pytest.raises(NotOwner):
            a.put("cam1", [make_entry(4)])  # fenced: a's epoch is gone
        got = b.fetch("cam1", [0, 1])
        assert_bit_exact(got.kv, [1, 3])
        assert [m.entry_id for m in b.entries("cam1")] == [0, 1], "nothing a wrote after losing is visible"
    finally:
        a.close()
        b.close()


def test_keys_only_and_fp8_degrades_survive_a_take_over(tmp_path, config):
    a = bank(tmp_path, config, "a")
    spec = make_spec("cam2", policy="fifo")
    try:
        a.create_stream(spec)
        ids = a.put("cam2", [make_entry(s) for s in range(4)])
        s = a._streams["cam2"]
        layout = s.layout
        with s.lock:  # a prune that degrades, as the planner would commit it
            degraded = a.store.commit(layout, Commit(record=s.record(), degrade=(
                (s.entries[ids[0]], "keys_only"), (s.entries[ids[1]], "fp8"))))
        assert degraded[ids[0]].codec == "none" and degraded[ids[1]].codec == "fp8"
    finally:
        a.close()
    b = bank(tmp_path, config, "b")
    try:
        metas = {m.entry_id: m for m in b.entries("cam2")}
        assert metas[ids[0]].codec == "none" and metas[ids[1]].codec == "fp8"
        got = b.fetch("cam2", ids[1:2]).kv[0].astype(np.float32)
        want = make_entry(1).kv.astype(np.float32)
        assert np.allclose(got, want, rtol=2 ** -3, atol=1e-2), "the fp8 payload came back from S3"
        assert_bit_exact(b.fetch("cam2", ids[2:]).kv, [2, 3])
    finally:
        b.close()


def test_a_stream_object_of_an_earlier_take_over_cannot_commit(tmp_path, config):
    a = bank(tmp_path, config, "a")
    try:
        a.create_stream(make_spec("Z"))
        a.put("Z", [make_entry(s) for s in range(2)])
        old = a._streams["Z"]
        own = a.cluster_store._owned["Z"]
        own.stale = own.behind = True  # as after a local write that failed once S3 and etcd had taken it
        assert len(a.entries("Z")) == 2  # the next call rebuilds the stream: a new object, a new local id
        assert a._streams["Z"] is not old and a._streams["Z"].sid != old.sid
        with pytest.raises(NotOwner):  # a call that held the old object (e.g. a put still encoding) is refused
            a.store.commit(old.layout, Commit(record=old.record(), evict=(0,)))
        assert a.put("Z", [make_entry(20)]) == [2]
        assert [m.entry_id for m in a.entries("Z")] == [0, 1, 2]
    finally:
        a.close()


def test_a_claim_after_a_lost_etcd_answer_keeps_the_copy_while_the_head_has_not_moved(tmp_path, config):
    a = bank(tmp_path, config, "a")
    try:
        a.create_stream(make_spec("K0"))  # nothing committed yet: etcd's head reads Head(0, 0), the copy's (0, epoch)
        fresh = a._streams["K0"]
        a.cluster_store._owned["K0"].stale = True
        assert a.put("K0", [make_entry(9)]) == [0] and a._streams["K0"] is fresh, "kept, and written under the claim"
        assert_bit_exact(a.fetch("K0", [0]).kv, [9])
        a.create_stream(make_spec("K"))
        a.put("K", [make_entry(s) for s in range(3)])
        old, own = a._streams["K"], a.cluster_store._owned["K"]
        epoch = own.epoch
        own.stale = True  # as after an etcd answer that was lost: the head did not move
        assert a.put("K", [make_entry(3)]) == [3]  # claimed again (a new epoch) and written under it
        assert a._streams["K"] is old and a.cluster_store._owned["K"] is own, "the open stream and copy were kept"
        assert own.epoch > epoch and not own.stale
        # the head moved since the copy's state (here: this node's own write whose answer was lost did land)
        seq = own.head.seq
        own.head = dataclasses.replace(own.head, seq=seq - 1)
        own.stale = True
        assert [m.entry_id for m in a.entries("K")] == [0, 1, 2, 3]  # replayed from S3: a new object
        assert a._streams["K"] is not old and a.cluster_store._owned["K"].head.seq == seq
        assert_bit_exact(a.fetch("K", [0, 1, 2, 3]).kv, [0, 1, 2, 3])
    finally:
        a.close()
    b = bank(tmp_path, config, "b")
    try:
        assert_bit_exact(b.fetch("K", [0, 1, 2, 3]).kv, [0, 1, 2, 3])
    finally:
        b.close()


def test_a_lost_lease_is_followed_by_a_claim_that_keeps_the_copy_and_serves_with_s3_down(tmp_path, config,
                                                                                       etcd_cluster, weed):
    a = bank(tmp_path, config, "a")
    try:
        a.create_stream(make_spec("L"))
        ids = a.put("L", [make_entry(s) for s in range(4)])
        old = a._streams["L"]
        lease = a.coord.lease_id
        etcd = etcd_client(etcd_cluster)
        etcd.post(etcd.get_url("/kv/lease/revoke"), json={"ID": lease})  # as when etcd expired it in an election
        deadline = time.monotonic() + 30
        while not (a.coord.lease_id != lease and a.cluster_store.is_current("L")):
            assert time.monotonic() < deadline, "the node did not claim its stream again after a new lease"
            time.sleep(0.05)
        assert a._streams["L"] is old, "the stream was claimed again with its open indexes, nothing replayed"
        weed.kill()
        try:
            assert_bit_exact(a.fetch("L", ids).kv, [0, 1, 2, 3])  # served from the local copy: S3 is not needed
            assert (a.query("L", "nam", make_entry(2).keys["nam"], 1).ids[:, 0] == ids[2]).all()
        finally:
            weed.restart()
        assert a.put("L", [make_entry(4)]) == [4]
    finally:
        a.close()
    b = bank(tmp_path, config, "b")
    try:
        assert_bit_exact(b.fetch("L", list(range(5))).kv, [0, 1, 2, 3, 4])
    finally:
        b.close()


def test_a_lapsed_copy_is_dropped_once_another_node_has_written(tmp_path, config, etcd_cluster):
    a = bank(tmp_path, config, "a")
    b = bank(tmp_path, config, "b")
    try:
        a.create_stream(make_spec("M"))
        a.put("M", [make_entry(0)])
        etcd = etcd_client(etcd_cluster)
        revoked = a.coord.lease_id
        etcd.post(etcd.get_url("/kv/lease/revoke"), json={"ID": revoked})
        deadline = time.monotonic() + 30
        while True:  # b takes it over (or a claims it back first: then b is refused, naming a, and tries again)
            try:
                assert b.put("M", [make_entry(1)]) == [1]
                break
            except NotOwner:
                assert time.monotonic() < deadline, "b never took the stream over"
                revoked = a.coord.lease_id
                etcd.post(etcd.get_url("/kv/lease/revoke"), json={"ID": revoked})
                time.sleep(0.1)
        while a.coord.lost() or a.coord.lease_id == revoked:  # a has noticed, and holds a new lease
            assert time.monotonic() < deadline, "a holds no new lease"
            time.sleep(0.05)
        with pytest.raises(NotOwner):
            a.put("M", [make_entry(2)])  # b owns it: a's copy is dropped, not kept
        assert "M" not in a.cluster_store.owned() and "M" not in a._streams
        b.close()  # hands it back: a claims it, replaying b's write
        assert_bit_exact(a.fetch("M", [0, 1]).kv, [0, 1])
        assert [m.entry_id for m in a.entries("M")] == [0, 1]
    finally:
        a.close()
        b.close()


def test_take_overs_creates_and_drops_at_once_neither_collide_nor_deadlock(tmp_path, config):
    import threading

    a = bank(tmp_path, config, "a")
    for name in ("P", "Q"):
        a.create_stream(make_spec(name))
        a.put(name, [make_entry(1)])
    a.close()  # both handed back: b takes them over on their first calls
    b = bank(tmp_path, config, "b")
    real = b.cluster_store.take_over

    def slow(name: str, **kw) -> bool:  # a long replay: the window between the take-over and the bank opening it
        kept = real(name, **kw)
        time.sleep(0.5)
        return kept

    b.cluster_store.take_over = slow
    try:
        calls = [threading.Thread(target=lambda: b.entries("Q")), threading.Thread(target=lambda: b.drop_stream("P")),
                 threading.Thread(target=lambda: b.create_stream(make_spec("R")))]
        for t in calls:
            t.start()
            time.sleep(0.1)
        for t in calls:
            t.join(20)
        assert not any(t.is_alive() for t in calls), "a take-over, a drop and a create deadlocked"
        assert sorted(b._streams) == ["Q", "R"]
        assert b._streams["Q"].sid != b._streams["R"].sid, "two streams share a local id"
        assert [m.frame_index for m in b.entries("Q")] == [1]
    finally:
        b.close()
