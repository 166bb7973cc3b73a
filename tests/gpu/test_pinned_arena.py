"""With a GPU: a client's shared-memory arena registered by the plugin (cudaHostRegister through torch) is pinned
memory to CUDA, a non_blocking copy reads it by DMA, and closing the client's arena ends the registration."""

import numpy as np
import pytest
import torch

from memory_service.shm import Arena
from plugin.kv_slots import to_torch
from plugin.pinned import ArenaPins, PinnedBudget

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_a_registered_arena_is_pinned_and_copied_from_by_dma():
    arena = Arena(8 << 20)
    _, region = arena.lease(4 << 20)
    arr = np.frombuffer(region, np.float32)  # a fetch result's kind of array: a view of the arena
    arr[:] = np.arange(arr.size, dtype=np.float32)
    host = to_torch(arr)
    assert not host.is_pinned()
    budget = PinnedBudget(64 << 20)
    pins = ArenaPins(budget)
    assert pins.direct(arr) and budget.used == arena.size
    assert host.is_pinned()  # CUDA now sees the arena's pages as page-locked
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        dev = torch.empty(host.shape, device="cuda")
        dev.copy_(host, non_blocking=True)
    side.synchronize()
    assert torch.equal(dev.cpu(), host)
    del host, arr, region
    arena.close()
    pins.sweep()
    assert budget.used == 0 and pins.unregistered == 1
    pins.close()


def test_a_refused_registration_leaves_no_cuda_error_for_the_next_kernel():
    """CUDA refuses to register pages twice (cudaErrorHostMemoryAlreadyRegistered) and keeps that error as the
    thread's last error; unconsumed, the next kernel launch's check would raise it. ArenaPins consumes it."""
    arena = Arena(8 << 20)
    _, region = arena.lease(1 << 20)
    arr = np.frombuffer(region, np.uint8)
    first = ArenaPins(PinnedBudget(64 << 20))
    second = ArenaPins(PinnedBudget(64 << 20))  # not shared: it tries to register the same pages again
    assert first.direct(arr)
    assert not second.direct(arr) and second.refused == 1 and second.errors_cleared == 1
    x = torch.arange(4, device="cuda")
    assert torch.equal((x + 1).cpu(), torch.arange(1, 5))  # an unrelated kernel: no stale error reported
    torch.cuda.synchronize()
    del arr, region
    arena.close()
    second.close()
    first.close()
    assert first.unregistered == 1 and first.budget.used == 0
