"""LMDB store: the `TensorStore` of one data directory, and the only module that knows its layout.

Owns the LMDB layout (the environment underneath is lmdb_env.py), named databases keyed by big-endian ids:
    streams  name -> stream record (JSON: id, spec, counters)    meta  next_sid, advance
    entries  sid|eid -> entry metadata (JSON)          stats  sid|eid -> retrieval statistics (JSON)
    keys     sid|space|eid -> key vectors (raw floats) phead  sid|eid|layer -> payload headers
    pbody    sid|eid|layer -> payload bodies (raw bytes)
Payload layers lie in groups of the stream's `layer_group` (StreamLayout), one phead and one pbody value per
group, keyed by the group's first layer: its layers' packed headers back to back, and their bodies back to back
(codec.split_group). A group of 1 is one layer a value, the layout of every stream made before groups; new
streams of small layers group them (stream.default_layer_group) so that a fetch reads an entry as a few values
and a put writes a few, and LMDB's whole pages waste one page a group, not one a layer.
and index snapshots as `snapshots/stream{sid}-space{i}.npz` beside it (written to a temporary file, then
renamed: a snapshot is whole or absent). Every verb of base.TensorStore is one LMDB write transaction, with
the full-disk behaviour of lmdb_env.py; reads go through `view()`, one read transaction, straight from the
memory map.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import struct
from typing import Any, Container, Iterator, Optional, Sequence

import numpy as np

from memory_service.copies import gather
from memory_service.errors import DataLoss, NotFound
from memory_service.store.base import Commit, Contents, NewEntries, StoredStream, StreamLayout
from memory_service.store.codec import (
    HEADER_BYTES, Header, body_bytes, checksum, decode_into, encode, fetched_view, header_scale_bytes, raw_prefix,
    split_group, stored_checksum,
)
from memory_service.store.lmdb_env import LMDBEnv, Reader, Writer, as_bytes, back_to_back
from memory_service.store.records import dumps, entry_from, loads, meta_json, stats_json
from memory_service.types import EntryMeta

_SID = struct.Struct(">I")
_SID_EID = struct.Struct(">IQ")
_SID_SPACE_EID = struct.Struct(">IBQ")
_SID_EID_LAYER = struct.Struct(">IQH")
_DATA_DBS = ("entries", "stats", "keys", "phead", "pbody")


def entry_key(sid: int, eid: int) -> bytes:
    return _SID_EID.pack(sid, eid)


def keys_key(sid: int, space: int, eid: int) -> bytes:
    return _SID_SPACE_EID.pack(sid, space, eid)


def payload_key(sid: int, eid: int, layer: int) -> bytes:
    return _SID_EID_LAYER.pack(sid, eid, layer)


# float16 -> float32 by table (256 KB), bit for bit what numpy's cast gives: widening 180 layer keys of 1536 (a warm
# ivfsq rerank's read at k=3, refine 2) into `out` took 0.47-0.55 ms by the cast, 0.27 ms by the table
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


class LMDBView(Reader):
    """One read transaction (base.StoreView); buffers it returns are valid only inside the `with` block."""

    def next_stream_id(self) -> int:
        raw = self.get("meta", b"next_sid")
        return int(bytes(raw)) if raw is not None else 1

    def streams(self) -> Iterator[StoredStream]:
        for key, value in self.iter_prefix("streams", b""):
            name = key.decode("utf-8", errors="replace")
            try:
                yield StoredStream(key, name, loads(value))
            except ValueError as exc:  # UnicodeDecodeError included
                yield StoredStream(key, name, None, f"the record is not valid JSON ({exc})")

    def entries(self, layout: StreamLayout) -> Iterator[EntryMeta]:
        stats_db = self._dbs["stats"]
        for key, value in self.iter_prefix("entries", _SID.pack(layout.sid)):
            yield entry_from(int.from_bytes(key[4:12], "big"), value, self.txn.get(key, db=stats_db))

    def iter_keys(self, layout: StreamLayout, space: int, only: Optional[Container[int]],
                  batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        dtype, shape = layout.key_spaces[space]
        ids: list[int] = []
        vecs: list[np.ndarray] = []
        for key, value in self.iter_prefix("keys", _SID.pack(layout.sid) + bytes([space])):
            eid = int.from_bytes(key[5:13], "big")
            if only is not None and eid not in only:
                continue
            ids.append(eid)
            vecs.append(np.frombuffer(value, dtype=dtype).reshape(shape).astype(np.float32))
            if len(ids) == batch:
                yield np.array(ids, np.int64), np.stack(vecs)
                ids, vecs = [], []
        if ids:
            yield np.array(ids, np.int64), np.stack(vecs)

    def read_keys(self, layout: StreamLayout, space: int, ids: Sequence[int], out: np.ndarray) -> None:
        dtype = layout.key_spaces[space][0]
        txn, db, sid, shape = self.txn, self._dbs["keys"], layout.sid, out.shape[1:]
        if np.dtype(dtype) != np.float16 or out.dtype != np.float32 or not out.flags.c_contiguous:
            for n, eid in enumerate(ids):
                out[n] = np.frombuffer(txn.get(_SID_SPACE_EID.pack(sid, space, eid), db=db), dtype=dtype).reshape(shape)
            return
        # float16 keys into float32, widened by table record by record (a record's indices fit the caches: one pass
        # over all of them was slower than numpy's cast). A two-stage rerank of 256 keys of 30 x 1536 took 25 ms by
        # numpy's cast key by key
        count = int(np.prod(shape))
        size, flat = 2 * count, out.reshape(len(out), count)
        for n, eid in enumerate(ids):
            v = txn.get(_SID_SPACE_EID.pack(sid, space, eid), db=db)
            if v is None or len(v) != size:
                raise DataLoss(f"stream {layout.name!r} key space {space}: the key record of entry {eid} is "
                               f"{'missing' if v is None else f'{len(v)} bytes'}, expected {size} ({list(shape)} float16)")
            np.take(_HALF_TO_FLOAT, np.frombuffer(v, np.uint16), out=flat[n])

    def read_layer_keys(self, layout: StreamLayout, space: int, ids: np.ndarray, out: np.ndarray) -> None:
        dtype, shape = layout.key_spaces[space]
        txn, db, sid = self.txn, self._dbs["keys"], layout.sid
        chosen = ids >= 0
        entries, layers = ids[chosen], np.nonzero(chosen)[0]  # row-major, as out[chosen] is
        order = np.argsort(entries, kind="stable")
        row = int(shape[-1]) * np.dtype(dtype).itemsize  # one layer's key
        size = row * int(np.prod(shape[:-1]))
        # The chosen layers' bytes joined in one buffer, then converted into `out` in one assignment (one numpy
        # assignment a key measured 0.7 ms for 180 keys). Each entry's record is read once, in id order, and let go
        # before the next: a getmulti of all of them held ~700 views and tuples alive through the copy, and every
        # collection of the collector's middle generation that met them moved them into its oldest (at 1e5 entries,
        # a full collection of 40-140 ms every ~500 queries).
        joined = bytearray(row * len(entries))
        missing, wrong, last, v = [], [], -1, None
        for slot, e, layer in zip(order.tolist(), entries[order].tolist(), layers[order].tolist()):
            if e != last:
                last, v = e, txn.get(_SID_SPACE_EID.pack(sid, space, e), db=db)
                if v is None:
                    missing.append(e)
                elif len(v) != size:  # sliced below without a reshape: another size would give other keys' bytes
                    wrong.append((e, len(v)))
            if v is not None and not wrong:
                joined[slot * row:(slot + 1) * row] = v[layer * row:(layer + 1) * row]
        if missing:
            raise NotFound(f"stream {layout.name!r} has no key of entries {missing[:8]} in key space {space}")
        if wrong:
            raise DataLoss(f"stream {layout.name!r} key space {space}: the key records of entries "
                           f"{[e for e, _ in wrong][:8]} are {wrong[0][1]} bytes, expected {size} ({list(shape)} {dtype})")
        keys = np.frombuffer(joined, dtype=dtype).reshape(-1, shape[-1])
        out[chosen] = np.take(_HALF_TO_FLOAT, keys.view(np.uint16)) if keys.dtype == np.float16 else keys

    def read_payloads(self, layout: StreamLayout, ids: Sequence[int], layers: Sequence[int], out: np.ndarray,
                      verified: Optional[dict[int, int]]) -> None:
        # One batched read per database for the whole fetch (the groups holding `layers`), then per group a byte
        # comparison of its headers with the layout's raw header (_all_raw), and one gather of the raw bodies into
        # `out` (copies.py: on two threads when big; a group's share of a run of layers is one piece). A group
        # whose headers differ (fp8, or damage) is decoded layer by layer, and decode_into says what is wrong.
        layers = list(layers)
        g, size = layout.layer_group, _layer_bytes(layout)
        starts = sorted({layer - layer % g for layer in layers})
        heads = self._walk("phead", layout.sid, ids, starts, g)
        bodies = self._walk("pbody", layout.sid, ids, starts, g) if heads is not None else None
        if heads is None or bodies is None or not out.flags.c_contiguous:
            return self._read_payloads_each(layout, ids, layers, out, verified)  # names what is missing
        prefix, flat = raw_prefix(layout.kv_dtype, layout.layer_shape), out.reshape(-1).view(np.uint8)
        lo, width, per = layers[0], len(layers), len(starts)
        runs: list[tuple[int, Any, int, int]] = []  # (offset in `flat`, body, start, end): gathered once all pass
        at = {a: k for k, a in enumerate(starts)}
        for n, eid in enumerate(ids):
            done = -1 if verified is None else verified.get(eid, 0)  # -1: every bit set, nothing to verify
            try:
                if layers == list(range(lo, lo + width)):  # a run of layers: a group's share of it is one piece
                    for k, a in enumerate(starts):
                        head, body = heads[n * per + k], bodies[n * per + k]
                        count = min(g, layout.layers - a)
                        first, end = max(a, lo), min(a + count, lo + width)
                        if not _all_raw(head, body, count, size, prefix):
                            for layer in range(first, end):
                                done = self._decode_layer(layout, eid, layer, head, body, out[n, layer - lo], done)
                            continue
                        for layer in range(first, end):
                            if not (done >> layer) & 1:
                                _check_raw(layout, eid, layer, head, body, layer - a, size)
                                done |= 1 << layer
                        runs.append(((n * width + first - lo) * size, body, (first - a) * size, (end - a) * size))
                    continue
                for j, layer in enumerate(layers):  # any other list: layer by layer
                    a = layer - layer % g
                    head, body = heads[n * per + at[a]], bodies[n * per + at[a]]
                    if _all_raw(head, body, min(g, layout.layers - a), size, prefix):
                        if not (done >> layer) & 1:
                            _check_raw(layout, eid, layer, head, body, layer - a, size)
                            done |= 1 << layer
                        runs.append(((n * width + j) * size, body, (layer - a) * size, (layer - a + 1) * size))
                    else:
                        done = self._decode_layer(layout, eid, layer, head, body, out[n, j], done)
            finally:  # the layers that passed, also when a later one did not
                if verified is not None:
                    verified[eid] = done
        gather(flat, [(offset, memoryview(body)[b0:b1]) for offset, body, b0, b1 in runs])

    @staticmethod
    def _decode_layer(layout: StreamLayout, eid: int, layer: int, head, body, out: np.ndarray, done: int) -> int:
        """A layer that is not a raw one of the layout's shape (fp8, or damage): decoded, or DataLoss saying what."""
        what = f"stream {layout.name!r} entry {eid} layer {layer}"
        h, b = _layer_of(layout, head, body, layer, what)
        decode_into(Header.unpack(h, what), b, out, not (done >> layer) & 1, what)
        return done | 1 << layer

    def _walk(self, db: str, sid: int, ids: Sequence[int], starts: list[int], step: int) -> Optional[list]:
        """The values of every (id, group start) record of `db`, in order, or None when one is missing. An entry's
        groups are adjacent keys, so a run of groups lo, lo + step .. hi is one cursor positioning and a walk of
        its values (no key objects, no descent from the root per record: 0.24 vs 0.44 ms for 6 x 30 heads and
        bodies after a scan evicted the caches, against getmulti of every key); other lists take getmulti."""
        if not starts or not ids:
            return []
        cursor, pack = self.txn.cursor(db=self._dbs[db]), _SID_EID_LAYER.pack
        lo, hi = starts[0], starts[-1]
        if starts != list(range(lo, hi + 1, step)):
            keys = [pack(sid, eid, layer) for eid in ids for layer in starts]
            found = cursor.getmulti(keys)
            return [value for _, value in found] if len(found) == len(keys) else None
        values: list = []
        run = len(starts)
        for eid in ids:
            if not cursor.set_key(pack(sid, eid, lo)):
                return None
            values += itertools.islice(cursor.iternext(keys=False), run)
            # the walk ended on (eid, hi) with run values: keys are unique, sorted and all 14 bytes, and a stream's
            # keys are only at its group starts, so the run was exactly those of eid (a missing group would have
            # walked into the next entry's records)
            if cursor.key() != pack(sid, eid, hi):
                return None
        return values if len(values) == run * len(ids) else None

    def _read_payloads_each(self, layout: StreamLayout, ids: Sequence[int], layers: Sequence[int], out: np.ndarray,
                            verified: Optional[dict[int, int]]) -> None:
        """read_payloads one record at a time: a missing one is NotFound, named."""
        txn, phead, pbody = self.txn, self._dbs["phead"], self._dbs["pbody"]
        sid, name, pack = layout.sid, layout.name, _SID_EID_LAYER.pack
        for n, eid in enumerate(ids):
            done = -1 if verified is None else verified.get(eid, 0)
            try:
                for j, layer in enumerate(layers):
                    key = pack(sid, eid, layer - layer % layout.layer_group)
                    head = txn.get(key, db=phead)
                    if head is None:
                        raise NotFound(f"entry {eid} of stream {name!r} was deleted during the fetch")
                    what = f"stream {name!r} entry {eid} layer {layer}"
                    h, b = _layer_of(layout, head, txn.get(key, db=pbody), layer, what)
                    decode_into(Header.unpack(h, what), b, out[n, j], not (done >> layer) & 1, what)
                    done |= 1 << layer
            finally:
                if verified is not None:
                    verified[eid] = done

    def read_layer(self, layout: StreamLayout, eid: int, layer: int, verified: Optional[dict[int, int]]) -> memoryview:
        key = payload_key(layout.sid, eid, layer - layer % layout.layer_group)
        head = self.get("phead", key)
        if head is None:
            raise NotFound(f"entry {eid} of stream {layout.name!r} was deleted during the fetch")
        verify = verified is not None and not (verified.get(eid, 0) >> layer) & 1
        what = f"stream {layout.name!r} entry {eid} layer {layer}"
        head, body = _layer_of(layout, head, self.get("pbody", key), layer, what)
        prefix = raw_prefix(layout.kv_dtype, layout.layer_shape)
        if (body is not None and len(head) == HEADER_BYTES and head[:len(prefix)] == prefix
                and len(body) == _layer_bytes(layout)):
            if verify and checksum(body) != stored_checksum(head):
                raise DataLoss(f"checksum mismatch in {what}: stored bytes are corrupt")
            view = memoryview(body)
        else:
            view = fetched_view(Header.unpack(head, what), body, layout.layer_shape, layout.np_dtype, verify, what)
        if verified is not None:
            verified[eid] = verified.get(eid, 0) | (1 << layer)
        return view

    def contents(self, sid: int) -> Contents:
        prefix = _SID.pack(sid)

        def ids(db: str) -> list[bytes]:
            return [k for k, _ in self.iter_prefix(db, prefix)]

        heads, bodies = set(), set()
        for k, head in self.iter_prefix("phead", prefix):  # a group's layers: as many as its headers
            _, eid, start = _SID_EID_LAYER.unpack(k)
            layers = range(start, start + _headers_in(head))
            heads |= {(eid, layer) for layer in layers}
            if self.get("pbody", k) is not None:
                bodies |= {(eid, layer) for layer in layers}
        for k in ids("pbody"):
            _, eid, start = _SID_EID_LAYER.unpack(k)
            if self.get("phead", k) is None:
                bodies.add((eid, start))
        return Contents(
            entries=tuple(_SID_EID.unpack(k)[1] for k in ids("entries")),
            stats=tuple(_SID_EID.unpack(k)[1] for k in ids("stats")),
            keys=tuple(_SID_SPACE_EID.unpack(k)[1:] for k in ids("keys")),
            payloads=tuple(sorted(heads & bodies)), partial=tuple(sorted(heads ^ bodies)),
        )


