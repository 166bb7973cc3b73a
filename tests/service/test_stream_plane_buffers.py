"""The streaming plane's answer buffers (stream_plane.Buffers) against a real server: an answer the caller still
holds - the array, a view of it, or a memoryview - is never written by a later answer; one the caller has
dropped is reused for the next answer of its size, and then holds that answer's bytes exactly."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from memory_service import KeySpace, KVLayout, MemoryClient, NewEntry, StreamSpec
from memory_service.stream_plane import RECYCLE_MIN_BYTES

LAYOUT = KVLayout(layers=2, heads=2, head_dim=64, tokens_per_frame=1024)  # 1 MiB of bf16 per entry


@pytest.fixture
def filled(server):
    rng = np.random.default_rng(7)
    kvs = [rng.standard_normal(LAYOUT.shape, np.float32).astype(ml_dtypes.bfloat16) for _ in range(4)]
    with MemoryClient(server.address, plane="stream") as client:
        client.create_stream(StreamSpec("s", {"emb": KeySpace(8)}, kv=LAYOUT))
        ids = client.put("s", [NewEntry(i, i, "p", {"emb": rng.standard_normal(8, np.float32)}, kv=kv)
                               for i, kv in enumerate(kvs)])
        yield client, ids, kvs


def _bytes(a: np.ndarray) -> bytes:
    return a.reshape(-1).view(np.uint8).tobytes()


def test_a_held_answer_is_never_overwritten(filled):
    client, ids, kvs = filled
    first = client.fetch("s", ids[:2])
    assert first.kv.nbytes >= RECYCLE_MIN_BYTES
    view = first.kv[1]  # only a view of it is kept
    mem = memoryview(client.fetch("s", ids[2:]).kv.reshape(-1).view(np.uint8))  # only a memoryview is kept
    del first
    for _ in range(3):  # answers of the same size, other bytes
        again = client.fetch("s", [ids[3], ids[2]])
        assert _bytes(again.kv) == _bytes(np.stack([kvs[3], kvs[2]]))
        del again
    assert _bytes(view) == _bytes(kvs[1])
    assert mem.tobytes() == _bytes(np.stack(kvs[2:]))


def test_a_dropped_answer_is_reused_and_rewritten(filled):
    client, ids, kvs = filled
    first = client.fetch("s", ids[:2])
    base = id(first.kv.base)
    del first
    second = client.fetch("s", ids[2:])
    assert id(second.kv.base) == base  # the dropped buffer, written again
    assert _bytes(second.kv) == _bytes(np.stack(kvs[2:]))
    fetched = client.query_fetch("s", "emb", np.ones(8, np.float32), 2, include=[ids[0]], fetch_k=0).fetched
    assert _bytes(second.kv) == _bytes(np.stack(kvs[2:]))  # held while query_fetch answered: untouched
    (group,) = fetched
    assert _bytes(group.kv) == _bytes(kvs[0][None])
