"""LayerBlock's pooled scan in both of its forms - one group per core with the caller scanning the first
(below SPLIT_MIN_BYTES), several groups per core queued on the pool (at or above it) - answers bit for bit as
the scan in the caller's thread, with and without a deny list, for each metric and key dtype."""

from __future__ import annotations

import numpy as np
import pytest

from memory_service.config import IndexParams
from memory_service.index import layer_block
from memory_service.index.layer_block import LayerBlock

LAYERS, DIM, N = 7, 16, 300


def _answers(metric: str, dtype: str, deny) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    keys = rng.standard_normal((N, LAYERS, DIM)).astype(np.float32)
    keys[40] = keys[41]  # equal scores: the order among equals must not depend on the split
    block = LayerBlock(LAYERS, DIM, metric, IndexParams(), dtype)
    block.add(np.arange(1000, 1000 + N, dtype=np.int64), keys)
    q = rng.standard_normal((LAYERS, DIM)).astype(np.float32)
    q[2] = keys[40, 2]
    return block.search(q, 5, deny)


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("deny", [None, np.arange(1000 + N - 9, 1000 + N)], ids=["no-deny", "window"])
def test_every_split_answers_as_one_scan(metric, dtype, deny, monkeypatch):
    monkeypatch.setattr(layer_block, "POOL_MIN_BYTES", 1 << 62)
    want = _answers(metric, dtype, deny)
    monkeypatch.setattr(layer_block, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(layer_block, "CORES", 2)  # a pool of two even on a one-core machine
    for split in (1 << 62, 0):  # caller + pool, one group per core; then groups queued on the pool
        monkeypatch.setattr(layer_block, "SPLIT_MIN_BYTES", split)
        scores, ids = _answers(metric, dtype, deny)
        assert np.array_equal(ids, want[1]) and np.array_equal(scores, want[0])
        assert deny is None or not np.isin(ids, deny).any()