class LMDBStore(LMDBEnv):
    """The LMDB `TensorStore`: an environment in `path`, index snapshots in `snapshot_dir`."""

    reader_class = LMDBView

    def __init__(self, path: str, map_size: int = 1 << 30, max_map_size: int = 1 << 40, durable: bool = True,
                 readonly: bool = False, reserve_bytes: int = 8 << 20, snapshot_dir: Optional[str] = None) -> None:
        super().__init__(path, map_size, max_map_size, durable, readonly, reserve_bytes)
        self.location = os.path.dirname(path)
        self.snapshot_dir = snapshot_dir or os.path.join(os.path.dirname(path), "snapshots")

    def view(self) -> contextlib.AbstractContextManager[LMDBView]:
        return self.reader()

    # -- streams ---------------------------------------------------------------------------------
    def create_stream(self, name: str, record: dict, next_sid: int) -> None:
        data, key = dumps(record), name.encode()

        def fn(w: Writer) -> None:
            w.put("streams", key, data)
            w.put("meta", b"next_sid", str(next_sid).encode())

        self.write(fn)

    def drop_stream(self, name: str, sid: Optional[int], record_key: Optional[bytes] = None) -> None:
        key = record_key if record_key is not None else name.encode()

        def fn(w: Writer) -> None:
            w.delete("streams", key)
            if sid is not None:
                for db in _DATA_DBS:
                    w.delete_prefix(db, _SID.pack(sid))

        self.write(fn, frees=True)

    # -- entries ---------------------------------------------------------------------------------
    def commit(self, layout: StreamLayout, commit: Commit) -> dict[int, EntryMeta]:
        record = dumps(commit.record)

        def fn(w: Writer) -> dict[int, EntryMeta]:
            if commit.put is not None:
                _put_entries(w, layout, commit.put)
            degraded = {meta.entry_id: _degrade(w, layout, meta, step, commit.verify) for meta, step in commit.degrade}
            for meta, layers in commit.rewrite:
                _drop_payload(w, layout, meta.entry_id)
                if layers:
                    _put_payload(w, layout, meta.entry_id, layers)
                w.put("entries", entry_key(layout.sid, meta.entry_id), dumps(meta_json(meta)))
                degraded[meta.entry_id] = meta
            for eid in commit.evict:
                _delete_entry(w, layout, eid)
            for meta in commit.stats:
                w.put("stats", entry_key(layout.sid, meta.entry_id), dumps(stats_json(meta)))
            w.put("streams", layout.name.encode(), record)
            if commit.staged is not None:
                commit.staged()  # the page writes and fsync of the transaction's commit come next
            return degraded

        return self.write(fn, frees=commit.frees)

    def put_metadata(self, layout: StreamLayout, metas: Sequence[EntryMeta]) -> None:
        rows = [(entry_key(layout.sid, m.entry_id), dumps(meta_json(m))) for m in metas]
        self.write(lambda w: [w.put("entries", k, v) for k, v in rows])

    def put_stats(self, layout: StreamLayout, metas: Sequence[EntryMeta]) -> None:
        rows = [(entry_key(layout.sid, m.entry_id), dumps(stats_json(m))) for m in metas]
        self.write(lambda w: [w.put("stats", k, v) for k, v in rows])

    def forget_payloads(self, layout: StreamLayout, ids: Sequence[int]) -> None:
        self.write(lambda w: [_drop_payload(w, layout, eid) for eid in ids], frees=True)

    # -- index snapshots -------------------------------------------------------------------------
    def _snapshot_path(self, sid: int, space: int) -> str:
        return os.path.join(self.snapshot_dir, f"stream{sid}-space{space}.npz")

    def save_snapshot(self, sid: int, space: int, version: int, parts: Sequence[tuple[bytes, np.ndarray]]) -> None:
        os.makedirs(self.snapshot_dir, exist_ok=True)
        arrays = {"count": np.int64(len(parts)), "version": np.int64(version)}
        for i, (data, tomb) in enumerate(parts):
            arrays[f"index{i}"] = np.frombuffer(data, np.uint8)
            arrays[f"tomb{i}"] = tomb
        path = self._snapshot_path(sid, space)
        tmp = path + ".tmp.npz"
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def load_snapshot(self, sid: int, space: int) -> Optional[tuple[int, list[tuple[bytes, np.ndarray]]]]:
        path = self._snapshot_path(sid, space)
        if not os.path.exists(path):
            return None
        with np.load(path) as z:
            parts = [(z[f"index{i}"].tobytes(), z[f"tomb{i}"]) for i in range(int(z["count"]))]
            return int(z["version"]), parts

    def drop_snapshots(self, sid: int) -> None:
        if not os.path.isdir(self.snapshot_dir):
            return
        for f in os.listdir(self.snapshot_dir):
            if f.startswith(f"stream{sid}-space"):
                os.remove(os.path.join(self.snapshot_dir, f))


