"""The TensorStore contract: every store implementation passes the same tests (STYLE.md items 3 and 13).

Only the protocol's verbs are used (memory_service/store/base.py), never a store's layout, so a new store
passes or fails on what it promises: bit-exact round trips (payloads drawn as raw bit patterns, NaNs included),
all or nothing per call (a call that fails inside its commit leaves nothing), a reopen sees every commit,
read-only refuses every write. kill -9 and a real full disk are in tests/faults/test_store_faults.py.
Adding an implementation is one line in STORES: a `Backend` that says how to open it, reopen it (a store that
must see every commit of the one closed before it) and open it read-only. A store that needs servers adds its
backend where those servers' fixtures live and imports these tests there, overriding `backend` (the cluster
store: tests/cluster/test_cluster_store_contract.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
import ml_dtypes
import numpy as np
import pytest

from memory_service.errors import MemFlowError, NotFound, PermissionDenied
from memory_service.store import Commit, Contents, LMDBStore, NewEntries, StreamLayout, TensorStore
from memory_service.store.codec import body_bytes, decode_into, encode
from memory_service.stream import stream_layout
from memory_service.types import EntryMeta, KeySpace, KVLayout, StreamSpec


def open_lmdb(root: str, readonly: bool = False, **kw) -> TensorStore:
    return LMDBStore(os.path.join(root, "lmdb"), readonly=readonly, snapshot_dir=os.path.join(root, "snapshots"), **kw)


class Backend:
    """How the contract opens one store implementation over a test's `root` directory."""

    # whether stream ids survive a reopen (a cluster node numbers the streams it takes over in its own cache)
    keeps_stream_ids = True
    readonly_skip = ""  # why the store has no read-only mode ("" when it has one)

    def open(self, root: str) -> TensorStore:
        """A store over nothing committed yet."""
        raise NotImplementedError

    def reopen(self, root: str) -> TensorStore:
        """A store that must see every commit of the one opened before it (closed by then)."""
        raise NotImplementedError

    def open_readonly(self, root: str) -> TensorStore:
        raise NotImplementedError


class LMDBBackend(Backend):
    def open(self, root: str) -> TensorStore:
        return open_lmdb(root)

    def reopen(self, root: str) -> TensorStore:
        return open_lmdb(root)

    def open_readonly(self, root: str) -> TensorStore:
        return open_lmdb(root, readonly=True)


STORES: dict[str, Backend] = {
    "lmdb": LMDBBackend(),
}

LAYOUT = StreamLayout(sid=7, name="cam0", key_spaces=(("float32", (3, 8)), ("float16", (8,))), layers=3,
                      layer_shape=(2, 4, 2, 8), kv_dtype="bfloat16")
KEYS_ONLY = StreamLayout(sid=9, name="keys ✓", key_spaces=(("float32", (8,)),))
GONE = StreamLayout(sid=8, name="gone", key_spaces=(("float16", (2, 4)),), layers=2, layer_shape=(2, 1, 1, 4),
                    kv_dtype="float16")


def spec_json(layout: StreamLayout) -> dict:
    """A spec (as stored, JSON) whose layout is `layout`: a cluster store rebuilds a stream's layout from it."""
    spaces = {f"k{i}": KeySpace(shape[-1], per_layer=len(shape) == 2, dtype=dt, layers=shape[0] if len(shape) == 2
                                else None) for i, (dt, shape) in enumerate(layout.key_spaces)}
    kv = None
    if layout.layers:
        _, t, h, d = layout.layer_shape
        kv = KVLayout(layout.layers, heads=h, head_dim=d, tokens_per_frame=t, dtype=layout.kv_dtype)
    spec = StreamSpec(layout.name, spaces, kv=kv)
    assert stream_layout(spec, layout.sid) == layout
    return json.loads(json.dumps(spec.to_json()))


@pytest.fixture(params=sorted(STORES))
def backend(request) -> Backend:
    return STORES[request.param]


@pytest.fixture
def root(tmp_path) -> str:
    return str(tmp_path / "store")


