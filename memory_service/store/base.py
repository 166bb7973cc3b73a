"""The `TensorStore` protocol: what the bank asks of durable storage, in domain verbs.

Owns the one signature every store implements (LMDB today; an object-store tier later), and the small frozen
values that cross it. Nothing above `store/` sees database names, key bytes or encodings: the bank speaks of
streams, entries, key spaces, payload layers and retrieval statistics. Promises of every implementation
(tests/unit/test_store_contract.py holds each one to them):
- each mutating verb is one atomic commit: after it returns all of it is durable (it survives kill -9),
  before it returns none of it is visible, and a verb that raises leaves the store exactly as it was;
- a full disk is `ResourceExhausted` and leaves every committed record readable; verbs that free space
  (dropping a stream, a commit that evicts or deletes) still commit on a full disk;
- a read-only store raises `PermissionDenied` on every mutating verb;
- a `view()` is one consistent read snapshot; buffers it hands out are valid until it closes (a store
  without a memory map may hand out bytes);
- verbs are batched: one call takes all the entries, ids and layers of a request, never one per layer.
A stream's `version` (in its record, bumped by every entry commit) stamps its index snapshots, so a reopen
knows what a snapshot covers and catches up by entry id.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Container, Iterator, Optional, Protocol, Sequence

import numpy as np

from memory_service.store.codec import Header
from memory_service.types import EntryMeta, kv_numpy_dtype


@dataclass(frozen=True)
class StreamLayout:
    """What a store needs to know of a stream to lay its entries out: fixed for the stream's lifetime."""

    sid: int  # the stream's numeric id (its data's key; names are reused after a drop, ids never)
    name: str
    key_spaces: tuple[tuple[str, tuple[int, ...]], ...]  # per key space, in spec order: stored dtype, shape per
    #                                                      entry ([L, d] per-layer, [d] single-vector)
    layers: int = 0  # payload layers per entry (0: a keys-only stream)
    layer_shape: tuple[int, ...] = ()  # one layer's K/V, [2, T, H, D]
    kv_dtype: str = ""  # the logical dtype payloads decode to
    # payload layers stored together in one record (lmdb_store.py): 1 for every stream made before layer groups
    # (their records say nothing), more for new streams of small layers (stream.default_layer_group)
    layer_group: int = 1
    np_dtype: Optional[np.dtype] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kv_dtype:  # resolved once: fetches use it on every layer
            object.__setattr__(self, "np_dtype", kv_numpy_dtype(self.kv_dtype))


@dataclass(frozen=True)
class StoredStream:
    """One stream record as found in the store; `record` is None (and `problem` says why) when it is unreadable."""

    key: bytes  # the store's own name for the record (`drop_stream(..., record_key=key)` removes it)
    name: str  # the stream name the key holds (undecodable bytes replaced)
    record: Optional[dict]
    problem: str = ""


@dataclass(frozen=True)
class NewEntries:
    """The entries one put adds, batched: per entry its metadata, its keys and its encoded payload layers."""

    metas: Sequence[EntryMeta]
    keys: Sequence[Sequence[np.ndarray]]  # per entry, per key space: C-contiguous in the space's stored dtype
    payloads: Sequence[Optional[Sequence[tuple[Header, np.ndarray]]]]  # per entry: (header, body) per layer, or None


@dataclass(frozen=True)
class Commit:
    """Everything one entry-changing call commits together: a put (or none), its degrades and evictions (or a
    prune's, a delete's), the retrieval statistics not yet persisted, and the stream record after it."""

    record: dict
    put: Optional[NewEntries] = None
    degrade: tuple[tuple[EntryMeta, str], ...] = ()  # (entry, step): step "keys_only" or "fp8"
    # (entry's new metadata, its new payload layers or None): a payload rewritten by the caller (cluster mode
    # degrades from bytes it read through; None: the layers are not kept in this store, only the metadata)
    rewrite: tuple[tuple[EntryMeta, Optional[Sequence[tuple[Header, np.ndarray]]]], ...] = ()
    evict: tuple[int, ...] = ()
    stats: tuple[EntryMeta, ...] = ()
    verify: bool = True  # check payload checksums of what a degrade reads
    # Called once the commit's writes are staged and only its durable step is left (LMDB: its puts are done and
    # the transaction's page writes and fsync come next; cluster mode: the log record is about to go to S3), so
    # the caller can run work of its own beside that wait (Bank.put's index adds). A store may call it more than
    # once (a write it reruns) or never; nothing it does may depend on the call.
    staged: Optional[Callable[[], None]] = field(default=None, compare=False, repr=False)

    @property
    def frees(self) -> bool:
        """Whether the commit frees space (a prune or delete, or a put that evicts): it may use the reserve."""
        return self.put is None or bool(self.evict)