def _put_entries(w: Writer, layout: StreamLayout, new: NewEntries) -> None:
    sid = layout.sid
    for meta, keys, payload in zip(new.metas, new.keys, new.payloads):
        key = entry_key(sid, meta.entry_id)
        w.put("entries", key, dumps(meta_json(meta)))
        w.put("stats", key, dumps(stats_json(meta)))
        for sidx, vec in enumerate(keys):
            w.put("keys", keys_key(sid, sidx, meta.entry_id), as_bytes(vec))
        if payload:
            _put_payload(w, layout, meta.entry_id, payload)


def _put_payload(w: Writer, layout: StreamLayout, eid: int, layers: Sequence[tuple[Header, np.ndarray]]) -> None:
    """One entry's encoded layers, a phead and a pbody value per layer group."""
    g = layout.layer_group
    whole = getattr(layers, "whole", None)  # raw layers: rows of one array (codec.EncodedLayers)
    for a in range(0, len(layers), g):
        key, part = payload_key(layout.sid, eid, a), layers[a:a + g]
        if len(part) == 1:
            w.put("phead", key, part[0][0].pack())
            w.put("pbody", key, as_bytes(part[0][1]))
        else:
            w.put("phead", key, b"".join(header.pack() for header, _ in part))
            w.put("pbody", key, as_bytes(whole[a:a + g]) if whole is not None else
                  back_to_back([body for _, body in part]))


