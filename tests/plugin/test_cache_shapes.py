"""The real pipelines' cache shapes on the reference model: CFG with two caches, relative RoPE, uneven chunks,
batch > 1 (one stream per sample), caches that reallocate, and a recache at a prompt switch.

Ground truths are the caches themselves: K/V read from a cache while a frame was still resident (what a
memory slot must hold later), `Rope3D.rotate` for positions, and the bank's own entries.
"""

import numpy as np
import pytest
import torch

from plugin import MemFlowBatch, MemFlowConfig, MemFlowPlugin, SelfForcingAdapter
from plugin.adapters.self_forcing import recache_frames
from plugin.reference_model import ReferenceDiT, tiny
from plugin_helpers import FOX, WHALE, Run, local_memory, make_plugin, tiny_model  # noqa: F401 - fixtures

N = 16  # tokens per frame of tiny()


def frame_kv(adapter, kv, frame):
    """`[L, 2, N, H, D]` copy of resident frame `frame`."""
    return torch.stack([torch.stack([k, v]) for k, v in adapter.frame_kv(kv, frame)]).clone()


def active_slots(kv, layer, m, sample=0):
    """The last `m` memory slots of `layer` (what attention reads): `[m, 2, N, H, D]`."""
    cap = kv[layer]["memory_frames"]
    k = kv[layer]["k_full"][sample, (cap - m) * N:cap * N].unflatten(0, (m, N))
    v = kv[layer]["v_full"][sample, (cap - m) * N:cap * N].unflatten(0, (m, N))
    return torch.stack([k, v], dim=1)


def bank_frames(memory, stream):
    """Frame index of every entry in `stream`, sorted."""
    n = memory.stats(stream).entries
    if n == 0:
        return []
    dim = memory.list_streams()[0].key_spaces["emb"].dim
    hits = memory.query(stream, "emb", np.ones(dim, np.float32), n)
    return sorted(int(f) for f in np.asarray(hits.frames) if f >= 0)


def check_slots_hold(report, kv, recorded, sample=0):
    """Every layer's active slots hold, in some order, exactly the recorded K/V of the selected frames."""
    frames = dict(report.selection.frames)
    for layer, ids in enumerate(report.selection.layer_ids):
        slots = active_slots(kv, layer, len(ids), sample)
        want = [recorded[frames[e]][layer] for e in ids]
        for w in want:
            assert any(torch.equal(w, s) for s in slots), f"layer {layer}: frame missing from the slots"


# -- CFG / two caches ------------------------------------------------------------------------------------
def test_cfg_two_caches_share_one_plugin_one_record_per_chunk(tiny_model, local_memory):
    plugin = make_plugin(local_memory, tiny_model)
    cond = tiny_model.new_state(memory_frames=plugin.memory_frames)
    uncond = tiny_model.new_state(memory_frames=plugin.memory_frames)
    adapter = plugin.adapter
    script = [FOX] * 6 + [WHALE] * 6
    recorded, reports = {}, []
    for i, prompt in enumerate(script):
        mem = plugin.before_chunk(i, prompt, cond.kv, mirrors=(uncond.kv,))
        reports.append(plugin.last_report)
        tiny_model.generate_chunk(cond, i, prompt, mem, uncond=uncond, negative_prompt="blurry")
        first = 3 * i
        if first >= 3:
            recorded[first] = frame_kv(adapter, cond.kv, first)
        plugin.after_chunk(i, cond.kv)
        if any(mem.frames):  # both caches attend the same bytes, loaded from the conditional records
            check_slots_hold(plugin.last_report, cond.kv, recorded)
            for a, b in zip(cond.kv, uncond.kv):
                assert torch.equal(a["k_full"][:, :a["memory_frames"] * N], b["k_full"][:, :b["memory_frames"] * N])
                assert torch.equal(a["v_full"][:, :a["memory_frames"] * N], b["v_full"][:, :b["memory_frames"] * N])
    plugin.flush()
    assert bank_frames(local_memory, plugin.config.stream) == [9, 18, 27]  # one record per recording chunk
    used = [r for r in reports if any(r.frames)]
    assert used and all(r.fallback is None for r in reports)
    # bound once: frames are loaded when the selection changes, never again because a second cache exists
    steady = [r for prev, r in zip(reports, reports[1:])
              if any(r.frames) and r.selection.layer_ids == prev.selection.layer_ids]
    assert steady and all(r.loaded == 0 for r in steady)
    assert plugin.stats().frames_loaded == sum(r.loaded for r in reports)
    plugin.close()


