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
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from typing import Optional, Sequence
from urllib.parse import quote

import numpy as np

from memory_service.errors import DataLoss
from memory_service.store.base import Commit, NewEntries, StreamLayout
from memory_service.store.codec import Header
from memory_service.types import EntryMeta

_LEN = struct.Struct("<Q")
_NAME = re.compile(r"^(\d{16})-(\d{16})\.(meta|kv)$")


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

    kind: str  # "commit" | "metadata" | "stats"
    commit: Optional[Commit] = None  # kind "commit": puts carry no payload; rewrites carry none either
    metas: tuple[EntryMeta, ...] = ()  # kind "metadata" / "stats"
    where: dict[int, Located] = dataclasses.field(default_factory=dict)  # entry id -> its payload's place


def prefix(name: str, incarnation: int) -> str:
    """The object prefix of one incarnation of a stream (names are reused after a drop, incarnations never)."""
    return f"streams/{quote(name, safe='')}/{incarnation}/"


def object_names(stream_prefix: str, seq: int, epoch: int) -> tuple[str, str]:
    base = f"{stream_prefix}log/{seq:016d}-{epoch:016d}"
    return base + ".meta", base + ".kv"


def valid_records(stream_prefix: str, keys: Sequence[str], head_seq: int, head_epoch: int) -> list[tuple[int, int]]:
    """(seq, epoch) of the valid record of every seq 1..head_seq, from a listing of the log; DataLoss when one is
    missing (the head says it was made durable)."""
    best: dict[int, int] = {}
    for key in keys:
        m = _NAME.match(key[len(stream_prefix) + 4:]) if key.startswith(stream_prefix + "log/") else None
        if m is None or m.group(3) != "meta":
            continue
        seq, epoch = int(m.group(1)), int(m.group(2))
        if seq <= head_seq and epoch <= head_epoch and epoch > best.get(seq, -1):
            best[seq] = epoch
    missing = [s for s in range(1, head_seq + 1) if s not in best]
    if missing:
        raise DataLoss(f"the log under {stream_prefix} lacks record(s) {missing[:5]} of the {head_seq} its head "
                       "in etcd covers; the durable tier lost objects")
    return [(s, best[s]) for s in range(1, head_seq + 1)]


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


def decode(layout: StreamLayout, blob: bytes, kv_key: str, what: str) -> Record:
    """A .meta object back into the change it records (payloads stay where `Record.where` says)."""
    try:
        (n,) = _LEN.unpack_from(blob, 0)
        doc = json.loads(blob[_LEN.size:_LEN.size + n])
        body = memoryview(blob)[_LEN.size + n:]
        where: dict[int, Located] = {}

        def entry(d: dict) -> EntryMeta:
            return EntryMeta(**d)

        def placed(m: EntryMeta, layers: Optional[list]) -> None:
            if layers is not None:
                where[m.entry_id] = Located(kv_key, tuple((int(o), int(h), int(b)) for o, h, b in layers))

        metas = tuple(entry(d) for d in doc.get("metas", ()))
        if doc["kind"] != "commit":
            return Record(doc["kind"], metas=metas)
        put_metas, put_keys = [], []
        for item in doc["put"]:
            m = entry(item["meta"])
            vecs = []
            for sidx, (off, size) in enumerate(item["keys"]):
                dtype, shape = layout.key_spaces[sidx]
                vecs.append(np.frombuffer(body[off:off + size], dtype=dtype).reshape(shape))
            put_metas.append(m)
            put_keys.append(vecs)
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
