"""The reference generator: deterministic, Wan-shaped RoPE, Self-Forcing cache bookkeeping, tied text keys."""

import math

import pytest
import torch

from plugin import SelfForcingAdapter
from plugin.reference_model import HashTokenizer, ReferenceDiT, tiny, wan_1_3b_shape
from plugin.rope import Rope3D
from plugin_helpers import CITY, FOX, WHALE, Run, brute_force_rope, tiny_model  # noqa: F401 - fixture


def test_same_seed_same_video_other_seed_other_video(tiny_model):
    a = Run(tiny_model).script([FOX] * 4 + [WHALE] * 2).outputs
    b = Run(tiny_model).script([FOX] * 4 + [WHALE] * 2).outputs
    c = Run(ReferenceDiT(tiny(seed=1))).script([FOX] * 4 + [WHALE] * 2).outputs
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[-1], c[-1])
    assert a[0].shape == (1, 3, 16, 4) and torch.isfinite(torch.stack(a)).all()


def test_tokenizer_is_stable_and_pads_with_zero():
    tok = HashTokenizer(vocab=4096, length=8)
    ids = tok("A red fox, a RED fox!")
    assert ids.tolist()[:6] == tok("a red fox a red fox").tolist()[:6]
    assert ids[0] == ids[3] and ids[1] == ids[4] and ids[0] != ids[1]
    assert ids.tolist()[6:] == [0, 0] and all(0 < i < 4096 for i in ids.tolist()[:6])


def test_rope_matches_the_wan_formula_and_inverts():
    rope = Rope3D(head_dim=32, grid_h=4, grid_w=4, max_frames=64)
    x = torch.randn(16, 4, 32)
    for frame in (0, 5, 37):
        got = rope.rotate(x, frame)
        assert torch.allclose(got.double(), brute_force_rope(x, frame, 4), atol=1e-5)
        assert torch.allclose(rope.rotate(got, frame, inverse=True), x, atol=1e-5)
    with pytest.raises(ValueError, match=r"outside the table of 64 frames"):
        rope.rotate(x, 64)


def test_cache_rolls_keeping_sink_and_window(tiny_model):
    cfg = tiny_model.cfg
    run = Run(tiny_model)
    adapter = SelfForcingAdapter.for_reference(tiny_model)
    captured = {}
    for i in range(8):
        run.chunk(i, FOX if i < 4 else CITY)
        first = i * cfg.frames_per_chunk
        for f in range(first, first + cfg.frames_per_chunk):
            captured[f] = torch.stack([torch.stack(kv) for kv in adapter.frame_kv(run.state.kv, f)]).clone()
    kv = run.state.kv
    n = cfg.tokens_per_frame
    assert int(kv[0]["global_end_index"]) == 8 * 3 * n
    assert int(kv[0]["local_end_index"]) == (cfg.sink_frames + cfg.window_frames) * n
    lo, hi = adapter.layout.window(7)
    assert (lo, hi) == (15, 24)
    for f in list(range(cfg.sink_frames)) + list(range(lo, hi)):
        now = torch.stack([torch.stack(v) for v in adapter.frame_kv(kv, f)])
        assert torch.equal(now, captured[f]), f"frame {f} changed after rolling"
    with pytest.raises(ValueError, match="frame 14 is not resident"):
        adapter.frame_kv(kv, 14)
    with pytest.raises(ValueError, match="frame 24 is not resident"):
        adapter.frame_kv(kv, 24)


def test_chunks_come_in_order(tiny_model):
    state = tiny_model.new_state()
    tiny_model.generate_chunk(state, 0, FOX)
    with pytest.raises(ValueError, match="chunk 2 requested, this stream is at chunk 1"):
        tiny_model.generate_chunk(state, 2, FOX)


def test_text_keys_are_the_cross_attention_cache_with_tied_projection(tiny_model):
    run = Run(tiny_model)
    run.chunk(0, WHALE)
    keys = tiny_model.text_keys(WHALE)  # [L, T, H, D]
    words = len(tiny_model.tokenizer.words(WHALE))
    assert keys.shape == (4, 16, 4, 32)
    for layer, cross in enumerate(run.state.cross):
        assert torch.equal(cross["k"][0], keys[layer])
        blk = tiny_model.blocks[layer]
        context = tiny_model.word_emb(tiny_model.tokenizer(WHALE))
        assert torch.allclose(keys[layer].flatten(1), blk.norm_k(blk.k(context)), atol=1e-6)
    assert torch.count_nonzero(keys[:, words:]) == 0  # padding keys are zero: the NAM mean is all words


def test_wan_shape_config_matches_wan_1_3b():
    cfg = wan_1_3b_shape()
    assert (cfg.layers, cfg.heads, cfg.head_dim, cfg.dim) == (30, 12, 128, 1536)
    assert (cfg.tokens_per_frame, cfg.frames_per_chunk, cfg.sink_frames, cfg.window_frames) == (1560, 3, 3, 9)
    assert cfg.dtype == "bfloat16"
    kv_bytes = 2 * cfg.tokens_per_frame * cfg.dim * 2 * cfg.layers
    assert math.isclose(kv_bytes / 1e6, 287.5, rel_tol=1e-3)  # K+V of one frame over all layers
    assert (cfg.sink_frames + 3 + cfg.window_frames) * cfg.tokens_per_frame == 23_400  # keys per chunk
