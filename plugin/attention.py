"""Attention of the current chunk over [sink | memory | local window], and its ordering against the plugin's copies.

Owns the per-layer attention a generator runs with the plugin, `ChunkMemory` (the value `before_chunk` hands the
generator: how many memory frames each layer attends to this chunk) and `MemoryFence` (CUDA only: what makes
that attention wait for the plugin's copies, and the plugin's copies wait for that attention). Promises:
- dense path: one call of the attention function over a contiguous view of the cache (see
  adapters/self_forcing.py for why [memory | sink | window] storage order is [sink | memory | window]
  attention): no copy, no allocation besides the attention's output; with 0 memory frames the call is the
  bare model's, bit for bit. The attention function is the generator's own (`attention=` here, or the
  adapter's `attention_fn` carried by `ChunkMemory`; FlashAttention's layout: `fn(q [B, S, H, D],
  k [B, T, H, D], v [B, T, H, D]) -> [B, S, H, D]`), SDPA by default;
- SMA (sparse memory activation, optional): per head, the mean query of the chunk scores the mean key of
  every sink and memory frame; each head attends to its top-k of those frames plus the whole window. Frames
  are gathered into a preallocated `AttentionWorkspace`, reused across layers and chunks;
- on CUDA, whatever stream the generator's attention runs on (the default stream, a side stream, one per CFG
  branch), it reads a layer's memory slots only after the plugin's copies into them: before attending, the
  attention's stream waits (`cudaStreamWaitEvent`, no host sync) on that layer's `ready` event, which the
  plugin records on its copy stream after the layer's copies; after attending it records its stream's `done`
  event, which the plugin's next copies (slot loads, write-back reads of the cache) wait on. Events are made
  once per plugin (per layer, and one per attention stream seen) and re-recorded every chunk. A `ChunkMemory`
  is valid for its own chunk only: used after the next `before_chunk` it raises instead of reading slots
  that are being rewritten.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("memflow.plugin")
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # [B,S,H,D],[B,T,H,D]x2 -> [B,S,H,D]
MAX_STREAMS = 8  # distinct attention streams a fence tracks with events; past that it falls back to a device sync


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The default attention: `scaled_dot_product_attention` in FlashAttention's `[B, S, H, D]` layout."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class AttentionWorkspace:
    """Gather buffers for SMA, grown on first need and then reused (one per plugin, one pair per CUDA stream:
    attention on two streams at once, e.g. CFG's branches, must not gather into the same buffers)."""

    def __init__(self) -> None:
        self.k: Optional[torch.Tensor] = None  # the last pair handed out (tests)
        self.v: Optional[torch.Tensor] = None
        self._pairs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, b: int, h: int, tokens: int, d: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, torch.cuda.current_stream(like.device).cuda_stream if like.is_cuda else 0)
        pair = self._pairs.get(key)
        k = pair[0] if pair is not None else None
        if k is None or k.shape[0] != b or k.shape[1] != h or k.shape[2] < tokens or k.shape[3] != d \
                or k.dtype != like.dtype:
            k = torch.empty((b, h, tokens, d), dtype=like.dtype, device=like.device)
            pair = (k, torch.empty_like(k))
            self._pairs[key] = pair
        self.k, self.v = pair
        return pair[0][:, :, :tokens], pair[1][:, :, :tokens]  # [B, H, tokens, D]