class Entry:
    """Entry `eid` of `layout`, regenerable from its id: metadata, keys per space, K/V [layers, 2, T, H, D]."""

    def __init__(self, eid: int, layout: StreamLayout = LAYOUT, kv: bool = True) -> None:
        rng = np.random.default_rng(eid)
        self.keys = [rng.standard_normal(shape).astype(dt) for dt, shape in layout.key_spaces]
        self.kv = None
        self.payload = None
        if kv and layout.layers:
            bits = rng.integers(0, 2**16, (layout.layers, *layout.layer_shape), dtype=np.uint16)
            self.kv = bits.view(ml_dtypes.bfloat16)  # any bit pattern: NaN payloads, -0, subnormals
            self.payload = [encode(self.kv[i], layout.kv_dtype, "raw") for i in range(layout.layers)]
        self.meta = EntryMeta(
            entry_id=eid, frame_index=eid, chunk_index=eid // 3, prompt=f"scene {eid} ✓", created=1000.0 + eid / 8,
            pinned=eid % 4 == 0, rope_position=eid * 2 if eid % 2 else None, hit_count=eid % 3,
            last_hit=2000.0 + eid if eid % 3 else None, importance=eid / 7, lfu=eid / 11,
            nbytes=sum(body_bytes(h) for h, _ in self.payload) if self.payload else 0,
            codec="raw" if self.payload else "none",
        )


def record(layout: StreamLayout, next_id: int, version: int, sid: int | None = None) -> dict:
    """The stream record as the bank writes it; `sid` when the store numbered the stream (a reopen may)."""
    return {"sid": layout.sid if sid is None else sid, "spec": spec_json(layout), "next_id": next_id,
            "version": version, "opaque": [1, 2.5, None, "✓"]}


def put(store: TensorStore, entries: list[Entry], version: int, layout: StreamLayout = LAYOUT, **changes):
    new = NewEntries([e.meta for e in entries], [e.keys for e in entries], [e.payload for e in entries])
    next_id = max(e.meta.entry_id for e in entries) + 1
    return store.commit(layout, Commit(record=record(layout, next_id, version), put=new, **changes))


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint8)


def assert_holds(store: TensorStore, expected: dict[int, Entry], layout: StreamLayout = LAYOUT) -> None:
    """The store holds exactly `expected` for the stream, whole and bit for bit."""
    ids = sorted(expected)
    with store.view() as v:
        assert list(v.entries(layout)) == [expected[i].meta for i in ids]
        c = v.contents(layout.sid)
        assert list(c.entries) == ids and list(c.stats) == ids and not c.partial
        assert sorted(c.keys) == sorted((s, i) for s in range(len(layout.key_spaces)) for i in ids)
        with_kv = [i for i in ids if expected[i].payload is not None]
        assert sorted(c.payloads) == [(i, j) for i in with_kv for j in range(layout.layers)]
        for space, (_, shape) in enumerate(layout.key_spaces):
            got = list(v.iter_keys(layout, space, None, 2))
            assert all(len(b_ids) <= 2 for b_ids, _ in got)
            got_ids = [int(i) for b_ids, _ in got for i in b_ids]
            assert got_ids == ids
            if ids:
                vecs = np.concatenate([b for _, b in got])
                assert vecs.dtype == np.float32
                assert np.array_equal(vecs, np.stack([expected[i].keys[space].astype(np.float32) for i in ids]))
                out = np.empty((len(ids), shape[0] if len(shape) == 2 else 1, shape[-1]), np.float32)
                v.read_keys(layout, space, ids[::-1], out)
                want = np.stack([expected[i].keys[space].astype(np.float32).reshape(out.shape[1:]) for i in ids[::-1]])
                assert np.array_equal(out, want)
        if with_kv:
            out = np.empty((len(with_kv), layout.layers, *layout.layer_shape), ml_dtypes.bfloat16)
            v.read_payloads(layout, with_kv, list(range(layout.layers)), out, {})
            assert np.array_equal(bits(out), bits(np.stack([expected[i].kv for i in with_kv])))
            some = [with_kv[-1], with_kv[0]]
            part = np.empty((2, 2, *layout.layer_shape), ml_dtypes.bfloat16)
            v.read_payloads(layout, some, [2, 0], part, None)
            assert np.array_equal(bits(part), bits(np.stack([expected[i].kv[[2, 0]] for i in some])))
            for i in some:
                assert bytes(v.read_layer(layout, i, 1, {})) == expected[i].kv[1].tobytes()


def test_round_trip_is_bit_exact(backend, root):
    store = backend.open(root)
    try:
        store.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), 8)
        store.create_stream(KEYS_ONLY.name, record(KEYS_ONLY, 0, 0), 10)
        es = {i: Entry(i) for i in range(6)}
        put(store, [es[i] for i in range(4)], 1)
        put(store, [es[4], es[5]], 2)
        ko = {i: Entry(i, KEYS_ONLY) for i in (3, 8)}
        put(store, list(ko.values()), 1, KEYS_ONLY)
        assert_holds(store, es)
        assert_holds(store, ko, KEYS_ONLY)
        with store.view() as v:
            assert v.next_stream_id() == 10
            streams = {s.name: s for s in v.streams()}
            assert set(streams) == {LAYOUT.name, KEYS_ONLY.name}
            assert streams[LAYOUT.name].record == record(LAYOUT, 6, 2) and not streams[LAYOUT.name].problem
            assert streams[KEYS_ONLY.name].record == record(KEYS_ONLY, 9, 1)
            assert v.contents(LAYOUT.sid + 100) == type(v.contents(LAYOUT.sid))()  # another id holds nothing
        verified: dict[int, int] = {}
        with store.view() as v:  # `verified` records the layers that passed
            v.read_payloads(LAYOUT, [1, 2], [0, 2], np.empty((2, 2, *LAYOUT.layer_shape), ml_dtypes.bfloat16),
                            verified)
            v.read_layer(LAYOUT, 3, 1, verified)
        assert verified == {1: 0b101, 2: 0b101, 3: 0b010}
    finally:
        store.close()


