"""Active memory: per-layer slots in the cache's memory region, filled by delta loading.

Owns which bank entry sits in which slot of which layer, and every copy into the slots. Promises:
- slots are the preallocated front region of the generator's KV cache (adapter `memory_region`); nothing
  is allocated per chunk besides the host tensors a fetch returns;
- delta loading: an (entry, layer) already resident is never copied from the host again; it stays in its
  slot or, when the active set shrinks, moves device-to-device (counted apart); a chunk whose selection did
  not change copies 0 frames;
- a layer's m active frames always occupy its last m slots, so attention reads one contiguous view;
- on CUDA, fetched frames go through a pinned staging buffer and are copied with `non_blocking=True`; the
  staging buffer is not rewritten (by the prefetch thread) before the copies reading it have finished.
`plan` and `stage` run on the memory thread (they read the slot table, which only `commit` changes, on the
generator's thread, after the staged result was awaited); a plan staged against an older table is refused.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import ml_dtypes
import numpy as np
import torch

from plugin.adapters.base import CacheLayout, GeneratorAdapter
from plugin.retrieval import Selection

Fetch = Callable[[Sequence[int], Sequence[int]], np.ndarray]  # (ids, layers) -> [n, nl, 2, N, H, D]


@dataclass(frozen=True)
class LoadPlan:
    version: int  # slot-table version the plan was made against
    selection: Selection
    groups: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (entry ids, layers) fetched together

    @property
    def frames_to_load(self) -> int:
        return sum(len(ids) * len(layers) for ids, layers in self.groups)


@dataclass(frozen=True)
class Staged:
    plan: LoadPlan
    data: tuple[torch.Tensor, ...]  # per group `[n, len(layers), 2, N, H, D]` on the host


@dataclass(frozen=True)
class LoadResult:
    frames: tuple[int, ...]  # active memory frames per layer
    loaded: int  # (entry, layer) frames copied host -> device
    moved: int  # (entry, layer) frames moved between slots


class MemorySlots:
    def __init__(self, layout: CacheLayout, capacity: int) -> None:
        self.layout = layout
        self.capacity = capacity
        self.tables: list[list[Optional[int]]] = [[None] * capacity for _ in range(layout.layers)]
        self.version = 0
        self._regions: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None
        self._mirrors: list[Sequence[tuple[torch.Tensor, torch.Tensor]]] = []  # other caches of the video (CFG)
        self._bound: Optional[tuple[int, ...]] = None
        self._cuda = layout.device.type == "cuda"
        self._staging: Optional[torch.Tensor] = None
        self._copied: Optional["torch.cuda.Event"] = None
        self._lock = threading.Lock()
        if self._cuda and capacity:
            shape = (capacity * layout.layers, 2, layout.tokens_per_frame, layout.heads, layout.head_dim)
            self._staging = torch.empty(shape, dtype=layout.dtype, pin_memory=True)  # [cap*L, 2, N, H, D]

    def bind(self, kv: object, adapter: GeneratorAdapter, mirrors: Sequence[object] = ()) -> None:
        """Attach to the cache of the video being generated (and `mirrors`, its other caches that attend the
        same memory, e.g. CFG's unconditional one); a new set of caches starts with empty slots."""
        key = (id(kv), *(id(m) for m in mirrors))
        if self._bound == key and self._regions is not None:
            return
        bound = []
        for cache in (kv, *mirrors):
            have = adapter.memory_capacity(cache)
            if have < self.capacity:
                raise ValueError(f"the KV cache reserves {have} memory frames per layer, the plugin needs "
                                 f"{self.capacity}; allocate it with memory_frames=plugin.memory_frames")
            regions = adapter.memory_region(cache)
            n = self.layout.tokens_per_frame
            # use the last `capacity` frames of a larger region, so right-alignment matches the attention view
            bound.append([(k[(have - self.capacity) * n:], v[(have - self.capacity) * n:]) for k, v in regions])
        self._regions, self._mirrors = bound[0], bound[1:]
        self._bound = key
        self.reset()

    def reset(self) -> None:
        self.tables = [[None] * self.capacity for _ in range(self.layout.layers)]
        self.version += 1

    def resident(self, layer: int) -> tuple[int, ...]:
        """Entries active or parked in `layer`'s slots, slot order."""
        return tuple(e for e in self.tables[layer] if e is not None)

    # -- memory thread -----------------------------------------------------------------------------
    def plan(self, selection: Selection) -> LoadPlan:
        """Which (entry, layer) frames must come from the bank: those not in the layer's slots."""
        need: dict[int, list[int]] = {}
        for layer, ids in enumerate(selection.layer_ids):
            if len(ids) > self.capacity:
                raise ValueError(f"layer {layer} selects {len(ids)} frames, the slots hold {self.capacity}")
            present = set(self.tables[layer])
            for e in ids:
                if e not in present:
                    need.setdefault(e, []).append(layer)
        by_layers: dict[tuple[int, ...], list[int]] = {}
        for e, layers in need.items():
            by_layers.setdefault(tuple(layers), []).append(e)
        groups = tuple((tuple(ids), layers) for layers, ids in by_layers.items())
        return LoadPlan(self.version, selection, groups)

    def stage(self, plan: LoadPlan, fetch: Fetch) -> Staged:
        """Fetch the plan's frames from the bank into host memory (pinned staging on CUDA)."""
        lay = self.layout
        frame_shape = (2, lay.tokens_per_frame, lay.heads, lay.head_dim)
        data = []
        row = 0
        if self._copied is not None:
            self._copied.synchronize()  # the previous commit's copies still read the staging buffer
        for ids, layers in plan.groups:
            arr = fetch(ids, layers)
            want = (len(ids), len(layers), *frame_shape)
            if tuple(arr.shape) != want:
                raise ValueError(f"fetch returned {list(arr.shape)}, expected {list(want)}")
            host = to_torch(arr)
            if self._staging is not None:
                rows = len(ids) * len(layers)
                dst = self._staging[row:row + rows].view(want)
                dst.copy_(host)
                host, row = dst, row + rows
            data.append(host)
        return Staged(plan, tuple(data))

    # -- generator thread --------------------------------------------------------------------------
    def commit(self, staged: Staged, adapter: GeneratorAdapter) -> LoadResult:
        """Make the plan's selection active: keep, move or load each (entry, layer); right-align."""
        plan = staged.plan
        if plan.version != self.version:
            raise RuntimeError(f"load plan made against slot table v{plan.version}, table is v{self.version}")
        if self._regions is None:
            raise RuntimeError("MemorySlots.commit before bind(kv)")
        source = {}
        for (ids, layers), block in zip(plan.groups, staged.data):
            for i, e in enumerate(ids):
                for j, layer in enumerate(layers):
                    source[(e, layer)] = block[i, j]  # [2, N, H, D]
        frames = dict(plan.selection.frames)
        n, cap = self.layout.tokens_per_frame, self.capacity
        loaded = moved = 0
        counts = []
        selection = plan.selection.layer_ids or tuple(() for _ in self.tables)
        for layer, want in enumerate(selection):
            table = self.tables[layer]
            k_region, v_region = self._regions[layer]  # [cap*N, H, D]
            m = len(want)
            target = range(cap - m, cap)
            wanted = set(want)
            new = [None] * cap
            for j in target:
                if table[j] in wanted:
                    new[j] = table[j]
            free = [j for j in target if new[j] is None]
            where = {e: j for j, e in enumerate(table) if e is not None}
            for e in want:
                if e in new:
                    continue
                j = free.pop(0)
                if e in where:  # parked outside the active range: device-to-device
                    src = where[e]
                    k_region[j * n:(j + 1) * n].copy_(k_region[src * n:(src + 1) * n])
                    v_region[j * n:(j + 1) * n].copy_(v_region[src * n:(src + 1) * n])
                    moved += 1
                else:
                    frame = source[(e, layer)]
                    k_region[j * n:(j + 1) * n].copy_(frame[0], non_blocking=self._cuda)
                    v_region[j * n:(j + 1) * n].copy_(frame[1], non_blocking=self._cuda)
                    index = j - (cap - m)  # its place among the layer's active frames, attention order
                    adapter.load_keys(k_region[j * n:(j + 1) * n], frames[e],
                                      adapter.memory_position(frames[e], index, m))
                    loaded += 1
                for mk, mv in (mirror[layer] for mirror in self._mirrors):  # same slot, device-to-device
                    mk[j * n:(j + 1) * n].copy_(k_region[j * n:(j + 1) * n])
                    mv[j * n:(j + 1) * n].copy_(v_region[j * n:(j + 1) * n])
                new[j] = e
            # entries outside the active range stay parked (their bytes are intact) for a cheap move back
            for j in range(cap - m):
                new[j] = table[j] if table[j] not in wanted else None
            self.tables[layer] = new
            counts.append(m)
        if self._cuda and loaded:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.version += 1
        return LoadResult(tuple(counts), loaded, moved)


def to_torch(arr: np.ndarray) -> torch.Tensor:
    """A host tensor sharing `arr`'s memory (bfloat16 through its bit pattern)."""
    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a host tensor (bfloat16 as ml_dtypes.bfloat16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