def _degrade(w: Writer, layout: StreamLayout, meta: EntryMeta, step: str, verify: bool) -> EntryMeta:
    """Rewrite one entry's payload a step down (fp8, or keys only) and its metadata; returns the new metadata."""
    sid, eid = layout.sid, meta.entry_id
    if step == "keys_only":
        _drop_payload(w, layout, eid)
        new = dataclasses.replace(meta, nbytes=0, codec="none")
    else:
        out = np.empty(layout.layer_shape, layout.np_dtype)  # [2, T, H, D]
        layers = []
        for a in range(0, layout.layers, layout.layer_group):
            key = payload_key(sid, eid, a)
            head, body = bytes(w.get("phead", key)), bytes(w.get("pbody", key))  # copies: the writes below move them
            for layer in range(a, min(layout.layers, a + layout.layer_group)):
                what = f"entry {eid} layer {layer}"
                h, b = _layer_of(layout, head, body, layer, what)
                decode_into(Header.unpack(h, what), b, out, verify, what)
                layers.append(encode(out, layout.kv_dtype, "fp8"))
        _put_payload(w, layout, eid, layers)
        new = dataclasses.replace(meta, nbytes=sum(body_bytes(header) for header, _ in layers), codec="fp8")
    w.put("entries", entry_key(sid, eid), dumps(meta_json(new)))
    return new


