"""MemFlow on diffusers' `WanTransformer3DModel`: a streaming driver and its adapter, no change to diffusers.

Owns chunk-by-chunk generation with a Self-Forcing KV cache on the Wan2.1 transformer that Self-Forcing /
LongLive / MemFlow checkpoints convert to (pinned: diffusers==`DIFFUSERS_VERSION`, extra `wan`), and the
`GeneratorAdapter` the plugin reads that cache through. How:
- every block's self-attention gets a `CachedSelfAttention` processor (`block.attn1.set_processor`); the
  processors of one driver share one `ChunkContext` (diffusers forwards no per-call arguments to them),
  which the driver fills before each transformer call: the video's cache (adapters/self_forcing.py layout,
  memory slots in front), where the chunk's K/V go, the chunk's memory, and RoPE tables at the chunk's
  *absolute* frames (diffusers' rotary embedding always starts at frame 0). A processor writes the chunk's
  rotated K/V into the cache and attends over [sink | memory | window] with `plugin.attention`;
- tokens are frame-major, tokens per frame = (H / patch_h) * (W / patch_w); the temporal patch must be 1;
- a chunk is the Self-Forcing schedule: one transformer call per denoising timestep (flow matching,
  sigma = t / 1000; each call rewrites the chunk's K/V without committing), then one clean pass at
  `context_timestep` on the denoised latents whose K/V the cache commits; the window rolls with
  `make_room` / `commit_chunk`, shared with the reference model, so both evict the same frames;
- NAM text keys are the cross-attention key projection (`attn2.to_k`, then `attn2.norm_k`) of the prompt's
  projected text embedding over all its (padded, 512 in Wan) tokens, computed fresh for each new prompt;
- keys are cached rotated at their absolute frame (as the reference); `WanAdapter(store_rotated=False)`
  banks them unrotated and rotates them back with the model's own RoPE table at load time. Frames past the
  table (`rope_max_seq_len`) are an error, never a wrap.
Promises: with no memory the driver's chunk 0 is the stock transformer's forward bit for bit, and streaming
equals a full-sequence forward under the equivalent sink + window block-causal mask. Only public diffusers
API is used (the config, `rope.freqs_cos/_sin`, the blocks' `attn1` / `attn2` modules, `set_processor`).
`tiny_model()` and `hash_text_encoder()` build a random-weight model and a prompt encoder for CPU tests.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import diffusers
import torch

from plugin.adapters.base import CacheLayout
from plugin.adapters.self_forcing import SelfForcingAdapter, allocate_cache, commit_chunk, make_room
from plugin.attention import NO_MEMORY, ChunkMemory, cache_attention
from plugin.rope import rotate_pairs_into

DIFFUSERS_VERSION = "0.42.1"  # the version this module was written and tested against (pyproject extra `wan`)
SELF_FORCING_TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)
NUM_TRAIN_TIMESTEPS = 1000.0


def shifted_timesteps(timesteps: Sequence[float], shift: float = 5.0) -> tuple[float, ...]:
    """Timesteps warped as Wan's flow-matching scheduler shifts them (Self-Forcing's `warp_denoising_step`):
    sigma' = shift * sigma / (1 + (shift - 1) * sigma), sigma = t / 1000."""
    out = []
    for t in timesteps:
        sigma = t / NUM_TRAIN_TIMESTEPS
        out.append(NUM_TRAIN_TIMESTEPS * shift * sigma / (1 + (shift - 1) * sigma))
    return tuple(out)


class ChunkContext:
    """Per-call state every processor of one driver reads (set by the driver around each transformer call)."""

    def __init__(self) -> None:
        self.kv: Optional[list[dict]] = None  # the video's cache; None outside the driver: stock attention
        self.start = 0  # local token where this call's K/V go
        self.memory: ChunkMemory = NO_MEMORY
        self.cos: Optional[torch.Tensor] = None  # [1, S, 1, D/2] at the chunk's absolute frames
        self.sin: Optional[torch.Tensor] = None
        self.tokens_per_frame = 1
        self.sink_frames = 0