def test_degrade_evict_pin_and_statistics(backend, root):
    store = backend.open(root)
    try:
        store.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), 8)
        es = {i: Entry(i) for i in range(5)}
        put(store, list(es.values()), 1)
        hits = EntryMeta(**{**vars(es[2].meta), "hit_count": 41, "last_hit": 3000.5, "importance": 2.25, "lfu": 3.0})
        new = {5: Entry(5)}
        degraded = put(store, [new[5]], 2, degrade=((es[0].meta, "fp8"), (es[1].meta, "keys_only")), evict=(3,),
                       stats=(hits,))
        assert set(degraded) == {0, 1}
        assert degraded[1].codec == "none" and degraded[1].nbytes == 0
        fp8_bytes = sum(body_bytes(encode(es[0].kv[i], "bfloat16", "fp8")[0]) for i in range(LAYOUT.layers))
        assert degraded[0].codec == "fp8" and degraded[0].nbytes == fp8_bytes
        with store.view() as v:
            fp8 = np.empty((1, LAYOUT.layers, *LAYOUT.layer_shape), ml_dtypes.bfloat16)
            v.read_payloads(LAYOUT, [0], list(range(LAYOUT.layers)), fp8, {})
            for layer in range(LAYOUT.layers):  # exactly what the fp8 codec makes of the stored layer
                want = np.empty(LAYOUT.layer_shape, ml_dtypes.bfloat16)
                header, body = encode(es[0].kv[layer], "bfloat16", "fp8")
                decode_into(header, body.tobytes(), want, True, "expected")
                assert np.array_equal(bits(fp8[0, layer]), bits(want))
            with pytest.raises(NotFound):
                v.read_payloads(LAYOUT, [1], [0], np.empty((1, 1, *LAYOUT.layer_shape), ml_dtypes.bfloat16), {})
            with pytest.raises(NotFound):
                v.read_layer(LAYOUT, 3, 0, None)
            got = {m.entry_id: m for m in v.entries(LAYOUT)}
            c = v.contents(LAYOUT.sid)
        assert sorted(got) == [0, 1, 2, 4, 5] and got[0] == degraded[0] and got[1] == degraded[1]
        assert got[2] == hits
        assert {i for i, _ in c.payloads} == {0, 2, 4, 5} and 3 not in c.entries + c.stats
        pinned = EntryMeta(**{**vars(got[4]), "pinned": True})
        store.put_metadata(LAYOUT, [pinned])
        later = EntryMeta(**{**vars(got[5]), "hit_count": 9, "last_hit": 4000.0, "importance": 1.5, "lfu": 0.5})
        store.put_stats(LAYOUT, [later])
        with store.view() as v:
            got = {m.entry_id: m for m in v.entries(LAYOUT)}
        assert got[4] == pinned and got[5] == later
        store.commit(LAYOUT, Commit(record=record(LAYOUT, 6, 3), evict=(0, 1, 2)))  # a delete: no put
        assert_holds(store, {4: _with(es[4], pinned), 5: _with(new[5], later)})
    finally:
        store.close()


def _with(e: Entry, meta: EntryMeta) -> Entry:
    e.meta = meta
    return e


def test_a_failing_commit_leaves_nothing(backend, root):
    store = backend.open(root)
    try:
        store.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), 8)
        es = {i: Entry(i) for i in range(4)}
        bad = Entry(4)  # its payload of the wrong shape is stored; decoding it (a degrade) fails inside the commit
        bad.payload = [encode(bad.kv[i][:, :2], "bfloat16", "raw") for i in range(LAYOUT.layers)]
        put(store, [*es.values(), bad], 1)
        with store.view() as v:
            before = (v.contents(LAYOUT.sid), list(v.entries(LAYOUT)), [s.record for s in v.streams()])
        hits = EntryMeta(**{**vars(es[1].meta), "hit_count": 99})
        with pytest.raises(MemFlowError):
            put(store, [Entry(5), Entry(6)], 2, degrade=((es[2].meta, "keys_only"), (bad.meta, "fp8")), evict=(0,),
                stats=(hits,))
        with store.view() as v:
            assert (v.contents(LAYOUT.sid), list(v.entries(LAYOUT)), [s.record for s in v.streams()]) == before
        del es[0]
        put(store, [Entry(5)], 2, evict=(0, 4))  # the store still takes commits
        assert_holds(store, {**es, 5: Entry(5)})
    finally:
        store.close()