@dataclass(frozen=True)
class Contents:
    """Every record a store holds for one stream id, by kind, orphans included (consistency checks compare them)."""

    entries: tuple[int, ...] = ()  # entry ids with metadata
    stats: tuple[int, ...] = ()  # entry ids with retrieval statistics
    keys: tuple[tuple[int, int], ...] = ()  # (key space index, entry id)
    payloads: tuple[tuple[int, int], ...] = ()  # (entry id, layer) stored whole
    partial: tuple[tuple[int, int], ...] = field(default=())  # (entry id, layer) with a part missing


class StoreView(Protocol):
    """One consistent read snapshot of a store."""

    def next_stream_id(self) -> int: ...

    def streams(self) -> Iterator[StoredStream]: ...

    def entries(self, layout: StreamLayout) -> Iterator[EntryMeta]:
        """Every entry of the stream in id order, its retrieval statistics merged in."""
        ...

    def iter_keys(self, layout: StreamLayout, space: int, only: Optional[Container[int]],
                  batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids [n], keys [n, *shape] float32) of key space `space` in id order, at most `batch` per step, for
        entries in `only` (all when None)."""
        ...

    def read_keys(self, layout: StreamLayout, space: int, ids: Sequence[int], out: np.ndarray) -> None:
        """Keys of `ids` in `space` into `out` ([n, L, d] float32)."""
        ...

    def read_layer_keys(self, layout: StreamLayout, space: int, ids: np.ndarray, out: np.ndarray) -> None:
        """Per layer, some entries' keys of that layer: `ids` `[L, W]` (-1: none, its row left as it is) into `out`
        `[L, W, d]` float32. Reads only those layers' bytes of each stored `[L, d]` key."""
        ...

    def read_payloads(self, layout: StreamLayout, ids: Sequence[int], layers: Sequence[int], out: np.ndarray,
                      verified: Optional[dict[int, int]]) -> None:
        """Layers of entries decoded into `out` ([n, layers, 2, T, H, D]). `verified` (entry id -> bitmask of
        layers whose checksum passed) says what to verify and records what passed; None verifies nothing.
        NotFound for an entry that is not stored; DataLoss for a layer that fails its checks."""
        ...

    def read_layer(self, layout: StreamLayout, eid: int, layer: int, verified: Optional[dict[int, int]]) -> memoryview:
        """One layer's bytes as a fetch returns them (raw payloads straight from storage), valid while the view is."""
        ...

    def contents(self, sid: int) -> Contents: ...


class TensorStore(Protocol):
    """Durable storage of a bank: stream records, entries, keys, payload layers and index snapshots."""

    location: str  # where it is, for messages
    readonly: bool

    def view(self) -> contextlib.AbstractContextManager[StoreView]: ...

    def create_stream(self, name: str, record: dict, next_sid: int) -> None:
        """Write a new stream's record and the next stream id, together."""
        ...

    def drop_stream(self, name: str, sid: Optional[int], record_key: Optional[bytes] = None) -> None:
        """Remove a stream record (by name, or by `record_key` when it is not one the store can name) and, when
        `sid` is given, everything stored under that stream id; commits on a full disk."""
        ...

    def commit(self, layout: StreamLayout, commit: Commit) -> dict[int, EntryMeta]:
        """One put, prune or delete (see `Commit`); returns the degraded entries' new metadata."""
        ...

    def put_metadata(self, layout: StreamLayout, metas: Sequence[EntryMeta]) -> None:
        """Rewrite entries' metadata (pinning)."""
        ...

    def put_stats(self, layout: StreamLayout, metas: Sequence[EntryMeta]) -> None:
        """Persist entries' retrieval statistics."""
        ...

    def forget_payloads(self, layout: StreamLayout, ids: Sequence[int]) -> None:
        """Remove entries' payload layers and nothing else (a cache tier drops what a lower tier keeps);
        commits on a full disk."""
        ...

    def save_snapshot(self, sid: int, space: int, version: int, parts: Sequence[tuple[bytes, np.ndarray]]) -> None:
        """Store an index snapshot stamped with `version`, whole or not at all (OSError when it does not fit)."""
        ...

    def load_snapshot(self, sid: int, space: int) -> Optional[tuple[int, list[tuple[bytes, np.ndarray]]]]:
        """(version, parts) of a snapshot, None when there is none; raises when it is unreadable."""
        ...

    def drop_snapshots(self, sid: int) -> None:
        """Remove every index snapshot of a stream id."""
        ...

    def map_size(self) -> int: ...

    def disk_bytes(self) -> int: ...

    def close(self) -> None: ...