def _delete_entry(w: Writer, layout: StreamLayout, eid: int) -> None:
    sid = layout.sid
    w.delete("entries", entry_key(sid, eid))
    w.delete("stats", entry_key(sid, eid))
    for s in range(len(layout.key_spaces)):
        w.delete("keys", keys_key(sid, s, eid))
    _drop_payload(w, layout, eid)


def _drop_payload(w: Writer, layout: StreamLayout, eid: int) -> None:
    for a in range(0, layout.layers, layout.layer_group):
        w.delete("phead", payload_key(layout.sid, eid, a))
        w.delete("pbody", payload_key(layout.sid, eid, a))


def _layer_bytes(layout: StreamLayout) -> int:
    return math.prod(layout.layer_shape) * layout.np_dtype.itemsize if layout.layers else 0


def _layer_of(layout: StreamLayout, head, body, layer: int, what: str) -> tuple:
    """One layer's (header, body) out of the values of the group holding it: as stored for a group of one, else
    cut at the layout's raw strides when the group is all raw-sized (each layer is then checked against its own
    header), else where the group's headers say (codec.split_group)."""
    g = layout.layer_group
    if g == 1:
        return head, body
    i = layer % g
    count = min(g, layout.layers - layer + i)
    size = _layer_bytes(layout)
    if body is not None and len(head) == count * HEADER_BYTES and len(body) == count * size:
        return memoryview(head)[i * HEADER_BYTES:(i + 1) * HEADER_BYTES], memoryview(body)[i * size:(i + 1) * size]
    if body is None:  # the caller's decode says what is missing
        return head, None
    return split_group(head, body, count, what)[i]


