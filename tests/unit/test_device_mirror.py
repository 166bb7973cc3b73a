"""The device-mirror search path (used for faiss-gpu) gives exactly the CPU flat results.

The mirror's factory is swapped for a CPU clone, so the over-fetch filtering and tombstone logic that runs
on a GPU is exercised here without one; tests/gpu/ checks the real GPU copy when CUDA is present.
"""

import faiss
import numpy as np
import pytest

from memory_service.config import IndexParams
from memory_service.index.vector_index import FlatIndex


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_mirror_equals_cpu_flat_with_deny_and_removals(metric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    plain = FlatIndex(16, metric, IndexParams())
    mirrored = FlatIndex(16, metric, IndexParams(), mirror_factory=faiss.clone_index)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    for index in (plain, mirrored):
        index.add(np.arange(500), x)
        index.remove(np.arange(0, 500, 7))  # tombstones in the mirror
    for deny in (None, np.arange(10, 60)):
        (s1, i1), (s2, i2) = plain.search(q, 10, deny), mirrored.search(q, 10, deny)
        assert np.array_equal(i1, i2) and np.allclose(s1, s2, rtol=1e-5)
        assert not np.isin(i2, np.arange(0, 500, 7)).any()
    for index in (plain, mirrored):
        index.remove(np.arange(1, 500, 2))  # past the ratio: the mirror is rebuilt from the CPU index
    (s1, i1), (s2, i2) = plain.search(q, 600), mirrored.search(q, 600)
    assert np.array_equal(i1, i2) and (i2[:, len(plain):] == -1).all()
