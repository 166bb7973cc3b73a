"""The adapter protocol: what the plugin needs to know about a generator's KV cache, and nothing more.

Owns the contract between `MemFlowPlugin` and a generator family. An adapter declares the cache layout
(`CacheLayout`), says which absolute latent frames are resident while a chunk is generated, hands out views
of one frame's K/V in the cache, exposes the preallocated memory region the plugin loads frames into, and
computes the text cross-attention keys of a prompt (the NAM query). It also declares how RoPE is handled:
`store_rotated=True` stores keys as the cache holds them (rotated at their absolute frame, the reference's
choice; entries carry `rope_position`), `False` stores them unrotated (entries carry `rope_position=None`)
and rotates them at load time. The plugin never touches a generator tensor except through an adapter.

What real pipelines do, and how the protocol says it:
- uneven chunks (Self-Forcing's independent first frame, an image-to-video initial latent): the layout's
  `first_chunks` gives the leading chunks' sizes, so `chunk_frames(i)` is the adapter's mapping, never
  `i * frames_per_chunk`;
- relative RoPE: `memory_position(frame, index, active)` is the RoPE frame position a loaded memory frame
  takes in the attended sequence, and `load_keys` receives it (None: the cache holds unrotated keys and the
  generator rotates the attended sequence itself, as LongLive's "infinity" model does);
- reallocating caches: `check_cache(kv)` refuses a cache whose K/V no longer share storage with its memory
  region, and returns a fingerprint of that region, so the plugin notices when it was replaced;
- batch > 1: `for_sample(b)` is the adapter of one sample's row of the cache (one stream per sample);
- recache on a prompt switch: `sink_range(kv)` says which absolute frames the sink holds now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch

TORCH_TO_KV_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class CacheLayout:
    """Shape facts of a streaming generator's self-attention KV cache."""

    layers: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    frames_per_chunk: int
    sink_frames: int  # first frames kept forever
    window_frames: int  # rolling local window, the chunk being generated included
    dtype: torch.dtype
    device: torch.device
    first_chunks: tuple[int, ...] = ()  # sizes of leading chunks that differ (e.g. (1,): an independent first frame)

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "head_dim", "tokens_per_frame", "frames_per_chunk", "window_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CacheLayout.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.sink_frames, int) or self.sink_frames < 0:
            raise ValueError(f"CacheLayout.sink_frames must be an int >= 0, got {self.sink_frames!r}")
        if self.window_frames < self.frames_per_chunk:
            raise ValueError(f"CacheLayout.window_frames ({self.window_frames}) must hold a whole chunk "
                             f"({self.frames_per_chunk} frames)")
        if not isinstance(self.first_chunks, tuple) or any(
                not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= self.window_frames
                for c in self.first_chunks):
            raise ValueError(f"CacheLayout.first_chunks must be a tuple of chunk sizes in [1, window_frames="
                             f"{self.window_frames}], got {self.first_chunks!r}")
        if self.dtype not in TORCH_TO_KV_DTYPE:
            raise ValueError(f"CacheLayout.dtype is {self.dtype}; expected one of {list(TORCH_TO_KV_DTYPE)}")

    @property
    def key_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dtype(self) -> str:
        return TORCH_TO_KV_DTYPE[self.dtype]

    def chunk_frames(self, chunk_index: int) -> tuple[int, int]:
        """Absolute latent frames [first, end) of chunk `chunk_index` (leading `first_chunks`, then
        `frames_per_chunk` each)."""
        if chunk_index < 0:
            raise ValueError(f"chunk index must be >= 0, got {chunk_index}")
        lead = self.first_chunks
        if chunk_index < len(lead):
            first = sum(lead[:chunk_index])
            return first, first + lead[chunk_index]
        first = sum(lead) + (chunk_index - len(lead)) * self.frames_per_chunk
        return first, first + self.frames_per_chunk

    def chunk_of(self, frame: int) -> int:
        """The chunk that generates absolute frame `frame`."""
        lead = self.first_chunks
        start = 0
        for i, size in enumerate(lead):
            if frame < start + size:
                return i
            start += size
        return len(lead) + (frame - start) // self.frames_per_chunk

    def window(self, chunk_index: int) -> tuple[int, int]:
        """Non-sink frames [lo, hi) in the cache while chunk `chunk_index` is generated (the chunk included)."""
        end = self.chunk_frames(chunk_index)[1]
        return max(self.sink_frames, end - self.window_frames), end


@runtime_checkable
class GeneratorAdapter(Protocol):
    """One generator family's KV-cache layout (see module docstring)."""

    layout: CacheLayout
    store_rotated: bool

    def text_keys(self, prompt: str) -> torch.Tensor:
        """Cross-attention keys of `prompt`, every layer: `[layers, text_tokens, heads, head_dim]`."""

    def memory_region(self, kv: Any) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (K, V) views `[capacity * tokens_per_frame, heads, head_dim]` the plugin loads into."""

    def memory_capacity(self, kv: Any) -> int:
        """Memory frames per layer the cache reserves."""

    def frame_kv(self, kv: Any, frame: int) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (K, V) views `[tokens_per_frame, heads, head_dim]` of resident frame `frame`."""

    def stored_keys(self, k: torch.Tensor, frame: int, out: torch.Tensor) -> torch.Tensor:
        """Keys of frame `frame` as the bank stores them (unrotated into `out` when not store_rotated)."""

    def load_keys(self, k_slot: torch.Tensor, frame: int, position: Optional[int] = None) -> None:
        """Make keys of frame `frame` just loaded into a slot ready for attention at RoPE frame `position`
        (from `memory_position`): rotate in place as needed; None leaves them unrotated."""

    def memory_position(self, frame: int, index: int, active: int) -> Optional[int]:
        """RoPE frame position of memory frame `frame`, the `index`-th of `active` memory frames of a layer
        (attention order), in the attended sequence: `frame` itself for absolute RoPE; None when the cache
        holds unrotated keys that the generator rotates at attention time."""

    def check_cache(self, kv: Any) -> tuple[int, ...]:
        """Refuse (ValueError) a cache whose K/V no longer share storage with its memory region; return a
        fingerprint of the region (e.g. its data pointers), which changes when the region is reallocated."""

    def sink_range(self, kv: Any) -> tuple[int, int]:
        """Absolute frames [first, end) the sink holds now (after a recache that rewrote it, not 0..sink)."""

    def for_sample(self, sample: int) -> "GeneratorAdapter":
        """The adapter of sample `sample`'s row of a batched cache."""
