"""Self-Forcing / LongLive KV-cache layout, with a memory region in front of it.

Owns the mapping between that layout and the plugin. The layout, per layer, is a dict:
  "k", "v"              [B, cache_tokens, H, D]  sink frames, then the rolling local window
  "global_end_index"    [1] long                 absolute tokens committed so far
  "local_end_index"     [1] long                 end of the committed tokens inside "k" / "v"
`allocate_cache` builds exactly that, plus "k_full" / "v_full" `[B, (M + cache_frames) * N, H, D]` whose
tail *is* "k" / "v" and whose first M frames are the plugin's memory slots ("memory_frames" = M). Because
attention is a set operation over keys (RoPE lives in the keys, there is no mask), attending to
`k_full[:, (M - m) * N : M * N + end]` is attention over [sink | m memory frames | window] with zero copies
and zero allocations per chunk, and with m = 0 it is the bare cache. A real Self-Forcing pipeline adopts the
plugin by allocating its cache with `allocate_cache` and attending through `plugin.attention`.
Cross-attention caches (per layer "k", "v" `[B, text_tokens, H, D]`, "is_init") are the generator's own;
the adapter asks the generator for a prompt's text keys through `text_keys_fn`.
`make_room` and `commit_chunk` are the window rolling every generator on this layout shares (the reference
model and the diffusers Wan driver), so all of them evict the same frames at the same chunk.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from plugin.adapters.base import CacheLayout


def allocate_cache(layout: CacheLayout, batch: int = 1, memory_frames: int = 0) -> list[dict[str, Any]]:
    """A zeroed Self-Forcing KV cache for `layout` with `memory_frames` memory slots in front of each layer."""
    if not isinstance(memory_frames, int) or memory_frames < 0:
        raise ValueError(f"memory_frames must be an int >= 0, got {memory_frames!r}")
    n = layout.tokens_per_frame
    cache_tokens = (layout.sink_frames + layout.window_frames) * n
    shape = (batch, memory_frames * n + cache_tokens, layout.heads, layout.head_dim)
    cache = []
    for _ in range(layout.layers):
        k_full = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        v_full = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        cache.append({
            "k": k_full[:, memory_frames * n:], "v": v_full[:, memory_frames * n:],
            "k_full": k_full, "v_full": v_full, "memory_frames": memory_frames,
            "global_end_index": torch.zeros(1, dtype=torch.long), "local_end_index": torch.zeros(1, dtype=torch.long),
        })
    return cache


def make_room(kv: Sequence[dict], layout: CacheLayout) -> int:
    """Roll every layer's window left (sink kept) so one more chunk fits; returns the local token where the
    chunk's K/V go. Evicted frames are never read again; the chunk is not committed (see `commit_chunk`)."""
    n, s = layout.tokens_per_frame, layout.frames_per_chunk * layout.tokens_per_frame
    sink = layout.sink_frames * n
    write_start = 0
    for layer in kv:
        local_end = int(layer["local_end_index"].item())
        capacity = layer["k"].shape[1]
        evict = local_end + s - capacity
        if evict > 0:
            kept = local_end - evict - sink
            for buf in (layer["k"], layer["v"]):
                for dst in range(sink, sink + kept, evict):  # blocks of `evict` tokens never overlap
                    width = min(evict, sink + kept - dst)
                    buf[:, dst:dst + width].copy_(buf[:, dst + evict:dst + evict + width])
            layer["local_end_index"].fill_(local_end - evict)
            local_end -= evict
        write_start = local_end
    return write_start


def commit_chunk(kv: Sequence[dict], write_start: int, layout: CacheLayout) -> None:
    """The chunk whose K/V were written from local token `write_start` is now part of the cache."""
    s = layout.frames_per_chunk * layout.tokens_per_frame
    for layer in kv:
        layer["global_end_index"].add_(s)
        layer["local_end_index"].fill_(write_start + s)


