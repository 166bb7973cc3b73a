"""Layer groups (lmdb_store.py): a new stream of small layers stores several payload layers in one record, a stream
of large layers one a record; a data directory written before groups (stream records without `layer_group`)
opens and reads as it was written, takes new puts in its own layout, and gets grouped streams beside it; a record
whose `layer_group` is not a valid count leaves that stream unavailable, named, and the others serving; the
grouped records hold what the per-layer ones would (every layer, bit for bit) in fewer LMDB pages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_entry, make_spec

from memory_service import KVLayout, LocalMemory, NewEntry, stream
from memory_service.errors import InvalidArgument
from memory_service.store.lmdb_store import payload_key


def _strip_group(m: LocalMemory, name: str) -> None:
    """Make the stream's record what a release before layer groups wrote (no `layer_group` field)."""
    def fn(w) -> None:
        record = json.loads(bytes(w.get("streams", name.encode())))
        record.pop("layer_group")
        w.put("streams", name.encode(), json.dumps(record).encode())
    m.bank.store.write(fn)


def _bits(kv: np.ndarray) -> np.ndarray:
    return kv.view(np.uint16)


def test_small_layers_are_grouped_and_large_ones_are_not(tmp_path):
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(make_spec("small"))  # 4 layers of 640 B
        big = KVLayout(layers=3, heads=12, head_dim=128, tokens_per_frame=400)  # 2.4 MB a layer
        m.create_stream(make_spec("big", kv=big))
        assert m.bank._streams["small"].layout.layer_group == 4
        assert m.bank._streams["big"].layout.layer_group == 1
        ids = m.put("small", [make_entry(i) for i in range(3)])
        sid = m.bank._streams["small"].sid
        with m.bank.store.view() as v:
            assert v.get("phead", payload_key(sid, ids[0], 0)) is not None
            assert v.get("phead", payload_key(sid, ids[0], 1)) is None  # layers 1..3 live in layer 0's record
            assert v.contents(sid).payloads == tuple((e, layer) for e in ids for layer in range(4))
        assert np.array_equal(_bits(m.fetch("small", ids).kv), _bits(np.stack([make_entry(i).kv for i in range(3)])))


def test_a_data_directory_from_before_groups_reads_and_writes_as_it_was(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(stream, "LAYER_GROUP_BYTES", 0)  # what a release before groups wrote: a layer a record
        with LocalMemory(str(tmp_path)) as m:
            m.create_stream(make_spec("old"))
            old_ids = m.put("old", [make_entry(i) for i in range(4)])
            _strip_group(m, "old")
    with LocalMemory(str(tmp_path)) as m:  # reopened by this release
        s = m.bank._streams["old"]
        assert s.layout.layer_group == 1
        new_ids = m.put("old", [make_entry(10), make_entry(11)])
        m.create_stream(make_spec("new"))
        assert m.bank._streams["new"].layout.layer_group == 4
        m.put("new", [make_entry(20)])
        with m.bank.store.view() as v:
            assert v.get("phead", payload_key(s.sid, new_ids[0], 3)) is not None  # still a layer a record
        m.delete("old", old_ids[:2])  # their per-layer records go
        left = [e.entry_id for e in m.entries("old")]
        want = {e: make_entry(seed).kv for e, seed in zip(old_ids + new_ids, [0, 1, 2, 3, 10, 11])}
        assert np.array_equal(_bits(m.fetch("old", left).kv), _bits(np.stack([want[e] for e in left])))
        with m.bank.store.view() as v:
            c = v.contents(s.sid)
            assert set(c.payloads) == {(e, layer) for e in left for layer in range(4)} and not c.partial
    with LocalMemory(str(tmp_path)) as m:  # the record it rewrote says 1 now: the layout holds across reopens
        assert m.bank._streams["old"].layout.layer_group == 1
        assert m.bank._streams["new"].layout.layer_group == 4
        assert np.array_equal(_bits(m.fetch("new", [0]).kv[0]), _bits(make_entry(20).kv))


@pytest.mark.parametrize("value", [0, 5, -1, "4", True, 2.0])
def test_a_record_with_a_bad_layer_group_leaves_only_its_stream_unavailable(tmp_path, value):
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(make_spec("bad"))
        m.create_stream(make_spec("good"))
        m.put("good", [make_entry(1)])

        def fn(w) -> None:
            record = json.loads(bytes(w.get("streams", b"bad")))
            record["layer_group"] = value
            w.put("streams", b"bad", json.dumps(record).encode())
        m.bank.store.write(fn)
    with LocalMemory(str(tmp_path)) as m:
        assert np.array_equal(_bits(m.fetch("good", [0]).kv[0]), _bits(make_entry(1).kv))
        with pytest.raises(Exception, match="layer_group"):
            m.fetch("bad", [0])
    with pytest.raises(InvalidArgument, match=r"'layer_group' is .*expected an int in \[1, 4\]"):
        stream.layer_group_of({"layer_group": value}, make_spec("x"))


def test_grouped_records_take_fewer_pages(tmp_path, monkeypatch):
    """The reason for groups: LMDB gives a value whole pages, and a 12 KiB layer (3 pages of body) takes 4."""
    kv = KVLayout(layers=30, heads=12, head_dim=128, tokens_per_frame=2)  # 12 KiB a layer, as baseline.py
    rng = np.random.default_rng(0)
    layers = rng.standard_normal(kv.shape).astype(np.float32).astype(make_entry(0).kv.dtype)
    pages = {}
    for group in ("grouped", "per_layer"):
        with monkeypatch.context() as patch:
            if group == "per_layer":
                patch.setattr(stream, "LAYER_GROUP_BYTES", 0)
            with LocalMemory(str(tmp_path / group)) as m:
                m.create_stream(make_spec("s", kv=kv))
                keys = [{"nam": rng.standard_normal((30, 32)).astype(np.float32),
                         "emb": rng.standard_normal(16).astype(np.float32)} for _ in range(20)]
                m.put("s", [NewEntry(i, i, "p", keys[i], layers) for i in range(20)])
                with m.bank.store.view() as v:
                    stat = v.txn.stat(v._dbs["pbody"])
                    pages[group] = stat["overflow_pages"]
                assert np.array_equal(_bits(m.fetch("s", [3]).kv[0]), _bits(layers))
    assert pages["per_layer"] == 20 * 30 * 4
    assert pages["grouped"] == 20 * 91  # 30 x 12 KiB + the page header: 91 pages, not 120