def test_cfg_guidance_changes_the_output_and_both_caches_commit(tiny_model):
    plain = Run(tiny_model).script([FOX] * 2).outputs
    cond, uncond = tiny_model.new_state(), tiny_model.new_state()
    outs = [tiny_model.generate_chunk(cond, i, FOX, uncond=uncond, negative_prompt="") for i in range(2)]
    assert not torch.equal(plain[1], outs[1])
    assert int(cond.kv[0]["global_end_index"]) == int(uncond.kv[0]["global_end_index"]) == 6 * N


# -- relative RoPE ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def relative_model():
    return ReferenceDiT(tiny(rope_mode="relative", max_frames=16))  # 16 frames: sink 3 + memory 3 + window 9


def test_relative_rope_is_invisible_when_empty_and_not_capped_by_the_table(relative_model, local_memory):
    script = [FOX] * 8  # 24 frames: past the 16-frame RoPE table
    bare = Run(relative_model).script(script).outputs
    plugin = make_plugin(local_memory, relative_model, record_interval=1000)  # nothing recorded: empty bank
    run = Run(relative_model, plugin).script(script)
    plugin.close()
    assert all(torch.equal(a, b) for a, b in zip(bare, run.outputs))
    absolute = ReferenceDiT(tiny(max_frames=16))
    with pytest.raises(ValueError, match="outside the table of 16 frames"):
        Run(absolute).script(script)


def test_relative_rope_memory_frames_attend_at_their_place_in_the_sequence(relative_model, local_memory):
    plugin = make_plugin(local_memory, relative_model)
    adapter = plugin.adapter
    assert adapter.rope == "relative" and not adapter.store_rotated
    run = Run(relative_model, plugin)
    script = [FOX] * 5 + [WHALE] * 7  # 36 frames, more than twice the RoPE table
    checked = 0
    for i, prompt in enumerate(script):
        run.chunk(i, prompt)
        report = run.reports[-1]
        if not any(report.frames):
            continue
        # the slots hold the keys unrotated, exactly as the cache held them (no rotation at the stored frame)
        check_slots_hold(report, run.state.kv, run.recorded)
        kv, cap = run.state.kv, plugin.memory_frames
        end = int(kv[0]["local_end_index"])
        for layer, m in enumerate(report.frames):
            mem_pos, _, _ = relative_model.relative_positions(m, end)
            assert mem_pos == list(adapter.relative_positions(m)) == [3 + j for j in range(m)]
            assert all(adapter.memory_position(f, j, m) is None for j, (_, f) in enumerate(report.selection.frames))
            # what the last layer's attention read: each memory slot rotated at sink + its index
            if layer == len(kv) - 1:
                slots = kv[layer]["k_full"][0, (cap - m) * N:cap * N]
                rotated = run.state.rotated[0, (cap - m) * N:cap * N]
                for j in range(m):
                    want = relative_model.rope.rotate(slots[j * N:(j + 1) * N], mem_pos[j])
                    assert torch.allclose(rotated[j * N:(j + 1) * N], want, atol=1e-6)
        checked += 1
    plugin.flush()
    plugin.close()
    assert checked >= 3


@pytest.mark.parametrize("store_rotated", [True, False])
def test_load_keys_turns_a_frame_to_the_position_its_adapter_assigns(tiny_model, store_rotated):
    adapter = SelfForcingAdapter.for_reference(tiny_model, store_rotated)
    rope = tiny_model.rope
    keys = torch.randn(N, 4, 32)  # one frame, unrotated
    banked = rope.rotate(keys, 40) if store_rotated else keys.clone()  # as the bank holds frame 40
    assert adapter.memory_position(40, 1, 3) == 40  # absolute RoPE: the frame's own position
    for position in (40, 5):
        slot = banked.clone()
        adapter.load_keys(slot, 40, position)
        assert torch.allclose(slot, rope.rotate(keys, position), atol=1e-5)


