"""ClusterBank: one node of a cluster - a MemoryBank over a ClusterStore that serves the streams it owns.

Owns the node's side of ownership. Promises:
- a stream is served only by its owner: the first call for a stream nobody owns (new node, or its owner's lease
  expired) takes it over here (claim in etcd, replay from S3, open its indexes); a call for a stream another
  node owns raises NotOwner with that node's address, before anything is executed, so the client may resend it;
- every write is fenced (store/cluster_store.py): a node that lost a stream never changes it again; when the
  node's lease is lost it serves none of its streams until it holds a new lease and has claimed them anew. Once
  it holds one it claims them again at once, in the background: a stream whose durable head has not moved keeps
  its local copy and its open indexes (nothing replayed), one another node owns now is dropped here;
- `list_streams` lists the whole cluster's catalog (etcd); `stats()`, budgets and quotas are this node's;
- `close()` hands its streams back (released in etcd) so another node serves them at once, then leaves.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

from memory_service.bank import MemoryBank
from memory_service.cluster.etcd import Coordinator
from memory_service.cluster.s3 import ObjectStore
from memory_service.config import BankConfig, ClusterConfig
from memory_service.errors import MemFlowError, NotOwner
from memory_service.store.cluster_store import ClusterStore
from memory_service.stream import Stream
from memory_service.types import StreamSpec

log = logging.getLogger("memflow.cluster")


class ClusterBank(MemoryBank):
    def __init__(self, data_dir: str, config: Optional[BankConfig], cluster: ClusterConfig) -> None:
        self.cluster = cluster
        self.coord = Coordinator(cluster.endpoints(), cluster.node_id, ttl_s=cluster.lease_ttl_s,
                                 prefix=cluster.prefix, timeout_s=cluster.etcd_timeout_s)
        self.hot = None
        try:
            self.objects = ObjectStore(cluster.s3_endpoint, cluster.s3_bucket)
            if cluster.mooncake_master:
                from memory_service.cluster.mooncake import MooncakeTier  # the wheel: only with the hot tier

                host = cluster.advertise.rsplit(":", 1)[0].strip("[]") if cluster.advertise else "127.0.0.1"
                self.hot = MooncakeTier(cluster.mooncake_master, cluster.mooncake_metadata, local_hostname=host,
                                        segment_bytes=cluster.mooncake_segment_bytes,
                                        protocol=cluster.mooncake_protocol, replicas=cluster.mooncake_replicas)
        except BaseException:
            self.coord.close()
            raise

        def store(directory: str, cfg: BankConfig) -> ClusterStore:
            return ClusterStore(os.path.join(directory, "cache"), self.coord, self.objects,
                                local_cache_bytes=cluster.local_cache_bytes, map_size=cfg.map_size,
                                max_map_size=cfg.max_map_size, durable=cfg.durable, reserve_bytes=cfg.reserve_bytes,
                                hot=self.hot, hot_pinned_entries=cluster.mooncake_pinned_entries,
                                hot_promote_queue_bytes=cluster.mooncake_promote_queue_bytes,
                                checkpoint_records=cluster.checkpoint_records)

        try:
            super().__init__(data_dir, config, store=store)
        except BaseException:
            if self.hot is not None:
                self.hot.close()
            self.objects.close()
            self.coord.close()
            raise
        self.cluster_store: ClusterStore = self.store  # type: ignore[assignment]
        # One take-over, create or drop at a time, and always taken before the bank's lock (adopt takes that one)
        self._takeover = threading.RLock()
        self._closing = False  # set under _takeover: no take-over starts once close has begun
        self.coord.on_lost(self._lease_lost)
        self.coord.on_regained(self._lease_regained)

    def announce(self, address: str) -> None:
        """Join the membership at `address` (once the server listens): the address NotOwner sends clients to."""
        self.cluster_store.address = address
        self.coord.announce(address)
        log.info("node %s joined the cluster at %s", self.coord.node_id, address)

    def _lease_lost(self) -> None:
        log.warning("node %s lost its etcd lease: it serves none of its %d stream(s) until it claims them again",
                    self.coord.node_id, len(self.cluster_store.owned()))

    def _lease_regained(self) -> None:
        threading.Thread(target=self._claim_again, name="memflow-reclaim", daemon=True).start()

    def _claim_again(self) -> None:
        """Claim every stream held here before the lease was lost (see the module doc); one that another node owns
        now, or that cannot be claimed yet, is left to its next call."""
        for name in self.cluster_store.owned():
            with self._takeover:
                if self._closing or self._closed or self.coord.lost():
                    return
                try:
                    self._stream(name)
                except MemFlowError as exc:
                    log.info("node %s: stream %r not claimed again: %s", self.coord.node_id, name, exc)

    def _stream(self, name: str) -> Stream:
        self._check_open()
        s = self._streams.get(name)
        if s is not None and self.cluster_store.is_current(name):
            return s
        with self._takeover:  # one take-over at a time; the others wait and find it open
            s = self._streams.get(name)
            if s is not None and self.cluster_store.is_current(name):
                return s
            if self.coord.lost():
                raise NotOwner(f"node {self.coord.node_id} has lost its etcd lease and serves no stream until it has "
                               "a new one; send the call to another node")
            if s is not None and name not in self.cluster_store.owned():
                self.forget(name)  # a stream object without a copy under it (the copy was dropped): never served
            kept = self.cluster_store.take_over(name, forget=lambda: self.forget(name))
            if kept and name in self._streams:
                return self._streams[name]
            try:
                self.adopt(name)
            except BaseException:
                self.cluster_store.discard(name)
                raise
            return self._streams[name]

    def _serves(self, name: str) -> bool:
        return self.cluster_store.is_current(name)

    def create_stream(self, spec: StreamSpec) -> None:
        with self._takeover:  # a take-over allocates a stream id too: one counter, one at a time
            with self.store.view() as v:
                self._next_sid = max(self._next_sid, v.next_stream_id())
            super().create_stream(spec)

    def drop_stream(self, name: str) -> None:
        with self._takeover:
            self._stream(name)  # owned here (taken over if need be) before the bank's lock is taken
            super().drop_stream(name)

    def tier_stats(self) -> dict:
        """Per tier (local, mooncake, s3): payload reads, bytes, recent p50/p99 load ms (served on /metrics)."""
        return self.cluster_store.tiers.stats()

    def promotion_stats(self):
        """Hot-tier promotions after S3 reads: promoted, dropped, failed, and what waits (served on /metrics)."""
        return self.cluster_store.tiers.promotion_stats()

    def list_streams(self) -> list[StreamSpec]:
        self._check_open()
        return [StreamSpec.from_json(record["spec"]) for _, (record, _) in sorted(self.coord.catalog().items())]

    def close(self) -> None:
        if self._closed:
            return
        with self._takeover:  # a claim in flight (a call's, or _claim_again's) ends before the streams go back
            self._closing = True
        try:
            super().close()  # statistics and snapshots to S3, then every stream released in etcd
        finally:
            if self.hot is not None:
                self.hot.close()
            self.objects.close()
            self.coord.close()
