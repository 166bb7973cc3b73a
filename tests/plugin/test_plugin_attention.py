"""Attention with memory equals naive dense attention over an explicit [sink | memory | window] (fp32).

The naive side rebuilds every key from independent sources: sink and window from the Self-Forcing cache,
memory frames straight from the bank (fetch), rotated by an independent RoPE when the bank holds them
unrotated; so a wrong slot, a wrong frame, a missed rotation or a wrong position fails the comparison.
"""

import math

import numpy as np
import pytest
import torch

from plugin.attention import AttentionWorkspace, ChunkMemory, cache_attention
from plugin_helpers import (  # noqa: F401 - fixtures
    FOX, WHALE, Run, brute_force_rope, local_memory, make_plugin, memory_backend, tiny_model,
)

SCRIPT = [FOX] * 6 + [WHALE] * 4 + [FOX] * 3


def naive_attention(q, keys, values):
    """softmax(q k^T / sqrt(D)) v per head, float64: q `[S, H, D]`, keys/values `[T, H, D]`."""
    q, keys, values = q.double(), keys.double(), values.double()
    scores = torch.einsum("shd,thd->hst", q, keys) / math.sqrt(q.shape[-1])
    return torch.einsum("hst,thd->shd", scores.softmax(-1), values)


def memory_frames_from_bank(memory, plugin, layer, ids, grid_w):
    fetched = memory.fetch(plugin.config.stream, list(ids), [layer]).kv  # [n, 1, 2, N, H, D]
    frames = dict(plugin.last_report.selection.frames)
    ks, vs = [], []
    for i, e in enumerate(ids):
        k = torch.from_numpy(np.array(fetched[i, 0, 0]))
        if not plugin.adapter.store_rotated:
            k = brute_force_rope(k, frames[e], grid_w).float()
        ks.append(k)
        vs.append(torch.from_numpy(np.array(fetched[i, 0, 1])))
    return ks, vs


def setup_chunk(model, memory, store_rotated):
    plugin = make_plugin(memory, model, store_rotated=store_rotated)
    run = Run(model, plugin).script(SCRIPT)
    index = len(SCRIPT)
    mem = plugin.before_chunk(index, FOX, run.state.kv)
    assert all(m == 3 for m in mem.frames), mem.frames
    return plugin, run, mem


def test_dense_attention_equals_naive_concatenation(tiny_model, memory_backend):
    check_dense_attention(tiny_model, memory_backend.memory, store_rotated=True)


def test_dense_attention_with_keys_stored_unrotated(tiny_model, local_memory):
    check_dense_attention(tiny_model, local_memory, store_rotated=False)


def check_dense_attention(tiny_model, memory, store_rotated):
    cfg = tiny_model.cfg
    plugin, run, mem = setup_chunk(tiny_model, memory, store_rotated)
    n, sink = cfg.tokens_per_frame, cfg.sink_frames
    torch.manual_seed(0)
    for layer, cache in enumerate(run.state.kv):
        end = int(cache["local_end_index"])
        q = torch.randn(1, 2 * n, cfg.heads, cfg.head_dim)
        got = cache_attention(q, cache, end, n, sink, mem, layer)[0]
        ids = plugin.last_report.selection.layer_ids[layer]
        mem_k, mem_v = memory_frames_from_bank(memory, plugin, layer, ids, cfg.grid_w)
        keys = torch.cat([cache["k"][0, :sink * n], *mem_k, cache["k"][0, sink * n:end]])
        values = torch.cat([cache["v"][0, :sink * n], *mem_v, cache["v"][0, sink * n:end]])
        assert keys.shape[0] == (sink + 3) * n + (end - sink * n)
        assert torch.allclose(got.double(), naive_attention(q[0], keys, values), atol=1e-5, rtol=1e-5)
        for e, k in zip(ids, mem_k):  # the bank's frame, at its RoPE position, is the frame the cache held
            frame = dict(plugin.last_report.selection.frames)[e]
            assert torch.allclose(k, run.recorded[frame][layer, 0], atol=1e-5)
    plugin.close()


def test_sma_attends_each_heads_top_frames_of_sink_and_memory(tiny_model, local_memory):
    cfg = tiny_model.cfg
    plugin, run, mem = setup_chunk(tiny_model, local_memory, True)
    n, sink, top = cfg.tokens_per_frame, cfg.sink_frames, 2
    sma = ChunkMemory(mem.frames, sma_k=top, workspace=AttentionWorkspace())
    torch.manual_seed(1)
    for layer, cache in enumerate(run.state.kv):
        end = int(cache["local_end_index"])
        q = torch.randn(1, 3 * n, cfg.heads, cfg.head_dim)
        got = cache_attention(q, cache, end, n, sink, sma, layer)[0]
        ids = plugin.last_report.selection.layer_ids[layer]
        mem_k, mem_v = memory_frames_from_bank(local_memory, plugin, layer, ids, cfg.grid_w)
        frames_k = [cache["k"][0, f * n:(f + 1) * n] for f in range(sink)] + mem_k
        frames_v = [cache["v"][0, f * n:(f + 1) * n] for f in range(sink)] + mem_v
        window_k, window_v = cache["k"][0, sink * n:end], cache["v"][0, sink * n:end]
        for h in range(cfg.heads):
            q_mean = q[0, :, h].double().mean(0)
            scores = torch.stack([q_mean @ k[:, h].double().mean(0) for k in frames_k])
            chosen = scores.topk(top).indices.tolist()
            keys = torch.cat([frames_k[i] for i in chosen] + [window_k])[:, h:h + 1]
            values = torch.cat([frames_v[i] for i in chosen] + [window_v])[:, h:h + 1]
            want = naive_attention(q[0, :, h:h + 1], keys, values)
            assert torch.allclose(got[:, h:h + 1].double(), want, atol=1e-5, rtol=1e-5), (layer, h)
        dense = cache_attention(q, cache, end, n, sink, mem, layer)[0]
        assert not torch.allclose(got, dense, atol=1e-4)  # SMA really dropped frames
    plugin.close()


def test_sma_runs_through_the_model(tiny_model, local_memory):
    runs = {}
    for sma in (False, True):
        plugin = make_plugin(local_memory, tiny_model, sma=sma, sma_k=2)
        runs[sma] = Run(tiny_model, plugin).script(SCRIPT)
        plugin.close()
    dense, sparse = runs[False], runs[True]
    assert all(torch.equal(a, b) for a, b in zip(dense.outputs[:6], sparse.outputs[:6]))  # no memory yet
    assert dense.reports[6].selection == sparse.reports[6].selection  # SMA changes attention, not retrieval
    assert not torch.equal(dense.outputs[6], sparse.outputs[6])
    assert all(torch.isfinite(o).all() for o in sparse.outputs)


def test_no_memory_attention_is_the_bare_cache(tiny_model, local_memory):
    cfg = tiny_model.cfg
    plugin, run, _ = setup_chunk(tiny_model, local_memory, True)
    n = cfg.tokens_per_frame
    cache = run.state.kv[0]
    end = int(cache["local_end_index"])
    q = torch.randn(1, n, cfg.heads, cfg.head_dim)
    got = cache_attention(q, cache, end, n, cfg.sink_frames, ChunkMemory(), 0)[0]
    assert torch.allclose(got.double(), naive_attention(q[0], cache["k"][0, :end], cache["v"][0, :end]), atol=1e-5)
    with pytest.raises(ValueError, match="layer 0 asks for 4 memory frames, the cache reserves 3"):
        cache_attention(q, cache, end, n, cfg.sink_frames, ChunkMemory((4, 0, 0, 0)), 0)
    plugin.close()
