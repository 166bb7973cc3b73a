"""A small causal video DiT that streams latent frames chunk by chunk, Self-Forcing / LongLive style.

Owns the reference generator used by the plugin's tests, demo and benchmarks. It exercises every path a
real streaming Wan model does: a per-layer KV cache in the Self-Forcing layout (sink frames + rolling local
window, global / local end indices; adapters/self_forcing.py), keys cached already rotated by 3-D RoPE at
their absolute frame, text cross-attention with its own K/V cache per layer, and per chunk a few
flow-matching denoising passes that attend to the cache without committing, then one clean pass at t=0
that commits the chunk's K/V. Output is a deterministic function of (config, seed, prompts, memory).

The real pipelines' cache shapes are exercised too: uneven leading chunks (`first_chunks`, e.g. (1,) for
Self-Forcing's independent first frame), classifier-free guidance with a second, unconditional cache
(`generate_chunk(..., uncond=...)`, as Self-Forcing's diffusion inference), relative RoPE (`rope_mode=
"relative"`: the cache holds unrotated keys and each attention rotates [sink | memory | window] at
positions 0, 1, ... - LongLive's "infinity" model - so a video is not capped by the RoPE table), and a
recache at a prompt switch (`recache`, LongLive's `_recache_after_switch`, with or without a global sink).

Configs: `tiny()` (CPU tests and demo, milliseconds per chunk) and `wan_1_3b_shape()` (Wan2.1-T2V-1.3B's
shapes: 30 layers, 12 heads x 128, 1560 tokens per frame, 3 frames per chunk, bf16, random weights; for GPU
timing).

Text: `HashTokenizer` maps lowercase words to ids by a stable hash (no download); a word embedding table
gives the text tokens, padding is id 0 with a zero embedding.

Why prompt-guided retrieval means something with random weights: every token of a frame is conditioned on
its prompt (the block's self-attention input is `norm(x) + prompt_strength * e_p`, e_p the RMS-normalized
mean embedding of the prompt's words) and the text cross-attention keys are computed with the *same* key
projection and key norm as the frame keys (tied weights, no key bias, so padding keys are 0). A frame's mean
key therefore points along the key projection of its prompt's words, and the NAM score (text key . frame
key) is high for frames generated under the same or an overlapping prompt and near zero otherwise, up to
the RoPE rotation of the cached keys (as in the reference).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plugin.adapters.base import CacheLayout
from plugin.adapters.self_forcing import (
    SelfForcingAdapter, allocate_cache, begin_recache, commit_chunk, make_room, recache_frames,
)
from plugin.attention import NO_MEMORY, ChunkMemory, cache_attention
from plugin.retrieval import nam_entry_keys
from plugin.rope import Rope3D

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    layers: int
    heads: int
    head_dim: int
    ffn_dim: int
    latent_channels: int
    grid_h: int  # tokens per latent frame = grid_h * grid_w
    grid_w: int
    text_len: int  # text tokens (padded)
    vocab: int  # hash buckets of the tokenizer
    frames_per_chunk: int = 3
    sink_frames: int = 3
    window_frames: int = 9  # local window, the chunk being generated included
    sigmas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # denoising passes; then one clean pass at 0
    prompt_strength: float = 2.0
    rope_theta: float = 10000.0
    max_frames: int = 1024  # RoPE table: the longest video in latent frames
    dtype: str = "float32"
    seed: int = 0
    first_chunks: tuple[int, ...] = ()  # sizes of leading chunks that differ from frames_per_chunk
    rope_mode: str = "absolute"  # "absolute": keys cached rotated at their frame; "relative": see module doc

    def __post_init__(self) -> None:
        if self.rope_mode not in ("absolute", "relative"):
            raise ValueError(f"ModelConfig.rope_mode is {self.rope_mode!r}; expected 'absolute' or 'relative'")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype is {self.dtype!r}; expected one of {sorted(DTYPES)}")
        if not self.sigmas or any(not 0 < s <= 1 for s in self.sigmas):
            raise ValueError(f"ModelConfig.sigmas must be non-empty values in (0, 1], got {self.sigmas!r}")

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_h * self.grid_w


def tiny(**overrides: Any) -> ModelConfig:
    """CPU-sized: 4 layers, 4 heads x 32, 16 tokens per frame; well under 0.1 s per chunk on 2 cores."""
    base = ModelConfig(layers=4, heads=4, head_dim=32, ffn_dim=256, latent_channels=4, grid_h=4, grid_w=4,
                       text_len=16, vocab=4096, max_frames=8192)
    return replace(base, **overrides)


def wan_1_3b_shape(**overrides: Any) -> ModelConfig:
    """Wan2.1-T2V-1.3B's shapes with random weights (bf16; for GPU timing, not for pictures)."""
    base = ModelConfig(layers=30, heads=12, head_dim=128, ffn_dim=8960, latent_channels=16, grid_h=30, grid_w=52,
                       text_len=512, vocab=32768, dtype="bfloat16")
    return replace(base, **overrides)