def test_reopen_sees_every_commit(backend, root):
    store = backend.open(root)
    es = {i: Entry(i) for i in range(8)}
    store.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), 8)
    store.create_stream(GONE.name, record(GONE, 0, 0), 9)
    store.create_stream(KEYS_ONLY.name, record(KEYS_ONLY, 0, 0), 10)
    put(store, [es[i] for i in range(5)], 1)
    put(store, [es[i] for i in range(5, 8)], 2, evict=(1,))
    put(store, [Entry(0, KEYS_ONLY)], 1, KEYS_ONLY)
    store.drop_stream(KEYS_ONLY.name, KEYS_ONLY.sid)  # its record and everything under its id
    store.drop_stream(GONE.name, None)  # its record
    parts = [(b"\x00index\xff" * 100, np.array([3, 1], np.int64)), (b"", np.zeros(0, np.int64))]
    store.save_snapshot(LAYOUT.sid, 1, 2, parts)
    store.close()
    del es[1]
    store = backend.reopen(root)
    try:
        with store.view() as v:
            found = [(s.name, s.record) for s in v.streams()]
        assert [name for name, _ in found] == [LAYOUT.name]
        sid = found[0][1]["sid"]  # the store's id of the stream
        assert found[0][1] == record(LAYOUT, 8, 2, sid)
        layout = dataclasses.replace(LAYOUT, sid=sid)
        assert_holds(store, es, layout)
        with store.view() as v:
            if backend.keeps_stream_ids:
                assert sid == LAYOUT.sid and v.next_stream_id() == 10
            assert v.next_stream_id() > sid  # ids are never reused
            assert v.contents(KEYS_ONLY.sid) == Contents()
        version, got = store.load_snapshot(sid, 1)
        assert version == 2 and [(d, t.tolist()) for d, t in got] == [(d, t.tolist()) for d, t in parts]
        assert store.load_snapshot(sid, 0) is None
        store.drop_snapshots(sid)
        assert store.load_snapshot(sid, 1) is None
    finally:
        store.close()


def test_read_only_refuses_every_write_and_reads_everything(backend, root):
    if backend.readonly_skip:
        pytest.skip(backend.readonly_skip)
    store = backend.open(root)
    es = {i: Entry(i) for i in range(3)}
    store.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), 8)
    put(store, list(es.values()), 1)
    store.close()
    store = backend.open_readonly(root)
    try:
        assert store.readonly
        writes = [
            lambda: store.create_stream("x", record(KEYS_ONLY, 0, 0), 10),
            lambda: store.drop_stream(LAYOUT.name, LAYOUT.sid),
            lambda: put(store, [Entry(3)], 2),
            lambda: store.commit(LAYOUT, Commit(record=record(LAYOUT, 3, 2), evict=(0,))),
            lambda: store.put_metadata(LAYOUT, [es[0].meta]),
            lambda: store.put_stats(LAYOUT, [es[0].meta]),
        ]
        for write in writes:
            with pytest.raises(PermissionDenied, match="read-only"):
                write()
        assert_holds(store, es)
    finally:
        store.close()


LAYOUT_LEAKS = re.compile(
    r"memory_service\.store\.(lmdb_store|lmdb_env|records)|^\s*import lmdb|\b(store\.write|store\.reader|iter_prefix|"
    r"delete_prefix|entry_key|keys_key|payload_key|_SID\w*)\b|\b[wr]\.(put|get|delete)\(\"|\"(phead|pbody)\"", re.M)


# clients a store is built on, not callers of one: the S3 client's `delete_prefix` and its response dicts'
# `r.get("ContentLength")` are S3's vocabulary, not a store's layout
BELOW_STORE = {"cluster/s3.py"}


def test_only_the_store_knows_its_layout():
    """Nothing above store/ names a database, builds a key, encodes a record or opens a transaction (STYLE.md 13)."""
    pkg = Path(__file__).resolve().parents[2] / "memory_service"
    leaks = [f"{path.relative_to(pkg)}: {m.group(0)!r}" for path in sorted(pkg.rglob("*.py"))
             if "store" not in path.relative_to(pkg).parts[:1] and path.relative_to(pkg).as_posix() not in BELOW_STORE
             for m in LAYOUT_LEAKS.finditer(path.read_text())]
    assert not leaks, leaks
