"""ClusterStore: the `TensorStore` of a cluster node - durable in S3, fenced in etcd, cached in local LMDB.

Owns the promise of cluster mode's storage (DESIGN.md "Beyond one machine"):
- a change is acknowledged only once it is durable: its log record is in S3 (cluster/records.py: one or two
  objects per call, never one per layer) and the stream's head in etcd has moved to it by a transaction that
  compares this node's epoch (cluster/etcd.py). A node that lost a stream (lease expired, paused, partitioned)
  fails that compare, so nothing it writes afterwards is ever part of the stream: its objects are never named
  by a head, and the next owner's records of the same seq win (records.replay_plan);
- only then is the change applied to the node's local LMDB, which holds metadata, keys and a bounded cache of
  payload layers (`local_cache_bytes`, oldest entries' payloads dropped first); a payload not cached is read
  through from S3 with one ranged GET per entry, bit-exact (its checksum travels with it);
- a node serves a stream only after `take_over`: claim it in etcd (a new, higher epoch), replay its log from S3
  into the local LMDB (metadata and keys; payloads stay in S3 until read), after which the bank opens it
  (index snapshots come from S3 too and are caught up by the bank as on a single node); checkpoints
  (cluster/checkpoint.py) bound that replay to the live state and the records since the last one;
- the local LMDB is a cache: it is emptied when the node starts. A stream whose ownership lapsed (the node's lease
  was lost, an answer from etcd was lost, another node claimed it) is marked stale and claimed again before its
  next call; its local copy is kept when the durable head is still the one it holds (nothing was written since,
  so no replay from S3: a lease lost in an etcd election costs one claim per stream, and reads of cached data go
  on when S3 is down too), and is dropped and replayed from S3 otherwise. A copy that misses a durable change (a
  local write failed after S3 and etcd took it) is never kept.
A stream this node does not own raises NotOwner (with the owner's address when there is one).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import shutil
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Container, Iterator, Optional, Sequence

import numpy as np

from memory_service.cluster import checkpoint, records
from memory_service.cluster.etcd import Coordinator, Head
from memory_service.cluster.tiers import PROMOTE_QUEUE_BYTES, Tiers
from memory_service.cluster.s3 import ObjectStore
from memory_service.errors import MemFlowError, NotFound, NotOwner, Unavailable
from memory_service.store.base import Commit, Contents, StoredStream, StreamLayout
from memory_service.store.codec import body_bytes, encode
from memory_service.store.lmdb_store import LMDBStore
from memory_service.types import EntryMeta, StreamSpec

if TYPE_CHECKING:
    from memory_service.cluster.mooncake import MooncakeTier

log = logging.getLogger("memflow.cluster")


@dataclasses.dataclass
class _Owned:
    """What this node knows of a stream it owns."""

    name: str
    incarnation: int
    epoch: int
    head: Head
    sid: int  # the local LMDB's id of the stream (never reused: a stream object of an earlier take-over is refused)
    prefix: str  # its objects' prefix in S3
    lease: int  # the lease it was claimed under: after that lease is lost, the ownership is void
    layout: StreamLayout
    where: dict[int, records.Located] = dataclasses.field(default_factory=dict)  # entry -> its payload in S3
    checkpoint_seq: int = 0  # the newest checkpoint's record (0: none); a take-over replays from there
    checkpoint_live: int = 0  # entries in it
    stale: bool = False  # claimed again before it serves (take_over)
    behind: bool = False  # the local copy misses a durable change: a claim replays the log instead of keeping it
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one durable change at a time


class ClusterStore:
    """A node's TensorStore in cluster mode (see the module doc)."""

    readonly = False

    def __init__(self, local_dir: str, coord: Coordinator, objects: ObjectStore, *,
                 local_cache_bytes: Optional[int] = None, map_size: int = 1 << 30, max_map_size: int = 1 << 40,
                 durable: bool = True, reserve_bytes: int = 8 << 20, hot: Optional[MooncakeTier] = None,
                 hot_pinned_entries: int = 3, hot_promote_queue_bytes: int = PROMOTE_QUEUE_BYTES,
                 checkpoint_records: int = 512) -> None:
        shutil.rmtree(local_dir, ignore_errors=True)  # a cache of what this node owned: stale by now
        self.local = LMDBStore(f"{local_dir}/lmdb", map_size, max_map_size, durable,
                               reserve_bytes=reserve_bytes, snapshot_dir=f"{local_dir}/snapshots")
        self.coord, self.objects = coord, objects
        self.location = f"{local_dir} (cache) over s3 bucket {objects.bucket!r}"
        self.local_cache_bytes = local_cache_bytes
        self._owned: dict[str, _Owned] = {}
        self._by_sid: dict[int, _Owned] = {}
        self._lock = threading.RLock()
        self._cached: OrderedDict[tuple[str, int], int] = OrderedDict()  # (stream, entry) -> cached bytes, oldest first
        self._cached_bytes = 0
        # reads past the local cache: Mooncake (if any), then S3 (promoted into Mooncake in the background)
        self.tiers = Tiers(objects, hot, hot_pinned_entries, hot_promote_queue_bytes)
        self.checkpoints = checkpoint.Checkpoints(objects, checkpoint_records)
        self._uploads = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="memflow-s3-put")
        self.address = ""  # this node's address, as announced (set by the node once it listens)

    @property
    def s3_reads(self) -> int:
        """Payload reads served from S3 (tests, benchmarks)."""
        return self.tiers.reads("s3")

    # -- ownership ---------------------------------------------------------------------------------
    def owned(self) -> list[str]:
        with self._lock:
            return list(self._owned)

    def _valid(self, own: _Owned) -> bool:
        return own.lease == self.coord.lease_id and not self.coord.lost()

    def is_current(self, name: str) -> bool:
        """Whether this node serves `name` from a local copy that is as new as the durable log, under its lease."""
        with self._lock:
            own = self._owned.get(name)
        return own is not None and self._valid(own) and not own.stale

    def _own(self, layout: StreamLayout) -> _Owned:
        """The ownership a change of `layout`'s stream is made under; NotOwner (nothing done) when there is none,
        when it is void (its lease is gone), when the local copy may lag the log, or when the caller's stream object
        is of an earlier take-over (another sid)."""
        name = layout.name
        with self._lock:
            own = self._owned.get(name)
        if own is None or not self._valid(own) or own.sid != layout.sid:
            raise NotOwner(f"this node ({self.coord.node_id}) does not own stream {name!r} (any more); ask again: the "
                           "client routes to its owner", owner=self._owner_address(name))
        if own.stale:  # the node rebuilds it on the stream's next call
            raise NotOwner(f"stream {name!r} is being rebuilt on this node from the durable tier; send the call again",
                           owner=self.address)
        return own

    def _owner_address(self, name: str) -> str:
        try:
            owner = self.coord.owner(name)
        except MemFlowError:
            return ""
        return owner.address if owner is not None and owner.node_id != self.coord.node_id else ""

    def take_over(self, name: str, forget: Callable[[], None] = lambda: None) -> bool:
        """Claim `name` and make the local copy that of its durable log -> True when the copy this node held was
        kept (see the module doc), False when the log was replayed from S3. `forget` runs before a held copy is
        dropped (the bank closes its stream object: a call in flight on it finishes first). NotOwner when another
        node owns it, NotFound when the cluster has no such stream; a failed claim or head read keeps the copy."""
        with self._lock:
            old = self._owned.get(name)
        if old is not None:
            # An earlier ownership here (stale, or of a lost lease): give it up so that this one has a higher
            # epoch. Never write under an epoch whose last change is in doubt (an etcd answer lost): its object
            # names would be written again, and a late-applied head could name the second attempt's objects.
            with contextlib.suppress(MemFlowError):
                self.coord.release(name, old.epoch)
        found = self.coord.stream(name)
        if found is None:
            self._drop_copy(name, forget)
            raise NotFound(f"stream {name!r} not found in the cluster")
        record, incarnation = found
        lease = self.coord.lease_id
        epoch = self.coord.claim(name, incarnation)  # None too when the name was dropped and created again since
        if epoch is None:
            self._drop_copy(name, forget)
            raise NotOwner(f"stream {name!r} is owned by another node; the client routes there",
                           owner=self._owner_address(name))
        try:
            if old is not None and self._keep(old, incarnation, epoch, lease):
                return True
        except BaseException:
            with contextlib.suppress(MemFlowError):
                self.coord.release(name, epoch)  # the copy stays: the next claim may still keep it
            raise
        self._drop_copy(name, forget)
        try:
            self._replay(name, record, incarnation, epoch, lease)
        except BaseException:
            with contextlib.suppress(MemFlowError):
                self.coord.release(name, epoch)  # let another node try: this one could not rebuild it
            self.discard(name)
            raise
        return False

    def _keep(self, old: _Owned, incarnation: int, epoch: int, lease: int) -> bool:
        """Re-own the copy of an earlier ownership under the new claim when the durable head is the one the copy
        holds. The claim came first: every write of an earlier epoch fails its compare from then on, so the head
        read here is final for them. Under the stream's lock, so no change of the earlier ownership is half-done."""
        with old.lock:
            with self._lock:
                if self._owned.get(old.name) is not old:
                    return False
            if old.behind or old.incarnation != incarnation:
                return False
            head = self.coord.head(old.name)
            if head.seq != old.head.seq or (head.seq and head.epoch != old.head.epoch):
                return False  # another owner wrote since (or this node's last change did land): replay
            old.epoch, old.lease, old.head, old.stale = epoch, lease, Head(head.seq, head.epoch), False
        log.info("claimed stream %r again at epoch %d: its local copy is current (head at record %d), nothing "
                 "replayed", old.name, epoch, head.seq, extra={"stream": old.name, "epoch": epoch})
        return True

    def _drop_copy(self, name: str, forget: Callable[[], None]) -> None:
        with self._lock:
            held = name in self._owned
        if held:
            forget()
        self.discard(name)

    def _replay(self, name: str, record: dict, incarnation: int, epoch: int, lease: int) -> None:
        head = self.coord.head(name)
        prefix = records.prefix(name, incarnation)
        with self.local.view() as v:
            sid = v.next_stream_id()
        layout = _layout(record, sid)
        self.local.create_stream(name, {"sid": sid, "spec": record["spec"], "next_id": 0, "version": 0}, sid + 1)
        own = _Owned(name, incarnation, epoch, Head(head.seq, head.epoch), sid, prefix, lease, layout)
        with self._lock:
            self._owned[name] = own
            self._by_sid[sid] = own
        start, logged = self.checkpoints.replay(prefix, layout, head.seq, head.epoch)
        replayed = 0
        for rec in logged:
            self._apply_local(own, layout, rec, payloads=False)
            replayed += 1
        own.checkpoint_seq, own.checkpoint_live = start, len(own.where)
        self.tiers.adopt(name, own.where)
        # the head is the last valid record's; taking over moves nothing until the first write, at our epoch
        log.info("took over stream %r at epoch %d: %d log objects replayed (from the checkpoint at record %d)", name,
                 epoch, replayed, start, extra={"stream": name, "epoch": epoch})

    def discard(self, name: str) -> None:
        """Forget a stream locally (its durable copy is untouched): after losing it, or before a fresh take-over."""
        with self._lock:
            own = self._owned.pop(name, None)
            if own is not None:
                self._by_sid.pop(own.sid, None)
            for key in [k for k in self._cached if k[0] == name]:
                self._cached_bytes -= self._cached.pop(key)
        self.tiers.release(name)
        with self.local.view() as v:
            stored = next((s for s in v.streams() if s.name == name), None)
        if stored is not None:
            sid = stored.record.get("sid") if isinstance(stored.record, dict) else None
            self.local.drop_stream(name, sid, record_key=stored.key)

    # -- durable changes -----------------------------------------------------------------------------
    def _durable(self, own: _Owned, layout: StreamLayout, kind: str, commit: Optional[Commit] = None,
                 metas: Sequence[EntryMeta] = ()) -> dict[int, records.Located]:
        """Write one log record and move the head to it (fenced); returns where its payloads lie."""
        with self._lock:
            current = self._owned.get(own.name) is own
        if not current or own.stale or not self._valid(own):  # changed while this call waited for the stream
            raise NotOwner(f"stream {own.name!r} changed hands on this node while the call waited; send it again",
                           owner=self.address)
        seq = own.head.seq + 1
        meta_key, kv_key = records.object_names(own.prefix, seq, own.epoch)
        meta_parts, kv_parts, where = records.encode(layout, kind, kv_key, commit, metas)
        # both objects at once (one S3 round trip, not two): neither is part of the stream before the head names it
        payload = self._uploads.submit(self.objects.put, kv_key, kv_parts) if kv_parts else None
        try:
            self.objects.put(meta_key, meta_parts)
        finally:
            if payload is not None:
                payload.result()  # its failure (Unavailable) is the call's, after the .meta's
        new = Head(seq, own.epoch)
        try:
            self.coord.advance(own.name, own.epoch, own.head, new)
        except NotOwner:
            self._lost(own)
            raise
        except Unavailable:
            own.stale = True  # etcd may have taken it: re-read the durable state before serving again
            raise
        own.head = new
        self.tiers.write_through(own.name, kv_key, kv_parts, where)  # durable now: the hot tier may have it
        return where

    def _lost(self, own: _Owned) -> None:
        own.stale = True
        log.warning("stream %r: this node lost its ownership (epoch %d); it serves it no more", own.name, own.epoch,
                    extra={"stream": own.name})

    def _local_layout(self, own: _Owned, layout: StreamLayout) -> StreamLayout:
        return layout if layout.sid == own.sid else dataclasses.replace(layout, sid=own.sid)

    def commit(self, layout: StreamLayout, commit: Commit) -> dict[int, EntryMeta]:
        own = self._own(layout)
        with own.lock:
            if commit.staged is not None:
                commit.staged()  # what is left is S3, etcd and the local LMDB: waits, mostly
            fp8 = [m for m, step in commit.degrade if step == "fp8"]
            rewrites = tuple((m, p) for m, p in commit.rewrite) + tuple(self._fp8(own, layout, m, commit.verify)
                                                                         for m in fp8)
            logged = dataclasses.replace(commit, degrade=tuple((m, s) for m, s in commit.degrade if s != "fp8"),
                                         rewrite=rewrites)
            where = self._durable(own, layout, "commit", logged)
            rec = records.Record("commit", commit=logged, where=where)
            degraded = self._apply_local(own, layout, rec, payloads=True)
            self._checkpoint_if_due(own, layout)
        self._trim()  # outside this stream's lock: trimming takes each victim stream's own
        return degraded

    def _fp8(self, own: _Owned, layout: StreamLayout, meta: EntryMeta, verify: bool):
        """An fp8 degrade made here, from the payload wherever it lies, so the log carries its bytes."""
        full = np.empty((1, layout.layers, *layout.layer_shape), layout.np_dtype)  # [1, L, 2, T, H, D]
        with self.view() as v:
            v.read_payloads(layout, [meta.entry_id], list(range(layout.layers)), full,
                            {} if verify else None)
        layers = [encode(full[0, j], layout.kv_dtype, "fp8") for j in range(layout.layers)]
        new = dataclasses.replace(meta, nbytes=sum(body_bytes(h) for h, _ in layers), codec="fp8")
        return new, layers

    def _apply_local(self, own: _Owned, layout: StreamLayout, rec: records.Record, payloads: bool):
        """Apply a durable record to the local LMDB (with its payloads when `payloads`, else metadata and keys only).
        A local failure after the record is durable never fails the call: the stream is marked stale and rebuilt
        from S3 before it serves again."""
        local = self._local_layout(own, layout)
        try:
            if rec.kind == "metadata":
                self.local.put_metadata(local, rec.metas)
                return {}
            if rec.kind == "stats":
                self.local.put_stats(local, rec.metas)
                return {}
            c = rec.commit
            assert c is not None
            if not payloads and c.put is not None:
                c = dataclasses.replace(c, put=dataclasses.replace(c.put, payloads=[None] * len(c.put.metas)))
            if not payloads:
                c = dataclasses.replace(c, rewrite=tuple((m, None) for m, _ in c.rewrite))
            # the local record keeps this cache's own id and layer group (a log record carries the writer's; a
            # cache rebuilt by a take-over keeps a layer a record, whatever layout the writer's cache had)
            record = {**c.record, "sid": own.sid}
            if "layer_group" in record or local.layer_group != 1:
                record["layer_group"] = local.layer_group
            c = dataclasses.replace(c, record=record)
            degraded = self.local.commit(local, c)
        except (OSError, MemFlowError) as exc:
            if not payloads:
                raise  # a replay: take_over fails and says why
            own.stale = own.behind = True
            log.warning("stream %r: a change durable in S3 did not reach the local cache (%s); the stream is rebuilt "
                        "from S3 before its next call", own.name, exc, extra={"stream": own.name})
            if rec.commit is None:
                return {}
            return {**{m.entry_id: dataclasses.replace(m, nbytes=0, codec="none") for m, _ in rec.commit.degrade},
                    **{m.entry_id: m for m, _ in rec.commit.rewrite}}
        gone = list(c.evict) + [m.entry_id for m, _ in c.degrade]
        replaced = [own.where[e] for e in gone + [m.entry_id for m, _ in c.rewrite] if e in own.where]
        if payloads:
            self.tiers.forget(own.name, replaced)  # their layers leave the hot tier (pinned ones too)
        for eid in gone:
            own.where.pop(eid, None)
        own.where.update(rec.where)
        with self._lock:
            for eid in gone:
                self._cached_bytes -= self._cached.pop((own.name, eid), 0)
            if payloads:
                for eid, at in rec.where.items():
                    self._cached_bytes += at.nbytes - self._cached.pop((own.name, eid), 0)
                    self._cached[(own.name, eid)] = at.nbytes
        return degraded

    def _checkpoint_if_due(self, own: _Owned, layout: StreamLayout) -> None:
        """Called under own.lock right after a durable change this node made: the local LMDB holds exactly the
        state of own.head, which is this owner's own (cluster/checkpoint.py)."""
        if own.stale or not self.checkpoints.due(own.prefix, own.head.seq, own.checkpoint_seq, own.checkpoint_live):
            return
        try:
            with self.local.view() as v:
                state = checkpoint.snapshot(v, self._local_layout(own, layout), own.where)
        except (OSError, MemFlowError) as exc:
            log.warning("stream %r: no checkpoint taken (%s)", own.name, exc, extra={"stream": own.name})
            return
        if state is None:
            return

        def done(seq: int, live: int) -> None:
            own.checkpoint_seq, own.checkpoint_live = max(own.checkpoint_seq, seq), live

        self.checkpoints.write(own.name, own.prefix, own.head.seq, own.head.epoch, state, done)

    def _trim(self) -> None:
        """Keep the cached payloads within local_cache_bytes, dropping the oldest entries' first."""
        if self.local_cache_bytes is None:
            return
        victims: dict[str, list[int]] = {}
        with self._lock:
            while self._cached_bytes > self.local_cache_bytes and self._cached:
                (name, eid), nbytes = self._cached.popitem(last=False)  # gone from the set first: readers go to S3
                self._cached_bytes -= nbytes
                victims.setdefault(name, []).append(eid)
        for name, eids in victims.items():
            with self._lock:
                own = self._owned.get(name)
            if own is None:
                continue
            with own.lock:  # no change of this stream in between: an entry cached again meanwhile stays
                with self._lock:
                    gone = [e for e in eids if (name, e) not in self._cached]
                if gone and self._owned.get(name) is own:
                    self.local.forget_payloads(own.layout, gone)

    def put_metadata(self, layout: StreamLayout, metas: Sequence[EntryMeta]) -> None:
        own = self._own(layout)
        with own.lock:
            self._durable(own, layout, "metadata", metas=metas)
            self._apply_local(own, layout, records.Record("metadata", metas=tuple(metas)), payloads=True)
            self._checkpoint_if_due(own, layout)

    def put_stats(self, layout: StreamLayout, metas: Sequence[EntryMeta]) -> None:
        own = self._own(layout)
        with own.lock:
            self._durable(own, layout, "stats", metas=metas)
            self._apply_local(own, layout, records.Record("stats", metas=tuple(metas)), payloads=True)
            self._checkpoint_if_due(own, layout)

    def forget_payloads(self, layout: StreamLayout, ids: Sequence[int]) -> None:
        self.local.forget_payloads(layout, ids)

    # -- streams ---------------------------------------------------------------------------------------
    def create_stream(self, name: str, record: dict, next_sid: int) -> None:
        lease = self.coord.lease_id
        incarnation, epoch = self.coord.create_stream(name, {"spec": record["spec"]})
        sid = record["sid"]
        own = _Owned(name, incarnation, epoch, Head(0, epoch), sid, records.prefix(name, incarnation), lease,
                     _layout(record, sid))
        try:
            self.local.create_stream(name, record, next_sid)
        except Exception:  # noqa: BLE001 - durable in the cluster: this node rebuilds it on its first call
            own.stale = own.behind = True
        with self._lock:
            self._owned[name] = own
            self._by_sid[sid] = own

    def drop_stream(self, name: str, sid: Optional[int], record_key: Optional[bytes] = None) -> None:
        with self._lock:
            own = self._owned.get(name)
        if own is None:  # a local record only (e.g. one the bank could not open)
            return self.local.drop_stream(name, sid, record_key)
        with own.lock:
            try:
                self.coord.drop_stream(name, own.epoch)
            except NotOwner:
                self._lost(own)
                raise
        self.tiers.forget(name, list(own.where.values()))
        self.discard(name)
        threading.Thread(target=self._delete_objects, args=(own.prefix,), name="memflow-s3-drop", daemon=True).start()

    def _delete_objects(self, prefix: str) -> None:
        try:
            self.objects.delete_prefix(prefix)
        except MemFlowError as exc:  # the stream is gone from the catalog: its objects are never read again
            log.warning("objects of a dropped stream stay in S3 under %s: %s", prefix, exc)

    # -- reads ------------------------------------------------------------------------------------------
    def view(self) -> contextlib.AbstractContextManager["ClusterView"]:
        return self._view()

    @contextlib.contextmanager
    def _view(self) -> Iterator["ClusterView"]:
        with self.local.view() as inner:
            yield ClusterView(self, inner)

    def _cached_entry(self, name: str, eid: int) -> bool:
        with self._lock:
            return (name, eid) in self._cached

    def _located(self, layout: StreamLayout, eid: int) -> records.Located:
        with self._lock:
            own = self._by_sid.get(layout.sid) or self._owned.get(layout.name)
        at = own.where.get(eid) if own is not None else None
        if at is None:
            raise NotFound(f"entry {eid} of stream {layout.name!r} has no payload in the durable tier (deleted?)")
        return at

    def read_through(self, layout: StreamLayout, ids: Sequence[int], layers: Sequence[int],
                     rows: Sequence[np.ndarray]) -> None:
        """Payload layers of entries that the local cache does not hold, decoded into each entry's row of the fetch
        buffer (`[len(layers), 2, T, H, D]`) and verified (cluster/tiers.py: Mooncake straight into the rows, all in
        one batch, then S3)."""
        self.tiers.read_into([(self._located(layout, eid), row, f"stream {layout.name!r} entry {eid}")
                              for eid, row in zip(ids, rows)], layers)

    # -- snapshots (S3: a new owner starts from them) -------------------------------------------------
    def _snapshot_key(self, sid: int, space: int, write: bool = False) -> Optional[str]:
        """The S3 name of a stream's snapshot; None for a stream not held here, or (`write`) not served now: a copy
        whose ownership lapsed may be of a state another owner has moved past, and never overwrites its snapshot."""
        with self._lock:
            own = self._by_sid.get(sid)
        if own is None or (write and (own.stale or not self._valid(own))):
            return None
        return f"{own.prefix}snap/space{space}.npz"

    def save_snapshot(self, sid: int, space: int, version: int, parts: Sequence[tuple[bytes, np.ndarray]]) -> None:
        key = self._snapshot_key(sid, space, write=True)
        if key is None:
            return
        arrays = {"count": np.int64(len(parts)), "version": np.int64(version)}
        for i, (data, tomb) in enumerate(parts):
            arrays[f"index{i}"] = np.frombuffer(data, np.uint8)
            arrays[f"tomb{i}"] = tomb
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            self.objects.put(key, [buf.getbuffer()])
        except MemFlowError as exc:  # a snapshot only saves a rebuild
            raise OSError(f"index snapshot not saved to S3: {exc}") from None

    def load_snapshot(self, sid: int, space: int) -> Optional[tuple[int, list[tuple[bytes, np.ndarray]]]]:
        key = self._snapshot_key(sid, space)
        if key is None:
            return None
        try:
            blob = self.objects.get(key)
        except NotFound:
            return None
        with np.load(io.BytesIO(blob)) as z:
            return int(z["version"]), [(z[f"index{i}"].tobytes(), z[f"tomb{i}"]) for i in range(int(z["count"]))]

    def drop_snapshots(self, sid: int) -> None:
        with self._lock:
            own = self._by_sid.get(sid)
        if own is None or own.stale or not self._valid(own):
            return  # a dropped stream's snapshots go with its whole prefix (drop_stream); a lapsed one's stay
        try:
            self.objects.delete(self.objects.list(f"{own.prefix}snap/"))
        except MemFlowError as exc:
            raise OSError(f"index snapshots not removed from S3: {exc}") from None

    def _durable_payloads(self, sid: int) -> set[tuple[int, int]]:
        with self._lock:
            own = self._by_sid.get(sid)
            where = dict(own.where) if own is not None else {}
        return {(eid, j) for eid, at in where.items() for j in range(len(at.layers))}

    def map_size(self) -> int:
        return self.local.map_size()

    def disk_bytes(self) -> int:
        return self.local.disk_bytes()

    def close(self) -> None:
        """Hand every stream back (so another node can claim it at once), then close the local cache."""
        with self._lock:
            owned = list(self._owned.values())
        self.tiers.close()  # what is queued for the hot tier goes first
        self.checkpoints.close()  # a checkpoint in flight lands (or fails) before the streams are handed back
        self._uploads.shutdown(wait=True)
        for own in owned:
            with contextlib.suppress(MemFlowError):
                self.coord.release(own.name, own.epoch)
        self.local.close()


