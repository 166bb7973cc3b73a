"""The TensorStore contract (tests/unit/test_store_contract.py) against ClusterStore, over the run's real etcd
members and weed, plus the promises that are ClusterStore's own.

Each contract test runs three times here: "cluster" keeps every payload in the node's local cache, "cluster-s3"
keeps none (local_cache_bytes=0: every payload read is a ranged GET from S3), "cluster-small" about two entries'
(one read mixes both). What the contract's verbs mean here:
- `open` is a node over a key prefix and a bucket of its own (per test): create_stream through it makes it the
  stream's owner, so it may commit;
- `reopen` is another node (another node id and local directory, local_cache_bytes=0) over the same prefix and
  bucket: it takes over every stream of the catalog (claim in etcd, replay of the log from S3), as a node does
  when the owner has handed its streams back (close) or died;
- read-only does not apply: a node writes the streams it owns and refuses the others with NotOwner.
ClusterStore's own: a change that S3 refuses leaves the store exactly as it was and the next one commits; a
payload read through S3 (raw or fp8, read_payloads or read_layer) is bit-exact; only the owner commits.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import uuid
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from etcd_servers import etcd_cluster  # noqa: F401 - the fixture, found by pytest through this name
from nodes import LEASE_TTL_S
from s3_server import weed  # noqa: F401 - the fixture, found by pytest through this name

from memory_service.cluster.etcd import Coordinator
from memory_service.cluster.s3 import ObjectStore
from memory_service.errors import NotOwner, Unavailable
from memory_service.store import Commit, TensorStore
from memory_service.store.cluster_store import ClusterStore
from memory_service.store.codec import decode_into, encode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from test_store_contract import (  # noqa: E402, F401 - the tests (and their fixtures) run here over ClusterStore
    LAYOUT, Backend, Entry, assert_holds, bits, put, record, root, test_a_failing_commit_leaves_nothing,
    test_degrade_evict_pin_and_statistics, test_read_only_refuses_every_write_and_reads_everything,
    test_reopen_sees_every_commit, test_round_trip_is_bit_exact,
)


class ClusterBackend(Backend):
    """ClusterStore nodes over one prefix and bucket of their own; `cache_bytes` is the first node's local cache."""

    keeps_stream_ids = False  # a node numbers the streams it takes over in its own (fresh) local cache
    readonly_skip = ("ClusterStore has no read-only mode: a node writes the streams it owns and answers NotOwner for "
                     "the others (test_cluster_store.py); read-only opening is LMDB's")

    def __init__(self, etcd_endpoints: list[str], s3_endpoint: str, cache_bytes: int | None, *,
                 s3_timeout_s: float = 10.0, s3_retries: int = 3) -> None:
        tag = uuid.uuid4().hex[:8]
        self.etcd, self.s3 = etcd_endpoints, s3_endpoint
        self.prefix, self.bucket = f"memflow-contract-{tag}/", f"memflow-contract-{tag}"
        self.cache_bytes = cache_bytes
        self.s3_timeout_s, self.s3_retries = s3_timeout_s, s3_retries
        self.nodes: list[ClusterStore] = []

    def node(self, root: str, cache_bytes: int | None) -> ClusterStore:
        node_id = f"n{len(self.nodes)}"
        coord = Coordinator(self.etcd, node_id, ttl_s=LEASE_TTL_S, prefix=self.prefix)
        try:
            objects = ObjectStore(self.s3, self.bucket, timeout_s=self.s3_timeout_s, retries=self.s3_retries)
        except BaseException:
            coord.close()
            raise
        store = ClusterStore(os.path.join(root, node_id), coord, objects, local_cache_bytes=cache_bytes)
        self.nodes.append(store)
        return store

    def open(self, root: str) -> TensorStore:
        return self.node(root, self.cache_bytes)

    def reopen(self, root: str) -> TensorStore:
        store = self.node(root, 0)
        for name in sorted(store.coord.catalog()):
            store.take_over(name)
        return store

    def close(self) -> None:
        """The nodes' etcd sessions and S3 clients (the tests close the stores themselves)."""
        for store in self.nodes:
            store.objects.close()
            store.coord.close()


