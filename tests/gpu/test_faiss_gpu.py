"""With faiss-gpu and a GPU, flat indexes search on a GPU mirror and return the CPU results."""

import numpy as np
import pytest

from memory_service.config import IndexParams
from memory_service.index.vector_index import FlatIndex, gpu_available

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a CUDA GPU")]


def test_flat_index_uses_gpu_and_matches_cpu():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    gpu = FlatIndex(64, "ip", IndexParams(use_gpu=True))
    cpu = FlatIndex(64, "ip", IndexParams(use_gpu=False))
    assert gpu._mirror is not None and cpu._mirror is None
    for index in (gpu, cpu):
        index.add(np.arange(2000), x)
        index.remove(np.arange(0, 2000, 5))
    q = rng.standard_normal((8, 64)).astype(np.float32)
    (s1, i1), (s2, i2) = cpu.search(q, 8, np.arange(100)), gpu.search(q, 8, np.arange(100))
    assert np.array_equal(i1, i2) and np.allclose(s1, s2, rtol=1e-4)
