"""One stream's in-memory state: its entry table, its search indexes, and how they are rebuilt.

Owns the promise that memory mirrors the store: on open the indexes come from a snapshot stamped with the
stream version it covers, caught up by id difference against the store (entry ids are monotonic, so anything
the store has that the snapshot lacks is added, anything the snapshot has that the store lost is removed), or
are rebuilt from the stored keys when there is no usable snapshot. The store always wins. Everything durable
goes through the store's verbs (memory_service/store/base.py), never its layout.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Optional

import numpy as np

from memory_service.config import IndexParams
from memory_service.errors import InvalidArgument
from memory_service.index.space import SpaceIndex, compact
from memory_service.pruning import parse_policy
from memory_service.pruning.neighbours import Neighbours
from memory_service.store.base import StoreView, StreamLayout, TensorStore
from memory_service.types import EntryMeta, StreamSpec, kv_numpy_dtype

log = logging.getLogger("memflow.bank")
REBUILD_BATCH = 1024


class EntryTable(dict):
    """entry id -> EntryMeta, with the sum of their payload bytes kept current (budgets check it on every put;
    summing it afresh cost ~0.5 ms at 5000 entries)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __setitem__(self, eid: int, meta: EntryMeta) -> None:
        old = dict.get(self, eid)
        self.nbytes += meta.nbytes - (old.nbytes if old is not None else 0)
        super().__setitem__(eid, meta)

    def __delitem__(self, eid: int) -> None:
        self.nbytes -= self[eid].nbytes
        super().__delitem__(eid)

    def pop(self, eid: int, *default):
        if eid in self:
            meta = super().pop(eid)
            self.nbytes -= meta.nbytes
            return meta
        return super().pop(eid, *default)

    def update(self, other=(), **kw) -> None:
        for eid, meta in dict(other, **kw).items():
            self[eid] = meta

    def clear(self) -> None:
        super().clear()
        self.nbytes = 0


