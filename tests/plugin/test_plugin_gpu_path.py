"""The GPU path's bookkeeping, on CPU: double-buffered staging lanes, the pinned budget, arena registration over a
real shared-memory client, nothing allocated per chunk, no host reads per layer, the adapter's attention function.

The CUDA side of the same promises (streams, events, DMA) is tests/plugin/test_plugin_cuda.py; here the same code
runs with CPU tensors, where every check is about which buffer holds which bytes, and what is allocated.
"""

import contextlib
import gc
import mmap
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memory_service import MemoryClient
from plugin import MemFlowBatch, MemFlowConfig, SelfForcingAdapter
from plugin.attention import ChunkMemory, cache_attention, sdpa_attention
from plugin.kv_slots import LANES, MemorySlots
from plugin.pinned import ArenaPins, PinnedBudget, backing_mmap
from plugin.retrieval import Selection
from plugin_helpers import (  # noqa: F401 - fixtures
    FOX, WHALE, Run, local_memory, make_plugin, shared_service, tiny_model,
)

SCRIPT = [FOX] * 12 + [WHALE] * 6


class Allocations(TorchDispatchMode):
    """Counts aten ops whose output owns storage none of its inputs had (an allocation), and host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.allocs: list[str] = []
        self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocs.append(str(func))
        return out


def banked(tiny_model, memory, **config):
    """A plugin that has run SCRIPT (so the bank holds frames) and the run."""
    plugin = make_plugin(memory, tiny_model, **config)
    run = Run(tiny_model, plugin).script(SCRIPT)
    plugin.flush(30.0)
    return plugin, run


def selection_of(memory, plugin, ids, layers):
    frames = {e.entry_id: e.frame_index for e in memory.entries(plugin.config.stream)}
    return Selection(tuple(tuple(ids) for _ in range(layers)), tuple((e, frames[e]) for e in ids))


def fetcher(memory, plugin):
    return lambda ids, layers: memory.fetch(plugin.config.stream, list(ids), list(layers)).kv


def test_staging_lanes_alternate_and_a_later_stage_never_overwrites_a_pending_one(tiny_model, local_memory):
    plugin, run = banked(tiny_model, local_memory)
    ids = [e.entry_id for e in local_memory.entries(plugin.config.stream)]
    assert len(ids) >= 3
    layers = tiny_model.cfg.layers
    slots = MemorySlots(tiny_model.layout, 3, budget=PinnedBudget(1 << 30), host_staging=True)
    slots.bind(run.state.kv, plugin.adapter)
    fetch = fetcher(local_memory, plugin)
    a = slots.stage(slots.plan(selection_of(local_memory, plugin, ids[:1], layers)), fetch)
    b = slots.stage(slots.plan(selection_of(local_memory, plugin, ids[1:2], layers)), fetch)  # chunk n+1's prefetch
    assert (a.lane, b.lane) == (0, 1)
    lane0, lane1 = slots.lane_buffer(0), slots.lane_buffer(1)
    assert lane0.data_ptr() != lane1.data_ptr()
    want_a = torch.from_numpy(np.array(fetch(ids[:1], list(range(layers)))))  # [1, L, 2, N, H, D]
    assert torch.equal(a.data[0], want_a)  # b went to the other lane: a's bytes are intact
    assert a.data[0].data_ptr() == lane0.data_ptr()
    slots.commit(a, plugin.adapter)
    n = tiny_model.cfg.tokens_per_frame
    for layer, cache in enumerate(run.state.kv):
        slot = slice(2 * n, 3 * n)  # one active frame: the last slot
        assert torch.equal(cache["k_full"][0, slot], want_a[0, layer, 0])
        assert torch.equal(cache["v_full"][0, slot], want_a[0, layer, 1])
    # a third stage reuses lane 0 (the same buffer: nothing allocated per chunk) and makes `a` stale
    c = slots.stage(slots.plan(selection_of(local_memory, plugin, ids[2:3], layers)), fetch)
    assert c.lane == 0 and slots.lane_buffer(0).data_ptr() == lane0.data_ptr()
    slots.reset()
    stale = slots.plan(selection_of(local_memory, plugin, ids[:1], layers))
    with pytest.raises(RuntimeError, match="overwritten by a newer stage"):
        slots.commit(type(a)(stale, a.data, a.lane, a.generation, a.pinned), plugin.adapter)
    stats = slots.staging_stats()
    assert stats.lane_fills == (2, 1) and stats.staged == 3 * layers and stats.pageable == 0
    assert stats.staging_bytes == LANES * lane0.numel() * lane0.element_size()
    slots.close()
    plugin.close()


def test_pinned_budget_bounds_the_lanes_and_what_does_not_fit_is_copied_from_the_fetch(tiny_model, local_memory):
    plugin, run = banked(tiny_model, local_memory)
    ids = [e.entry_id for e in local_memory.entries(plugin.config.stream)]
    layers = tiny_model.cfg.layers
    lay = tiny_model.layout
    lane_bytes = 3 * layers * 2 * lay.tokens_per_frame * lay.heads * lay.head_dim * 4  # float32 tiny model
    budget = PinnedBudget(lane_bytes + lane_bytes // 2)  # room for one lane, not two
    slots = MemorySlots(lay, 3, budget=budget, host_staging=True)
    slots.bind(run.state.kv, plugin.adapter)
    fetch = fetcher(local_memory, plugin)
    a = slots.stage(slots.plan(selection_of(local_memory, plugin, ids[:2], layers)), fetch)
    b = slots.stage(slots.plan(selection_of(local_memory, plugin, ids[1:3], layers)), fetch)
    assert slots.lane_buffer(0) is not None and slots.lane_buffer(1) is None
    assert budget.used == lane_bytes and budget.refused == 1
    assert b.pinned == (False,) and a.data[0].data_ptr() == slots.lane_buffer(0).data_ptr()
    slots.commit(b, plugin.adapter)  # from the fetched array itself: the same bytes land
    want = np.array(fetch(ids[1:3], list(range(layers))))
    n = lay.tokens_per_frame
    for layer, cache in enumerate(run.state.kv):
        got = {int(e): None for e in slots.tables[layer][1:]}
        assert set(got) == set(ids[1:3])
        for j in (1, 2):
            e = slots.tables[layer][j]
            stored = torch.from_numpy(want[ids[1:3].index(e), layer, 0])
            assert torch.equal(cache["k_full"][0, j * n:(j + 1) * n], stored)
    assert slots.staging_stats().pageable == 2 * layers
    slots.close()
    assert budget.used == 0
    with pytest.raises(RuntimeError, match="only 0 are reserved"):
        budget.release(1)
    plugin.close()


def test_arena_pins_register_each_arena_once_and_unregister_it_when_the_client_closes_it(tiny_model, tmp_path):
    calls = []
    budget = PinnedBudget(1 << 40)
    pins = ArenaPins(budget, register=lambda p, s: calls.append(("reg", p, s)) or True,
                     unregister=lambda p: calls.append(("unreg", p)) or True)
    client = MemoryClient(shared_service(), plane="shm", arena_bytes=8 << 20)
    try:
        plugin, _ = banked(tiny_model, client, record_interval=1)
        ids = [e.entry_id for e in client.entries(plugin.config.stream)]
        first = client.fetch(plugin.config.stream, ids[:2]).kv
        mm = backing_mmap(first)
        assert mm is not None and len(mm) == client.arena_usage().bytes
        assert pins.direct(first) and pins.direct(client.fetch(plugin.config.stream, ids[2:4]).kv)
        regs = [c for c in calls if c[0] == "reg"]
        assert len(regs) == 1 and regs[0][2] == len(mm) and budget.used == len(mm)
        base = regs[0][1]
        assert np.frombuffer(mm, np.uint8).__array_interface__["data"][0] == base
        assert not pins.direct(np.zeros(4)) and not pins.direct(np.array(first))  # not arena memory
        plugin.close()
        del first
        gc.collect()  # a view of the arena held only by cyclic garbage (a frame, a traceback) goes now, not later
    finally:
        client.close()
    assert mm.closed
    pins.sweep()
    assert ("unreg", base) in calls and budget.used == 0 and pins.unregistered == 1


def test_arena_pins_respect_the_budget(tiny_model):
    budget = PinnedBudget(1 << 20)  # smaller than an arena
    registered = []
    pins = ArenaPins(budget, register=lambda p, s: registered.append(s) or True, unregister=lambda p: True)
    with MemoryClient(shared_service(), plane="shm", arena_bytes=8 << 20) as client:
        plugin, _ = banked(tiny_model, client)
        ids = [e.entry_id for e in client.entries(plugin.config.stream)]
        arr = client.fetch(plugin.config.stream, ids[:1]).kv
        assert not pins.direct(arr) and not pins.direct(arr)
        assert registered == [] and budget.used == 0 and budget.refused == 1 and pins.refused == 1
        plugin.close()


def test_a_refused_registration_clears_the_cuda_error_it_left_and_falls_back_counted():
    """cudaHostRegister / cudaHostUnregister that fail leave the runtime's "last error", which the next kernel
    launch on the thread would report as its own: ArenaPins consumes it at once and copies through staging."""
    calls = []
    budget = PinnedBudget(1 << 30)
    refuse = {"reg": True, "unreg": True}
    pins = ArenaPins(budget, register=lambda p, s: calls.append("reg") or not refuse["reg"],
                     unregister=lambda p: calls.append("unreg") or not refuse["unreg"],
                     clear_error=lambda: calls.append("clear") or True)
    mm = mmap.mmap(-1, 1 << 16)
    arr = np.frombuffer(mm, np.uint8)[4096:]
    assert not pins.direct(arr) and not pins.direct(arr)  # refused once, not retried for the same mapping
    assert calls == ["reg", "clear"] and pins.refused == 1 and pins.errors_cleared == 1 and budget.used == 0
    refuse["reg"] = False
    mm2 = mmap.mmap(-1, 1 << 16)
    assert pins.direct(np.frombuffer(mm2, np.uint8)) and budget.used == len(mm2)
    del arr
    mm2.close()
    pins.sweep()  # its unregistration fails too: cleared, and the budget still goes back
    assert calls == ["reg", "clear", "reg", "unreg", "clear"] and pins.errors_cleared == 2
    assert pins.unregistered == 1 and budget.used == 0
    pins.close()
    mm.close()


def test_arena_pins_hold_an_arena_only_weakly():
    """An arena the client drops (here: the last reference to its mapping goes) is unmapped, never kept alive by
    the registration; the next sweep unregisters it and gives its bytes back to the budget."""
    unregistered = []
    budget = PinnedBudget(1 << 30)
    pins = ArenaPins(budget, register=lambda p, s: True, unregister=lambda p: unregistered.append(p) or True)
    mm = mmap.mmap(-1, 1 << 16)
    arr = np.frombuffer(mm, np.uint8)
    base = arr.__array_interface__["data"][0]
    assert pins.direct(arr) and budget.used == len(mm)
    probe = weakref.ref(mm)
    del arr, mm
    gc.collect()
    assert probe() is None  # nothing in ArenaPins kept the mapping
    pins.sweep()
    assert unregistered == [base] and budget.used == 0 and pins.pinned_bytes == 0
    pins.close()


def test_the_plugins_of_one_client_share_its_arena_pins_and_a_batch_one_budget(tiny_model, local_memory):
    budget = PinnedBudget(1 << 30)
    a = ArenaPins.shared(local_memory, budget)
    b = ArenaPins.shared(local_memory, PinnedBudget(1))  # a second user gets the first one's instance
    assert a is b and a.budget is budget
    other = ArenaPins.shared(type("OtherClient", (), {})(), PinnedBudget(1))
    assert other is not a
    unregistered = []
    a._unregister = lambda p: unregistered.append(p) or True
    a._register = lambda p, s: True
    mm = mmap.mmap(-1, 1 << 16)
    assert a.direct(np.frombuffer(mm, np.uint8)) and b.direct(np.frombuffer(mm, np.uint8)) and a.registered == 1
    a.close()
    assert unregistered == [] and budget.used == len(mm)  # one user left: the registration stays
    b.close()
    assert len(unregistered) == 1 and budget.used == 0
    assert ArenaPins.shared(local_memory, budget) is not a  # closed by its last user: a fresh one next time
    mm.close()
    config = MemFlowConfig(stream="batch-budget", deadline_s=30.0, prefetch=False, pinned_bytes=5 << 20)
    batch = MemFlowBatch(local_memory, config, SelfForcingAdapter.for_reference(tiny_model), 3)
    try:
        assert all(p.pinned is batch.pinned for p in batch.plugins) and batch.pinned.limit == 5 << 20
    finally:
        batch.close()


@pytest.mark.parametrize("store_rotated", [True, False])
def test_steady_state_chunks_allocate_nothing_and_read_no_scalar_per_layer(tiny_model, local_memory, store_rotated):
    plugin = make_plugin(local_memory, tiny_model, store_rotated=store_rotated, record_interval=1)
    run = Run(tiny_model, plugin).script(SCRIPT)
    plugin.flush(30.0)
    layers = tiny_model.cfg.layers
    loads = 0
    for index in range(len(SCRIPT), len(SCRIPT) + 6):
        mode = Allocations()
        with mode:
            memory = plugin.before_chunk(index, WHALE, run.state.kv)
        hooks_allocs = list(mode.allocs)
        tiny_model.generate_chunk(run.state, index, WHALE, memory)
        run.state.next_chunk = index + 1
        mode = Allocations()
        with mode:
            plugin.after_chunk(index, run.state.kv)
        hooks_allocs += mode.allocs
        assert mode.scalar_reads < layers, f"after_chunk read {mode.scalar_reads} scalars for {layers} layers"
        plugin.flush(30.0)
        report = plugin.last_report
        assert report.fallback is None
        assert hooks_allocs == [], (index, report.loaded, hooks_allocs)
        loads += report.loaded
    assert loads > 0  # the steady state did load frames (and rotate them, unrotated)
    plugin.close()


def test_the_adapters_attention_function_is_the_one_attention_calls(tiny_model, local_memory):
    calls = []

    def flash_like(q, k, v):  # FlashAttention's layout: [B, S, H, D], [B, T, H, D] -> [B, S, H, D]
        calls.append((q.shape, k.shape))
        return sdpa_attention(q, k, v)

    plugin = make_plugin(local_memory, tiny_model)
    plugin.adapter.attention_fn = flash_like
    bare = Run(tiny_model).script(SCRIPT).outputs
    run = Run(tiny_model, plugin).script(SCRIPT)
    plugin.close()
    assert len(calls) == len(SCRIPT) * tiny_model.cfg.layers * (len(tiny_model.cfg.sigmas) + 1)
    assert all(q[1:] == (48, 4, 32) for q, _ in calls)  # 3 frames x 16 tokens, 4 heads x 32
    first = next(i for i, r in enumerate(run.reports) if any(r.frames))
    assert all(torch.equal(a, b) for a, b in zip(bare[:first], run.outputs[:first]))
    # and through cache_attention directly: the argument wins over ChunkMemory's, both over SDPA
    q = torch.randn(1, 16, 4, 32)
    cache = {"k_full": torch.randn(1, 32, 4, 32), "v_full": torch.randn(1, 32, 4, 32), "memory_frames": 0}
    seen = []
    mine = lambda q, k, v: seen.append("arg") or sdpa_attention(q, k, v)  # noqa: E731
    out = cache_attention(q, cache, 32, 16, 1, ChunkMemory(attention=flash_like), 0, attention=mine)
    assert seen == ["arg"] and torch.equal(out, cache_attention(q, cache, 32, 16, 1))


def test_the_diffusers_driver_hooks_allocate_nothing_in_steady_state_with_unrotated_keys(local_memory):
    pytest.importorskip("diffusers")
    from plugin import MemFlowConfig, MemFlowPlugin
    from plugin.adapters.diffusers_wan import WanAdapter, WanStreamingDriver, hash_text_encoder
    from plugin.adapters.diffusers_wan import tiny_model as wan_tiny_model

    model = wan_tiny_model()
    driver = WanStreamingDriver(model, hash_text_encoder(model.config.text_dim), height=8, width=8,
                                frames_per_chunk=2, sink_frames=2, window_frames=4)
    plugin = MemFlowPlugin(local_memory, MemFlowConfig(stream="wan-allocs", deadline_s=30.0, record_interval=1,
                                                       prefetch=False), WanAdapter(driver, store_rotated=False))
    state = driver.new_state(memory_frames=plugin.memory_frames)
    prompts = [FOX] * 6 + [WHALE] * 8
    loads = 0
    for i, prompt in enumerate(prompts):
        measured = i >= 9  # the whale prompt's text keys are computed once, at chunk 6
        mode = Allocations()
        with mode if measured else contextlib.nullcontext():
            memory = plugin.before_chunk(i, prompt, state.kv)
        allocs = list(mode.allocs)
        driver.generate_chunk(state, i, prompt, memory)
        with mode if measured else contextlib.nullcontext():
            plugin.after_chunk(i, state.kv)
        plugin.flush(30.0)
        if measured:
            assert mode.allocs == [] and allocs == [], (i, mode.allocs)
            loads += plugin.last_report.loaded
    plugin.close()
    assert loads > 0 and plugin.stats().fallbacks == 0
