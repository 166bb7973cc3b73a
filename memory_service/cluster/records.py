"""Log records: how one durable change of a stream is laid out as S3 objects in cluster mode.

Owns the object schema of a stream's log. Every change the owner makes (a commit: put, degrade, evict,
statistics; a metadata rewrite; a statistics flush) is one log record at sequence number `seq`, written as
at most two objects under the stream's prefix:
    log/{seq:016d}-{epoch:016d}.meta   a little-endian u64 header length, the JSON header, then key bytes
    log/{seq:016d}-{epoch:016d}.kv     every payload layer of the record: packed header, then body, back to back
The JSON header names what changed and, for each entry's keys and payload layers, where its bytes lie (offsets
into .meta after the header, or into .kv), so a reader replays the metadata and keys without reading payloads,
and reads any payload layer later with one ranged GET. Objects are immutable once written. The epoch in the
name keeps a fenced-out owner's late objects apart from the next owner's at the same seq: the valid record of a
seq is the one of the highest epoch not above the head's (etcd), which a fenced write can never be.

A checkpoint bounds what a take-over replays (the log of a long stream would otherwise grow with every chunk and
every statistics flush):
    log/{seq:016d}-{epoch:016d}.ckpt   the whole live state after record seq: the stream record, every live
                                       entry's metadata and keys, and where its payload layers lie (in .kv objects
                                       of earlier records, which stay while an entry needs them)
It is written only for a head this owner moved itself (so the record at seq is the valid one, of its epoch), and
it is valid while that holds: a take-over starts from the newest valid checkpoint and replays only the records
after it. Records before a checkpoint, and .kv objects no live entry points into, are then garbage
(`obsolete`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from typing import Container, Iterator, Optional, Sequence
from urllib.parse import quote

import numpy as np

from memory_service.errors import DataLoss
from memory_service.store.base import Commit, NewEntries, StreamLayout
from memory_service.store.codec import Header
from memory_service.types import EntryMeta

_LEN = struct.Struct("<Q")
_NAME = re.compile(r"^(\d{16})-(\d{16})\.(meta|kv|ckpt)$")


@dataclasses.dataclass(frozen=True)
class Located:
    """Where one entry's payload layers lie in the durable tier: (offset, header bytes, body bytes) per layer."""

    key: str
    layers: tuple[tuple[int, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(h + b for _, h, b in self.layers)


@dataclasses.dataclass(frozen=True)
class Record:
    """One decoded log record: the change to apply (payloads left out: `where` says where they lie)."""

    kind: str  # "commit" | "metadata" | "stats" (a checkpoint decodes as the commit that rebuilds its state)
    commit: Optional[Commit] = None  # kind "commit": puts carry no payload; rewrites carry none either
    metas: tuple[EntryMeta, ...] = ()  # kind "metadata" / "stats"
    where: dict[int, Located] = dataclasses.field(default_factory=dict)  # entry id -> its payload's place


def prefix(name: str, incarnation: int) -> str:
    """The object prefix of one incarnation of a stream (names are reused after a drop, incarnations never)."""
    return f"streams/{quote(name, safe='')}/{incarnation}/"


def object_names(stream_prefix: str, seq: int, epoch: int) -> tuple[str, str]:
    base = f"{stream_prefix}log/{seq:016d}-{epoch:016d}"
    return base + ".meta", base + ".kv"


def checkpoint_name(stream_prefix: str, seq: int, epoch: int) -> str:
    return f"{stream_prefix}log/{seq:016d}-{epoch:016d}.ckpt"


@dataclasses.dataclass(frozen=True)
class ReplayPlan:
    """What a take-over reads: the newest valid checkpoint (if any), then the valid record of each later seq."""

    checkpoint: Optional[tuple[int, int]]  # (seq, epoch) of the checkpoint object
    records: list[tuple[int, int]]  # (seq, epoch) of the records after it, in order


def _names(stream_prefix: str, keys: Sequence[str]) -> Iterator[tuple[int, int, str, str]]:
    """(seq, epoch, suffix, key) of each log object in a listing; other names are ignored."""
    start = len(stream_prefix) + 4
    for key in keys:
        m = _NAME.match(key[start:]) if key.startswith(stream_prefix + "log/") else None
        if m is not None:
            yield int(m.group(1)), int(m.group(2)), m.group(3), key


def replay_plan(stream_prefix: str, keys: Sequence[str], head_seq: int, head_epoch: int) -> ReplayPlan:
    """From a listing of the log: the newest checkpoint whose record is the valid one of its seq, and the valid
    record of every seq after it up to head_seq; DataLoss when one is missing (the head says it was made durable)."""
    best: dict[int, int] = {}
    ckpts: list[tuple[int, int]] = []
    for seq, epoch, suffix, _ in _names(stream_prefix, keys):
        if seq > head_seq or epoch > head_epoch:
            continue  # a fenced owner's late object, or one past the head: never part of the stream
        if suffix == "meta" and epoch > best.get(seq, -1):
            best[seq] = epoch
        elif suffix == "ckpt":
            ckpts.append((seq, epoch))
    start = max((c for c in ckpts if best.get(c[0]) == c[1]), default=None)
    first = start[0] + 1 if start is not None else 1
    missing = [s for s in range(first, head_seq + 1) if s not in best]
    if missing:
        raise DataLoss(f"the log under {stream_prefix} lacks record(s) {missing[:5]} of the {head_seq} its head "
                       "in etcd covers; the durable tier lost objects")
    return ReplayPlan(start, [(s, best[s]) for s in range(first, head_seq + 1)])


def obsolete(stream_prefix: str, keys: Sequence[str], checkpoint_seq: int, live: Container[str]) -> list[str]:
    """The log objects a checkpoint at `checkpoint_seq` made garbage: every record and checkpoint before it, except
    the .kv objects named in `live` (payloads the checkpoint's entries still point into)."""
    return [key for seq, _, suffix, key in _names(stream_prefix, keys)
            if seq < checkpoint_seq and not (suffix == "kv" and key in live)]


def _bytes_of(a: np.ndarray) -> memoryview:
    """An array's bytes without a copy (bfloat16 and float8 have no buffer format of their own)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).data


def _meta(m: EntryMeta) -> dict:
    return dict(vars(m))


def encode(layout: StreamLayout, kind: str, kv_key: str, commit: Optional[Commit] = None,
           metas: Sequence[EntryMeta] = ()) -> tuple[list, list, dict[int, Located]]:
    """(parts of the .meta object, parts of the .kv object (empty: none is written), where each entry's payload
    lies). Buffers are referenced, never joined: a put's payload travels from the caller's arrays to S3."""
    keys: list = []
    kv: list = []
    where: dict[int, Located] = {}
    key_at = kv_at = 0

    def add_keys(vecs: Sequence[np.ndarray]) -> list[list[int]]:
        nonlocal key_at
        out = []
        for vec in vecs:
            buf = _bytes_of(vec)
            keys.append(buf)
            out.append([key_at, buf.nbytes])
            key_at += buf.nbytes
        return out

    def add_payload(eid: int, layers: Optional[Sequence[tuple[Header, np.ndarray]]]) -> Optional[list]:
        nonlocal kv_at
        if layers is None:
            return None
        placed = []
        for header, body in layers:
            head = header.pack()
            raw = _bytes_of(body)
            kv.extend((head, raw))
            placed.append((kv_at, len(head), raw.nbytes))
            kv_at += len(head) + raw.nbytes
        where[eid] = Located(kv_key, tuple(placed))
        return [list(p) for p in placed]

    doc: dict = {"kind": kind}
    if commit is not None:
        put = commit.put
        doc.update(
            record=commit.record,
            put=[] if put is None else [
                {"meta": _meta(m), "keys": add_keys(k), "layers": add_payload(m.entry_id, p)}
                for m, k, p in zip(put.metas, put.keys, put.payloads)],
            rewrite=[{"meta": _meta(m), "layers": add_payload(m.entry_id, p)} for m, p in commit.rewrite],
            keys_only=[_meta(m) for m, step in commit.degrade if step == "keys_only"],
            evict=list(commit.evict), stats=[_meta(m) for m in commit.stats])
        if any(step != "keys_only" for _, step in commit.degrade):
            raise ValueError("a logged commit carries fp8 degrades as rewrites (made by the store beforehand)")
    doc["metas"] = [_meta(m) for m in metas]
    head = json.dumps(doc, separators=(",", ":")).encode()
    return [_LEN.pack(len(head)), head, *keys], kv, where


def encode_checkpoint(record: dict, metas: Sequence[EntryMeta], keys: Sequence[np.ndarray],
                      where: dict[int, Located]) -> list:
    """The parts of a checkpoint object: the stream record, and per live entry its metadata, its keys (`keys[s]` is
    space s's `[n, ...]` array, rows in the order of `metas`) and where its payload layers lie."""
    blobs = [_bytes_of(k) for k in keys]
    row = [b.nbytes // max(1, len(metas)) for b in blobs]
    base = [sum(b.nbytes for b in blobs[:s]) for s in range(len(blobs))]
    items = []
    for n, m in enumerate(metas):
        at = where.get(m.entry_id)
        items.append({"meta": _meta(m), "keys": [[base[s] + n * row[s], row[s]] for s in range(len(blobs))],
                      "kv": at.key if at is not None else None,
                      "layers": [list(p) for p in at.layers] if at is not None else None})
    head = json.dumps({"kind": "checkpoint", "record": record, "entries": items}, separators=(",", ":")).encode()
    return [_LEN.pack(len(head)), head, *blobs]


def decode(layout: StreamLayout, blob: bytes, kv_key: str, what: str) -> Record:
    """A .meta object back into the change it records (payloads stay where `Record.where` says)."""
    try:
        (n,) = _LEN.unpack_from(blob, 0)
        doc = json.loads(blob[_LEN.size:_LEN.size + n])
        body = memoryview(blob)[_LEN.size + n:]
        where: dict[int, Located] = {}

        def entry(d: dict) -> EntryMeta:
            return EntryMeta(**d)

        def placed(m: EntryMeta, layers: Optional[list], key: str = kv_key) -> None:
            if layers is not None:
                where[m.entry_id] = Located(key, tuple((int(o), int(h), int(b)) for o, h, b in layers))

        def keys_of(item: dict) -> list[np.ndarray]:
            vecs = []
            for sidx, (off, size) in enumerate(item["keys"]):
                dtype, shape = layout.key_spaces[sidx]
                vecs.append(np.frombuffer(body[off:off + size], dtype=dtype).reshape(shape))
            return vecs

        if doc["kind"] == "checkpoint":  # the commit that rebuilds its state in an empty stream
            metas = tuple(entry(item["meta"]) for item in doc["entries"])
            for m, item in zip(metas, doc["entries"]):
                placed(m, item["layers"], item["kv"])
            put = NewEntries(metas, [keys_of(item) for item in doc["entries"]], [None] * len(metas))
            return Record("commit", commit=Commit(record=doc["record"], put=put if metas else None), where=where)
        metas = tuple(entry(d) for d in doc.get("metas", ()))
        if doc["kind"] != "commit":
            return Record(doc["kind"], metas=metas)
        put_metas, put_keys = [], []
        for item in doc["put"]:
            m = entry(item["meta"])
            put_metas.append(m)
            put_keys.append(keys_of(item))
            placed(m, item["layers"])
        rewrite = []
        for item in doc["rewrite"]:
            m = entry(item["meta"])
            placed(m, item["layers"])
            rewrite.append((m, None))
        commit = Commit(
            record=doc["record"],
            put=NewEntries(put_metas, put_keys, [None] * len(put_metas)) if put_metas else None,
            degrade=tuple((entry(d), "keys_only") for d in doc["keys_only"]),
            rewrite=tuple(rewrite), evict=tuple(int(e) for e in doc["evict"]),
            stats=tuple(entry(d) for d in doc["stats"]))
        return Record("commit", commit=commit, where=where)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataLoss(f"log record {what} is corrupt: {type(exc).__name__}: {exc}") from None