class Stream:
    def __init__(self, record: dict, params: IndexParams, store: TensorStore) -> None:
        """Builds everything a stream needs (its indexes included) from its record, or raises before building any
        of it: the spec is checked against memory_service/limits.py first, so the cost here is bounded by those
        limits (at most MAX_INDEXES_PER_STREAM empty indexes), never by the numbers a record holds."""
        if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
            raise InvalidArgument(f"a stream record must be an object with a 'spec' object, got {str(record)[:80]!r}")
        self.spec = StreamSpec.from_json(record["spec"])
        self._spec_json = self.spec.to_json()  # written with the stream record on every put; the spec never changes
        self.sid: int = _counter(record, "sid", None, 2**32)
        self.next_id: int = _counter(record, "next_id", 0, 2**63)
        self.version: int = _counter(record, "version", 0, 2**63)
        self.evicted_total: int = _counter(record, "evicted_total", 0, 2**63)
        self.degraded_total: int = _counter(record, "degraded_total", 0, 2**63)
        self.policy = parse_policy(self.spec.policy)
        self.lock = threading.RLock()
        self.store = store
        self.space_names = list(self.spec.key_spaces)
        self.layer_group = layer_group_of(record, self.spec)
        self.layout = stream_layout(self.spec, self.sid, self.layer_group)
        self.entries = EntryTable()
        self.dirty: set[int] = set()  # entries whose retrieval statistics are not yet persisted
        # Held by a statistics flush while it writes (outside `lock`, so queries and puts go on) and by every
        # commit that removes entries, from the commit until memory mirrors it: a flush never writes statistics
        # of an entry whose records were just removed. Always taken after `lock`, never the other way round.
        self.stats_lock = threading.Lock()
        self.verified: dict[int, int] = {}  # entry id -> bitmask of payload layers whose checksum passed
        self.compact: dict[int, np.ndarray] = {}  # only when the policy needs vectors (redundancy)
        # the unpinned entries' nearest neighbours by compact key, kept current (eviction.mirror, MemoryBank.pin)
        self.neighbours = Neighbours(self.spec.key_spaces[self.space_names[0]].dim) if self.policy.needs_vectors \
            else None
        self.key_bytes_per_entry = sum(
            self.spec.layers_of(s) * ks.dim * np.dtype(ks.dtype).itemsize for s, ks in self.spec.key_spaces.items()
        )
        self.spaces = {
            name: SpaceIndex(ks, self.spec.layers_of(name), params, self._loader(name), self._layer_loader(name))
            for name, ks in self.spec.key_spaces.items()
        }
        self._cols: Optional[tuple] = None

    def record(self) -> dict:
        return {
            "sid": self.sid, "spec": self._spec_json, "next_id": self.next_id, "version": self.version,
            "evicted_total": self.evicted_total, "degraded_total": self.degraded_total, "layer_group": self.layer_group,
        }

    # -- columns for vectorized filters ----------------------------------------------------------
    def invalidate_columns(self) -> None:
        """Drop the cached filter columns; the next columns() rebuilds them from the entry metadata."""
        self._cols = None

    def columns_added(self, metas: list[EntryMeta]) -> None:
        """New entries (ids above every existing one) extend the cached columns in place of a rebuild."""
        if self._cols is None or not metas:
            return
        add = (np.array([m.entry_id for m in metas], np.int64), np.array([m.frame_index for m in metas], np.int64),
               np.array([m.created for m in metas], np.float64), np.array([m.pinned for m in metas], np.bool_))
        self._cols = tuple(np.concatenate([col, new]) for col, new in zip(self._cols, add))  # type: ignore[assignment]

    def columns_removed(self, ids) -> None:
        if self._cols is None or not len(ids):
            return
        keep = ~np.isin(self._cols[0], np.asarray(ids, np.int64))
        self._cols = tuple(col[keep] for col in self._cols)  # type: ignore[assignment]

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, frame_index, created, pinned), sorted by id; cached, and kept current by puts and evictions
        (a rebuild from every entry in Python cost ~2 ms at 1e4 entries on the query after each put)."""
        if self._cols is None:
            metas = [self.entries[i] for i in sorted(self.entries)]
            self._cols = (
                np.fromiter((m.entry_id for m in metas), np.int64, len(metas)),
                np.fromiter((m.frame_index for m in metas), np.int64, len(metas)),
                np.fromiter((m.created for m in metas), np.float64, len(metas)),
                np.fromiter((m.pinned for m in metas), np.bool_, len(metas)),
            )
        return self._cols

    def frames_of(self, ids: np.ndarray) -> np.ndarray:
        all_ids, frames, _, _ = self.columns()
        pos = np.clip(np.searchsorted(all_ids, ids), 0, max(0, len(all_ids) - 1))
        ok = (ids >= 0) & (len(all_ids) > 0)
        if len(all_ids):
            ok &= all_ids[pos] == ids
        return np.where(ok, frames[pos] if len(all_ids) else -1, -1)

    @property
    def payload_bytes(self) -> int:
        return self.entries.nbytes

    # -- keys from the store -----------------------------------------------------------------------
    def _loader(self, space: str):
        sidx = self.space_names.index(space)
        ks = self.spec.key_spaces[space]
        layers = self.spec.layers_of(space)

        def load(ids: np.ndarray) -> np.ndarray:  # [n] -> [n, L, d] float32
            out = np.empty((len(ids), layers, ks.dim), np.float32)
            with self.store.view() as v:
                v.read_keys(self.layout, sidx, ids.tolist(), out)
            return out

        return load

    def _layer_loader(self, space: str):
        sidx, dim = self.space_names.index(space), self.spec.key_spaces[space].dim

        def load(ids: np.ndarray) -> np.ndarray:  # [L, W] (-1: none) -> [L, W, d] float32 (zeros for -1)
            out = np.zeros((*ids.shape, dim), np.float32)
            with self.store.view() as v:
                v.read_layer_keys(self.layout, sidx, ids, out)
            return out

        return load

    # -- open: entries, then indexes ---------------------------------------------------------------
    def load(self, v: StoreView) -> None:
        for meta in v.entries(self.layout):
            self.entries[meta.entry_id] = meta
        live = np.array(sorted(self.entries), np.int64)
        for sidx, name in enumerate(self.space_names):
            if not self._load_snapshot(name, sidx, live, v):
                self._rebuild(name, sidx, v, None)
        if self.policy.needs_vectors:
            self._rebuild_compact(v)

    def _load_snapshot(self, name: str, sidx: int, live: np.ndarray, v: StoreView) -> bool:
        try:
            got = self.store.load_snapshot(self.sid, sidx)
            if got is None:
                return False
            stamp, parts = got
            self.spaces[name].load(parts)
            have = self.spaces[name].ids()
            extra = np.setdiff1d(have, live)
            missing = np.setdiff1d(live, have)
            if len(extra):
                self.spaces[name].remove(extra)
            if len(missing):
                self._rebuild(name, sidx, v, set(missing.tolist()))
            log.info("stream %r space %r: snapshot v%d loaded, %d added, %d removed to match the store's v%d",
                     self.spec.name, name, stamp, len(missing), len(extra), self.version)
            return True
        except Exception as exc:  # a bad snapshot is never fatal: the store is the truth
            log.warning("stream %r space %r: snapshot unusable (%s); rebuilding from the store", self.spec.name,
                        name, exc)
            self.spaces[name] = SpaceIndex(self.spec.key_spaces[name], self.spec.layers_of(name),
                                           self.spaces[name].params, self._loader(name), self._layer_loader(name))
            return False

    def _rebuild(self, name: str, sidx: int, v: StoreView, only: Optional[set[int]]) -> None:
        # keys of live entries only (`only` is a subset of them): an orphaned key never enters an index
        for ids, vecs in v.iter_keys(self.layout, sidx, self.entries if only is None else only, REBUILD_BATCH):
            self.spaces[name].add(ids, vecs)

    def _rebuild_compact(self, v: StoreView) -> None:
        for ids, vecs in v.iter_keys(self.layout, 0, self.entries, REBUILD_BATCH):
            self.add_compact(ids, vecs)

    def add_compact(self, ids: np.ndarray, keys0: np.ndarray) -> None:
        """Unit-norm compact vector of the first key space, for the redundancy policy."""
        metric = self.spec.key_spaces[self.space_names[0]].metric
        c = compact(keys0, metric) if keys0.ndim == 3 else keys0.astype(np.float32)
        c = c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
        for eid, vec in zip(ids.tolist(), c):
            self.compact[eid] = vec
        if self.neighbours is not None:
            free = np.array([not self.entries[e].pinned for e in ids.tolist()], np.bool_)
            self.neighbours.add(ids[free], c[free])

    def repin(self, ids: list[int]) -> None:
        """After a pin change of `ids`: pinned entries leave the neighbour graph, unpinned ones (re)join it."""
        if self.neighbours is None:
            return
        self.neighbours.remove(ids)
        free = [e for e in ids if not self.entries[e].pinned]
        if free:
            self.neighbours.add(np.array(free, np.int64), np.stack([self.compact[e] for e in free]))

    # -- snapshots -------------------------------------------------------------------------------
    def save_snapshot(self) -> None:
        """Snapshot every index, stamped with the stream version; on a full disk the rest are skipped (the store
        leaves no partial snapshot)."""
        for sidx, name in enumerate(self.space_names):
            try:
                self.store.save_snapshot(self.sid, sidx, self.version, self.spaces[name].dump())
            except OSError as exc:  # a full disk: the next open catches up or rebuilds from the store
                log.warning("stream %r space %r: snapshot skipped (%s); the next open rebuilds it from the store",
                            self.spec.name, name, exc)
                return


# New streams store their payload layers in records of up to this many bytes (a stream of small layers reads
# a fetch's entries as a few records, not one per layer, and writes a page less per layer: LMDB gives each value
# whole pages, one more than a 12 KiB layer fills). Large layers stay one record each.
LAYER_GROUP_BYTES = 1 << 20


def default_layer_group(spec: StreamSpec) -> int:
    """How many payload layers a new stream of `spec` keeps in one record."""
    kv = spec.kv
    if kv is None:
        return 1
    layer_bytes = math.prod(kv.layer_shape) * kv_numpy_dtype(kv.dtype).itemsize
    return max(1, min(kv.layers, LAYER_GROUP_BYTES // max(1, layer_bytes)))


def layer_group_of(record: dict, spec: StreamSpec) -> int:
    """The layer group a stream record says (1 when it says none: a stream made before layer groups)."""
    value = record.get("layer_group", 1)
    top = max(1, spec.kv.layers if spec.kv else 1)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
        raise InvalidArgument(f"stream record field 'layer_group' is {value!r}; expected an int in [1, {top}]")
    return value


def stream_layout(spec: StreamSpec, sid: int, layer_group: int = 1) -> StreamLayout:
    """How a store lays a stream out; fixed with the spec (and the layer group its record says)."""
    kv = spec.kv
    return StreamLayout(
        sid=sid, name=spec.name,
        key_spaces=tuple((ks.dtype, (spec.layers_of(n), ks.dim) if ks.per_layer else (ks.dim,))
                         for n, ks in spec.key_spaces.items()),
        layers=kv.layers if kv else 0, layer_shape=tuple(kv.layer_shape) if kv else (), kv_dtype=kv.dtype if kv else "",
        layer_group=layer_group,
    )


def _counter(record: dict, field: str, default: Optional[int], end: int) -> int:
    value = record.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < end:
        raise InvalidArgument(f"stream record field {field!r} is {value!r}; expected an int in [0, {end})")
    return value
