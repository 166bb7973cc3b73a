"""CUDA: the plugin's copies are ordered against the generator by events, whatever stream or device it runs on.

Skipped without a GPU. No timing is asserted (benchmarks time things); these check results only. Several tests
delay the plugin's copy stream on purpose (`torch.cuda._sleep`): if attention did not wait for the slot copies,
or the window roll for the write-back's reads, or a stage for the copies reading its staging lane, the delayed
copies would land late and the outputs or the slots would differ from an undelayed run, bit for bit.
"""

import contextlib

import numpy as np
import pytest
import torch

from memory_service import LocalMemory, MemoryClient
from plugin import MemFlowBatch, MemFlowConfig, SelfForcingAdapter
from plugin.attention import ChunkMemory, cache_attention
from plugin.kv_slots import MemorySlots
from plugin.pinned import PinnedBudget
from plugin.reference_model import ReferenceDiT, tiny, wan_1_3b_shape
from plugin.retrieval import Selection
from plugin_helpers import FOX, WHALE, Flaky, Run, make_plugin, shared_service

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SCRIPT = [FOX] * 9 + [WHALE] * 6 + [FOX] * 6
DELAY = 50_000_000  # GPU cycles (tens of ms): long enough that an unordered read sees the old bytes


def delay(stream, cycles=DELAY):
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)


def selected_frames(report):
    """Per layer, the frames a chunk attends (entry ids differ between banks, frames do not)."""
    frames = dict(report.selection.frames)
    return [[frames[e] for e in ids] for ids in report.selection.layer_ids]


def stream_script(model, plugin, prompts, side=None, slow_copies=False):
    """The reference model under the plugin; the generator's work on `side` when given (hooks on the default
    stream); `slow_copies` delays the plugin's copy stream before every hook. Returns outputs and reports."""
    state = model.new_state(memory_frames=plugin.memory_frames)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())  # the cache was zeroed on the default stream
    outputs, reports = [], []
    for i, prompt in enumerate(prompts):
        if slow_copies:
            delay(plugin.fence.stream)
        memory = plugin.before_chunk(i, prompt, state.kv, next_prompt=prompts[min(i + 1, len(prompts) - 1)])
        reports.append(plugin.last_report)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            outputs.append(model.generate_chunk(state, i, prompt, memory))
        if slow_copies:
            delay(plugin.fence.stream)
        plugin.after_chunk(i, state.kv)
    torch.cuda.synchronize()
    plugin.flush(60.0)
    return outputs, reports, state


def bank_kv(memory, plugin):
    entries = memory.entries(plugin.config.stream)
    return {e.frame_index: np.array(memory.fetch(plugin.config.stream, [e.entry_id]).kv[0]) for e in entries}


@pytest.fixture(scope="module")
def cuda_model():
    return ReferenceDiT(tiny(), device="cuda")


def reference_run(model, tmp_path, **config):
    with LocalMemory(str(tmp_path / "reference")) as memory:
        plugin = make_plugin(memory, model, **config)
        outputs, reports, _ = stream_script(model, plugin, SCRIPT)
        banked = bank_kv(memory, plugin)
        plugin.close()
    return outputs, reports, banked


def test_slots_hold_the_banks_frames_through_pinned_staging(cuda_model, tmp_path):
    model = cuda_model
    bare = Run(model).script(SCRIPT).outputs
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, model)
        outputs, reports, state = stream_script(model, plugin, SCRIPT)
        assert plugin.slots.lane_buffer(0).is_pinned() and plugin.writer._kv.is_pinned()
        first = next(i for i, r in enumerate(reports) if any(r.frames))
        assert all(torch.equal(a, b) for a, b in zip(bare[:first], outputs[:first]))
        n, cap = model.cfg.tokens_per_frame, plugin.memory_frames
        report = reports[-1]
        for layer, cache in enumerate(state.kv):
            m = len(report.selection.layer_ids[layer])
            for slot in range(cap - m, cap):  # active frames are right-aligned in the memory region
                e = plugin.slots.tables[layer][slot]
                want = torch.from_numpy(np.array(memory.fetch(plugin.config.stream, [e], [layer]).kv[0, 0]))
                tokens = slice(slot * n, (slot + 1) * n)
                got = torch.stack([cache["k_full"][0, tokens], cache["v_full"][0, tokens]])
                assert torch.equal(got.cpu(), want)
        stats = plugin.stats()
        plugin.close()
        assert stats.fallbacks == 0 and stats.frames_loaded > 0 and stats.frames_staged > 0
        assert stats.pinned_bytes <= plugin.config.pinned_bytes
        assert plugin.pinned.used == 0  # close gave every pinned byte back