def rotate_half_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs, the same arithmetic as diffusers' processor: `x` `[..., T, H, D]`,
    `cos` / `sin` `[..., T, 1, D/2]` (one value per pair)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class CachedSelfAttention:
    """The self-attention processor of layer `layer`: K/V into the cache, attention over [sink|memory|window]."""

    def __init__(self, layer: int, context: ChunkContext, stock: Callable[..., torch.Tensor]) -> None:
        self.layer, self.context, self.stock = layer, context, stock

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb: Any = None, **kwargs: Any) -> torch.Tensor:
        ctx = self.context
        if ctx.kv is None:  # called outside the driver (e.g. a plain model(...) call): diffusers' own attention
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError("the streaming self-attention takes no attention mask or encoder states")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = rotate_half_pairs(query, ctx.cos, ctx.sin)
        layer_cache = ctx.kv[self.layer]
        end = ctx.start + query.shape[1]
        layer_cache["k"][:, ctx.start:end].copy_(rotate_half_pairs(key, ctx.cos, ctx.sin))
        layer_cache["v"][:, ctx.start:end].copy_(value)
        out = cache_attention(query, layer_cache, end, ctx.tokens_per_frame, ctx.sink_frames, ctx.memory, self.layer)
        out = out.flatten(2, 3).type_as(query)  # [B, S, H*D]
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class WanStream:
    """One video being generated: its KV cache (Self-Forcing layout with memory slots) and position."""

    kv: list[dict[str, Any]]
    next_chunk: int = 0
    write_start: int = 0  # local token where the current chunk's K/V go