# -- uneven chunks ---------------------------------------------------------------------------------------
def test_uneven_first_chunk_maps_chunks_to_the_adapters_frames(local_memory):
    model = ReferenceDiT(tiny(first_chunks=(1,)))  # Self-Forcing's independent first frame: [1, 3, 3, ...]
    lay = model.layout
    assert [lay.chunk_frames(i) for i in range(4)] == [(0, 1), (1, 4), (4, 7), (7, 10)]
    assert [lay.chunk_of(f) for f in (0, 1, 3, 4, 9, 10)] == [0, 1, 1, 2, 3, 4]
    plugin = MemFlowPlugin(local_memory, MemFlowConfig(stream="uneven", deadline_s=30.0, record_interval=1),
                           SelfForcingAdapter.for_reference(model))
    state = model.new_state(memory_frames=plugin.memory_frames)
    recorded, used = {}, 0
    for i, prompt in enumerate([FOX] * 7 + [WHALE] * 5):
        mem = plugin.before_chunk(i, prompt, state.kv)
        out = model.generate_chunk(state, i, prompt, mem)
        first, end = lay.chunk_frames(i)
        assert out.shape[1] == end - first
        if first >= lay.sink_frames:
            recorded[first] = frame_kv(plugin.adapter, state.kv, first)
        plugin.after_chunk(i, state.kv)
        if any(mem.frames):
            used += 1
            check_slots_hold(plugin.last_report, state.kv, recorded)
            lo = lay.window(i)[0]
            assert all(f < lo for _, f in plugin.last_report.selection.frames)
    plugin.flush()
    plugin.close()
    assert used >= 3
    assert bank_frames(local_memory, "uneven") == [4, 7, 10, 13, 16, 19, 22, 25, 28, 31]  # each chunk's first


def test_uneven_chunks_are_invisible_with_an_empty_bank(local_memory):
    model = ReferenceDiT(tiny(first_chunks=(1, 2)))
    script = [FOX] * 6
    bare = Run(model).script(script).outputs
    plugin = make_plugin(local_memory, model, record_interval=1000)
    state = model.new_state(memory_frames=plugin.memory_frames)
    outs = []
    for i, p in enumerate(script):
        outs.append(model.generate_chunk(state, i, p, plugin.before_chunk(i, p, state.kv)))
        plugin.after_chunk(i, state.kv)
    plugin.close()
    assert all(torch.equal(a, b) for a, b in zip(bare, outs))


# -- batch > 1 -------------------------------------------------------------------------------------------
def test_batch_gets_one_stream_per_sample_and_never_mixes_them(tiny_model, local_memory):
    config = MemFlowConfig(stream="batch", deadline_s=30.0)
    adapter = SelfForcingAdapter.for_reference(tiny_model)
    state = tiny_model.new_state(batch=2, memory_frames=config.memory_frames)
    single = MemFlowPlugin(local_memory, config.replace(stream="single"), adapter)
    with pytest.raises(ValueError, match=r"batch 2.*MemFlowBatch\(memory, config, adapter, batch=2\)"):
        single.before_chunk(0, FOX, state.kv)
    single.close()
    batch = MemFlowBatch(local_memory, config, adapter, 2)
    recorded = [{}, {}]
    used = 0
    for i, prompt in enumerate([FOX] * 6 + [WHALE] * 6):
        mem = batch.before_chunk(i, [prompt, prompt], state.kv)
        tiny_model.generate_chunk(state, i, prompt, mem)
        if i * 3 >= 3:
            for b in range(2):
                recorded[b][i * 3] = frame_kv(adapter.for_sample(b), state.kv, i * 3)
        batch.after_chunk(i, state.kv)
        if any(mem.frames):
            used += 1
            for b, report in enumerate(batch.last_reports):
                assert report.frames == mem.frames
                check_slots_hold(report, state.kv, recorded[b], sample=b)
                other = active_slots(state.kv, 0, mem.frames[0], 1 - b)
                assert not any(torch.equal(recorded[b][f][0], s) for _, f in report.selection.frames for s in other)
    batch.flush()
    batch.close()
    assert used >= 3
    assert bank_frames(local_memory, "batch-0") == bank_frames(local_memory, "batch-1") == [9, 18, 27]
    a = local_memory.fetch("batch-0", [0], [0]).kv
    b = local_memory.fetch("batch-1", [0], [0]).kv
    assert not np.array_equal(a.view(np.uint16), b.view(np.uint16))  # each sample banked its own frame