def test_attention_on_a_side_stream_waits_for_the_slot_copies(cuda_model, tmp_path):
    ref_out, ref_reports, ref_bank = reference_run(cuda_model, tmp_path)
    side = torch.cuda.Stream()
    with LocalMemory(str(tmp_path / "side")) as memory:
        plugin = make_plugin(memory, cuda_model)
        outputs, reports, _ = stream_script(cuda_model, plugin, SCRIPT, side=side, slow_copies=True)
        banked = bank_kv(memory, plugin)
        attention_streams = len(plugin.fence._streams)
        plugin.close()
    assert any(any(r.frames) for r in reports)
    assert [selected_frames(r) for r in reports] == [selected_frames(r) for r in ref_reports]
    assert all(torch.equal(a, b) for a, b in zip(ref_out, outputs))  # no attention read a slot early
    assert banked.keys() == ref_bank.keys()
    assert all(np.array_equal(banked[f].view(np.uint8), ref_bank[f].view(np.uint8)) for f in banked)  # nor a roll
    assert attention_streams == 1  # one event per attention stream, made once


def test_relative_rope_rotates_the_slots_only_after_their_copies(tmp_path):
    """The relative model rotates [memory | sink | window] itself before cache_attention: that read of the slots
    waits for the plugin's copies too (held back here on the copy stream)."""
    model = ReferenceDiT(tiny(rope_mode="relative"), device="cuda")
    ref_out, ref_reports, _ = reference_run(model, tmp_path)
    with LocalMemory(str(tmp_path / "slow")) as memory:
        plugin = make_plugin(memory, model)
        outputs, reports, _ = stream_script(model, plugin, SCRIPT, side=torch.cuda.Stream(), slow_copies=True)
        plugin.close()
    assert any(any(r.frames) for r in reports)
    assert [selected_frames(r) for r in reports] == [selected_frames(r) for r in ref_reports]
    assert all(torch.equal(a, b) for a, b in zip(ref_out, outputs))


def test_a_chunk_memory_is_refused_after_the_next_before_chunk(cuda_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, cuda_model)
        state = cuda_model.new_state(memory_frames=plugin.memory_frames)
        old = plugin.before_chunk(0, FOX, state.kv)
        plugin.before_chunk(0, FOX, state.kv)
        with pytest.raises(RuntimeError, match="earlier chunk"):
            cuda_model.generate_chunk(state, 0, FOX, old)
        plugin.close()


