"""MemoryBank: streams of memory entries over a VectorIndex per key space and one TensorStore (LMDB).

Owns the public protocol's semantics (DESIGN.md "Public surface"); `LocalMemory` and the gRPC servicer
only delegate here. Promises:
- every mutating call is one store commit: all of it or none of it, and a failed call (bad input,
  budget, full disk) leaves the bank exactly as it was; memory (indexes, entry table) is updated only
  after the commit succeeds;
- after `put` returns, the stream is within its budget (the put's own evictions commit with it); with the
  upkeep thread running (`start_pruner`, as the service does) a put evicts only what the budget demands and the
  batch beyond it, TTL expiry and the policy's ranking run on that thread (memory_service/upkeep.py);
- queries never see another stream's entries, and run under the stream's lock only for the search itself.
Retrieval statistics (hits, last hit, importance, decayed frequency) live in memory - the truth every pruning
policy reads - and are persisted by a flush off the request path: at most `hit_flush_interval_s` after they
change while the bank is in use (the pruner's thread, or a one-shot thread a query or put starts), and on
close; never in a put's transaction, and a query never writes (so it never fails on a full disk). What a crash
(kill -9) may lose is statistics of about the last interval, never an entry: a put is durable when it returns.
Deletes, drops, prunes and puts that evict commit on a full disk (the store's reserve), and a close on a full
disk skips what it cannot write (statistics, snapshots) and still closes. What is durable goes through the
store's verbs (memory_service/store/base.py); this module never sees how the store lays it out.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from memory_service import copies, eviction
from memory_service.config import BankConfig
from memory_service.errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, MemFlowError, NotFound, ResourceExhausted, Unavailable,
)
from memory_service.pruning import LFU, parse_policy
from memory_service.pruning.planner import Plan
from memory_service.store import LMDBStore, NewEntries, StoredStream, StoreView, TensorStore
from memory_service.store.codec import body_bytes, encode_layers
from memory_service.store.dirlock import DirLock
from memory_service.query_fetch import FetchPlan
from memory_service.stream import Stream, default_layer_group
from memory_service.upkeep import Upkeep
from memory_service.types import (
    BankStats, EntryMeta, FetchResult, NewEntry, PruneResult, QueryFetchResult, QueryResult, QueryTrace, StreamSpec,
    StreamStats, kv_numpy_dtype,
)
from memory_service.validate import check_entries, check_ids, check_query

log = logging.getLogger("memflow.bank")


@dataclasses.dataclass(frozen=True)
class UnopenedStream:
    """A stream record on disk that the bank could not open: the stream is unavailable, the others are served."""

    name: str
    reason: str
    sid: Optional[int] = None  # None when the record is too damaged to name its id
    key: bytes = dataclasses.field(default=b"", repr=False)  # the store's key of the record, as stored


def _build_stream(record: dict, params, store: TensorStore) -> Stream:
    """A new stream's in-memory state; what fails here is the caller's spec, so nothing is written."""
    try:
        return Stream(record, params, store)
    except MemFlowError:
        raise
    except MemoryError:
        raise ResourceExhausted(f"stream {record['spec']['name']!r} needs more memory to build than the service has; "
                                "expected a smaller layout") from None
    except Exception as exc:  # noqa: BLE001 - e.g. faiss refusing a structure: the spec, not the service
        raise InvalidArgument(f"stream {record['spec']['name']!r} cannot be built: {type(exc).__name__}: {exc}") from None


class MemoryBank:
    def __init__(self, data_dir: str, config: Optional[BankConfig] = None, clock: Callable[[], float] = time.time,
                 read_only: bool = False, store: Optional[Callable[[str, BankConfig], TensorStore]] = None):
        """`store` builds the bank's TensorStore from (data_dir, config) once the directory is locked (cluster mode
        passes its ClusterStore's); by default it is the directory's LMDB store."""
        self.data_dir = str(data_dir)
        self.config = config or BankConfig()
        self.clock = clock
        # One writer per directory, across processes (store/dirlock.py); a read-only bank (inspect, beside a
        # live service) takes no lock and writes nothing: no snapshots, and a write raises PermissionDenied.
        self.read_only = read_only
        self._dirlock = None if read_only else DirLock.acquire(self.data_dir)
        if read_only:
            self.config = dataclasses.replace(self.config, snapshot_on_close=False)
        self.snapshot_dir = os.path.join(self.data_dir, "snapshots")
        try:
            self.store: TensorStore = store(self.data_dir, self.config) if store is not None else LMDBStore(
                os.path.join(self.data_dir, "lmdb"), self.config.map_size, self.config.max_map_size,
                self.config.durable, readonly=read_only, reserve_bytes=self.config.reserve_bytes,
                snapshot_dir=self.snapshot_dir)
        except BaseException:
            # freed now, not when the half-built bank is collected: the caller's traceback keeps it alive, and a
            # retry in this process would find its own directory "in use"
            if self._dirlock is not None:
                self._dirlock.release()
            raise
        self._lock = threading.RLock()
        self._streams: dict[str, Stream] = {}
        self._unavailable: dict[str, UnopenedStream] = {}  # records on disk this bank could not open
        self._last_flush = time.monotonic()
        self._flushing = threading.Lock()  # flushes run one at a time
        self._closed = False
        self._stop = threading.Event()
        self._pruner: Optional[Upkeep] = None
        try:
            with self.store.view() as v:  # one consistent snapshot, also beside a live writer (read-only)
                self._next_sid = v.next_stream_id()
                for stored in v.streams():
                    self._open_stream(v, stored)
        except BaseException:
            self.store.close()
            if self._dirlock is not None:
                self._dirlock.release()
            raise

    def _open_stream(self, v: StoreView, stored: StoredStream) -> None:
        """Open one stream record at start; a record that cannot be opened (written by an older version without
        the spec limits, or damaged) makes that stream unavailable, never the bank: the others are served."""
        name, key, record = stored.name, stored.key, stored.record
        sid = None
        try:
            if record is None:
                raise InvalidArgument(stored.problem)
            sid = record.get("sid") if isinstance(record, dict) else None
            s = Stream(record, self.config.index, self.store)  # checks the spec (limits) before building anything
            s.load(v)
        except Exception as exc:  # noqa: BLE001 - any failure of one record must not take the others down
            reason = f"{type(exc).__name__}: {exc}"
            ok_sid = sid if isinstance(sid, int) and not isinstance(sid, bool) and 0 <= sid < 2**32 else None
            self._unavailable[name] = UnopenedStream(name, reason, ok_sid, key)
            log.error("stream %r is unavailable: its record in %s cannot be opened (%s); the other streams are "
                      "served", name, self.data_dir, reason, extra={"stream": name})
            return
        self._streams[s.spec.name] = s

    def adopt(self, name: str) -> None:
        """Open a stream whose record the store holds but this bank has not opened (cluster mode: the store has
        just replayed a stream this node took over). Raises what opening it raised; nothing is left half-open."""
        self._check_open()
        with self._lock:
            if name in self._streams:
                return
            with self.store.view() as v:
                stored = next((st for st in v.streams() if st.name == name), None)
                if stored is None or stored.record is None:
                    raise NotFound(f"stream {name!r} is not in the store"
                                   + (f" ({stored.problem})" if stored is not None else ""))
                s = Stream(stored.record, self.config.index, self.store)
                s.load(v)
            self._next_sid = max(self._next_sid, s.sid + 1)
            self._unavailable.pop(name, None)
            self._streams[name] = s

    def forget(self, name: str) -> None:
        """Close a stream in memory without touching the store (cluster mode: another node owns it now). Calls
        already inside it finish; the next call for it does not find it."""
        with self._lock:
            s = self._streams.pop(name, None)
        if s is not None:
            with s.lock, s.stats_lock:  # waits for a call, or a statistics flush, in flight on it
                s.dirty.clear()

    def _serves(self, name: str) -> bool:
        """Whether background work (TTL prunes, statistics flushes) may touch the stream (cluster mode: only while
        this node owns it; it never takes a stream over)."""
        return True

    def unavailable_streams(self) -> list[UnopenedStream]:
        """Streams whose record is on disk but could not be opened, with the reason (inspect lists them)."""
        self._check_open()
        return sorted(self._unavailable.values(), key=lambda u: u.name)

    def _drop_unavailable(self, name: str) -> None:
        """DropStream of an unavailable stream: its record goes and, when the record still names its id, all of
        its entries and snapshots with it (the way out for an operator whose data directory holds a bad record)."""
        u = self._unavailable[name]
        if u.sid is not None and any(s.sid == u.sid for s in self._streams.values()):
            u = dataclasses.replace(u, sid=None)  # a damaged record naming a live stream's id: never touch its data
        self.store.drop_stream(name, u.sid, record_key=u.key)
        del self._unavailable[name]
        if u.sid is not None:
            self._drop_snapshots(name, u.sid)

    def _drop_snapshots(self, name: str, sid: int) -> None:
        """After a committed drop: its snapshots go, best effort. The drop is answered OK whatever happens here (a
        snapshot left behind is never read: stream ids are not reused)."""
        try:
            self.store.drop_snapshots(sid)
        except OSError as exc:
            log.warning("stream %r is dropped, but its index snapshots stay on disk: %s", name, exc,
                        extra={"stream": name})

    # -- streams ---------------------------------------------------------------------------------
    def create_stream(self, spec: StreamSpec) -> None:
        self._check_open()
        if not isinstance(spec, StreamSpec):
            raise InvalidArgument(f"create_stream takes a StreamSpec, got {type(spec).__name__}")
        parse_policy(spec.policy)  # an unknown policy is refused before anything is written
        with self._lock:
            if spec.name in self._streams:
                raise AlreadyExists(f"stream {spec.name!r} already exists; drop it first or pick another name")
            if spec.name in self._unavailable:
                raise AlreadyExists(f"stream {spec.name!r} already exists but is unavailable "
                                    f"({self._unavailable[spec.name].reason}); drop it first or pick another name")
            record = {"sid": self._next_sid, "spec": spec.to_json(), "next_id": 0, "version": 0,
                      "layer_group": default_layer_group(spec)}
            # The stream is built (indexes included) and its record serialized before anything is written: a
            # record on disk is always one the next start can open.
            stream = _build_stream(record, self.config.index, self.store)
            self.store.create_stream(spec.name, record, self._next_sid + 1)
            self._next_sid += 1
            self._streams[spec.name] = stream

    def drop_stream(self, name: str) -> None:
        with self._lock:
            if name in self._unavailable:
                return self._drop_unavailable(name)
            s = self._stream(name)
            with s.lock, s.stats_lock:  # a statistics flush in flight on it finishes first
                self.store.drop_stream(name, s.sid)
                del self._streams[name]
            self._drop_snapshots(name, s.sid)

    def list_streams(self) -> list[StreamSpec]:
        self._check_open()
        with self._lock:
            return [s.spec for s in self._streams.values()]

    def usage(self, prefix: str = "") -> tuple[int, int]:
        """(streams, stored payload + key bytes) of the streams whose names start with `prefix` (a tenant's quota
        check). A stream on disk that could not be opened counts as a stream (its name is taken until it is
        dropped) with no bytes. Read without the streams' locks, so it never waits for a put; a put in flight may
        be missing."""
        self._check_open()
        with self._lock:
            streams = [s for name, s in self._streams.items() if name.startswith(prefix)]
            unopened = sum(1 for name in self._unavailable if name.startswith(prefix))
        return len(streams) + unopened, sum(s.payload_bytes + len(s.entries) * s.key_bytes_per_entry for s in streams)

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"the memory bank in {self.data_dir} is closed; open a new one")

    def spec(self, name: str) -> StreamSpec:
        return self._stream(name).spec

    def _stream(self, name: str) -> Stream:
        self._check_open()
        s = self._streams.get(name)
        if s is None and name in self._unavailable:
            raise FailedPrecondition(f"stream {name!r} is unavailable: its record in the data directory cannot be "
                                     f"opened ({self._unavailable[name].reason}); drop it to remove it")
        if s is None:
            known = sorted(self._streams)
            shown = known[:10] + (["..."] if len(known) > 10 else [])
            raise NotFound(f"stream {name!r} not found; existing streams: {shown}")
        return s

    # -- put -------------------------------------------------------------------------------------
    def put(self, stream: str, entries: Sequence[NewEntry]) -> list[int]:
        s = self._stream(stream)
        checked = check_entries(s.spec, entries, self.config.max_batch)
        codec = s.spec.storage
        encoded = []  # per entry: [(header, body)] per layer, or None
        stored_keys = []  # per entry: per key space, in the space's stored dtype
        dtypes = [s.spec.key_spaces[space].dtype for space in s.space_names]
        for _, keys, kv in checked:
            encoded.append(None if kv is None else encode_layers(kv, s.spec.kv.dtype, codec))
            stored_keys.append([keys[space].astype(dt, copy=False) for space, dt in zip(s.space_names, dtypes)])
        with s.lock:
            now = self.clock()
            ids = list(range(s.next_id, s.next_id + len(checked)))
            metas = []
            for eid, (e, _, _), enc in zip(ids, checked, encoded):
                nbytes = sum(body_bytes(h) for h, _ in enc) if enc else 0
                metas.append(EntryMeta(
                    entry_id=eid, frame_index=int(e.frame_index), chunk_index=int(e.chunk_index), prompt=e.prompt,
                    created=now, pinned=bool(e.pinned),
                    rope_position=None if e.rope_position is None else int(e.rope_position),
                    importance=float(e.importance), nbytes=nbytes, codec=codec if enc else "none",
                ))
            # with the upkeep thread running, only what the budget demands is evicted here; the rest goes there
            p = eviction.plan_for(s, len(metas), sum(m.nbytes for m in metas), now, deferred=self._pruner is not None)
            with s.stats_lock:
                id_arr = np.array(ids, np.int64)
                stacked = _Stacked([keys for _, keys, _ in checked])
                adds = _Adds(s, id_arr, stacked)  # the index adds: beside the commit's fsync where they can be undone
                try:
                    # one commit: the entries and the evictions that make room for them (evicting, it may use the
                    # reserve)
                    degraded = eviction.apply(self.store, s, p, ids[-1] + 1, self.config.verify_checksums,
                                              NewEntries(metas, stored_keys, encoded), staged=adds.start)
                except BaseException:
                    adds.undo()  # nothing is committed: keys added beside it come out before anyone sees them
                    raise
                for meta in metas:
                    s.entries[meta.entry_id] = meta
                s.columns_added(metas)
                adds.finish()
                if s.policy.needs_vectors:
                    s.add_compact(id_arr, stacked[s.space_names[0]])
                eviction.mirror(s, p, degraded, ids[-1] + 1)
            if self._pruner is not None and eviction.due(s):
                self._pruner.ask(stream)
        self._flush_if_due()
        return ids

    def prune(self, stream: str) -> PruneResult:
        """Expire and enforce the budget now (puts already do this; use it after a budget or clock change)."""
        s = self._stream(stream)
        with s.lock:
            p = eviction.plan_for(s, 0, 0, self.clock())
            if not p.evict and not p.degrade:
                # nothing to change: no commit (the TTL pruner asks every few seconds; in cluster mode a commit
                # is an S3 record and an etcd transaction)
                return PruneResult(evicted=(), degraded=(), reason=p.reason or "within budget")
            with s.stats_lock:
                degraded = eviction.apply(self.store, s, p, s.next_id, self.config.verify_checksums)
                eviction.mirror(s, p, degraded, s.next_id)
        return PruneResult(evicted=p.evict, degraded=tuple(d for d, _ in p.degrade), reason=p.reason or "within budget")

    # -- query -----------------------------------------------------------------------------------
    def query(self, stream: str, space: str, vectors, k: int, *, combine: str = "per_layer",
              exclude_frames: Optional[tuple[int, int]] = None, pinned_only: bool = False,
              time_range: Optional[tuple[float, float]] = None, record: bool = True) -> QueryResult:
        """Top-k entries of `space` for `vectors`. `exclude_frames=(lo, hi)` skips frames lo <= f < hi. With
        `record=False` its hits do not count yet (a query_fetch counts them with `record_hits` once it succeeded)."""
        s = self._stream(stream)
        q = check_query(s.spec, space, vectors, k, combine, self.config.max_k, exclude_frames, time_range)
        steps: list[tuple[str, float]] = []
        with s.lock:
            t0 = time.perf_counter()
            deny = None
            if exclude_frames is not None or pinned_only or time_range is not None:
                ids, frames, created, pinned = s.columns()
                mask = np.zeros(len(ids), np.bool_)
                if exclude_frames is not None:
                    mask |= (frames >= exclude_frames[0]) & (frames < exclude_frames[1])
                if pinned_only:
                    mask |= ~pinned
                if time_range is not None:
                    mask |= (created < time_range[0]) | (created >= time_range[1])
                deny = ids[mask]
            steps.append(("filter", (time.perf_counter() - t0) * 1e3))
            scores, ids, scanned = s.spaces[space].search(q, k, combine, deny, steps)
            frames = s.frames_of(ids)
            if record:
                self._record_hits(s, ids)
        self._flush_if_due()
        return QueryResult(ids=ids, scores=scores, frames=frames, trace=QueryTrace(scanned, tuple(steps)))

    def _record_hits(self, s: Stream, ids: np.ndarray) -> None:
        rows = ids.reshape(-1, ids.shape[-1])
        counts = Counter(rows.ravel().tolist())  # a few dozen ids: a Counter beats np.unique (~50 us cold)
        counts.pop(-1, None)
        if not counts:
            return
        now = self.clock()
        half_life = next((p.half_life_s for p in eviction.parts(s.policy) if isinstance(p, LFU)), LFU().half_life_s)
        for eid, c in counts.items():
            m = s.entries.get(eid)
            if m is None:
                continue
            since = m.last_hit if m.last_hit is not None else m.created
            lfu = m.lfu * math.pow(2.0, -max(0.0, now - since) / half_life) + 1.0
            # In place, under the stream's lock: a new EntryMeta a hit lived on in the table, so every query moved
            # dozens of objects into the collector's oldest generation. At 1e5 entries that (and read_layer_keys'
            # views, since read one by one) ran a full collection of 40-140 ms over 145k objects: 6 in 1500 queries.
            # entries() hands out copies; the statistics flush reads all four fields in one step (stats_json).
            m.__dict__.update(hit_count=m.hit_count + 1, last_hit=now, lfu=lfu,
                              importance=m.importance + c / len(rows))
            s.dirty.add(eid)

    _flusher: Optional[threading.Thread] = None  # the one-shot statistics flush a query or put may start

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._last_flush > self.config.hit_flush_interval_s:
            self._flush_soon()  # never inline: a query must not write (nor fail on a full disk), a put not wait

    def _flush_soon(self) -> None:
        """Persist statistics on a one-shot thread (the pruner thread does it when the bank has one)."""
        if self._pruner is not None or not self._lock.acquire(blocking=False):
            return  # the pruner flushes; or the bank is busy (a drop, a close): the next query asks again
        try:
            if self._stop.is_set() or (self._flusher is not None and self._flusher.is_alive()):
                return
            self._last_flush = time.monotonic()
            self._flusher = threading.Thread(target=self._flush_quietly, name="memflow-flush", daemon=True)
            self._flusher.start()
        finally:
            self._lock.release()

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except ResourceExhausted as exc:  # a full disk: they stay in memory and go with a later write
            log.warning("retrieval statistics not persisted yet: %s", exc)

    def flush(self) -> None:
        """Persist retrieval statistics of every stream: per stream one store write of the entries hit since the
        last flush. The stream's lock is held only to take them: the write runs beside queries and puts (a commit
        that removes entries waits for it on `stats_lock`, so no statistics of a removed entry are written)."""
        self._last_flush = time.monotonic()
        if self.read_only:
            return  # a read-only bank's hits stay in memory: it writes nothing
        with self._flushing:  # one flush at a time: an older copy of an entry's statistics never lands last
            for s in list(self._streams.values()):
                if not self._serves(s.spec.name):
                    continue
                with s.lock:
                    if not s.dirty:
                        continue
                    taken, s.dirty = s.dirty, set()
                    metas = [s.entries[e] for e in taken if e in s.entries]
                try:
                    # Read outside the lock: a hit updates an entry in one dict update and stats_json reads it in
                    # one step, so a record never holds half of one hit; a hit after the read is written by the next
                    # flush (its entry is dirty again). No copies: 30k of them alive through a flush's write were
                    # promoted into the collector's oldest generation and brought on its full collections.
                    with s.stats_lock:
                        live = [m for m in metas if m.entry_id in s.entries]  # evicted meanwhile: records gone
                        if live and self._streams.get(s.spec.name) is s:  # a drop or forget meanwhile: nothing to write
                            self.store.put_stats(s.layout, live)
                except BaseException:
                    with s.lock:  # not written: they go with the next flush
                        s.dirty.update(e for e in taken if e in s.entries)
                    raise

    # -- fetch / delete / pin --------------------------------------------------------------------
    def fetch(self, stream: str, ids, layers: Optional[Sequence[int]] = None, out: Optional[np.ndarray] = None) -> FetchResult:
        """K/V of `ids` for `layers` (all by default), decoded into `out` when given (the shm data plane)."""
        return self.fetch_groups(stream, [(ids, layers)], None if out is None else [out])[0]

    def fetch_groups(self, stream: str, groups: Sequence[tuple[Sequence[int], Sequence[int]]],
                     outs: Optional[Sequence[np.ndarray]] = None) -> tuple[FetchResult, ...]:
        """Several fetches of one stream, `groups[i]` = (ids, layers), checked together and read in one store
        view (query_fetch's groups; one fetch each cost a check and a read transaction); into `outs[i]` when
        given. Raises what the first failing fetch would, before anything is read."""
        if not groups:
            return ()
        s = self._stream(stream)
        prepared = [self._fetch_prepare(stream, ids, layers, s) for ids, layers in groups]
        bufs = []
        for n, (_, _, _, shape, dtype) in enumerate(prepared):
            out = outs[n] if outs is not None else np.empty(shape, dtype)
            if out.shape != shape or out.dtype != dtype:
                which = "" if len(groups) == 1 else f" {n}"
                raise InvalidArgument(f"fetch buffer{which} is {out.dtype}{list(out.shape)}, expected {dtype}"
                                      f"{list(shape)}")
            bufs.append(out)
        verified = self._verified(s)
        with self.store.view() as v, copies.batched():  # one gather for all groups (split when big)
            for (_, id_list, layer_list, _, _), out in zip(prepared, bufs):
                v.read_payloads(s.layout, id_list, layer_list, out, verified)
        return tuple(FetchResult(ids=tuple(p[1]), layers=tuple(p[2]), kv=out) for p, out in zip(prepared, bufs))

    def query_fetch(self, stream: str, space: str, vectors, k: int, *, fetch_k: Optional[int] = None, include=(),
                    resident=(), layers: Optional[Sequence[int]] = None, combine: str = "per_layer",
                    exclude_frames: Optional[tuple[int, int]] = None, pinned_only: bool = False,
                    time_range: Optional[tuple[float, float]] = None) -> QueryFetchResult:
        """`query`, then `fetch` of the pairs query_fetch.FetchPlan picks from its hits: the two calls composed."""
        plan = FetchPlan(self.spec(stream), k, layers, fetch_k, include, resident)
        if plan.include:  # an unknown or keys-only id fails before the query records its hits
            self.fetch_layout(stream, plan.include, plan.layers)
        result = self.query(stream, space, vectors, k, combine=combine, exclude_frames=exclude_frames,
                            pinned_only=pinned_only, time_range=time_range, record=False)
        fetched = self.fetch_groups(stream, plan.groups(result.ids))
        self.record_hits(stream, result.ids)  # once the whole call succeeded: a failed one leaves the bank as it was
        return QueryFetchResult(query=result, fetched=fetched)

    def record_hits(self, stream: str, ids: np.ndarray) -> None:
        """Count a ranking's hits in the retrieval statistics (a query with record=False, once its call succeeded)."""
        s = self._stream(stream)
        with s.lock:
            self._record_hits(s, ids)

    def fetch_layout(self, stream: str, ids, layers: Optional[Sequence[int]] = None):
        """(ids, layers, shape, dtype) a fetch would return; raises what the fetch would raise."""
        _, id_list, layer_list, shape, dtype = self._fetch_prepare(stream, ids, layers)
        return tuple(id_list), tuple(layer_list), shape, dtype

    def iter_fetch(self, stream: str, ids, layers: Optional[Sequence[int]], chunk_bytes: int,
                   frame: Callable[[memoryview], object]) -> Iterator[object]:
        """The bytes a fetch returns, in order, as `frame(chunk)` of at most `chunk_bytes` each (streaming plane).

        Raw payloads go from the store's memory map straight into `frame` (which must copy what it keeps); a read
        view is held for one layer of one entry at a time, never while the consumer waits.
        """
        s, id_list, layer_list, _, _ = self._fetch_prepare(stream, ids, layers)
        verified = self._verified(s)
        for eid in id_list:
            for layer in layer_list:
                with self.store.view() as v:
                    view = v.read_layer(s.layout, eid, layer, verified)
                    framed = [frame(view[i:i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)]
                    del view
                yield from framed

    def _fetch_prepare(self, stream: str, ids, layers, s: Optional[Stream] = None):
        s = s or self._stream(stream)
        if s.spec.kv is None:
            raise InvalidArgument(f"stream {stream!r} is keys-only: it has no KV payloads to fetch")
        id_arr = check_ids(ids)
        layer_list = self._check_layers(s, layers)
        id_list = id_arr.tolist()
        # no lock is held here: an entry a concurrent delete or eviction removed is not found (as a KeyError it was
        # INTERNAL); ids are never reused, so the check names it gone for good
        metas = [s.entries.get(i) for i in id_list]
        if any(m is None for m in metas):
            self._require(s, id_arr)
        gone = [i for i, m in zip(id_list, metas) if m is None or m.codec == "none"]
        if gone:
            raise NotFound(f"entries {gone[:10]} of stream {stream!r} hold keys only (codec 'none': put without K/V, "
                           "or degraded to keys only by pruning): they have no K/V to fetch")
        shape = (len(id_arr), len(layer_list), *s.spec.kv.layer_shape)
        return s, id_list, layer_list, shape, kv_numpy_dtype(s.spec.kv.dtype)

    def _verified(self, s: Stream) -> Optional[dict[int, int]]:
        """What a read verifies: checksums on the first read of each payload layer after open (the stream's
        bitmasks), or on every read with `verify_every_read` (a fresh map), or never (None). That catches what
        disk or a crash did to the file, without re-hashing hot payloads on every chunk (xxh3 costs about a
        third of a warm fetch)."""
        if not self.config.verify_checksums:
            return None
        return {} if self.config.verify_every_read else s.verified

    def _check_layers(self, s: Stream, layers: Optional[Sequence[int]]) -> list[int]:
        total = s.spec.kv.layers
        if layers is None:
            return list(range(total))
        out = [int(x) for x in layers]
        bad = [x for x in out if not 0 <= x < total]
        if not out or bad or len(set(out)) != len(out):
            raise InvalidArgument(f"layers {list(layers)} invalid; expected distinct ints in [0, {total})")
        return out

    def _require(self, s: Stream, ids: np.ndarray) -> None:
        missing = [int(i) for i in ids if int(i) not in s.entries]
        if missing:
            raise NotFound(f"stream {s.spec.name!r} has no entries {missing[:10]}" + (" ..." if len(missing) > 10 else ""))

    def delete(self, stream: str, ids) -> int:
        s = self._stream(stream)
        id_arr = np.unique(check_ids(ids))
        with s.lock:
            self._require(s, id_arr)
            p = Plan(evict=tuple(id_arr.tolist()), reason="deleted")
            with s.stats_lock:
                eviction.apply(self.store, s, p, s.next_id, self.config.verify_checksums)
                eviction.mirror(s, p, {}, s.next_id)
        return len(id_arr)

    def pin(self, stream: str, ids, pinned: bool = True) -> None:
        s = self._stream(stream)
        id_arr = np.unique(check_ids(ids))
        with s.lock:
            self._require(s, id_arr)
            new = {int(e): dataclasses.replace(s.entries[int(e)], pinned=bool(pinned)) for e in id_arr}
            self.store.put_metadata(s.layout, list(new.values()))
            s.entries.update(new)
            s.invalidate_columns()
            s.repin(list(new))

    # -- introspection ---------------------------------------------------------------------------
    def entries(self, stream: str) -> list[EntryMeta]:
        s = self._stream(stream)
        with s.lock:
            return [_updated(s.entries[i]) for i in sorted(s.entries)]  # copies: hits update the table's in place

    def stats(self, stream: Optional[str] = None):
        self._check_open()
        if stream is not None:
            return self._stream_stats(self._stream(stream))
        with self._lock:
            per = tuple(self._stream_stats(s) for s in self._streams.values())
        return BankStats(streams=per, entries=sum(p.entries for p in per), payload_bytes=sum(p.payload_bytes for p in per),
                         map_size=self.store.map_size(), disk_bytes=self.store.disk_bytes())

    def _stream_stats(self, s: Stream) -> StreamStats:
        with s.lock:
            return StreamStats(
                name=s.spec.name, entries=len(s.entries), pinned=sum(m.pinned for m in s.entries.values()),
                payload_bytes=s.payload_bytes, key_bytes=len(s.entries) * s.key_bytes_per_entry,
                next_entry_id=s.next_id, evicted_total=s.evicted_total, degraded_total=s.degraded_total,
                budget=s.spec.budget, policy=s.spec.policy,
            )

    def snapshot(self) -> None:
        """Write index snapshots stamped with each stream's version (fast reopen for ANN indexes); one that
        does not fit on the disk is skipped (no partial file is left) and the next open rebuilds from the store."""
        for s in list(self._streams.values()):
            with s.lock:
                s.save_snapshot()

    def start_pruner(self, interval_s: float = 5.0) -> None:
        """Start the background upkeep thread (memory_service/upkeep.py): from then on puts leave pruning to it
        (evicting inline only what the budget demands), TTL streams are expired every `interval_s` without puts,
        and retrieval statistics are flushed every `hit_flush_interval_s`; all of it off the request path."""
        if self._pruner is None:
            self._pruner = Upkeep(self, interval_s)

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:  # no query starts a flusher after this
            self._stop.set()
        if self._pruner is not None:
            self._pruner.stop()
        if self._flusher is not None:
            self._flusher.join()
        try:
            self.flush()
        except ResourceExhausted as exc:  # a full disk must not stop a clean close: the store holds every entry
            log.warning("closing without persisting the latest retrieval statistics: %s", exc)
        try:
            if self.config.snapshot_on_close:
                self.snapshot()
        finally:  # a snapshot that fails in an unforeseen way still leaves the store closed and the directory free
            self.store.close()
            self._closed = True
            if self._dirlock is not None:
                self._dirlock.release()  # after the store is closed: the next writer finds everything on disk


def _updated(meta: EntryMeta, **changes) -> EntryMeta:
    """`dataclasses.replace` without re-running __init__ (40x faster); with no changes, a copy."""
    new = object.__new__(EntryMeta)
    new.__dict__.update(meta.__dict__)
    new.__dict__.update(changes)
    return new


# A put's index adds run beside its commit's durable step (_Adds) when its keys are at least this large: the
# fsync (or S3 and etcd in cluster mode) waits without the GIL, and the adds are numpy and faiss calls that let go
# of it too. Started with the puts instead, they slowed LMDB's copies into its pages about 2x. Below this the
# hand-off to a thread costs more than the add (a few frames at MemFlow's 30 x 1536 keys are ~0.5 MB).
BESIDE_MIN_BYTES = 1 << 20
_ADD_POOL: Optional[ThreadPoolExecutor] = None
_ADD_POOL_LOCK = threading.Lock()


class _Stacked(dict):
    """A put's keys of each space as one `[n, ...]` array, stacked when first asked for (on the add pool's thread
    when the adds run beside the commit: 11.8 MB for 64 entries of 30 x 1536 is a few ms)."""

    def __init__(self, keys: list[dict[str, np.ndarray]]) -> None:
        super().__init__()
        self.keys = keys
        self.nbytes = sum(k.nbytes for entry in keys for k in entry.values())

    def __missing__(self, space: str) -> np.ndarray:
        self[space] = stacked = np.stack([entry[space] for entry in self.keys])
        return stacked


def _add_keys(s: Stream, ids: np.ndarray, stacked: _Stacked) -> None:
    for space in s.space_names:
        s.spaces[space].add(ids, stacked[space])


class _Adds:
    """A put's index adds. Where its keys are BESIDE_MIN_BYTES or more and every space can take them out again
    exactly (SpaceIndex.undoable), `start` (the commit's Commit.staged) runs them on the add pool while the commit
    waits on its fsync (or S3 and etcd); otherwise `finish` runs them after the commit, as the only way for kinds
    that train on their data or leave tombstones. All under the stream's lock, which the caller holds until the
    adds are finished or undone: no query sees them early."""

    def __init__(self, s: Stream, ids: np.ndarray, stacked: _Stacked) -> None:
        self.s, self.ids, self.stacked = s, ids, stacked
        self.beside = stacked.nbytes >= BESIDE_MIN_BYTES and all(s.spaces[space].undoable for space in s.space_names)
        self.running: Optional[Future] = None

    def start(self) -> None:
        global _ADD_POOL
        if not self.beside or self.running is not None:
            return  # after the commit; or started already (a store may stage a write it reruns)
        with _ADD_POOL_LOCK:
            if _ADD_POOL is None:
                _ADD_POOL = ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="memflow-add")
        try:
            self.running = _ADD_POOL.submit(_add_keys, self.s, self.ids, self.stacked)
        except RuntimeError:  # the interpreter is shutting down: no new threads; finish() adds them
            pass

    def undo(self) -> None:
        """The commit failed: wait for adds that started, then take out whatever of them landed (`remove` passes
        over ids an index does not hold, so an add that failed half-way comes out too)."""
        if self.running is None:
            return
        wait([self.running])
        for space in self.s.space_names:
            self.s.spaces[space].remove(self.ids)

    def finish(self) -> None:
        """The commit is durable: the adds are done when this returns (an add's failure is the put's, as before)."""
        if self.running is not None:
            self.running.result()
        else:
            _add_keys(self.s, self.ids, self.stacked)