class SelfForcingAdapter:
    """GeneratorAdapter for Self-Forcing / LongLive-style caches (see module docstring).

    `text_keys_fn(prompt) -> [layers, text_tokens, heads, head_dim]` is the generator's cross-attention key
    projection of a prompt. `rope_fn(x, first_frame, inverse)` rotates `[tokens, H, D]` keys of one frame;
    it is needed only when `store_rotated=False`.
    """

    def __init__(self, layout: CacheLayout, text_keys_fn: Callable[[str], torch.Tensor],
                 rope_fn: Optional[Callable[..., torch.Tensor]] = None, store_rotated: bool = True) -> None:
        if not store_rotated and rope_fn is None:
            raise ValueError("store_rotated=False needs rope_fn to rotate keys at load time")
        self.layout = layout
        self.store_rotated = store_rotated
        self._text_keys_fn = text_keys_fn
        self._rope_fn = rope_fn

    @classmethod
    def for_reference(cls, model: Any, store_rotated: bool = True) -> "SelfForcingAdapter":
        """The adapter of `plugin.reference_model.ReferenceDiT` (the same layout, exercised for real)."""
        return cls(model.layout, model.text_keys, model.rope.rotate, store_rotated)

    # -- reading the cache ------------------------------------------------------------------------
    def text_keys(self, prompt: str) -> torch.Tensor:
        keys = self._text_keys_fn(prompt)
        lay = self.layout
        if keys.dim() != 4 or keys.shape[0] != lay.layers or tuple(keys.shape[2:]) != (lay.heads, lay.head_dim):
            raise ValueError(f"text keys have shape {list(keys.shape)}, expected [{lay.layers}, tokens, "
                             f"{lay.heads}, {lay.head_dim}]")
        return keys

    def memory_capacity(self, kv: Sequence[dict]) -> int:
        self._check(kv)
        return int(kv[0].get("memory_frames", 0))

    def memory_region(self, kv: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._check(kv)
        if kv[0]["k_full"].shape[0] != 1:
            raise ValueError(f"the plugin serves one video per cache (batch 1), got batch {kv[0]['k_full'].shape[0]}")
        tokens = self.memory_capacity(kv) * self.layout.tokens_per_frame
        return [(layer["k_full"][0, :tokens], layer["v_full"][0, :tokens]) for layer in kv]  # [M*N, H, D] each

    def frame_kv(self, kv: Sequence[dict], frame: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._check(kv)
        n, sink = self.layout.tokens_per_frame, self.layout.sink_frames
        out = []
        for layer in kv:
            global_end = int(layer["global_end_index"].item())
            local_end = int(layer["local_end_index"].item())
            start = frame * n if frame < sink else local_end - (global_end - frame * n)
            if frame < 0 or frame * n >= global_end or (frame >= sink and start < sink * n):
                raise ValueError(f"frame {frame} is not resident in the KV cache (committed frames end at "
                                 f"{global_end // n}, window starts at frame {(global_end - local_end) // n + sink})")
            out.append((layer["k"][0, start:start + n], layer["v"][0, start:start + n]))  # [N, H, D] views
        return out

    # -- RoPE -------------------------------------------------------------------------------------
    def stored_keys(self, k: torch.Tensor, frame: int, out: torch.Tensor) -> torch.Tensor:
        if self.store_rotated:
            return k
        return self._rope_fn(k, frame, inverse=True, out=out)

    def load_keys(self, k_slot: torch.Tensor, frame: int) -> None:
        if not self.store_rotated:
            k_slot.copy_(self._rope_fn(k_slot, frame))

    def _check(self, kv: Sequence[dict]) -> None:
        if len(kv) != self.layout.layers or "k_full" not in kv[0]:
            raise ValueError(f"expected a cache from allocate_cache with {self.layout.layers} layers, got "
                             f"{len(kv)} layers with keys {sorted(kv[0]) if len(kv) else []}")