def test_a_batchs_memory_waits_for_every_samples_copies(cuda_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as memory:
        config = MemFlowConfig(stream="wait-batch", deadline_s=30.0)
        batch = MemFlowBatch(memory, config, SelfForcingAdapter.for_reference(cuda_model), 2)
        state = cuda_model.new_state(batch=2, memory_frames=batch.memory_frames)
        memory_now = batch.before_chunk(0, FOX, state.kv)
        assert memory_now.fence is not None  # each sample's fence, behind one object
        memory_now.wait(torch.cuda.Stream())  # a reader of the slots outside cache_attention (ChunkMemory.wait)
        cuda_model.generate_chunk(state, 0, FOX, memory_now)
        batch.close()


def test_a_second_device(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU (cuda:1)")
    model = ReferenceDiT(tiny(), device="cuda:1")
    assert torch.cuda.current_device() == 0  # hooks run with another device current
    runs = []
    for name, current in (("a", 0), ("b", 1)):
        with torch.cuda.device(current), LocalMemory(str(tmp_path / name)) as memory:
            plugin = make_plugin(memory, model)
            assert plugin.fence.device == torch.device("cuda", 1)
            outputs, reports, state = stream_script(model, plugin, SCRIPT, slow_copies=True)
            torch.cuda.synchronize(1)
            assert all(r.fallback is None for r in reports) and any(any(r.frames) for r in reports)
            n, layer = model.cfg.tokens_per_frame, 0
            slot = plugin.memory_frames - 1
            e = plugin.slots.tables[layer][slot]
            want = np.array(memory.fetch(plugin.config.stream, [e], [layer]).kv[0, 0, 0])
            assert torch.equal(state.kv[layer]["k_full"][0, slot * n:(slot + 1) * n].cpu(), torch.from_numpy(want))
            runs.append(outputs)
            plugin.close()
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_later_stage_waits_for_the_copies_reading_its_lane(cuda_model, tmp_path):
    """The race: lane 0's copies are held back on the copy stream; two stages later lane 0 is filled again.
    If that stage did not wait for the copies, they would carry the new bytes into the slots."""
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, cuda_model, record_interval=1)
        _, _, state = stream_script(cuda_model, plugin, SCRIPT)
        ids = [e.entry_id for e in memory.entries(plugin.config.stream)]
        frames = {e.entry_id: e.frame_index for e in memory.entries(plugin.config.stream)}
        plugin.close()
        layers = cuda_model.cfg.layers
        slots = MemorySlots(cuda_model.layout, 3, budget=PinnedBudget(1 << 30))
        slots.bind(state.kv, plugin.adapter)
        fetch = lambda i, ls: memory.fetch(plugin.config.stream, list(i), list(ls)).kv  # noqa: E731

        def plan(entry):
            return slots.plan(Selection(tuple((entry,) for _ in range(layers)), ((entry, frames[entry]),)))

        a = slots.stage(plan(ids[0]), fetch)
        delay(slots.fence.stream, 20 * DELAY)  # far longer than the two stages below take
        slots.commit(a, plugin.adapter)  # its copies wait behind the delay, reading lane 0
        slots.stage(plan(ids[1]), fetch)  # lane 1
        slots.stage(plan(ids[2]), fetch)  # lane 0 again: must wait for a's copies first
        torch.cuda.synchronize()
        assert slots.staging_stats().lane_waits >= 1
        want = np.array(fetch([ids[0]], list(range(layers))))[0]  # [L, 2, N, H, D]
        n = cuda_model.cfg.tokens_per_frame
        for layer, cache in enumerate(state.kv):
            got = cache["k_full"][0, 2 * n:3 * n].cpu()
            assert torch.equal(got, torch.from_numpy(want[layer, 0]))
        slots.close()


def test_prefetch_under_slow_memory_gives_the_same_video(cuda_model, tmp_path):
    ref_out, _, _ = reference_run(cuda_model, tmp_path)
    with LocalMemory(str(tmp_path / "slow")) as inner:
        memory = Flaky(inner)
        memory.mode, memory.delay = "slow", 0.02
        plugin = make_plugin(memory, cuda_model, prefetch=True)
        outputs, reports, _ = stream_script(cuda_model, plugin, SCRIPT, slow_copies=True)
        stats = plugin.stats()
        plugin.close()
    assert stats.prefetch_hits > 0 and stats.fallbacks == 0
    assert all(torch.equal(a, b) for a, b in zip(ref_out, outputs))


def test_pageable_copies_past_the_pinned_budget_give_the_same_video(cuda_model, tmp_path):
    """No pinned budget: write-back, load staging and arenas all pageable. Slot loads are still issued on the copy
    stream without a host sync (the lane holds their sources until its event): the delayed copy stream must
    still be waited for by attention, and the results match the pinned run bit for bit."""
    ref_out, _, ref_bank = reference_run(cuda_model, tmp_path)
    with LocalMemory(str(tmp_path / "pageable")) as memory:
        plugin = make_plugin(memory, cuda_model, pinned_bytes=0)
        outputs, reports, _ = stream_script(cuda_model, plugin, SCRIPT, slow_copies=True)
        stats = plugin.stats()
        bank = bank_kv(memory, plugin)
        plugin.close()
    assert stats.fallbacks == 0 and stats.frames_pageable > 0 and stats.frames_staged == 0
    assert stats.pinned_bytes == 0
    assert all(torch.equal(a, b) for a, b in zip(ref_out, outputs))
    assert bank.keys() == ref_bank.keys() and all(np.array_equal(bank[f], ref_bank[f]) for f in bank)


def test_unrotated_keys_are_rotated_in_place_in_the_slots(cuda_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, cuda_model, store_rotated=False)
        _, reports, state = stream_script(cuda_model, plugin, SCRIPT, slow_copies=True)
        report = reports[-1]
        frames = dict(report.selection.frames)
        n, cap = cuda_model.cfg.tokens_per_frame, plugin.memory_frames
        checked = 0
        for layer, cache in enumerate(state.kv):
            for slot in range(cap - len(report.selection.layer_ids[layer]), cap):
                e = plugin.slots.tables[layer][slot]
                stored = torch.from_numpy(np.array(memory.fetch(plugin.config.stream, [e], [layer]).kv[0, 0, 0]))
                want = cuda_model.rope.rotate(stored.cuda(), frames[e])  # the allocating path, independently
                assert torch.equal(cache["k_full"][0, slot * n:(slot + 1) * n], want)
                checked += 1
        plugin.close()
    assert checked > 0 and plugin.stats().fallbacks == 0


def test_sma_attends_through_the_fence(cuda_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, cuda_model, sma=True, sma_k=2)
        outputs, reports, state = stream_script(cuda_model, plugin, SCRIPT, slow_copies=True)
        assert all(r.fallback is None for r in reports) and any(any(r.frames) for r in reports)
        assert all(torch.isfinite(o.float()).all() for o in outputs)
        # the same SMA attention on CPU copies of the same cache
        memory_now = plugin.before_chunk(len(SCRIPT), FOX, state.kv)
        q = torch.randn(1, 48, 4, 32, device="cuda")
        end = state.kv[0]["local_end_index"].item()
        got = cache_attention(q, state.kv[0], end, 16, 3, memory_now, 0)
        memory_now.wait()  # this test reads the slots itself, outside cache_attention
        cpu_cache = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state.kv[0].items()}
        torch.cuda.synchronize()
        want = cache_attention(q.cpu(), cpu_cache, end, 16, 3, ChunkMemory(memory_now.frames, 2), 0)
        assert torch.allclose(got.cpu(), want, atol=1e-4)
        plugin.close()


