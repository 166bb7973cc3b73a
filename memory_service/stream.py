"""One stream's in-memory state: its entry table, its search indexes, and how they are rebuilt.

Owns the promise that memory mirrors LMDB: on open the indexes come from a snapshot stamped with the
stream version it covers, caught up by id difference against LMDB (entry ids are monotonic, so anything
LMDB has that the snapshot lacks is added, anything the snapshot has that LMDB lost is removed), or are
rebuilt from LMDB keys when there is no usable snapshot. LMDB always wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Optional

import numpy as np

from memory_service.config import IndexParams
from memory_service.errors import InvalidArgument
from memory_service.index.space import SpaceIndex, compact
from memory_service.pruning import parse_policy
from memory_service.store.lmdb_store import _SID, LMDBStore, Reader, entry_key, keys_key, loads
from memory_service.types import EntryMeta, StreamSpec

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
    def __init__(self, record: dict, params: IndexParams, store: LMDBStore) -> None:
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
        self.entries = EntryTable()
        self.dirty: set[int] = set()  # entries whose retrieval statistics are not yet persisted
        self.verified: dict[int, int] = {}  # entry id -> bitmask of payload layers whose checksum passed
        self.compact: dict[int, np.ndarray] = {}  # only when the policy needs vectors (redundancy)
        self.key_bytes_per_entry = sum(
            self.spec.layers_of(s) * ks.dim * np.dtype(ks.dtype).itemsize for s, ks in self.spec.key_spaces.items()
        )
        self.spaces = {
            name: SpaceIndex(ks, self.spec.layers_of(name), params, self._loader(name))
            for name, ks in self.spec.key_spaces.items()
        }
        self._cols: Optional[tuple] = None

    def record(self) -> dict:
        return {
            "sid": self.sid, "spec": self._spec_json, "next_id": self.next_id, "version": self.version,
            "evicted_total": self.evicted_total, "degraded_total": self.degraded_total,
        }

    # -- columns for vectorized filters ----------------------------------------------------------
    def touch(self) -> None:
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

    # -- keys from LMDB --------------------------------------------------------------------------
    def _loader(self, space: str):
        sidx = self.space_names.index(space)
        ks = self.spec.key_spaces[space]
        layers = self.spec.layers_of(space)

        def load(ids: np.ndarray) -> np.ndarray:  # [n] -> [n, L, d] float32
            out = np.empty((len(ids), layers, ks.dim), np.float32)
            with self.store.reader() as r:
                for n, eid in enumerate(ids.tolist()):
                    buf = r.get("keys", keys_key(self.sid, sidx, eid))
                    out[n] = np.frombuffer(buf, dtype=ks.dtype).reshape(layers, ks.dim)
            return out

        return load

    # -- open: entries, then indexes ---------------------------------------------------------------
    def load(self, r: Reader, snapshot_dir: str) -> None:
        prefix = _SID.pack(self.sid)
        for key, value in r.iter_prefix("entries", prefix):
            eid = int.from_bytes(key[4:12], "big")
            meta = loads(value)
            stats = r.get("stats", entry_key(self.sid, eid))
            if stats is not None:
                meta.update(loads(stats))
            self.entries[eid] = EntryMeta(entry_id=eid, **meta)
        live = np.array(sorted(self.entries), np.int64)
        for sidx, name in enumerate(self.space_names):
            if not self._load_snapshot(name, sidx, live, snapshot_dir, r):
                self._rebuild(name, sidx, r, None)
        if self.policy.needs_vectors:
            self._rebuild_compact(r)

    def _load_snapshot(self, name: str, sidx: int, live: np.ndarray, snapshot_dir: str, r: Reader) -> bool:
        path = snapshot_path(snapshot_dir, self.sid, sidx)
        if not os.path.exists(path):
            return False
        try:
            with np.load(path) as z:
                parts = [(z[f"index{i}"].tobytes(), z[f"tomb{i}"]) for i in range(int(z["count"]))]
                stamp = int(z["version"])
            self.spaces[name].load(parts)
            have = self.spaces[name].ids()
            extra = np.setdiff1d(have, live)
            missing = np.setdiff1d(live, have)
            if len(extra):
                self.spaces[name].remove(extra)
            if len(missing):
                self._rebuild(name, sidx, r, set(missing.tolist()))
            log.info("stream %r space %r: snapshot v%d loaded, %d added, %d removed to match LMDB v%d",
                     self.spec.name, name, stamp, len(missing), len(extra), self.version)
            return True
        except Exception as exc:  # a bad snapshot is never fatal: LMDB is the truth
            log.warning("stream %r space %r: snapshot unusable (%s); rebuilding from LMDB", self.spec.name, name, exc)
            self.spaces[name] = SpaceIndex(self.spec.key_spaces[name], self.spec.layers_of(name),
                                           self.spaces[name].params, self._loader(name))
            return False

    def _iter_keys(self, sidx: int, r: Reader, only: Optional[set[int]]):
        ks = self.spec.key_spaces[self.space_names[sidx]]
        shape = (self.spec.layers_of(self.space_names[sidx]), ks.dim) if ks.per_layer else (ks.dim,)
        ids, vecs = [], []
        for key, value in r.iter_prefix("keys", _SID.pack(self.sid) + bytes([sidx])):
            eid = int.from_bytes(key[5:13], "big")
            if eid not in self.entries or (only is not None and eid not in only):
                continue
            ids.append(eid)
            vecs.append(np.frombuffer(value, dtype=ks.dtype).reshape(shape).astype(np.float32))
            if len(ids) == REBUILD_BATCH:
                yield np.array(ids, np.int64), np.stack(vecs)
                ids, vecs = [], []
        if ids:
            yield np.array(ids, np.int64), np.stack(vecs)

    def _rebuild(self, name: str, sidx: int, r: Reader, only: Optional[set[int]]) -> None:
        for ids, vecs in self._iter_keys(sidx, r, only):
            self.spaces[name].add(ids, vecs)

    def _rebuild_compact(self, r: Reader) -> None:
        for ids, vecs in self._iter_keys(0, r, None):
            self.add_compact(ids, vecs)

    def add_compact(self, ids: np.ndarray, keys0: np.ndarray) -> None:
        """Unit-norm compact vector of the first key space, for the redundancy policy."""
        metric = self.spec.key_spaces[self.space_names[0]].metric
        c = compact(keys0, metric) if keys0.ndim == 3 else keys0.astype(np.float32)
        c = c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
        for eid, vec in zip(ids.tolist(), c):
            self.compact[eid] = vec

    # -- snapshots -------------------------------------------------------------------------------
    def save_snapshot(self, snapshot_dir: str) -> None:
        """Snapshot every index; on a full disk the rest are skipped and no partial file is left."""
        try:
            os.makedirs(snapshot_dir, exist_ok=True)
        except OSError as exc:
            log.warning("stream %r: snapshots skipped (%s)", self.spec.name, exc)
            return
        for sidx, name in enumerate(self.space_names):
            parts = self.spaces[name].dump()
            arrays = {"count": np.int64(len(parts)), "version": np.int64(self.version)}
            for i, (data, tomb) in enumerate(parts):
                arrays[f"index{i}"] = np.frombuffer(data, np.uint8)
                arrays[f"tomb{i}"] = tomb
            path = snapshot_path(snapshot_dir, self.sid, sidx)
            tmp = path + ".tmp.npz"
            try:
                np.savez(tmp, **arrays)
                os.replace(tmp, path)
            except OSError as exc:  # a full disk: no partial file; the next open catches up or rebuilds from LMDB
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                log.warning("stream %r space %r: snapshot skipped (%s); the next open rebuilds it from LMDB",
                            self.spec.name, name, exc)
                return


def _counter(record: dict, field: str, default: Optional[int], end: int) -> int:
    value = record.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < end:
        raise InvalidArgument(f"stream record field {field!r} is {value!r}; expected an int in [0, {end})")
    return value


def snapshot_path(snapshot_dir: str, sid: int, sidx: int) -> str:
    return os.path.join(snapshot_dir, f"stream{sid}-space{sidx}.npz")


def meta_json(meta: EntryMeta) -> dict:
    """The immutable part of an entry's metadata, as stored in the `entries` database."""
    skip = ("entry_id", *STATS_FIELDS)
    return {k: v for k, v in vars(meta).items() if k not in skip}  # every field is a scalar: no deep copy


STATS_FIELDS = ("hit_count", "last_hit", "importance", "lfu")


def stats_json(meta: EntryMeta) -> dict:
    return {k: getattr(meta, k) for k in STATS_FIELDS}
