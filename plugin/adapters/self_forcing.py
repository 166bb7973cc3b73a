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
model and the diffusers Wan driver), so all of them evict the same frames at the same chunk; they take the
chunk's size, so uneven chunks (`CacheLayout.first_chunks`) roll the same way.
Real pipelines' shapes (see base.py): a batched cache is served one sample at a time (`for_sample`, a row
of "k_full"); `check_cache` refuses a cache whose "k" / "v" were replaced by tensors outside "k_full"; a
recache on a prompt switch (`recache_frames`, `begin_recache`, LongLive's `_recache_after_switch`) re-runs
the last frames with the new prompt, and with `global_sink=False` the sink then holds the recache's first
frames: "sink_start" (per layer, an int) says which. `rope="relative"` is a cache of unrotated keys whose
generator rotates the attended [sink | memory | window] at positions 0, 1, ... (LongLive's "infinity"
model): memory slots then hold unrotated keys too, at positions `sink + index`.
"""

from __future__ import annotations

import copy
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
            "sink_start": 0, "layer": len(cache),  # the layer index, for cache_attention(..., layer_cache["layer"])
        })
    return cache


def make_room(kv: Sequence[dict], layout: CacheLayout, frames: Optional[int] = None) -> int:
    """Roll every layer's window left (sink kept) so one more chunk of `frames` frames (default
    `frames_per_chunk`) fits; returns the local token where the chunk's K/V go. Evicted frames are never read
    again; the chunk is not committed (see `commit_chunk`)."""
    n = layout.tokens_per_frame
    s = (layout.frames_per_chunk if frames is None else frames) * n
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


def commit_chunk(kv: Sequence[dict], write_start: int, layout: CacheLayout, frames: Optional[int] = None) -> None:
    """The chunk of `frames` frames (default `frames_per_chunk`) whose K/V were written from local token
    `write_start` is now part of the cache."""
    s = (layout.frames_per_chunk if frames is None else frames) * layout.tokens_per_frame
    for layer in kv:
        layer["global_end_index"].add_(s)
        layer["local_end_index"].fill_(write_start + s)


def recache_frames(layout: CacheLayout, next_frame: int, global_sink: bool) -> tuple[int, int]:
    """Frames [first, next_frame) a recache before frame `next_frame` re-runs: the whole cache (the sink
    rewritten, LongLive's `global_sink=False`) or only the window (`global_sink=True`, the sink kept)."""
    if global_sink:
        return max(layout.sink_frames, next_frame - layout.window_frames), next_frame
    return max(0, next_frame - layout.sink_frames - layout.window_frames), next_frame


def begin_recache(kv: Sequence[dict], layout: CacheLayout, first_frame: int, global_sink: bool) -> None:
    """Empty the cache for a recache whose first re-run frame is `first_frame` (see `recache_frames`); the
    generator then re-runs the frames chunk by chunk (`make_room` / `commit_chunk`). Without a global sink
    the re-run's first `sink_frames` frames become the sink ("sink_start")."""
    n = layout.tokens_per_frame
    for layer in kv:
        if not global_sink:
            layer["k"].zero_()
            layer["v"].zero_()
            layer["sink_start"] = first_frame
        kept = layout.sink_frames * n if global_sink else 0
        layer["local_end_index"].fill_(kept)
        layer["global_end_index"].fill_(first_frame * n)


class SelfForcingAdapter:
    """GeneratorAdapter for Self-Forcing / LongLive-style caches (see module docstring).

    `text_keys_fn(prompt) -> [layers, text_tokens, heads, head_dim]` is the generator's cross-attention key
    projection of a prompt. `rope_fn(x, first_frame, inverse)` rotates `[tokens, H, D]` keys of one frame;
    it is needed only when `store_rotated=False` with absolute RoPE. `rope="relative"`: the cache holds
    unrotated keys and the generator rotates at attention time (entries are banked unrotated). `sample`:
    the row of a batched cache this adapter serves (None: the cache must have batch 1).
    """

    def __init__(self, layout: CacheLayout, text_keys_fn: Callable[[str], torch.Tensor],
                 rope_fn: Optional[Callable[..., torch.Tensor]] = None, store_rotated: bool = True,
                 rope: str = "absolute", sample: Optional[int] = None) -> None:
        if rope not in ("absolute", "relative"):
            raise ValueError(f"rope is {rope!r}; expected 'absolute' (keys cached rotated at their frame) or "
                             "'relative' (keys cached unrotated, rotated by the generator at attention time)")
        if rope == "relative" and store_rotated:
            raise ValueError("rope='relative' caches unrotated keys: use store_rotated=False")
        if rope == "absolute" and not store_rotated and rope_fn is None:
            raise ValueError("store_rotated=False needs rope_fn to rotate keys at load time")
        if sample is not None and (not isinstance(sample, int) or sample < 0):
            raise ValueError(f"sample must be an int >= 0, got {sample!r}")
        self.layout = layout
        self.store_rotated = store_rotated
        self.rope = rope
        self.sample = sample
        self._text_keys_fn = text_keys_fn
        self._rope_fn = rope_fn

    @classmethod
    def for_reference(cls, model: Any, store_rotated: bool = True) -> "SelfForcingAdapter":
        """The adapter of `plugin.reference_model.ReferenceDiT` (the same layout, exercised for real)."""
        relative = getattr(model.cfg, "rope_mode", "absolute") == "relative"
        return cls(model.layout, model.text_keys, model.rope.rotate, store_rotated and not relative,
                   "relative" if relative else "absolute")

    def for_sample(self, sample: int) -> "SelfForcingAdapter":
        twin = copy.copy(self)
        if not isinstance(sample, int) or sample < 0:
            raise ValueError(f"sample must be an int >= 0, got {sample!r}")
        twin.sample = sample
        return twin

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

    def _row(self, kv: Sequence[dict]) -> int:
        batch = kv[0]["k_full"].shape[0]
        if self.sample is None:
            if batch != 1:
                raise ValueError(f"the KV cache has batch {batch}; one MemFlowPlugin serves one video (batch 1). "
                                 f"For a batch, use plugin.MemFlowBatch(memory, config, adapter, batch={batch}): "
                                 "each sample gets its own plugin and stream")
            return 0
        if self.sample >= batch:
            raise ValueError(f"sample {self.sample} is outside the KV cache's batch of {batch}")
        return self.sample

    def memory_region(self, kv: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._check(kv)
        b = self._row(kv)
        tokens = self.memory_capacity(kv) * self.layout.tokens_per_frame
        return [(layer["k_full"][b, :tokens], layer["v_full"][b, :tokens]) for layer in kv]  # [M*N, H, D] each

    def check_cache(self, kv: Sequence[dict]) -> tuple[int, ...]:
        self._check(kv)
        n = self.layout.tokens_per_frame
        marks = []
        for i, layer in enumerate(kv):
            offset = int(layer.get("memory_frames", 0)) * n
            for name in ("k", "v"):
                full, tail = layer[f"{name}_full"], layer[name]
                expected = full.data_ptr() + offset * full.stride(1) * full.element_size()  # no view made
                if (tail.data_ptr() != expected or tail.stride() != full.stride()
                        or tail.shape[1] != full.shape[1] - offset or tail.shape[0] != full.shape[0]):
                    raise ValueError(
                        f"layer {i}'s cache[{name!r}] no longer shares storage with the memory region "
                        f"cache['{name}_full'] (it was reallocated or replaced, shape {list(tail.shape)}); the "
                        "plugin's memory frames would not be attended. Keep writing into the tensors "
                        "allocate_cache made (copy_ / index_copy_, never `cache['k'] = new`), or allocate a "
                        "new cache with allocate_cache and a new plugin")
            marks.append(layer["k_full"].data_ptr())
            marks.append(layer["v_full"].data_ptr())
        return tuple(marks)

    def sink_range(self, kv: Sequence[dict]) -> tuple[int, int]:
        start = int(kv[0].get("sink_start", 0))
        return start, start + self.layout.sink_frames

    def frame_kv(self, kv: Sequence[dict], frame: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._check(kv)
        b = self._row(kv)
        n, sink = self.layout.tokens_per_frame, self.layout.sink_frames
        # every layer rolls and commits together (make_room / commit_chunk): one read of the indices serves all,
        # so a cache whose indices live on the GPU costs one host sync per call, not two per layer
        global_end = int(kv[0]["global_end_index"].item())
        local_end = int(kv[0]["local_end_index"].item())
        sink_start = int(kv[0].get("sink_start", 0))
        in_sink = sink_start <= frame < sink_start + sink and frame * n < global_end
        start = (frame - sink_start) * n if in_sink else local_end - (global_end - frame * n)
        if frame < 0 or frame * n >= global_end or (not in_sink and start < sink * n):
            raise ValueError(f"frame {frame} is not resident in the KV cache (committed frames end at "
                             f"{global_end // n}, window starts at frame {(global_end - local_end) // n + sink}, "
                             f"sink holds frames [{sink_start}, {sink_start + sink}))")
        return [(layer["k"][b, start:start + n], layer["v"][b, start:start + n]) for layer in kv]  # [N, H, D] views

    # -- RoPE -------------------------------------------------------------------------------------
    def stored_keys(self, k: torch.Tensor, frame: int, out: torch.Tensor) -> torch.Tensor:
        if self.store_rotated or self.rope == "relative":
            return k  # rotated as cached, or (relative) cached unrotated already
        return self._rope_fn(k, frame, inverse=True, out=out)

    def memory_position(self, frame: int, index: int, active: int) -> Optional[int]:
        if self.rope == "relative":
            return None  # unrotated in the slot; the generator rotates it at sink_frames + index
        return frame

    def relative_positions(self, active: int) -> range:
        """Relative RoPE: the positions the generator gives a layer's `active` memory frames (after the sink)."""
        return range(self.layout.sink_frames, self.layout.sink_frames + active)

    def load_keys(self, k_slot: torch.Tensor, frame: int, position: Optional[int] = None) -> None:
        if position is None:
            position = None if self.rope == "relative" else frame
        if position is None:
            return  # relative RoPE: the slot keeps the unrotated keys the bank holds
        if self.store_rotated:
            if position != frame:  # banked rotated at `frame`: turn to `position`
                self._rope_fn(k_slot, frame, inverse=True, out=k_slot)  # in place: no temporaries per frame
                self._rope_fn(k_slot, position, out=k_slot)
            return
        self._rope_fn(k_slot, position, out=k_slot)

    def _check(self, kv: Sequence[dict]) -> None:
        if len(kv) != self.layout.layers or "k_full" not in kv[0]:
            raise ValueError(f"expected a cache from allocate_cache with {self.layout.layers} layers, got "
                             f"{len(kv)} layers with keys {sorted(kv[0]) if len(kv) else []}")
