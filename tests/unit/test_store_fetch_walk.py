"""A fetch reads a run of adjacent layers by walking the store's cursor (LMDBView._walk) and any other layer list
by key: both return exactly the records asked for, and an entry missing a layer in the middle of the run (which
a walk would step over into the next entry's records) is NotFound, not another entry's bytes."""

from __future__ import annotations

import numpy as np
import pytest

from memory_service import stream
from memory_service import KeySpace, KVLayout, LocalMemory, NewEntry, StreamSpec
from memory_service.errors import NotFound
from memory_service.store.lmdb_store import payload_key
from memory_service.types import kv_numpy_dtype

SHAPE = (4, 2, 2, 2, 8)  # [L, 2, T, H, D]


def _bank(tmp_path) -> tuple[LocalMemory, list[int], list[np.ndarray]]:
    rng = np.random.default_rng(5)
    kvs = [rng.standard_normal(SHAPE).astype(kv_numpy_dtype("bfloat16")) for _ in range(3)]
    m = LocalMemory(str(tmp_path))
    m.create_stream(StreamSpec("s", {"e": KeySpace(8)}, kv=KVLayout(layers=4, heads=2, head_dim=8, tokens_per_frame=2)))
    ids = m.put("s", [NewEntry(i, i, "p", {"e": rng.standard_normal(8).astype(np.float32)}, kv) for i, kv in enumerate(kvs)])
    return m, ids, kvs


LAYER_BYTES = 2 * 2 * 2 * 8 * 2  # one layer of SHAPE in bfloat16


@pytest.mark.parametrize("group", [1, 2, 3, 4])  # layers a record; 3: groups of 3 and 1
@pytest.mark.parametrize("layers", [None, [1, 2], [3], [0, 2], [3, 1], [2, 3, 0]])
def test_layers_read_as_asked(tmp_path, monkeypatch, group, layers):
    monkeypatch.setattr(stream, "LAYER_GROUP_BYTES", group * LAYER_BYTES)
    m, ids, kvs = _bank(tmp_path)
    with m:
        assert m.bank._streams["s"].layout.layer_group == group
        got = m.fetch("s", [ids[2], ids[0]], layers).kv
        pick = list(range(4)) if layers is None else layers
        want = np.stack([kvs[2][pick], kvs[0][pick]])
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_a_missing_middle_layer_is_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "LAYER_GROUP_BYTES", 0)  # one layer a record: a layer can go missing alone
    m, ids, _ = _bank(tmp_path)
    with m:
        key = payload_key(m.bank._streams["s"].sid, ids[0], 1)
        m.bank.store.write(lambda w: (w.delete("phead", key), w.delete("pbody", key)))
        with pytest.raises(NotFound, match=f"entry {ids[0]}"):
            m.fetch("s", [ids[0], ids[1]])
        with pytest.raises(NotFound):
            m.fetch("s", [ids[0]], [0, 1, 2])
        assert m.fetch("s", [ids[0]], [2, 3]).kv.shape[:2] == (1, 2)  # the run past the gap still reads


def test_an_entry_missing_its_group_is_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "LAYER_GROUP_BYTES", 2 * LAYER_BYTES)  # layers (0, 1) and (2, 3) a record each
    m, ids, kvs = _bank(tmp_path)
    with m:
        key = payload_key(m.bank._streams["s"].sid, ids[0], 2)
        m.bank.store.write(lambda w: (w.delete("phead", key), w.delete("pbody", key)))
        with pytest.raises(NotFound, match=f"entry {ids[0]}"):
            m.fetch("s", [ids[0], ids[1]])  # the walk would have stepped into ids[1]'s first group
        with pytest.raises(NotFound):
            m.fetch("s", [ids[0]], [3])
        got = m.fetch("s", [ids[0], ids[1]], [0, 1]).kv  # the group still there reads
        assert np.array_equal(got.view(np.uint16), np.stack([kvs[0][:2], kvs[1][:2]]).view(np.uint16))