def _all_raw(head, body, count: int, size: int, prefix: bytes) -> bool:
    """Whether a group's `count` layers are all raw ones of the layout's dtype and shape (each header the layout's
    raw header but for its checksum, each body `size` bytes): its layers can be copied out as they lie."""
    if len(head) != count * HEADER_BYTES or len(body) != count * size:
        return False
    n = len(prefix)
    return all(head[i:i + n] == prefix for i in range(0, count * HEADER_BYTES, HEADER_BYTES))


def _check_raw(layout: StreamLayout, eid: int, layer: int, head, body, i: int, size: int) -> None:
    """The checksum of layer `i` of an all-raw group (_all_raw), or DataLoss naming the layer."""
    h0 = i * HEADER_BYTES
    if checksum(body[i * size:(i + 1) * size]) != stored_checksum(head[h0:h0 + HEADER_BYTES]):
        raise DataLoss(f"checksum mismatch in stream {layout.name!r} entry {eid} layer {layer}: stored bytes are "
                       "corrupt")


def _headers_in(head) -> int:
    """How many layers a phead value holds (the packed headers back to back; a cut one ends the count)."""
    view, n, at = memoryview(head).cast("B"), 0, 0
    while at + HEADER_BYTES <= len(view):
        at += HEADER_BYTES + header_scale_bytes(view[at:at + HEADER_BYTES])
        n += 1
    return max(1, n)
