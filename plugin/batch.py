"""MemFlowBatch: MemFlow for a batch of videos generated together, each sample its own plugin and stream.

Owns the fan-out of the two hooks over a batched KV cache (`[B, tokens, H, D]` per layer). Sample `b` gets a
`MemFlowPlugin` of its own (slots in row `b` of the cache's memory region through `adapter.for_sample(b)`,
its own stream `f"{config.stream}-{b}"`, its own write-back and fail-open guard), so no sample ever attends
another sample's frames; all samples share one pinned-memory budget (`config.pinned_bytes` bounds the whole
batch) and their client's arena registrations (pinned.py). The generator's attention reads one contiguous view
for the whole batch, so every sample attends the same number of memory frames per layer: the batch's
`ChunkMemory` takes, per layer, the fewest any sample loaded (a sample with more attends its last ones - each
layer's active frames are right-aligned - and `last_reports` says what each loaded). With every sample's bank
empty, or the plugin off, the batch is the bare model's, bit for bit. On CUDA the batch's attention waits for
every sample's slot copies (each plugin's fence).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from memory_service import Memory
from plugin.adapters.base import GeneratorAdapter
from plugin.attention import NO_MEMORY, ChunkMemory
from plugin.config import MemFlowConfig
from plugin.hook import ChunkReport, MemFlowPlugin, PluginStats
from plugin.pinned import PinnedBudget


class _Fences:
    """The batch's attention orders against every sample plugin's copy fence (each has its own copy stream)."""

    def __init__(self, fences: list[tuple[Any, int]]) -> None:
        self.fences = fences

    def attend(self, layer: int, epoch: int) -> Any:
        streams = [f.attend(layer, e) for f, e in self.fences]  # each makes the current stream wait for its copies
        return streams[0]

    def attended(self, stream: Any) -> None:
        for f, _ in self.fences:
            f.attended(stream)

    def wait_all(self, stream: Any = None) -> None:
        """`ChunkMemory.wait`: make `stream` (default: the current one) wait for every sample's slot copies."""
        for f, _ in self.fences:
            f.wait_all(stream)


class MemFlowBatch:
    """`MemFlowBatch(memory, config, adapter, batch)`: one `MemFlowPlugin` per sample (see module docstring).

    Hooks take the batch's cache and one prompt per sample (or one prompt for all):
    `before_chunk(chunk_index, prompts, kv, *, next_prompts=None, mirrors=()) -> ChunkMemory` and
    `after_chunk(chunk_index, kv, keys=None)` (`keys`: one mapping per sample, or None).
    """

    def __init__(self, memory: Memory, config: MemFlowConfig, adapter: GeneratorAdapter, batch: int) -> None:
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        self.batch, self.config = batch, config
        self.plugins: list[MemFlowPlugin] = []
        # one pinned budget for the batch (config.pinned_bytes bounds all its samples together, not each one), and
        # the samples share the client's arena registrations (ArenaPins.shared): each arena is pinned once
        self.pinned = PinnedBudget(config.pinned_bytes)
        try:
            for b in range(batch):
                self.plugins.append(MemFlowPlugin(memory, config.replace(stream=f"{config.stream}-{b}"),
                                                  adapter.for_sample(b), pinned=self.pinned))
        except BaseException:
            self.close()
            raise
        self.memory_frames = self.plugins[0].memory_frames
        self.last_reports: tuple[Optional[ChunkReport], ...] = (None,) * batch

    def _per_sample(self, value: Union[str, Sequence[str], None], name: str) -> list[Optional[str]]:
        if value is None or isinstance(value, str):
            return [value] * self.batch
        values: list[Optional[str]] = list(value)
        if len(values) != self.batch:
            raise ValueError(f"{name} has {len(values)} entries, the batch has {self.batch} samples")
        return values

    def before_chunk(self, chunk_index: int, prompts: Union[str, Sequence[str]], kv: Any, *,
                     next_prompts: Union[str, Sequence[str], None] = None,
                     mirrors: Sequence[Any] = ()) -> ChunkMemory:
        if not self.config.enabled:
            return NO_MEMORY
        now, nxt = self._per_sample(prompts, "prompts"), self._per_sample(next_prompts, "next_prompts")
        memories = [p.before_chunk(chunk_index, str(pr), kv, next_prompt=np_, mirrors=mirrors)
                    for p, pr, np_ in zip(self.plugins, now, nxt)]
        self.last_reports = tuple(p.last_report for p in self.plugins)
        frames: tuple[int, ...] = ()
        if all(m.frames for m in memories):  # a sample without memory this chunk: the batch attends none
            frames = tuple(min(col) for col in zip(*(m.frames for m in memories)))
            frames = frames if any(frames) else ()
        first = memories[0]
        fences = [(m.fence, m.epoch) for m in memories if m.fence is not None]
        if not frames and not fences and first.attention is None:
            return NO_MEMORY
        # CUDA: the batch's attention waits for every sample's slot copies (and records that it ran, for them)
        fence = _Fences(fences) if fences else None
        # _Fences is a MemoryFence by duck typing (attend / attended), for every sample's fence at once
        return ChunkMemory(frames, first.sma_k if frames else 0, first.workspace, fence,  # type: ignore[arg-type]
                           0, first.attention)

    def after_chunk(self, chunk_index: int, kv: Any,
                    keys: Optional[Sequence[Optional[Mapping[str, np.ndarray]]]] = None) -> None:
        per = [None] * self.batch if keys is None else list(keys)
        if len(per) != self.batch:
            raise ValueError(f"keys has {len(per)} entries, the batch has {self.batch} samples")
        for p, k in zip(self.plugins, per):
            p.after_chunk(chunk_index, kv, k)

    def stats(self) -> tuple[PluginStats, ...]:
        return tuple(p.stats() for p in self.plugins)

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        return all([p.flush(timeout_s) for p in self.plugins])

    def close(self, timeout_s: float = 5.0) -> None:
        for p in self.plugins:
            p.close(timeout_s)

    def __enter__(self) -> "MemFlowBatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
