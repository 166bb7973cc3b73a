"""The plugin on diffusers' WanTransformer3DModel (tiny random-weight config, CPU, no download).

Ground truths are independent of the driver: diffusers' own forward with its own processors (stock, or stock
with an explicit block-causal sink + window mask), `plugin.rope.Rope3D` for positions, and K/V read from the
cache while a frame was still resident for what memory slots must hold.
"""

import copy
import tomllib

import diffusers
import pytest
import torch

from plugin import MemFlowConfig, MemFlowPlugin
from plugin.adapters.diffusers_wan import (
    DIFFUSERS_VERSION, WanAdapter, WanStreamingDriver, hash_text_encoder, tiny_model,
)
from plugin.adapters.self_forcing import commit_chunk, make_room
from plugin.rope import Rope3D
from plugin_helpers import REPO, local_memory  # noqa: F401 - fixture

FOX = "red fox runs through deep snow near pine forest"  # no word shared between scenes
WHALE = "blue whale swims slowly in the dark ocean"
CITY = "busy city street at night with neon signs and rain"
H = W = 8  # latent frame; patch 2x2 -> 16 tokens per frame
LAYOUT = dict(frames_per_chunk=2, sink_frames=2, window_frames=4)
SCRIPT = [FOX] * 4 + [WHALE] * 4 + [FOX] * 3
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]


def make_driver(model=None, device="cpu", **kw):
    model = (tiny_model() if model is None else model).to(device)
    return WanStreamingDriver(model, hash_text_encoder(model.config.text_dim), height=H, width=W,
                              **{**LAYOUT, **kw})


def stream(driver, prompts, plugin=None):
    """Generate `prompts` chunk by chunk; returns outputs, plugin reports and each recorded frame's K/V."""
    state = driver.new_state(memory_frames=plugin.memory_frames if plugin else 0)
    outputs, reports, recorded = [], [], {}
    for i, prompt in enumerate(prompts):
        memory = plugin.before_chunk(i, prompt, state.kv) if plugin else None
        if plugin:
            reports.append(plugin.last_report)
        outputs.append(driver.generate_chunk(state, i, prompt, memory))
        first = i * driver.layout.frames_per_chunk
        if plugin and first >= driver.layout.sink_frames:
            views = plugin.adapter.frame_kv(state.kv, first)  # [L] x (K, V) `[N, H, D]`
            recorded[first] = torch.stack([torch.stack([k, v]) for k, v in views]).clone()
        if plugin:
            plugin.after_chunk(i, state.kv)
    return outputs, reports, recorded


def wan_plugin(memory, driver, store_rotated=True, **config):
    config = {"deadline_s": 30.0, "stream": "wan", "record_interval": 1, **config}
    return MemFlowPlugin(memory, MemFlowConfig(**config), WanAdapter(driver, store_rotated))


def test_installed_diffusers_is_the_pinned_version():
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["wan"]
    assert f"diffusers=={DIFFUSERS_VERSION}" in pins, pins
    assert diffusers.__version__ == DIFFUSERS_VERSION, (
        f"diffusers {diffusers.__version__} is installed, the Wan adapter is pinned to {DIFFUSERS_VERSION}")


