"""Attention of the current chunk over [sink | memory | local window], through SDPA.

Owns the per-layer attention a generator runs with the plugin, and `ChunkMemory`, the value `before_chunk`
hands the generator: how many memory frames each layer attends to this chunk. Promises:
- dense path: one `scaled_dot_product_attention` over a contiguous view of the cache (see
  adapters/self_forcing.py for why [memory | sink | window] storage order is [sink | memory | window]
  attention): no copy, no allocation besides SDPA's output; with 0 memory frames the call is the bare
  model's, bit for bit;
- SMA (sparse memory activation, optional): per head, the mean query of the chunk scores the mean key of
  every sink and memory frame; each head attends to its top-k of those frames plus the whole window. Frames
  are gathered into a preallocated `AttentionWorkspace`, reused across layers and chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


class AttentionWorkspace:
    """Gather buffers for SMA, grown on first need and then reused (one per plugin)."""

    def __init__(self) -> None:
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def get(self, b: int, h: int, tokens: int, d: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k
        if k is None or k.shape[0] != b or k.shape[1] != h or k.shape[2] < tokens or k.shape[3] != d \
                or k.dtype != like.dtype or k.device != like.device:
            self.k = torch.empty((b, h, tokens, d), dtype=like.dtype, device=like.device)
            self.v = torch.empty_like(self.k)
        return self.k[:, :, :tokens], self.v[:, :, :tokens]  # [B, H, tokens, D]


@dataclass(frozen=True)
class ChunkMemory:
    """What the generator's attention needs from the plugin for one chunk.

    `frames[layer]` memory frames are active in that layer (right-aligned in the cache's memory region);
    an empty tuple means no memory anywhere (bare attention). `sma_k > 0` turns on SMA.
    """

    frames: tuple[int, ...] = ()
    sma_k: int = 0
    workspace: Optional[AttentionWorkspace] = field(default=None, compare=False, repr=False)

    def layer_frames(self, layer: int) -> int:
        return self.frames[layer] if self.frames else 0

    @property
    def total(self) -> int:
        return sum(self.frames)


NO_MEMORY = ChunkMemory()


def cache_attention(q: torch.Tensor, layer_cache: dict, end: int, tokens_per_frame: int, sink_frames: int,
                    memory: ChunkMemory = NO_MEMORY, layer: int = 0) -> torch.Tensor:
    """Attention of `q` `[B, S, H, D]` (rotated) over one layer's cache up to local token `end`.

    Keys are the `memory.layer_frames(layer)` active memory frames, the sink and the window `[.., end)`
    (the chunk's own keys already written there). Returns `[B, S, H, D]`.
    """
    n = tokens_per_frame
    capacity = layer_cache.get("memory_frames", 0)
    m = memory.layer_frames(layer)
    if m > capacity:
        raise ValueError(f"layer {layer} asks for {m} memory frames, the cache reserves {capacity}")
    start = (capacity - m) * n
    k = layer_cache["k_full"][:, start:capacity * n + end]  # [B, T, H, D]
    v = layer_cache["v_full"][:, start:capacity * n + end]
    global_frames = m + sink_frames
    if memory.sma_k and m and memory.sma_k < global_frames:
        return _sma_attention(q, k, v, global_frames, n, memory.sma_k, memory.workspace or AttentionWorkspace())
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, S, D]
    return out.transpose(1, 2)


def sma_select(q: torch.Tensor, k_frames: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per head, the `top_k` frames (sorted indices) whose mean key best matches the chunk's mean query.

    `q` `[B, S, H, D]`, `k_frames` `[B, G, N, H, D]` -> `[B, H, top_k]`.
    """
    q_mean = q.float().mean(dim=1)  # [B, H, D]
    k_mean = k_frames.float().mean(dim=2)  # [B, G, H, D]
    scores = torch.einsum("bhd,bghd->bhg", q_mean, k_mean)  # [B, H, G]
    return torch.topk(scores, top_k, dim=-1).indices.sort(dim=-1).values


def _sma_attention(q, k, v, global_frames: int, n: int, top_k: int, ws: AttentionWorkspace) -> torch.Tensor:
    b, t, h, d = k.shape
    g_tokens = global_frames * n
    k_frames = k[:, :g_tokens].unflatten(1, (global_frames, n))  # [B, G, N, H, D]
    v_frames = v[:, :g_tokens].unflatten(1, (global_frames, n))
    idx = sma_select(q, k_frames, top_k)  # [B, H, top_k]
    window = t - g_tokens
    wk, wv = ws.get(b, h, top_k * n + window, d, k)  # [B, H, top_k*N + window, D]
    gather = idx[:, :, :, None, None].expand(b, h, top_k, n, d)
    sel_k = wk[:, :, :top_k * n].unflatten(2, (top_k, n))  # [B, H, top_k, N, D] view into the workspace
    sel_v = wv[:, :, :top_k * n].unflatten(2, (top_k, n))
    torch.gather(k_frames.permute(0, 3, 1, 2, 4), 2, gather, out=sel_k)
    torch.gather(v_frames.permute(0, 3, 1, 2, 4), 2, gather, out=sel_v)
    wk[:, :, top_k * n:].copy_(k[:, g_tokens:].transpose(1, 2))
    wv[:, :, top_k * n:].copy_(v[:, g_tokens:].transpose(1, 2))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), wk, wv)  # [B, H, S, D]
    return out.transpose(1, 2)