def test_batch_with_empty_banks_is_the_bare_batch_bit_for_bit(tiny_model, local_memory):
    script = [FOX] * 8
    bare_state = tiny_model.new_state(batch=2)
    bare = [tiny_model.generate_chunk(bare_state, i, p) for i, p in enumerate(script)]
    config = MemFlowConfig(stream="empty-batch", deadline_s=30.0, record_interval=1000)
    batch = MemFlowBatch(local_memory, config, SelfForcingAdapter.for_reference(tiny_model), 2)
    state = tiny_model.new_state(batch=2, memory_frames=batch.memory_frames)
    outs = []
    for i, p in enumerate(script):
        outs.append(tiny_model.generate_chunk(state, i, p, batch.before_chunk(i, p, state.kv)))
        batch.after_chunk(i, state.kv)
    batch.close()
    assert all(torch.equal(a, b) for a, b in zip(bare, outs))
    assert all(s.retrievals == len(script) and s.fallbacks == 0 for s in batch.stats())


# -- caches that reallocate ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["replace_k", "replace_region"])
def test_a_reallocated_cache_is_refused_not_attended_wrongly(tiny_model, local_memory, how):
    plugin = make_plugin(local_memory, tiny_model)
    run = Run(tiny_model, plugin).script([FOX] * 3)
    layer = run.state.kv[1]
    if how == "replace_k":  # e.g. `cache["k"] = torch.cat(...)`: the generator writes outside the memory region
        layer["k"] = layer["k"].clone()
        match = r"layer 1's cache\['k'\] no longer shares storage"
    else:  # the whole buffer reallocated, the tail re-viewed: the slots the plugin bound are gone
        layer["k_full"] = layer["k_full"].clone()
        layer["k"] = layer["k_full"][:, plugin.memory_frames * N:]
        match = "memory region was reallocated"
    with pytest.raises(ValueError, match=match):
        plugin.before_chunk(3, FOX, run.state.kv)
    plugin.close()


# -- recache on a prompt switch --------------------------------------------------------------------------
@pytest.mark.parametrize("global_sink", [False, True])
def test_recache_moves_the_sink_and_its_memory_attends_only_older_frames(tiny_model, local_memory, global_sink):
    plugin = make_plugin(local_memory, tiny_model, record_interval=1, k=5, k_max=5)
    adapter = plugin.adapter
    run = Run(tiny_model, plugin).script([FOX] * 8)  # frames 0..23; records at 3, 6, ..., 21
    plugin.flush()
    history = torch.cat(run.outputs, dim=1)  # [1, 24, N, C]
    kv = run.state.kv
    first, end = recache_frames(tiny_model.layout, 24, global_sink)
    assert (first, end) == ((15, 24) if global_sink else (12, 24))
    mem = plugin.before_recache(8, WHALE, kv, first)
    recache_report = plugin.last_report
    assert recache_report.fallback is None and any(mem.frames)
    assert all(f < first for _, f in recache_report.selection.frames)  # re-run frames are resident: not loaded
    assert tiny_model.recache(run.state, WHALE, history, global_sink=global_sink, memory=mem) == (first, end)
    sink = (0, 3) if global_sink else (12, 15)
    assert adapter.sink_range(kv) == sink
    if not global_sink:  # the sink slots now hold the re-run's first frames
        assert torch.equal(adapter.frame_kv(kv, 12)[0][0], kv[0]["k"][0, :N])
        with pytest.raises(ValueError, match="frame 0 is not resident"):
            adapter.frame_kv(kv, 0)
    run.chunk(8, WHALE)
    report = run.reports[-1]
    assert report.fallback is None
    chosen = {f for _, f in report.selection.frames}
    eligible = {3, 6, 9, 12, 15} - set(range(*sink))  # below the window (18), not held by the sink
    assert chosen == eligible  # k=5 takes every eligible frame: a record the sink holds is never loaded twice
    plugin.close()
