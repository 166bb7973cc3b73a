"""Active memory: per-layer slots in the cache's memory region, filled by delta loading.

Owns which bank entry sits in which slot of which layer, and every copy into the slots. Promises:
- slots are the preallocated front region of the generator's KV cache (adapter `memory_region`); nothing
  is allocated per chunk besides the host tensors a fetch returns (host staging and CUDA events are made once,
  staging on first need);
- delta loading: an (entry, layer) already resident is never copied from the host again; it stays in its
  slot or, when the active set shrinks, moves device-to-device (counted apart); a chunk whose selection did
  not change copies 0 frames;
- a layer's m active frames always occupy its last m slots, so attention reads one contiguous view;
- on CUDA every copy into the slots runs on the plugin's copy stream of the cache's device (`MemoryFence`,
  attention.py), after the generator's current stream and the last attention that read the slots, and each
  layer's attention waits for that layer's copies (`mark_ready`); the regions are `record_stream`ed on the copy
  stream, so the caching allocator never hands their memory out while a copy may still write it;
- host memory on the way: a fetched array that views a shared-memory arena registered with CUDA (pinned.py) is
  copied to the GPU in place (`non_blocking`, one host copy on the whole path); any other is copied into one of
  `LANES` = 2 pinned staging lanes (double-buffered: chunk n+1's stage fills the other lane while chunk n's
  copies still read theirs), bounded by the plugin's pinned budget; what fits in neither is copied from
  pageable memory (slower, the same bytes) - issued like the others, with no host sync of the copy stream by
  the plugin (a synchronous copy would wait for everything the copy stream waits on: the generator's queued
  work); only the driver's own staging of pageable bytes may hold the call;
- a lane is rewritten only after the copies that read it have finished (its event, made with blocking sync:
  the memory thread that waits for it sleeps, it never spins a core), and a staged result is committed only
  while its lane still holds it (generation check), so no copy ever reads staging that a later stage has
  overwritten; the host arrays a commit's copies read (a registered arena's fetched arrays, with their arena
  leases, and pageable ones) are held by the lane until those copies have finished.
`plan` and `stage` run on the memory thread, one at a time (they read the slot table, which only `commit`
changes, on the generator's thread, after the staged result was awaited); a plan staged against an older
table is refused.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import ml_dtypes
import numpy as np
import torch

from plugin.adapters.base import CacheLayout, GeneratorAdapter
from plugin.attention import MemoryFence
from plugin.pinned import ArenaPins, PinnedBudget
from plugin.retrieval import Selection

Fetch = Callable[[Sequence[int], Sequence[int]], np.ndarray]  # (ids, layers) -> [n, nl, 2, N, H, D]
LANES = 2  # staging lanes: one being filled for chunk n+1 while chunk n's copies read the other


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
    lane: int = -1  # the staging lane it was staged through (-1: none)
    generation: int = 0  # the lane's generation then: a newer stage of the lane makes it stale
    pinned: tuple[bool, ...] = ()  # per group: page-locked (copied non_blocking)


@dataclass(frozen=True)
class LoadResult:
    frames: tuple[int, ...]  # active memory frames per layer
    loaded: int  # (entry, layer) frames copied host -> device
    moved: int  # (entry, layer) frames moved between slots


@dataclass(frozen=True)
class StagingStats:
    direct: int  # frame-layers copied to the GPU straight from a registered arena
    staged: int  # through a staging lane
    pageable: int  # from pageable memory (no lane room within the budget)
    lane_fills: tuple[int, ...]  # stages per lane
    lane_waits: int  # stages that had to wait for a lane's copies to finish
    staging_bytes: int  # host staging allocated (pinned on CUDA)


class _Lane:
    """One staging buffer, the event of the copies that read it, and what those copies hold."""

    def __init__(self, cuda: bool) -> None:
        self.staging: Optional[torch.Tensor] = None  # [rows, 2, N, H, D], made on first need
        self.allocated = False
        self.reserved = 0  # bytes of the plugin's pinned budget it holds
        # re-recorded by every commit through this lane; blocking: a host wait for it sleeps instead of spinning
        self.event = torch.cuda.Event(blocking=True) if cuda else None
        self.pending = False  # the event was recorded and not yet waited for
        self.held: tuple[torch.Tensor, ...] = ()  # host tensors the pending copies read
        self.generation = 0
        self.fills = 0
        self.lock = threading.Lock()


class MemorySlots:
    """`host_staging` (default: on CUDA) stages fetched frames through the lanes; `budget` bounds their bytes;
    `pins` registers shared-memory arenas; `fence` orders the copies (CUDA)."""

    def __init__(self, layout: CacheLayout, capacity: int, *, budget: Optional[PinnedBudget] = None,
                 fence: Optional[MemoryFence] = None, pins: Optional[ArenaPins] = None,
                 host_staging: Optional[bool] = None) -> None:
        self.layout = layout
        self.capacity = capacity
        self.tables: list[list[Optional[int]]] = [[None] * capacity for _ in range(layout.layers)]
        self.version = 0
        self._regions: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None
        self._mirrors: list[Sequence[tuple[torch.Tensor, torch.Tensor]]] = []  # other caches of the video (CFG)
        self._bound: Optional[tuple[int, ...]] = None
        self._cuda = layout.device.type == "cuda"
        if self._cuda and fence is None and capacity:
            fence = MemoryFence(layout.device, layout.layers)
        self.fence = fence
        self.budget = budget if budget is not None else PinnedBudget(0)
        self._pins = pins
        self._host_staging = self._cuda if host_staging is None else host_staging
        self._lanes = [_Lane(self._cuda) for _ in range(LANES)]
        self._next_lane = 0
        self._lock = threading.Lock()
        self._direct = self._staged = self._pageable = self._lane_waits = 0

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
        if self.fence is not None:
            for regions in bound:
                for k, v in regions:
                    if k.device != self.fence.device or v.device != self.fence.device:
                        raise ValueError(f"the cache's memory region is on {k.device}, the plugin's layout says "
                                         f"{self.fence.device}; build the adapter's CacheLayout on the cache's device")
                    k.record_stream(self.fence.stream)  # the copy stream writes them: never reused under it
                    v.record_stream(self.fence.stream)
        self._regions, self._mirrors = bound[0], bound[1:]
        self._bound = key
        self.reset()

    def reset(self) -> None:
        self.tables = [[None] * self.capacity for _ in range(self.layout.layers)]
        self.version += 1

    def resident(self, layer: int) -> tuple[int, ...]:
        """Entries active or parked in `layer`'s slots, slot order."""
        return tuple(e for e in self.tables[layer] if e is not None)

    def staging_stats(self) -> StagingStats:
        with self._lock:
            return StagingStats(self._direct, self._staged, self._pageable, tuple(lane.fills for lane in self._lanes),
                                self._lane_waits, sum(lane.staging.numel() * lane.staging.element_size()
                                                      for lane in self._lanes if lane.staging is not None))

    def lane_buffer(self, lane: int) -> Optional[torch.Tensor]:
        """Lane `lane`'s staging buffer (None before its first need, or when the budget had no room)."""
        return self._lanes[lane].staging

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
        """Fetch the plan's frames into host memory the GPU can copy from (see module docstring)."""
        lay = self.layout
        frame_shape = (2, lay.tokens_per_frame, lay.heads, lay.head_dim)
        lane, index, generation = self._take_lane()
        data: list[torch.Tensor] = []
        pinned: list[bool] = []
        row = 0
        for ids, layers in plan.groups:
            arr = fetch(ids, layers)
            want = (len(ids), len(layers), *frame_shape)
            if tuple(arr.shape) != want:
                raise ValueError(f"fetch returned {list(arr.shape)}, expected {list(want)}")
            rows = len(ids) * len(layers)
            if self._pins is not None and self._pins.direct(arr):
                data.append(to_torch(arr))  # page-locked where the service wrote it: no host copy here
                pinned.append(True)
                kind = "direct"
            elif self._host_staging and self._lane_room(lane, row + rows):
                dst = lane.staging[row:row + rows].view(want)  # type: ignore[index]
                dst.copy_(to_torch(arr))
                data.append(dst)
                pinned.append(self._cuda)  # lanes are page-locked on CUDA
                row += rows
                kind = "staged"
            else:
                data.append(to_torch(arr))
                pinned.append(False)
                kind = "pageable"
            with self._lock:
                if kind == "direct":
                    self._direct += rows
                elif kind == "staged":
                    self._staged += rows
                else:
                    self._pageable += rows
        return Staged(plan, tuple(data), index, generation, tuple(pinned))

    def _take_lane(self) -> tuple[_Lane, int, int]:
        """The next lane, once the copies that read it have finished: (lane, index, its new generation)."""
        with self._lock:
            index = self._next_lane
            self._next_lane = (index + 1) % LANES
        lane = self._lanes[index]
        with lane.lock:  # a commit through this lane is either done issuing its copies or not begun (then stale)
            lane.generation += 1
            lane.fills += 1
            if lane.pending:
                assert lane.event is not None
                if not lane.event.query():
                    with self._lock:
                        self._lane_waits += 1
                    lane.event.synchronize()  # the memory thread waits, never the generator
                lane.pending = False
            lane.held = ()
            return lane, index, lane.generation

    def _lane_room(self, lane: _Lane, rows: int) -> bool:
        if not lane.allocated:
            lay = self.layout
            lane.allocated = True  # once: a budget that had no room is not asked again every chunk
            shape = (self.capacity * lay.layers, 2, lay.tokens_per_frame, lay.heads, lay.head_dim)
            nbytes = int(np.prod(shape)) * torch.empty((), dtype=lay.dtype).element_size()
            if self.budget.reserve(nbytes):
                try:
                    lane.staging = torch.empty(shape, dtype=lay.dtype, pin_memory=self._cuda)  # [cap*L, 2, N, H, D]
                    lane.reserved = nbytes
                except RuntimeError:  # the driver refused to lock more memory: no lane (pageable copies)
                    self.budget.release(nbytes)
        return lane.staging is not None and rows <= lane.staging.shape[0]

    # -- generator thread --------------------------------------------------------------------------
    def commit(self, staged: Staged, adapter: GeneratorAdapter) -> LoadResult:
        """Make the plan's selection active: keep, move or load each (entry, layer); right-align."""
        plan = staged.plan
        if plan.version != self.version:
            raise RuntimeError(f"load plan made against slot table v{plan.version}, table is v{self.version}")
        if self._regions is None:
            raise RuntimeError("MemorySlots.commit before bind(kv)")
        lane = self._lanes[staged.lane] if 0 <= staged.lane < LANES else None
        with lane.lock if lane is not None else contextlib.nullcontext():
            if lane is not None and staged.generation != lane.generation:
                raise RuntimeError(f"staged frames of lane {staged.lane} generation {staged.generation} were "
                                   f"overwritten by a newer stage (generation {lane.generation})")
            if self.fence is None:
                return self._apply(staged, adapter)
            with self.fence.copies():
                try:
                    return self._apply(staged, adapter)
                finally:
                    if lane is not None:  # even after a failure: copies may have been issued from the lane
                        assert lane.event is not None
                        lane.event.record(self.fence.stream)
                        lane.pending, lane.held = True, staged.data

    def _apply(self, staged: Staged, adapter: GeneratorAdapter) -> LoadResult:
        plan = staged.plan
        source: dict[tuple[int, int], tuple[torch.Tensor, bool]] = {}
        pinned = staged.pinned or (False,) * len(staged.data)
        for (ids, layers), block, locked in zip(plan.groups, staged.data, pinned):
            for i, e in enumerate(ids):
                for j, layer in enumerate(layers):
                    source[(e, layer)] = (block[i, j], locked)  # [2, N, H, D]
        frames = dict(plan.selection.frames)
        n, cap = self.layout.tokens_per_frame, self.capacity
        loaded = moved = 0
        counts = []
        selection = plan.selection.layer_ids or tuple(() for _ in self.tables)
        for layer, want in enumerate(selection):
            table = self.tables[layer]
            k_region, v_region = self._regions[layer]  # type: ignore[index]  # [cap*N, H, D]
            m = len(want)
            target = range(cap - m, cap)
            wanted = set(want)
            new: list[Optional[int]] = [None] * cap
            for j in target:
                if table[j] in wanted:
                    new[j] = table[j]
            free = [j for j in target if new[j] is None]
            where = {e: j for j, e in enumerate(table) if e is not None}
            touched = False
            for e in want:
                if e in new:
                    continue
                j = free.pop(0)
                touched = True
                if e in where:  # parked outside the active range: device-to-device
                    src = where[e]
                    k_region[j * n:(j + 1) * n].copy_(k_region[src * n:(src + 1) * n])
                    v_region[j * n:(j + 1) * n].copy_(v_region[src * n:(src + 1) * n])
                    moved += 1
                else:
                    frame, _ = source[(e, layer)]
                    # page-locked: an async DMA. Pageable too: a blocking copy would synchronize the whole copy
                    # stream (and so wait for the generator's queued work); the lane holds the source until the
                    # copy is done, so nothing frees it early (CPU tensors: a plain copy either way)
                    k_region[j * n:(j + 1) * n].copy_(frame[0], non_blocking=True)
                    v_region[j * n:(j + 1) * n].copy_(frame[1], non_blocking=True)
                    index = j - (cap - m)  # its place among the layer's active frames, attention order
                    adapter.load_keys(k_region[j * n:(j + 1) * n], frames[e],
                                      adapter.memory_position(frames[e], index, m))
                    loaded += 1
                for mk, mv in (mirror[layer] for mirror in self._mirrors):  # same slot, device-to-device
                    mk[j * n:(j + 1) * n].copy_(k_region[j * n:(j + 1) * n])
                    mv[j * n:(j + 1) * n].copy_(v_region[j * n:(j + 1) * n])
                new[j] = e
            if touched and self.fence is not None:
                self.fence.mark_ready(layer)  # this layer's attention waits for exactly these copies
            # entries outside the active range stay parked (their bytes are intact) for a cheap move back
            for j in range(cap - m):
                new[j] = table[j] if table[j] not in wanted else None
            self.tables[layer] = new
            counts.append(m)
        self.version += 1
        return LoadResult(tuple(counts), loaded, moved)

    def close(self) -> None:
        """Wait for the copies still reading host memory, then let the staging go (and its budget)."""
        for lane in self._lanes:
            with lane.lock:
                if lane.pending and lane.event is not None:
                    lane.event.synchronize()
                lane.pending, lane.held = False, ()
                if lane.staging is not None:
                    self.budget.release(lane.reserved)
                    lane.staging, lane.reserved = None, 0


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