# bytes of payload the first node keeps locally: all, none (every read goes to S3), about two entries' (reads mix
# the cache and S3 in one call; older entries are trimmed from the cache as newer ones arrive)
CACHES = {"cluster": None, "cluster-s3": 0, "cluster-small": 5 * Entry(0).meta.nbytes // 2}

@pytest.fixture(params=sorted(CACHES))
def backend(request, etcd_cluster, weed):
    b = ClusterBackend(etcd_cluster.endpoints, weed.endpoint, CACHES[request.param])
    try:
        yield b
    finally:
        b.close()


def _state(store: ClusterStore) -> tuple:
    """Everything the local view says of LAYOUT's stream (it answers while S3 is down)."""
    with store.view() as v:
        return v.contents(LAYOUT.sid), list(v.entries(LAYOUT)), [(s.name, s.record) for s in v.streams()]


def test_a_change_s3_refuses_leaves_the_store_as_it_was(backend, weed, root):
    """S3 unreachable (weed killed): commit, put_metadata and put_stats raise Unavailable and change nothing, in
    the node or in the durable log; once S3 is back the next commit is acknowledged and a take-over sees exactly
    the acknowledged changes."""
    b = backend
    b.s3_timeout_s, b.s3_retries = 2.0, 0  # a refused connection answers at once
    store = b.open(root)
    try:
        store.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), 8)
        es = {i: Entry(i) for i in range(4)}
        put(store, list(es.values()), 1)
        before = _state(store)
        hits = dataclasses.replace(es[1].meta, hit_count=99)
        weed.kill()
        try:
            refused = [
                lambda: put(store, [Entry(5), Entry(6)], 2, degrade=((es[2].meta, "keys_only"),), evict=(0,),
                            stats=(hits,)),
                lambda: store.commit(LAYOUT, Commit(record=record(LAYOUT, 4, 2), evict=(3,))),
                lambda: store.put_metadata(LAYOUT, [dataclasses.replace(es[2].meta, pinned=True)]),
                lambda: store.put_stats(LAYOUT, [hits]),
            ]
            for change in refused:
                with pytest.raises(Unavailable, match="S3"):
                    change()
                assert _state(store) == before
        finally:
            weed.start()  # the run's other tests need it
        assert_holds(store, es)  # payloads too (from S3 when nothing is cached)
        put(store, [Entry(5)], 2, evict=(0,))  # the store still takes commits
        del es[0]
        es[5] = Entry(5)
        assert_holds(store, es)
        store.close()
        store = b.reopen(root)
        with store.view() as v:
            sid = next(s.record["sid"] for s in v.streams() if s.name == LAYOUT.name)
        assert_holds(store, es, dataclasses.replace(LAYOUT, sid=sid))  # nothing of the refused changes
    finally:
        store.close()


def test_read_through_is_bit_exact_raw_and_fp8(backend, tmp_path):
    """With nothing cached, read_payloads and read_layer come from S3 and equal what was committed: raw bit for
    bit, fp8 exactly what the fp8 codec makes of the layer."""
    store = backend.open(str(tmp_path))
    try:
        store.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), 8)
        es = {i: Entry(i) for i in range(4)}
        put(store, list(es.values()), 1)
        store.commit(LAYOUT, Commit(record=record(LAYOUT, 4, 2), degrade=((es[1].meta, "fp8"),)))
        want = {i: es[i].kv for i in (0, 2, 3)}
        fp8 = np.empty((LAYOUT.layers, *LAYOUT.layer_shape), ml_dtypes.bfloat16)
        for layer in range(LAYOUT.layers):
            header, body = encode(es[1].kv[layer], "bfloat16", "fp8")
            decode_into(header, body.tobytes(), fp8[layer], True, "expected")
        want[1] = fp8
        reads = store.s3_reads
        ids = [3, 1, 0, 2]
        with store.view() as v:
            out = np.empty((len(ids), LAYOUT.layers, *LAYOUT.layer_shape), ml_dtypes.bfloat16)
            v.read_payloads(LAYOUT, ids, list(range(LAYOUT.layers)), out, {})
            assert np.array_equal(bits(out), bits(np.stack([want[i] for i in ids])))
            part = np.empty((len(ids), 2, *LAYOUT.layer_shape), ml_dtypes.bfloat16)
            v.read_payloads(LAYOUT, ids, [2, 0], part, None)
            assert np.array_equal(bits(part), bits(np.stack([want[i][[2, 0]] for i in ids])))
            for i in ids:
                for layer in range(LAYOUT.layers):
                    assert bytes(v.read_layer(LAYOUT, i, layer, {})) == want[i][layer].tobytes(), (i, layer)
        through = store.s3_reads - reads
        calls = 2 * len(ids) + len(ids) * LAYOUT.layers  # one ranged GET per entry and call when none is cached
        if backend.cache_bytes is None:
            assert through == 0
        elif backend.cache_bytes == 0:
            assert through == calls
        else:
            assert 0 < through < calls
    finally:
        store.close()


def test_a_stream_not_owned_refuses_commits(backend, tmp_path):
    """Only the owner commits: a second node over the same cluster refuses every change of a stream it has not
    taken over (NotOwner, nothing written), and the owner's store is unchanged by the attempts."""
    owner = backend.open(str(tmp_path))
    other = backend.node(str(tmp_path), None)
    try:
        owner.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), 8)
        es = {i: Entry(i) for i in range(2)}
        put(owner, list(es.values()), 1)
        for change in [lambda: put(other, [Entry(2)], 2), lambda: other.put_metadata(LAYOUT, [es[0].meta]),
                       lambda: other.put_stats(LAYOUT, [es[0].meta])]:
            with pytest.raises(NotOwner):
                change()
        assert_holds(owner, es)
    finally:
        other.close()
        owner.close()