class WanStreamingDriver:
    """Streams latent frames chunk by chunk through a `WanTransformer3DModel` (see module docstring).

    `encode_prompt(prompt) -> [1, text_tokens, text_dim]` is the prompt's text-encoder output (umT5 for a real
    checkpoint, padded with zeros to 512 tokens as Wan's pipeline does; `hash_text_encoder` in tests).
    `height` / `width` are the latent frame's size. Installs its processors on `model` (`close()` puts the
    stock ones back).
    """

    def __init__(self, model: Any, encode_prompt: Callable[[str], torch.Tensor], *, height: int, width: int,
                 frames_per_chunk: int = 3, sink_frames: int = 3, window_frames: int = 9,
                 timesteps: Sequence[float] = SELF_FORCING_TIMESTEPS, context_timestep: float = 0.0,
                 seed: int = 0) -> None:
        if diffusers.__version__ != DIFFUSERS_VERSION:
            warnings.warn(f"diffusers {diffusers.__version__} is installed; plugin.adapters.diffusers_wan was "
                          f"written against {DIFFUSERS_VERSION} (pip install 'memflow[wan]')", stacklevel=2)
        p_t, p_h, p_w = model.config.patch_size
        if p_t != 1:
            raise ValueError(f"the model's temporal patch is {p_t} (patch_size {tuple(model.config.patch_size)}); "
                             "the streaming driver needs 1, so that one latent frame is one block of tokens")
        if height % p_h or width % p_w:
            raise ValueError(f"latent frame {height}x{width} is not a multiple of the spatial patch {p_h}x{p_w}")
        if not timesteps or any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in timesteps):
            raise ValueError(f"timesteps must be non-empty values in (0, {NUM_TRAIN_TIMESTEPS:g}], got {timesteps!r}")
        if any(isinstance(block.attn1.processor, CachedSelfAttention) for block in model.blocks):
            raise ValueError("the model already serves a WanStreamingDriver; close() that driver first")
        self.model, self.encode_prompt = model, encode_prompt
        self.grid = (height // p_h, width // p_w)
        self.height, self.width = height, width
        self.timesteps, self.context_timestep, self.seed = tuple(float(t) for t in timesteps), context_timestep, seed
        param = model.blocks[0].attn1.to_k.weight  # the cached keys' dtype and device
        cfg = model.config
        heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.layout = CacheLayout(cfg.num_layers, heads, head_dim, self.grid[0] * self.grid[1], frames_per_chunk,
                                  sink_frames, window_frames, param.dtype, param.device)
        rope = model.rope
        self.max_frames = rope.max_seq_len
        split = [rope.t_dim, rope.h_dim, rope.w_dim]
        self._time_cos, h_cos, w_cos = rope.freqs_cos.split(split, dim=1)  # [max_seq_len, part] float32
        self._time_sin, h_sin, w_sin = rope.freqs_sin.split(split, dim=1)
        gh, gw = self.grid
        if max(gh, gw) > self.max_frames:
            raise ValueError(f"latent grid {gh}x{gw} is larger than the rotary table ({self.max_frames})")
        self._space_cos = torch.cat([h_cos[:gh].view(gh, 1, -1).expand(gh, gw, -1),
                                     w_cos[:gw].view(1, gw, -1).expand(gh, gw, -1)], dim=-1)  # [gh, gw, h+w]
        self._space_sin = torch.cat([h_sin[:gh].view(gh, 1, -1).expand(gh, gw, -1),
                                     w_sin[:gw].view(1, gw, -1).expand(gh, gw, -1)], dim=-1)
        self.context = ChunkContext()
        self.context.tokens_per_frame, self.context.sink_frames = self.layout.tokens_per_frame, sink_frames
        self._stock = []
        for layer, block in enumerate(model.blocks):
            self._stock.append(block.attn1.processor)
            block.attn1.set_processor(CachedSelfAttention(layer, self.context, block.attn1.processor))
        self._embeddings: dict[str, torch.Tensor] = {}
        self._frame_work: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (device, heads, stream) -> RoPE workspace

    def close(self) -> None:
        """Put diffusers' own self-attention processors back."""
        for block, stock in zip(self.model.blocks, self._stock):
            block.attn1.set_processor(stock)
        self._stock = []

    # -- text --------------------------------------------------------------------------------------
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """The text encoder's output for `prompt`, `[1, T, text_dim]` (cached per prompt)."""
        emb = self._embeddings.get(prompt)
        if emb is None:
            emb = self.encode_prompt(prompt).to(self.layout.device, self.layout.dtype)
            if emb.dim() != 3 or emb.shape[0] != 1 or emb.shape[2] != self.model.config.text_dim:
                raise ValueError(f"encode_prompt returned shape {list(emb.shape)}, expected [1, tokens, "
                                 f"{self.model.config.text_dim}]")
            if len(self._embeddings) >= 32:
                self._embeddings.pop(next(iter(self._embeddings)))
            self._embeddings[prompt] = emb
        return emb

    @torch.no_grad()
    def text_keys(self, prompt: str) -> torch.Tensor:
        """NAM text keys of `prompt`: per layer `attn2.norm_k(attn2.to_k(context))`, `[layers, T, heads, head_dim]`."""
        context = self.model.condition_embedder.text_embedder(self.text_embedding(prompt))  # [1, T, dim]
        lay = self.layout
        keys = [blk.attn2.norm_k(blk.attn2.to_k(context))[0] for blk in self.model.blocks]  # [T, dim] each
        return torch.stack(keys).unflatten(-1, (lay.heads, lay.head_dim))

    # -- RoPE --------------------------------------------------------------------------------------
    def rope_tables(self, first_frame: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[1, frames * N, 1, head_dim]` (interleaved, as diffusers builds them) for absolute frames
        [first_frame, first_frame + frames); at frame 0 they are the stock `model.rope` output."""
        if first_frame < 0 or first_frame + frames > self.max_frames:
            raise ValueError(f"frames [{first_frame}, {first_frame + frames}) are past the model's rotary table "
                             f"of {self.max_frames} frames (rope_max_seq_len); store keys unrotated or use a "
                             "larger table")
        gh, gw = self.grid
        out = []
        for time, space in ((self._time_cos, self._space_cos), (self._time_sin, self._space_sin)):
            t = time[first_frame:first_frame + frames].view(frames, 1, 1, -1).expand(frames, gh, gw, -1)
            s = space[None].expand(frames, gh, gw, -1)
            out.append(torch.cat([t, s], dim=-1).reshape(1, frames * gh * gw, 1, -1))
        return out[0], out[1]

    def rotate(self, x: torch.Tensor, first_frame: int, inverse: bool = False,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotate keys `[frames * N, H, D]` (frame-major, from absolute frame `first_frame`); `inverse` undoes it."""
        n = self.layout.tokens_per_frame
        if x.shape[-3] % n:
            raise ValueError(f"RoPE input has {x.shape[-3]} tokens, expected a multiple of {n} (tokens per frame)")
        if out is not None and x.dim() == 3 and x.shape[0] == n:
            return self._rotate_frame(x, first_frame, inverse, out)
        cos, sin = self.rope_tables(first_frame, x.shape[-3] // n)
        cos, sin = cos[0, ..., 0::2].to(x.device), sin[0, ..., 1::2].to(x.device)  # [T, 1, D/2]
        rotated = rotate_half_pairs(x, cos, -sin if inverse else sin)
        if out is None:
            return rotated
        return out.copy_(rotated)

    def _rotate_frame(self, x: torch.Tensor, frame: int, inverse: bool, out: torch.Tensor) -> torch.Tensor:
        """`rotate` of one frame `[N, H, D]` into `out` (may be `x`) with no temporaries: a workspace made on first
        use and the arithmetic of `rotate_half_pairs`, so the result is the same bit for bit. The plugin's load and
        write-back paths call this once per frame."""
        if not 0 <= frame < self.max_frames:
            self.rope_tables(frame, 1)  # the same error as every other path
        n, h, d = x.shape
        # one workspace per stream: plugins of a batch rotate on their own copy streams, concurrently on the GPU
        key = (x.device, h, torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0)
        work = self._frame_work.get(key)
        if work is None:
            cos = torch.empty((n, 1, d // 2), dtype=torch.float32, device=x.device)
            sin = torch.empty_like(cos)
            work = (cos, sin, *(torch.empty((n, h, d // 2), dtype=torch.float32, device=x.device) for _ in range(4)))
            self._frame_work[key] = work
        cos, sin = work[0], work[1]
        pt = self._time_cos.shape[1] // 2  # pairs of the time part; the rest turn by the token's row and column
        cos[:, 0, :pt].copy_(self._time_cos[frame, 0::2].expand(n, pt))
        cos[:, 0, pt:].copy_(self._space_cos.reshape(n, -1)[:, 0::2])
        sin[:, 0, :pt].copy_(self._time_sin[frame, 1::2].expand(n, pt))
        sin[:, 0, pt:].copy_(self._space_sin.reshape(n, -1)[:, 1::2])
        if inverse:
            sin.neg_()
        return rotate_pairs_into(x, cos, sin, out, work[2:])

    # -- streaming ---------------------------------------------------------------------------------
    def new_state(self, batch: int = 1, memory_frames: int = 0) -> WanStream:
        """A fresh video; `memory_frames` reserves memory slots for the plugin (`plugin.memory_frames`)."""
        return WanStream(allocate_cache(self.layout, batch, memory_frames))

    @torch.no_grad()
    def forward(self, state: WanStream, chunk_index: int, latents: torch.Tensor, timestep: float, prompt: str,
                memory: Optional[ChunkMemory] = None) -> torch.Tensor:
        """One transformer call on chunk `chunk_index`'s latents `[B, C, frames_per_chunk, H, W]`: writes the
        chunk's K/V into the cache (uncommitted) and returns the model's flow prediction, same shape."""
        lay = self.layout
        memory = memory or NO_MEMORY
        if memory.frames and len(memory.frames) != lay.layers:
            raise ValueError(f"ChunkMemory has {len(memory.frames)} layers, the model has {lay.layers}")
        b, _, f, h, w = latents.shape
        if (f, h, w) != (lay.frames_per_chunk, self.height, self.width):
            raise ValueError(f"chunk latents are [B, C, {f}, {h}, {w}], expected [B, C, {lay.frames_per_chunk}, "
                             f"{self.height}, {self.width}]")
        cos, sin = self.rope_tables(chunk_index * lay.frames_per_chunk, f)
        ctx = self.context
        ctx.cos, ctx.sin = cos[..., 0::2].to(lay.device), sin[..., 1::2].to(lay.device)  # [1, S, 1, D/2]
        ctx.kv, ctx.start, ctx.memory = state.kv, state.write_start, memory
        try:
            text = self.text_embedding(prompt).expand(b, -1, -1)
            t = torch.full((b,), timestep, device=lay.device)
            return self.model(latents.to(lay.dtype), t, text, return_dict=False)[0]
        finally:
            ctx.kv, ctx.memory = None, NO_MEMORY

    @torch.no_grad()
    def generate_chunk(self, state: WanStream, chunk_index: int, prompt: str,
                       memory: Optional[ChunkMemory] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Generate chunk `chunk_index` (chunks come in order): denoised latents `[B, C, frames_per_chunk, H, W]`.

        `noise` (default: seeded by (seed, chunk_index)) is the chunk's starting noise; re-noising between
        steps draws from the same seeded generator.
        """
        if chunk_index != state.next_chunk:
            raise ValueError(f"chunk {chunk_index} requested, this stream is at chunk {state.next_chunk}")
        lay = self.layout
        self.rope_tables(chunk_index * lay.frames_per_chunk, lay.frames_per_chunk)  # past the table: refused first
        state.write_start = make_room(state.kv, lay)
        b = state.kv[0]["k"].shape[0]
        shape = (b, self.model.config.in_channels, lay.frames_per_chunk, self.height, self.width)
        g = torch.Generator(device=lay.device).manual_seed(self.seed * 1_000_003 + chunk_index)
        x = torch.randn(shape, generator=g, device=lay.device, dtype=torch.float32) if noise is None else noise.float()
        x0 = x
        for i, t in enumerate(self.timesteps):
            sigma = t / NUM_TRAIN_TIMESTEPS
            flow = self.forward(state, chunk_index, x, t, prompt, memory).float()
            x0 = x - sigma * flow
            if i + 1 < len(self.timesteps):
                nxt = self.timesteps[i + 1] / NUM_TRAIN_TIMESTEPS
                x = (1 - nxt) * x0 + nxt * torch.randn(shape, generator=g, device=lay.device, dtype=torch.float32)
        self.forward(state, chunk_index, x0, self.context_timestep, prompt, memory)  # clean pass: the cache's K/V
        commit_chunk(state.kv, state.write_start, lay)
        state.next_chunk += 1
        return x0.to(lay.dtype)


class WanAdapter(SelfForcingAdapter):
    """The plugin's view of a `WanStreamingDriver`'s cache: `MemFlowPlugin(memory, config, WanAdapter(driver))`."""

    def __init__(self, driver: WanStreamingDriver, store_rotated: bool = True) -> None:
        super().__init__(driver.layout, driver.text_keys, driver.rotate, store_rotated)
        self.driver = driver


# -- tiny random-weight models for CPU tests and the README example ----------------------------------
def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A `WanTransformer3DModel` config of Wan2.1's structure at CPU size (2 layers, 2 heads x 24)."""
    base = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    base.update(overrides)
    return base


def tiny_model(seed: int = 0, **overrides: Any) -> Any:
    """A random-weight `WanTransformer3DModel` of `tiny_config(**overrides)` (float32, eval, no grad)."""
    torch.manual_seed(seed)  # diffusers' modules initialise from the global generator
    model = diffusers.WanTransformer3DModel(**tiny_config(**overrides))
    return model.eval().requires_grad_(False)


def hash_text_encoder(text_dim: int, length: int = 512, vocab: int = 4096,
                      seed: int = 0) -> Callable[[str], torch.Tensor]:
    """A stand-in text encoder: lowercase words hash to rows of a seeded table; padding is zeros, as Wan's
    pipeline pads umT5 output. Returns `prompt -> [1, length, text_dim]` float32."""
    table = torch.randn((vocab, text_dim), generator=torch.Generator().manual_seed(seed))

    def encode(prompt: str) -> torch.Tensor:
        words = re.findall(r"[a-z0-9']+", prompt.lower())[:length]
        ids = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % vocab for w in words]
        out = torch.zeros((1, length, text_dim))
        if ids:
            out[0, :len(ids)] = table[torch.tensor(ids)]
        return out

    return encode