class MemoryFence:
    """CUDA ordering between the plugin's copy stream and the generator's attention (see module docstring).

    One per plugin, on the cache's device; used from the generator's thread only. `stream` is the plugin's
    dedicated copy stream; `copies()` runs the plugin's GPU work on it, after the generator's current stream and
    every attention stream seen so far; `mark_ready(layer)` publishes a layer's slot copies; `attend` /
    `attended` are the two calls `cache_attention` makes around each attention.
    """

    def __init__(self, device: torch.device, layers: int) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"MemoryFence orders CUDA streams; the cache is on {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(device=self.device)
        self.ready = [torch.cuda.Event() for _ in range(layers)]  # recorded on `stream` after a layer's slot copies
        self._recorded = [False] * layers
        self._generator_mark = torch.cuda.Event()  # re-recorded on the generator's stream by every `copies()`
        self._streams: dict[int, tuple[torch.cuda.Stream, torch.cuda.Event]] = {}  # handle -> (stream, its done event)
        self.overflow = False
        self.epoch = 0

    def new_chunk(self) -> int:
        """A new chunk's memory is being made: ChunkMemory of earlier epochs is refused from now on."""
        self.epoch += 1
        return self.epoch

    @contextlib.contextmanager
    def copies(self) -> Iterator[torch.cuda.Stream]:
        """Run the body's GPU work on the copy stream, ordered after the generator's current stream and every
        attention stream's last `done`; yields the generator's current stream (of the cache's device)."""
        generator = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self._generator_mark.record(generator)  # wait_stream would make a new event per call
            self.stream.wait_event(self._generator_mark)
            for _, done in self._streams.values():
                self.stream.wait_event(done)
            if self.overflow:  # more attention streams than events: order by draining the device (rare)
                torch.cuda.synchronize(self.device)
            yield generator

    def mark_ready(self, layer: int) -> None:
        """Under `copies()`: the layer's slot copies are issued; its attention waits for them."""
        self.ready[layer].record(self.stream)
        self._recorded[layer] = True

    def hold_generator(self, event: torch.cuda.Event, generator: torch.cuda.Stream) -> None:
        """Make the generator's streams (current and every attention stream) wait for `event` (recorded on the copy
        stream) before their next work: e.g. the window roll must not move a frame the write-back still reads."""
        generator.wait_event(event)
        for stream, _ in self._streams.values():
            if stream.cuda_stream != generator.cuda_stream:
                stream.wait_event(event)

    def attend(self, layer: int, epoch: int) -> torch.cuda.Stream:
        if epoch != self.epoch:
            raise RuntimeError(f"this ChunkMemory belongs to an earlier chunk (epoch {epoch}, the plugin is at "
                               f"{self.epoch}); expected the value returned by the latest before_chunk")
        stream = torch.cuda.current_stream(self.device)
        if self._recorded[layer]:
            stream.wait_event(self.ready[layer])
        return stream

    def attended(self, stream: torch.cuda.Stream) -> None:
        entry = self._streams.get(stream.cuda_stream)
        if entry is None:
            if len(self._streams) >= MAX_STREAMS:
                if not self.overflow:
                    log.warning("memflow: attention ran on more than %d CUDA streams; the plugin orders its copies "
                                "against the others by synchronizing the device", MAX_STREAMS)
                self.overflow = True
                return
            entry = (stream, torch.cuda.Event())  # once per attention stream, then re-recorded
            self._streams[stream.cuda_stream] = entry
        entry[1].record(stream)

    def wait_all(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Make `stream` (default: the current one) wait for every layer's latest slot copies."""
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        for layer, recorded in enumerate(self._recorded):
            if recorded:
                stream.wait_event(self.ready[layer])


@dataclass(frozen=True)
class ChunkMemory:
    """What the generator's attention needs from the plugin for one chunk.

    `frames[layer]` memory frames are active in that layer (right-aligned in the cache's memory region);
    an empty tuple means no memory anywhere (bare attention). `sma_k > 0` turns on SMA. `fence` / `epoch`
    (CUDA) order the attention against the plugin's copies; `attention` is the adapter's attention function.
    """

    frames: tuple[int, ...] = ()
    sma_k: int = 0
    workspace: Optional[AttentionWorkspace] = field(default=None, compare=False, repr=False)
    fence: Optional[MemoryFence] = field(default=None, compare=False, repr=False)
    epoch: int = field(default=0, compare=False, repr=False)
    attention: Optional[AttentionFn] = field(default=None, compare=False, repr=False)

    def layer_frames(self, layer: int) -> int:
        return self.frames[layer] if self.frames else 0

    @property
    def total(self) -> int:
        return sum(self.frames)

    def wait(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        """For a reader of the memory slots other than `cache_attention` (which waits by itself): make `stream`
        (default: the current one) wait, on the GPU, for this chunk's slot copies. A no-op off CUDA."""
        if self.fence is not None:
            self.fence.wait_all(stream)


NO_MEMORY = ChunkMemory()


def cache_attention(q: torch.Tensor, layer_cache: dict, end: int, tokens_per_frame: int, sink_frames: int,
                    memory: ChunkMemory = NO_MEMORY, layer: int = 0,
                    attention: Optional[AttentionFn] = None) -> torch.Tensor:
    """Attention of `q` `[B, S, H, D]` (rotated) over one layer's cache up to local token `end`.

    Keys are the `memory.layer_frames(layer)` active memory frames, the sink and the window `[.., end)`
    (the chunk's own keys already written there). `attention` (default: `memory.attention`, then SDPA) is the
    generator's attention function. Returns `[B, S, H, D]`.
    """
    n = tokens_per_frame
    capacity = layer_cache.get("memory_frames", 0)
    m = memory.layer_frames(layer)
    if m > capacity:
        raise ValueError(f"layer {layer} asks for {m} memory frames, the cache reserves {capacity}")
    fn = attention or memory.attention or sdpa_attention
    start = (capacity - m) * n
    k = layer_cache["k_full"][:, start:capacity * n + end]  # [B, T, H, D]
    v = layer_cache["v_full"][:, start:capacity * n + end]
    fence = memory.fence
    stream = fence.attend(layer, memory.epoch) if fence is not None else None
    global_frames = m + sink_frames
    if memory.sma_k and m and memory.sma_k < global_frames:
        out = _sma_attention(q, k, v, global_frames, n, memory.sma_k, memory.workspace or AttentionWorkspace(), fn)
    else:
        out = fn(q, k, v)  # [B, S, H, D]
    if stream is not None:
        fence.attended(stream)
    return out


def sma_select(q: torch.Tensor, k_frames: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per head, the `top_k` frames (sorted indices) whose mean key best matches the chunk's mean query.

    `q` `[B, S, H, D]`, `k_frames` `[B, G, N, H, D]` -> `[B, H, top_k]`.
    """
    q_mean = q.float().mean(dim=1)  # [B, H, D]
    k_mean = k_frames.float().mean(dim=2)  # [B, G, H, D]
    scores = torch.einsum("bhd,bghd->bhg", q_mean, k_mean)  # [B, H, G]
    return torch.topk(scores, top_k, dim=-1).indices.sort(dim=-1).values


def _sma_attention(q, k, v, global_frames: int, n: int, top_k: int, ws: AttentionWorkspace,
                   fn: AttentionFn) -> torch.Tensor:
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
    return fn(q, wk.transpose(1, 2), wv.transpose(1, 2))  # [B, S, H, D]