def test_memory_client_over_shm_copies_from_the_registered_arena(cuda_model, tmp_path):
    ref_out, ref_reports, _ = reference_run(cuda_model, tmp_path)
    with MemoryClient(shared_service(), plane="shm") as client:
        plugin = make_plugin(client, cuda_model)
        outputs, reports, _ = stream_script(cuda_model, plugin, SCRIPT, slow_copies=True)
        stats = plugin.stats()
        registered = plugin.pins.registered
        plugin.close()
    assert registered >= 1 and stats.frames_direct > 0 and stats.frames_staged == 0 and stats.frames_pageable == 0
    assert stats.pinned_bytes >= client.arena_bytes
    assert [selected_frames(r) for r in reports] == [selected_frames(r) for r in ref_reports]
    assert all(torch.equal(a, b) for a, b in zip(ref_out, outputs))


def test_a_batch_over_shm_registers_the_arena_once_and_copies_every_sample_from_it(cuda_model):
    """Each sample's plugin used to register the client's arena itself: CUDA refused the second registration, so
    only sample 0 copied from the arena. Now the samples share one ArenaPins (and one pinned budget)."""
    config = MemFlowConfig(stream="shm-batch", deadline_s=30.0, prefetch=False, record_interval=1)
    with MemoryClient(shared_service(), plane="shm") as client:
        batch = MemFlowBatch(client, config.replace(on_existing="replace"), SelfForcingAdapter.for_reference(cuda_model), 2)
        state = cuda_model.new_state(batch=2, memory_frames=batch.memory_frames)
        for i, prompt in enumerate(SCRIPT[:12]):
            memory = batch.before_chunk(i, prompt, state.kv)
            cuda_model.generate_chunk(state, i, prompt, memory)
            batch.after_chunk(i, state.kv)
            batch.flush(60.0)
        torch.cuda.synchronize()
        pins = batch.plugins[0].pins
        stats = batch.stats()
        assert all(p.pins is pins for p in batch.plugins) and pins.registered >= 1 and pins.refused == 0
        assert all(s.frames_direct > 0 for s in stats), stats  # sample 1 too: it reads the arena sample 0 pinned
        assert all(p.pinned is batch.pinned for p in batch.plugins)
        unregistered = pins.unregistered  # arenas the client let go during the run were swept: counted here
        batch.plugins[0].close()
        batch.plugins[0].close()  # a second close gives nothing back twice: the other sample still holds the pins
        assert not pins._closed and pins.unregistered == unregistered and pins.pinned_bytes > 0
        batch.close()
        assert pins._closed and pins.pinned_bytes == 0 and batch.pinned.used == 0


