"""The adapter protocol: what the plugin needs to know about a generator's KV cache, and nothing more.

Owns the contract between `MemFlowPlugin` and a generator family. An adapter declares the cache layout
(`CacheLayout`), says which absolute latent frames are resident while a chunk is generated, hands out views
of one frame's K/V in the cache, exposes the preallocated memory region the plugin loads frames into, and
computes the text cross-attention keys of a prompt (the NAM query). It also declares how RoPE is handled:
`store_rotated=True` stores keys as the cache holds them (rotated at their absolute frame, the reference's
choice; entries carry `rope_position`), `False` stores them unrotated (entries carry `rope_position=None`)
and rotates them at load time. The plugin never touches a generator tensor except through an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

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
        if self.dtype not in TORCH_TO_KV_DTYPE:
            raise ValueError(f"CacheLayout.dtype is {self.dtype}; expected one of {list(TORCH_TO_KV_DTYPE)}")

    @property
    def key_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dtype(self) -> str:
        return TORCH_TO_KV_DTYPE[self.dtype]

    def chunk_frames(self, chunk_index: int) -> tuple[int, int]:
        """Absolute latent frames [first, end) of chunk `chunk_index`."""
        first = chunk_index * self.frames_per_chunk
        return first, first + self.frames_per_chunk

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

    def load_keys(self, k_slot: torch.Tensor, frame: int) -> None:
        """Make keys of frame `frame` just loaded into a slot ready for attention (rotate in place when the
        adapter stores keys unrotated; a no-op when it stores them rotated)."""