class HashTokenizer:
    """Lowercase words -> ids in [1, vocab) by a stable hash; 0 pads. No vocabulary file needed."""

    def __init__(self, vocab: int, length: int) -> None:
        self.vocab, self.length = vocab, length

    def words(self, prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9']+", prompt.lower())[: self.length]

    def __call__(self, prompt: str) -> torch.Tensor:
        ids = [1 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % (self.vocab - 1)
               for w in self.words(prompt)]
        return torch.tensor(ids + [0] * (self.length - len(ids)), dtype=torch.long)  # [length]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.q, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)  # shared with the text keys (see module docstring)
        self.norm_q, self.norm_k = RMSNorm(d), RMSNorm(d)
        self.norm3 = nn.LayerNorm(d, eps=1e-6)
        self.cross_q, self.cross_v, self.cross_o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.cross_norm_q = RMSNorm(d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm_k(self.k(context)), self.cross_v(context)  # [B, T, dim] each


@dataclass
class StreamState:
    """One video being generated: its KV cache (adapter layout), cross-attention caches, position."""

    kv: list[dict[str, Any]]
    cross: list[dict[str, Any]]
    prompt_vec: torch.Tensor  # [B, 1, dim]
    next_chunk: int = 0
    write_start: int = 0  # local token where the current chunk's K/V go
    rotated: Optional[torch.Tensor] = None  # relative RoPE: [B, (M + cache frames) * N, H, D] rotated keys


class ReferenceDiT(nn.Module):
    """The reference streaming generator (see module docstring)."""

    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.device_ = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]
        self.tokenizer = HashTokenizer(cfg.vocab, cfg.text_len)
        d = cfg.dim
        with torch.device(self.device_):
            self.word_emb = nn.Embedding(cfg.vocab, d, padding_idx=0)
            self.patch_in = nn.Linear(cfg.latent_channels, d)
            self.time_mlp = nn.Sequential(nn.Linear(64, d), nn.SiLU(), nn.Linear(d, d))
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
            self.head_norm = nn.LayerNorm(d, eps=1e-6)
            self.head = nn.Linear(d, cfg.latent_channels)
        self._init_weights()
        self.to(self.dtype).eval().requires_grad_(False)
        self.rope = Rope3D(cfg.head_dim, cfg.grid_h, cfg.grid_w, cfg.max_frames, cfg.rope_theta, self.device_)
        self.layout = CacheLayout(cfg.layers, cfg.heads, cfg.head_dim, cfg.tokens_per_frame, cfg.frames_per_chunk,
                                  cfg.sink_frames, cfg.window_frames, self.dtype, self.device_, cfg.first_chunks)

    @torch.no_grad()
    def _init_weights(self) -> None:
        g = torch.Generator(device=self.device_).manual_seed(self.cfg.seed)
        out_scale = 1.0 / math.sqrt(2 * self.cfg.layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            elif p.dim() == 2 and "word_emb" not in name:
                std = 1.0 / math.sqrt(p.shape[1])
                if name.endswith((".o.weight", ".cross_o.weight", "ffn.2.weight")):
                    std *= out_scale
                p.normal_(0.0, std, generator=g)
            elif "word_emb" in name:
                p.normal_(0.0, 1.0, generator=g)
                p[0].zero_()

    # -- text ----------------------------------------------------------------------------------
    def _context(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(prompt).to(self.device_)
        context = self.word_emb(ids)[None]  # [1, T, dim]
        n = max(1, int((ids > 0).sum()))
        pooled = context.float().sum(1, keepdim=True) / n  # [1, 1, dim]
        pooled = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6)
        return context, pooled.to(self.dtype)

    @torch.no_grad()
    def text_keys(self, prompt: str) -> torch.Tensor:
        """Cross-attention keys of `prompt` in every layer: `[layers, text_len, heads, head_dim]`."""
        context, _ = self._context(prompt)
        cfg = self.cfg
        return torch.stack([blk.text_kv(context)[0][0] for blk in self.blocks]).view(
            cfg.layers, cfg.text_len, cfg.heads, cfg.head_dim)

    def _set_prompt(self, state: StreamState, prompt: str) -> None:
        if all(c["is_init"] and c["prompt"] == prompt for c in state.cross):
            return
        context, pooled = self._context(prompt)
        context = context.expand(state.cross[0]["k"].shape[0], -1, -1)
        for blk, c in zip(self.blocks, state.cross):
            k, v = blk.text_kv(context)
            c["k"].copy_(k.view_as(c["k"]))
            c["v"].copy_(v.view_as(c["v"]))
            c["is_init"], c["prompt"] = True, prompt
        state.prompt_vec.copy_(pooled)

    @torch.no_grad()
    def frame_nam_key(self, state: StreamState, frame: int) -> np.ndarray:
        """The NAM entry key the plugin records for resident frame `frame`: `[layers, heads*head_dim]` float32
        (per-layer mean of its cached keys). For benchmarks that need NAM keys without a bank."""
        views = SelfForcingAdapter(self.layout, self.text_keys).frame_kv(state.kv, frame)
        out = torch.empty((self.cfg.layers, self.cfg.dim), dtype=torch.float32, device=self.device_)
        return nam_entry_keys([k for k, _ in views], out).cpu().numpy()

    # -- streaming -----------------------------------------------------------------------------
    def new_state(self, batch: int = 1, memory_frames: int = 0) -> StreamState:
        """A fresh video; `memory_frames` reserves memory slots for the plugin (`plugin.memory_frames`)."""
        cfg = self.cfg
        shape = (batch, cfg.text_len, cfg.heads, cfg.head_dim)
        cross = [{"k": torch.zeros(shape, dtype=self.dtype, device=self.device_),
                  "v": torch.zeros(shape, dtype=self.dtype, device=self.device_), "is_init": False, "prompt": None}
                 for _ in range(cfg.layers)]
        kv = allocate_cache(self.layout, batch, memory_frames)
        rotated = torch.empty_like(kv[0]["k_full"]) if cfg.rope_mode == "relative" else None
        return StreamState(kv, cross, torch.zeros((batch, 1, cfg.dim), dtype=self.dtype, device=self.device_),
                           rotated=rotated)

    @torch.no_grad()
    def generate_chunk(self, state: StreamState, chunk_index: int, prompt: str,
                       memory: Optional[ChunkMemory] = None, *, uncond: Optional[StreamState] = None,
                       negative_prompt: str = "", guidance: float = 3.0) -> torch.Tensor:
        """Generate chunk `chunk_index` (chunks come in order): latents `[B, frames, N, C]`.

        `uncond`: classifier-free guidance with a second cache (Self-Forcing's `kv_cache_neg`), conditioned on
        `negative_prompt`: flow = uncond + guidance * (cond - uncond); both caches commit the chunk and attend
        the same `memory` (load it into both with `before_chunk(..., mirrors=(uncond.kv,))`).
        """
        if chunk_index != state.next_chunk:
            raise ValueError(f"chunk {chunk_index} requested, this stream is at chunk {state.next_chunk}")
        if uncond is not None and uncond.next_chunk != chunk_index:
            raise ValueError(f"the unconditional stream is at chunk {uncond.next_chunk}, not {chunk_index}")
        cfg = self.cfg
        memory = memory or NO_MEMORY
        if memory.frames and len(memory.frames) != cfg.layers:
            raise ValueError(f"ChunkMemory has {len(memory.frames)} layers, the model has {cfg.layers}")
        first, end = self.layout.chunk_frames(chunk_index)
        f = end - first
        states = [(state, prompt)] + ([(uncond, negative_prompt)] if uncond is not None else [])
        for st, pr in states:
            self._set_prompt(st, pr)
            st.write_start = make_room(st.kv, self.layout, f)  # the window rolling shared with every generator
        b = state.kv[0]["k"].shape[0]
        g = torch.Generator(device=self.device_).manual_seed(cfg.seed * 1_000_003 + chunk_index)
        shape = (b, f, cfg.tokens_per_frame, cfg.latent_channels)
        x = torch.randn(shape, generator=g, device=self.device_, dtype=torch.float32)
        x0 = x
        for i, sigma in enumerate(cfg.sigmas):
            flow = self._forward(state, first, x.to(self.dtype), sigma, memory).float()
            if uncond is not None:
                flow_u = self._forward(uncond, first, x.to(self.dtype), sigma, memory).float()
                flow = flow_u + guidance * (flow - flow_u)
            x0 = x - sigma * flow
            if i + 1 < len(cfg.sigmas):
                nxt = cfg.sigmas[i + 1]
                x = (1 - nxt) * x0 + nxt * torch.randn(shape, generator=g, device=self.device_, dtype=torch.float32)
        for st, _ in states:
            self._forward(st, first, x0.to(self.dtype), 0.0, memory)  # clean pass: K/V of the chunk
            commit_chunk(st.kv, st.write_start, self.layout, f)
            st.next_chunk += 1
        return x0.to(self.dtype)

    @torch.no_grad()
    def recache(self, state: StreamState, prompt: str, history: torch.Tensor, *, global_sink: bool = False,
                memory: Optional[ChunkMemory] = None) -> tuple[int, int]:
        """A prompt switch before chunk `state.next_chunk`, as LongLive's `_recache_after_switch`: the cache is
        emptied and rebuilt by clean passes over the last frames under the new `prompt` (block-causal, one
        chunk-sized block at a time, attending `memory`). `history` `[B, frames so far, N, C]` holds the
        video's clean latents. Without `global_sink` the re-run's first frames become the sink. Returns the
        re-run frames [first, end)."""
        end = self.layout.chunk_frames(state.next_chunk)[0]
        if history.shape[1] < end:
            raise ValueError(f"history holds {history.shape[1]} frames, the video has {end}")
        first, end = recache_frames(self.layout, end, global_sink)
        self._set_prompt(state, prompt)
        begin_recache(state.kv, self.layout, first, global_sink)
        memory = memory or NO_MEMORY
        frame = first
        while frame < end:
            f = min(self.cfg.frames_per_chunk, end - frame)
            state.write_start = make_room(state.kv, self.layout, f)
            self._forward(state, frame, history[:, frame:frame + f].to(self.dtype), 0.0, memory)
            commit_chunk(state.kv, state.write_start, self.layout, f)
            frame += f
        return first, end

    def _forward(self, state: StreamState, first_frame: int, x: torch.Tensor, sigma: float,
                 memory: ChunkMemory) -> torch.Tensor:
        cfg = self.cfg
        b, f, n, _ = x.shape
        h = self.patch_in(x).flatten(1, 2)  # [B, S, dim]
        h = h + self.time_mlp(_timestep_embedding(sigma, 64, h))
        lo, hi = state.write_start, state.write_start + f * n
        relative = cfg.rope_mode == "relative"
        if not relative:
            cos, sin = self.rope.tables(first_frame, f)  # [S, 1, D/2] each
        for layer, (blk, kv, cross) in enumerate(zip(self.blocks, state.kv, state.cross)):
            y = blk.norm1(h) + cfg.prompt_strength * state.prompt_vec
            q = blk.norm_q(blk.q(y)).unflatten(-1, (cfg.heads, cfg.head_dim))  # [B, S, H, D]
            k = blk.norm_k(blk.k(y)).unflatten(-1, (cfg.heads, cfg.head_dim))
            v = blk.v(y).unflatten(-1, (cfg.heads, cfg.head_dim))
            kv["v"][:, lo:hi].copy_(v)
            if relative:
                kv["k"][:, lo:hi].copy_(k)  # unrotated; rotated below at its place in the attended sequence
                if memory.fence is not None:  # CUDA: the rotation reads the memory slots, after the plugin's copies
                    memory.fence.attend(layer, memory.epoch)
                q, view = self._relative_view(state, kv, q, hi, memory.layer_frames(layer))
                attn = cache_attention(q, view, hi, n, cfg.sink_frames, memory, layer)
            else:
                q = self.rope.apply(q, cos, sin)
                self.rope.apply(k, cos, sin, out=kv["k"][:, lo:hi])
                attn = cache_attention(q, kv, hi, n, cfg.sink_frames, memory, layer)  # [B, S, H, D]
            h = h + blk.o(attn.reshape(b, f * n, cfg.dim))
            cq = blk.cross_norm_q(blk.cross_q(blk.norm3(h))).unflatten(-1, (cfg.heads, cfg.head_dim))
            c = F.scaled_dot_product_attention(cq.transpose(1, 2), cross["k"].transpose(1, 2),
                                               cross["v"].transpose(1, 2))  # [B, H, S, D]
            h = h + blk.cross_o(c.transpose(1, 2).reshape(b, f * n, cfg.dim))
            h = h + blk.ffn(blk.norm2(h))
        return self.head(self.head_norm(h)).view(b, f, n, cfg.latent_channels)

    def relative_positions(self, m: int, end: int) -> tuple[list[int], list[int], list[int]]:
        """Relative RoPE frame positions of the attended sequence of a layer with `m` memory frames and the
        cache filled to local token `end`: (memory, sink, window) - sink 0..s-1, memory s..s+m-1, then the
        window. (Each layer's active memory frames are the memory region's last m slots.)"""
        s, n = self.cfg.sink_frames, self.cfg.tokens_per_frame
        window = end // n - s
        return list(range(s, s + m)), list(range(s)), list(range(s + m, s + m + window))

    def _relative_view(self, state: StreamState, kv: dict, q: torch.Tensor, end: int,
                       m: int) -> tuple[torch.Tensor, dict]:
        """Rotate one layer's attended keys [memory m | sink | window to `end`] into `state.rotated` at their
        relative positions; returns the rotated query and a cache view for `cache_attention`."""
        n, cap = self.cfg.tokens_per_frame, kv["memory_frames"]
        mem, sink, window = self.relative_positions(m, end)
        positions = mem + sink + window  # storage order of k_full: [memory | sink | window]
        start = (cap - m) * n
        cos, sin = self._tables_at(positions)  # [T, 1, D/2]
        self.rope.apply(kv["k_full"][:, start:cap * n + end], cos, sin, out=state.rotated[:, start:cap * n + end])
        f = q.shape[1] // n
        qcos, qsin = cos[-f * n:], sin[-f * n:]  # the chunk is the window's last frames
        return self.rope.apply(q, qcos, qsin), {"k_full": state.rotated, "v_full": kv["v_full"],
                                                "memory_frames": cap}

    def _tables_at(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.rope
        if max(positions) >= r.max_frames:
            raise ValueError(f"relative RoPE positions reach {max(positions)}, the table has {r.max_frames} frames")
        # runs of consecutive positions (memory, sink, window) as slices of the table: no index tensor is copied
        # to the device (a host sync on CUDA) per layer
        runs, first = [], 0
        for i in range(1, len(positions) + 1):
            if i == len(positions) or positions[i] != positions[i - 1] + 1:
                runs.append((positions[first], positions[i - 1] + 1))
                first = i
        n, frames = r.tokens_per_frame, len(positions)
        out = []
        for time, space in ((r.time_cos, r.space_cos), (r.time_sin, r.space_sin)):
            t = torch.cat([time[a:b] for a, b in runs])[:, None, :].expand(frames, n, r.ct)
            out.append(torch.cat([t, space[None].expand(frames, n, -1)], dim=-1).reshape(frames * n, 1, -1))
        return out[0], out[1]


def _timestep_embedding(sigma: float, dim: int, like: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=like.device) / half)
    angles = sigma * 1000.0 * freqs
    return torch.cat([angles.cos(), angles.sin()]).to(like.dtype)  # [dim]