def test_the_diffusers_driver_on_cuda_with_attention_on_a_side_stream(tmp_path):
    pytest.importorskip("diffusers")
    from plugin.adapters.diffusers_wan import WanAdapter, WanStreamingDriver, hash_text_encoder, tiny_model
    from plugin.config import MemFlowConfig
    from plugin.hook import MemFlowPlugin

    model = tiny_model().to("cuda")
    driver = WanStreamingDriver(model, hash_text_encoder(model.config.text_dim), height=8, width=8,
                                frames_per_chunk=2, sink_frames=2, window_frames=4)
    prompts = [FOX] * 4 + [WHALE] * 4 + [FOX] * 3
    runs = []
    for name, side in (("default", None), ("side", torch.cuda.Stream())):
        for store_rotated in (True, False):
            with LocalMemory(str(tmp_path / f"{name}{store_rotated}")) as memory:
                plugin = MemFlowPlugin(memory, MemFlowConfig(stream="wan", deadline_s=30.0, record_interval=1),
                                       WanAdapter(driver, store_rotated))
                state = driver.new_state(memory_frames=plugin.memory_frames)
                if side is not None:
                    side.wait_stream(torch.cuda.current_stream())
                outputs = []
                for i, prompt in enumerate(prompts):
                    delay(plugin.fence.stream)
                    mem = plugin.before_chunk(i, prompt, state.kv)
                    assert plugin.last_report.fallback is None
                    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                        outputs.append(driver.generate_chunk(state, i, prompt, mem))
                    delay(plugin.fence.stream)
                    plugin.after_chunk(i, state.kv)
                torch.cuda.synchronize()
                assert plugin.stats().frames_loaded > 0
                plugin.close()
                runs.append(outputs)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))  # rotated: default vs side stream
    assert all(torch.equal(a, b) for a, b in zip(runs[1], runs[3]))  # unrotated


def test_wan_1_3b_shape_streams_with_memory(tmp_path):
    model = ReferenceDiT(wan_1_3b_shape(), device="cuda")
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, model, record_interval=1, write_queue=2, deadline_s=60.0)
        run = Run(model, plugin).script([FOX] * 5)
        torch.cuda.synchronize()
        plugin.flush(60.0)
        stats = plugin.stats()
        plugin.close()
        assert run.reports[4].frames == (1,) * 30 and run.reports[4].fallback is None  # frame 3 left the window
        assert all(torch.isfinite(o.float()).all() for o in run.outputs)
        assert run.outputs[0].shape == (1, 3, 1560, 16) and run.outputs[0].dtype == torch.bfloat16
        entries = memory.entries(plugin.config.stream)
        assert [e.frame_index for e in entries] == [3, 6, 9, 12] and entries[0].nbytes == 287_539_200
        assert 0 < stats.pinned_bytes <= plugin.config.pinned_bytes