def test_rope_positions_equal_plugin_rope_and_start_where_diffusers_does():
    driver = make_driver()
    cfg = driver.model.config
    rope = Rope3D(cfg.attention_head_dim, H // 2, W // 2, cfg.rope_max_seq_len)
    x = torch.randn(2 * 16, cfg.num_attention_heads, cfg.attention_head_dim)  # two frames
    for frame in (0, 1, 7, 500, 1022):
        got = driver.rotate(x, frame)
        assert torch.allclose(got, rope.rotate(x, frame), atol=1e-5), frame
        assert torch.allclose(driver.rotate(got, frame, inverse=True), x, atol=1e-5)
    stock_cos, stock_sin = driver.model.rope(torch.zeros(1, cfg.in_channels, 5, H, W))  # frames 0..4
    cos, sin = driver.rope_tables(0, 5)
    assert torch.equal(cos, stock_cos) and torch.equal(sin, stock_sin)
    later_cos, _ = driver.rope_tables(3, 2)  # absolute frames 3, 4 are the stock table's rows for them
    assert torch.equal(later_cos, stock_cos[:, 3 * 16:])


def test_chunk_zero_is_the_stock_forward_and_close_restores_diffusers():
    model = tiny_model()
    stock = copy.deepcopy(model)
    driver = make_driver(model)
    with pytest.raises(ValueError, match="already serves a WanStreamingDriver"):
        make_driver(model)
    encode = driver.encode_prompt
    state = driver.new_state()
    x = torch.randn(1, 4, 2, H, W)
    for t in (1000.0, 500.0, 0.0):  # every pass of chunk 0 sees only its own K/V, rewritten each time
        got = driver.forward(state, 0, x, t, FOX)
        assert torch.equal(got, stock(x, torch.full((1,), t), encode(FOX), return_dict=False)[0]), t
    # the whole Self-Forcing schedule of chunk 0, written out with the stock model
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn((1, 4, 2, H, W), generator=g)
    steps = driver.timesteps
    for i, t in enumerate(steps):
        x0 = noisy - t / 1000 * stock(noisy, torch.full((1,), t), encode(FOX), return_dict=False)[0]
        if i + 1 < len(steps):
            noisy = (1 - steps[i + 1] / 1000) * x0 + steps[i + 1] / 1000 * torch.randn(noisy.shape, generator=g)
    assert torch.equal(driver.generate_chunk(driver.new_state(), 0, FOX), x0)
    driver.close()
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
    make_driver(model).close()  # a closed driver's model takes a new one


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_with_evictions_equals_the_masked_full_sequence_forward(device):
    model = tiny_model(num_layers=3).to(device)
    full_model = copy.deepcopy(model)
    driver = make_driver(model)
    lay, n, chunks = driver.layout, driver.layout.tokens_per_frame, 6  # the window rolls from chunk 3 on
    torch.manual_seed(1)
    clean = torch.randn(1, 4, chunks * 2, H, W).to(device)
    state, streamed = driver.new_state(), []
    for c in range(chunks):
        state.write_start = make_room(state.kv, lay)
        x = clean[:, :, 2 * c:2 * c + 2]
        driver.forward(state, c, torch.randn_like(x), 750.0, FOX)  # a denoising pass: overwritten, not committed
        streamed.append(driver.forward(state, c, x, 0.0, FOX))
        commit_chunk(state.kv, state.write_start, lay)
    # frame of each token; query frame qf sees key frame kf iff kf is a sink frame or in qf's chunk's window
    frame = torch.arange(chunks * 2 * n) // n
    chunk_end = (frame // 2 + 1) * 2
    lo = torch.clamp(chunk_end - lay.window_frames, min=lay.sink_frames)
    kf = frame[None, :]
    visible = (kf < chunk_end[:, None]) & ((kf < lay.sink_frames) | (kf >= lo[:, None]))  # [S, S]
    assert not visible[-1, 2 * n:6 * n].any()  # evicted frames really are masked out for the last chunk
    visible = visible.to(device)

    def masked(processor):
        return lambda attn, h, enc=None, mask=None, rotary=None, **kw: processor(attn, h, enc, visible, rotary)

    for block in full_model.blocks:
        block.attn1.set_processor(masked(block.attn1.processor))
    text, t0 = driver.text_embedding(FOX), torch.zeros(1, device=device)
    full = full_model(clean, t0, text, return_dict=False)[0]
    tol = 2e-5 if device == "cpu" else 2e-4  # GPU kernels reduce in another order
    for c, out in enumerate(streamed):
        assert torch.allclose(out, full[:, :, 2 * c:2 * c + 2], atol=tol, rtol=1e-4), c
    unmasked = model(clean, t0, text, return_dict=False)[0]  # the stock processors, outside the driver
    assert not torch.allclose(streamed[-1], unmasked[:, :, -2:], atol=1e-3)  # the driver: all frames attend all


def test_plugin_off_and_empty_bank_are_the_bare_driver_bit_for_bit(local_memory):
    driver = make_driver()
    bare = stream(driver, SCRIPT)[0]
    off = wan_plugin(local_memory, driver, enabled=False, stream="off")
    assert off.memory_frames == 0
    assert all(torch.equal(a, b) for a, b in zip(bare, stream(driver, SCRIPT, off)[0]))
    off.close()
    assert local_memory.list_streams() == []
    empty = wan_plugin(local_memory, driver, record_interval=1000)  # chunk 0 is the sink: nothing recorded
    outputs, reports, _ = stream(driver, SCRIPT, empty)
    empty.close()
    assert all(torch.equal(a, b) for a, b in zip(bare, outputs))
    assert all(r.fallback is None and not any(r.frames) for r in reports)
    assert empty.stats().retrievals == len(SCRIPT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("store_rotated", [True, False])
def test_memory_run_loads_and_attends_frames(local_memory, store_rotated, device):
    driver = make_driver(device=device)
    bare = stream(driver, SCRIPT)[0]
    plugin = wan_plugin(local_memory, driver, store_rotated)
    state = driver.new_state(memory_frames=plugin.memory_frames)
    outputs, recorded = [], {}
    for i, prompt in enumerate(SCRIPT):
        memory = plugin.before_chunk(i, prompt, state.kv)
        memory.wait()  # on CUDA the slot copies run on the plugin's stream: this test reads the slots itself
        report = plugin.last_report
        assert report.fallback is None, report.fallback
        if any(report.frames):  # the slots hold exactly the frames the cache held (rotated at their frame)
            frames = dict(report.selection.frames)
            for layer, (k_region, v_region) in enumerate(plugin.adapter.memory_region(state.kv)):
                for slot, entry in enumerate(plugin.slots.tables[layer][-report.frames[layer]:]):
                    j = plugin.memory_frames - report.frames[layer] + slot
                    want = recorded[frames[entry]][layer]  # [2, N, H, D]
                    got = k_region[j * 16:(j + 1) * 16]  # banked as cached, or unrotated and rotated back
                    assert torch.equal(got, want[0]) if store_rotated else torch.allclose(got, want[0], atol=1e-5)
                    assert torch.equal(v_region[j * 16:(j + 1) * 16], want[1])
        outputs.append(driver.generate_chunk(state, i, prompt, memory))
        if i:
            recorded[2 * i] = torch.stack([torch.stack([k, v]) for k, v in plugin.adapter.frame_kv(state.kv, 2 * i)]
                                          ).clone()
        plugin.after_chunk(i, state.kv)
    plugin.close()
    stats = plugin.stats()
    first = next(i for i, o in enumerate(outputs) if not torch.equal(o, bare[i]))
    assert first == 3  # frame 2 (chunk 1's record) leaves the 4-frame window when chunk 3 starts
    assert stats.frames_loaded > 0 and stats.fallbacks == 0 and stats.writes_written == len(SCRIPT) - 1
    assert plugin.last_report.frames == (3,) * driver.layout.layers


def tie_prompt_into_frames(model, gain=1000.0):
    """Make the prompt visible in every frame's keys, as the reference model does: the cross-attention adds
    the mean of the prompt's text context to the residual stream (zero query: uniform attention; identity
    value and output projections), and attn2's key projection and key norm are attn1's (no bias, zero text
    projection bias: padding keys are 0). Layer 0's keys come before any cross-attention, so only layers
    1.. carry the prompt; the rest of the weights stay random."""
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    with torch.no_grad():
        proj = model.condition_embedder.text_embedder
        proj.linear_1.bias.zero_()
        proj.linear_2.bias.zero_()
        for block in model.blocks:
            a1, a2 = block.attn1, block.attn2
            a1.to_k.bias.zero_()
            a2.to_k.weight.copy_(a1.to_k.weight)
            a2.to_k.bias.zero_()
            a2.norm_k.weight.copy_(a1.norm_k.weight)
            a2.to_q.weight.zero_()
            a2.to_q.bias.zero_()
            a2.to_v.weight.copy_(torch.eye(dim))
            a2.to_v.bias.zero_()
            a2.to_out[0].weight.copy_(gain * torch.eye(dim))
            a2.to_out[0].bias.zero_()
    return model


def test_a_returning_prompt_retrieves_its_own_scenes_frames(local_memory):
    driver = make_driver(tie_prompt_into_frames(tiny_model(num_layers=3)))
    script = [FOX] * 4 + [WHALE] * 4 + [CITY] * 3 + [FOX] * 3
    keys = driver.text_keys(FOX)  # [L, 512, H, D]: every padded text token, from attn2's key projection
    assert keys.shape == (3, 512, 2, 24) and torch.count_nonzero(keys[:, len(FOX.split()):]) == 0
    plugin = wan_plugin(local_memory, driver)
    _, reports, _ = stream(driver, script, plugin)
    plugin.close()
    for chunk in range(11, 14):
        frames = dict(reports[chunk].selection.frames)
        for layer, ids in enumerate(reports[chunk].selection.layer_ids):
            scored = [frames[e] for e in ids[1:]]  # ids[0] is the newest record, kept regardless of score
            assert len(scored) == 2, (chunk, layer, ids)
            if layer:
                assert all(script[f // 2] == FOX for f in scored), (chunk, layer, scored)
    frames = dict(reports[7].selection.frames)  # whale scene, its record of frame 8 just out of the window
    for layer, ids in list(enumerate(reports[7].selection.layer_ids))[1:]:
        assert frames[ids[0]] == 10 and frames[ids[1]] == 8, (layer, [frames[e] for e in ids])


def test_a_temporal_patch_other_than_one_is_refused():
    with pytest.raises(ValueError, match=r"temporal patch is 2 .*needs 1"):
        make_driver(tiny_model(patch_size=(2, 2, 2)))


def test_frames_past_the_rotary_table_are_refused():
    driver = make_driver(tiny_model(rope_max_seq_len=8))
    state = driver.new_state()
    for i in range(4):  # frames 0..7 fit the 8-frame table
        driver.generate_chunk(state, i, FOX)
    with pytest.raises(ValueError, match=r"frames \[8, 10\) are past the model's rotary table of 8 frames"):
        driver.generate_chunk(state, 4, FOX)
    with pytest.raises(ValueError, match="past the model's rotary table"):
        driver.rotate(torch.zeros(16, 2, 24), 8)
    with pytest.raises(ValueError, match="chunk 5 requested, this stream is at chunk 4"):
        driver.generate_chunk(state, 5, FOX)