def _layout(record: dict, sid: int) -> StreamLayout:
    from memory_service.stream import layer_group_of, stream_layout  # stream.py imports the store package

    spec = StreamSpec.from_json(record["spec"])
    return stream_layout(spec, sid, layer_group_of(record, spec))


class ClusterView:
    """One read snapshot: the local LMDB's, with payloads that are not cached read through from S3."""

    def __init__(self, store: ClusterStore, inner) -> None:
        self._store, self._inner = store, inner

    def next_stream_id(self) -> int:
        return self._inner.next_stream_id()

    def streams(self) -> Iterator[StoredStream]:
        return self._inner.streams()

    def entries(self, layout: StreamLayout) -> Iterator[EntryMeta]:
        return self._inner.entries(layout)

    def iter_keys(self, layout: StreamLayout, space: int, only: Optional[Container[int]],
                  batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._inner.iter_keys(layout, space, only, batch)

    def read_keys(self, layout: StreamLayout, space: int, ids: Sequence[int], out: np.ndarray) -> None:
        self._inner.read_keys(layout, space, ids, out)

    def read_layer_keys(self, layout: StreamLayout, space: int, ids: np.ndarray, out: np.ndarray) -> None:
        self._inner.read_layer_keys(layout, space, ids, out)

    def contents(self, sid: int) -> Contents:
        """The local records, and as payloads also every layer the durable tier holds for the stream."""
        local = self._inner.contents(sid)
        durable = self._store._durable_payloads(sid)
        return dataclasses.replace(local, payloads=tuple(sorted(set(local.payloads) | durable)))

    def read_payloads(self, layout: StreamLayout, ids: Sequence[int], layers: Sequence[int], out: np.ndarray,
                      verified: Optional[dict[int, int]]) -> None:
        through = []  # positions in ids of the entries read through (one batch for all of them)
        for n, eid in enumerate(ids):
            if self._store._cached_entry(layout.name, eid):
                try:
                    t0 = time.perf_counter()
                    self._inner.read_payloads(layout, [eid], layers, out[n:n + 1], verified)
                    self._store.tiers.count("local", out[n].nbytes, t0)
                    continue
                except NotFound:  # cached after this view began (a rewrite): S3 has it
                    pass
            through.append(n)
        if not through:
            return
        self._store.read_through(layout, [ids[n] for n in through], layers, [out[n] for n in through])  # verified
        if verified is not None:
            for n in through:
                for layer in layers:
                    verified[ids[n]] = verified.get(ids[n], 0) | (1 << layer)

    def read_layer(self, layout: StreamLayout, eid: int, layer: int, verified: Optional[dict[int, int]]) -> memoryview:
        if self._store._cached_entry(layout.name, eid):
            try:
                return self._inner.read_layer(layout, eid, layer, verified)
            except NotFound:  # cached after this view began (a rewrite): S3 has it
                pass
        tmp = np.empty((1, *layout.layer_shape), layout.np_dtype)  # [1 layer, 2, T, H, D]
        self._store.read_through(layout, [eid], [layer], [tmp])
        if verified is not None:
            verified[eid] = verified.get(eid, 0) | (1 << layer)
        return memoryview(tmp.reshape(-1).view(np.uint8))
