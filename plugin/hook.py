"""MemFlowPlugin: the only object a streaming generator touches.

Owns the per-chunk protocol between a generator and a memory bank (`LocalMemory` or `MemoryClient`, used only
through the public protocol: create_stream, list_streams, drop_stream, put, query_fetch, query, fetch,
stats):

    kv  = generator cache allocated with memory_frames=plugin.memory_frames
    mem = plugin.before_chunk(i, prompt, kv)   # query the bank and fetch the frames the slots lack (one
                                               # query_fetch call), delta-load them into the cache's slots
                                               # (mirrors=(kv_uncond,): CFG's other cache gets the same frames)
    ... generator attends through plugin.attention.cache_attention(..., memory=mem) ...
    plugin.after_chunk(i, kv)                  # record the chunk's prototype frame (async)

Promises: disabled, or with nothing to retrieve, `before_chunk` returns memory of 0 frames and the
generator's output is bit-identical to the bare model's; a memory failure or a missed deadline makes the
chunk memory-free (counted, logged once per outage) and never raises into, or stalls, the generator; the
generator's own errors (a cache without memory slots, chunks out of order) do raise. NAM text keys are
computed on the generator's thread (once per prompt); every memory call runs on the guard's thread.
On CUDA a plugin owns one `MemoryFence` (its copy stream on the cache's device and the events, made once, that
order its copies against the generator's attention; attention.py) and one `PinnedBudget` (`pinned_bytes`: every
page-locked byte of write-back staging, load staging and registered shared-memory arenas; pinned.py; a
`MemFlowBatch` gives all its samples one budget) and shares its memory client's `ArenaPins`. The
`ChunkMemory` it returns is valid for that chunk only, and carries the adapter's `attention_fn` when it has one.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from memory_service import Budget, KeySpace, KVLayout, Memory, NotFound, QueryFetchResult, StreamSpec
from plugin.adapters.base import GeneratorAdapter
from plugin.attention import NO_MEMORY, AttentionWorkspace, ChunkMemory, MemoryFence
from plugin.config import MemFlowConfig
from plugin.guard import Guard
from plugin.kv_slots import LoadPlan, MemorySlots, Staged
from plugin.pinned import ArenaPins, PinnedBudget
from plugin.retrieval import EMPTY, Selection, nam_query, select
from plugin.writeback import WriteBack

FUTURE_FRAMES = 1 << 62  # upper end of the excluded frame range: the window and everything after it
MAX_OUTSTANDING = 2  # memory reads queued or running at once (one chunk's and the next chunk's prefetch)


class StreamConflict(ValueError):
    """The configured stream exists with a layout this generator cannot use, or exists and the config did not
    say to continue it (`on_existing`)."""


@dataclass(frozen=True)
class ChunkReport:
    """What the plugin did for one chunk."""

    chunk_index: int
    prompt: str
    selection: Selection  # per-layer entry ids and their frames (empty on fallback)
    frames: tuple[int, ...]  # memory frames attended per layer
    loaded: int  # (entry, layer) frames copied host -> device
    moved: int  # (entry, layer) frames moved between slots
    fallback: Optional[str]  # why the chunk went memory-free, None if memory was used
    prefetched: bool
    wait_ms: float  # time before_chunk spent


@dataclass(frozen=True)
class PluginStats:
    chunks: int
    retrievals: int
    fallbacks: int
    frames_loaded: int
    frames_moved: int
    prefetch_hits: int
    prefetch_misses: int
    writes_submitted: int
    writes_written: int
    writes_dropped: int
    write_failures: int
    writes_pending: int
    outage_episodes: int
    pinned_bytes: int = 0  # page-locked host memory held now (staging, write-back, registered arenas)
    frames_direct: int = 0  # frame-layers copied to the GPU straight from a registered shared-memory arena
    frames_staged: int = 0  # through a pinned staging lane
    frames_pageable: int = 0  # from pageable memory (the pinned budget had no room)


class MemFlowPlugin:
    """MemFlow for one streaming video: `MemFlowPlugin(memory, config, adapter)`.

    `memory` is a `memory_service.Memory` (a `LocalMemory` or a `MemoryClient`); `adapter` describes the
    generator's KV cache (`SelfForcingAdapter.for_reference(model)` for the reference model). One plugin serves one
    video on one stream (`config.stream`; an existing stream is continued only with `on_existing="reuse"`, so a second
    video never attends the first one's frames by accident); allocate the video's cache with
    `memory_frames=plugin.memory_frames`. Hooks:
    `before_chunk(chunk_index, prompt, kv, *, next_prompt=None, query=None, mirrors=()) -> ChunkMemory` and
    `after_chunk(chunk_index, kv, keys=None)`; at a prompt switch that recaches, `before_recache(...)` first.
    `last_report` and `stats()` say what happened. (docs/adopting.md: the real pipelines' cache shapes.)
    """

    def __init__(self, memory: Memory, config: MemFlowConfig, adapter: GeneratorAdapter, *,
                 pinned: Optional[PinnedBudget] = None) -> None:
        if not isinstance(config, MemFlowConfig):
            raise TypeError(f"config must be a MemFlowConfig, got {type(config).__name__}")
        if not isinstance(adapter, GeneratorAdapter):
            raise TypeError(f"adapter must implement plugin.adapters.GeneratorAdapter, got {type(adapter).__name__}")
        self.memory, self.config, self.adapter = memory, config, adapter
        self.layout = adapter.layout
        if config.record_frame >= self.layout.frames_per_chunk:
            raise ValueError(f"record_frame {config.record_frame} is outside a chunk of "
                             f"{self.layout.frames_per_chunk} frames")
        self.memory_frames = config.memory_frames
        self.workspace = AttentionWorkspace()
        cuda = self.layout.device.type == "cuda" and config.enabled
        # one budget for every page-locked byte of this plugin (`pinned`: a batch's one budget, shared by its samples);
        # one fence (copy stream + reused events) on the cache's device orders all its copies against the
        # generator's attention (attention.py); one ArenaPins per memory client, so an arena is registered once
        self.pinned = pinned if pinned is not None else PinnedBudget(config.pinned_bytes)
        self.fence = MemoryFence(self.layout.device, self.layout.layers) if cuda else None
        self.pins = ArenaPins.shared(memory, self.pinned, self.layout.device) if cuda else None
        self.slots = MemorySlots(self.layout, self.memory_frames, budget=self.pinned, fence=self.fence, pins=self.pins)
        self.last_report: Optional[ChunkReport] = None
        self._guard = Guard()
        self._stream_ready = False
        self._stream_lock = threading.Lock()
        self._queries: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._prompts: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._prefetch: Optional[tuple[tuple[int, str], Any]] = None
        self._bound_caches: Optional[tuple[int, ...]] = None  # ids of the caches bound, and their regions'
        self._cache_marks: tuple = ()  # fingerprints (adapter.check_cache): a reallocation is refused
        self._pins_released = False
        self._chunks = self._retrievals = self._fallbacks = self._loaded = self._moved = 0
        self._prefetch_hits = self._prefetch_misses = 0
        self.writer: Optional[WriteBack] = None
        if not config.enabled:
            return
        self.writer = WriteBack(self.layout, config.write_queue, config.write_batch, config.write_policy,
                                config.deadline_s, self._put, self._write_failed, partial(self._guard.success, "write"),
                                fence=self.fence, budget=self.pinned)
        opened = self._guard.submit(self._ensure_stream)
        try:
            opened.result(timeout=max(1.0, 10 * config.deadline_s))
        except StreamConflict:
            self.close(timeout_s=1.0)  # the writer's thread, the guard's, and this plugin's share of the arena pins
            raise
        except Exception as exc:  # noqa: BLE001 - memory down at start: retried before each memory call
            self._guard.failure("read", f"opening stream {config.stream!r}: {type(exc).__name__}: {exc}")
        if self.pins is not None and getattr(memory, "plane", None) == "shm":
            self._guard.submit(self._pin_arena)  # register the client's arena now, not inside a chunk's deadline

    def _pin_arena(self) -> None:
        """On the guard's thread: register (pinned.py) the shared-memory arena fetches will land in."""
        # a lease in the client's newest arena (a MemoryClient's: the caller checked plane == "shm")
        probe = self.memory.arena_array((1,), np.uint8)  # type: ignore[attr-defined]
        assert self.pins is not None
        self.pins.direct(probe)

    # -- the stream ------------------------------------------------------------------------------
    def stream_spec(self) -> StreamSpec:
        cfg, lay = self.config, self.layout
        return StreamSpec(
            cfg.stream,
            {"nam": KeySpace(lay.key_dim, per_layer=True, dtype=cfg.key_dtype),
             "emb": KeySpace(lay.key_dim, metric="cosine")},
            kv=KVLayout(lay.layers, lay.heads, lay.head_dim, lay.tokens_per_frame, lay.kv_dtype),
            budget=Budget(cfg.max_entries, cfg.max_bytes), policy=cfg.policy)

    def _ensure_stream(self) -> None:
        if self._stream_ready:
            return
        with self._stream_lock:  # the memory thread and the writer thread both get here first
            if not self._stream_ready:
                self._open_stream()

    def _open_stream(self) -> None:
        spec, name = self.stream_spec(), self.config.stream
        existing = {s.name: s for s in self.memory.list_streams()}
        if name in existing and self.config.on_existing == "replace":
            self.memory.drop_stream(name)
        elif name in existing:
            if self.config.on_existing is None:
                raise StreamConflict(
                    f"stream {name!r} already exists in the bank (an earlier video's?); a new plugin does not "
                    f"continue it silently: give this video its own stream (MemFlowConfig(stream=...)), or set "
                    f"on_existing='reuse' to continue it (the same video resumed) or 'replace' to drop it")
            if self.config.on_existing == "error":
                raise StreamConflict(f"stream {name!r} already exists (on_existing='error'); name another stream "
                                     "or set on_existing='reuse' / 'replace'")
            have = existing[name]
            if have.kv != spec.kv or any(have.key_spaces.get(s) is None or have.key_spaces[s].dim != ks.dim
                                         or have.key_spaces[s].per_layer != ks.per_layer
                                         for s, ks in spec.key_spaces.items()):
                raise StreamConflict(f"stream {name!r} exists with KV layout {have.kv} and key spaces "
                                     f"{dict(have.key_spaces)}; this generator needs {spec.kv} and {spec.key_spaces}")
            self._stream_ready = True
            return
        self.memory.create_stream(spec)
        self._stream_ready = True

    # -- before the chunk ------------------------------------------------------------------------
    def before_chunk(self, chunk_index: int, prompt: str, kv: Any, *, next_prompt: Optional[str] = None,
                     query: Optional[np.ndarray] = None, mirrors: Sequence[Any] = (),
                     _recache_from: Optional[int] = None) -> ChunkMemory:
        """Retrieve and load this chunk's memory; returns what the generator's attention uses.

        `next_prompt` (default: the same prompt) lets `prefetch` start chunk n+1's retrieval now; `query`
        overrides the query vector (embedding scorer: `[dim]`; NAM: `[layers, dim]`). `mirrors` are the
        video's other caches attending the same memory (CFG's unconditional cache): loaded with the same
        frames, bound once (no reload per call), never recorded from.
        """
        cfg = self.config
        if not cfg.enabled:
            return NO_MEMORY
        t0 = time.perf_counter()
        self._chunks += 1
        self._prompts[chunk_index] = prompt
        while len(self._prompts) > 64:
            self._prompts.popitem(last=False)
        self.slots.bind(kv, self.adapter, mirrors)
        self._check_caches(kv, mirrors)
        sink = self.adapter.sink_range(kv)
        lo = self.layout.window(chunk_index)[0] if _recache_from is None else _recache_from
        vec = self._query_vector(prompt, query)
        key = (chunk_index, prompt)
        fut, prefetched, reason = None, False, None
        if self._prefetch is not None:
            if self._prefetch[0] == key and query is None and _recache_from is None:
                fut, prefetched = self._prefetch[1], True
                self._prefetch_hits += 1
            else:
                self._prefetch[1].cancel()  # a wrong guess: drop it unless it already runs
                self._prefetch_misses += 1
            self._prefetch = None
        if fut is None:
            if self._guard.stuck(cfg.deadline_s):
                reason = "a previous memory call is still running past its deadline"
            else:
                fut = self._guard.submit(partial(self._retrieve, lo, vec, sink), limit=MAX_OUTSTANDING)
                if fut is None:
                    reason = "memory is behind: earlier calls are still queued"
        staged: Optional[Staged] = None
        if fut is not None:
            ok, value = self._guard.wait(fut, cfg.deadline_s - (time.perf_counter() - t0))
            staged, reason = (value, None) if ok else (None, value)
        self.writer.release_held()  # the last chunk's write-back waited for this retrieval (see writeback.py)
        # on CUDA even a memory-free chunk carries the fence: its attention records the events that the next
        # copies (slot loads, the write-back's reads) wait on
        epoch = self.fence.new_chunk() if self.fence is not None else 0
        attention_fn = getattr(self.adapter, "attention_fn", None)  # the generator's own attention, if it says
        memory, report_sel, loaded, moved = NO_MEMORY, EMPTY, 0, 0
        if self.fence is not None or attention_fn is not None:
            memory = ChunkMemory((), 0, self.workspace, self.fence, epoch, attention_fn)
        if staged is not None:
            try:
                result = self.slots.commit(staged, self.adapter)
            except Exception as exc:  # noqa: BLE001 - a stale plan or a bad payload: no memory this chunk
                self.slots.reset()
                reason = f"loading slots: {type(exc).__name__}: {exc}"
            else:
                self._retrievals += 1
                self._guard.success("read")
                loaded, moved = result.loaded, result.moved
                self._loaded += loaded
                self._moved += moved
                report_sel = staged.plan.selection
                if any(result.frames):
                    memory = ChunkMemory(result.frames, cfg.sma_k if cfg.sma else 0, self.workspace, self.fence,
                                         epoch, attention_fn)
        if reason is not None:
            self._fallbacks += 1
            self._guard.failure("read", reason)
        if cfg.prefetch and _recache_from is None:
            nxt = prompt if next_prompt is None else next_prompt
            nvec = self._query_vector(nxt, None)
            nlo = self.layout.window(chunk_index + 1)[0]
            task = self._guard.submit(partial(self._retrieve, nlo, nvec, sink), limit=MAX_OUTSTANDING)
            self._prefetch = ((chunk_index + 1, nxt), task) if task is not None else None
        self.last_report = ChunkReport(chunk_index, prompt, report_sel, memory.frames or (0,) * self.layout.layers,
                                       loaded, moved, reason, prefetched, (time.perf_counter() - t0) * 1e3)
        return memory

    def before_recache(self, chunk_index: int, prompt: str, kv: Any, first_frame: int, *,
                       mirrors: Sequence[Any] = ()) -> ChunkMemory:
        """Memory for a recache forward at a prompt switch (LongLive's `_recache_after_switch`): re-running
        frames [first_frame, chunk `chunk_index`'s first) with the new `prompt`, it attends frames below
        `first_frame` chosen by the new prompt's text keys (all re-run frames are resident). Call it after
        the cache was emptied for the recache (`adapters.self_forcing.begin_recache`, which moves the sink
        when it is rewritten), then `before_chunk(chunk_index, prompt, ...)` as usual."""
        return self.before_chunk(chunk_index, prompt, kv, mirrors=mirrors, _recache_from=first_frame)

    def _check_caches(self, kv: Any, mirrors: Sequence[Any]) -> None:
        """A cache whose K/V were reallocated is refused, never attended without its memory frames."""
        ids = (id(kv), *(id(m) for m in mirrors))
        marks = tuple(self.adapter.check_cache(c) for c in (kv, *mirrors))
        if ids != self._bound_caches:
            self._bound_caches, self._cache_marks = ids, marks
        elif marks != self._cache_marks:
            raise ValueError("the KV cache's memory region was reallocated since the plugin bound it (its "
                             "tensors changed); the plugin's slots would no longer be attended. Allocate the "
                             "cache once per video (allocate_cache) and write into it in place")

    def _query_vector(self, prompt: str, query: Optional[np.ndarray]) -> np.ndarray:
        if query is not None:
            return np.asarray(query, np.float32)
        if self.config.scorer == "recent":
            return np.zeros(0, np.float32)  # nothing is scored
        vec = self._queries.get(prompt)
        if vec is None:
            nam = nam_query(self.adapter.text_keys(prompt))  # [L, H*D]
            vec = nam if self.config.scorer == "nam" else nam.mean(axis=0)
            self._queries[prompt] = vec
            while len(self._queries) > 32:
                self._queries.popitem(last=False)
        else:
            self._queries.move_to_end(prompt)
        return vec

    def _retrieve(self, lo: int, vec: np.ndarray, sink: tuple[int, int]) -> Staged:
        """On the guard's thread: query frames below `lo` (the window, or a recache's first frame), select
        (never a frame the sink `sink` holds), and stage the frames the slots lack."""
        cfg = self.config
        self._ensure_stream()
        self.writer.wait_frames_below(lo, cfg.deadline_s / 2)
        moved = sink != (0, self.layout.sink_frames)  # a recache rewrote the sink: its frames are resident
        count = cfg.k if cfg.scorer == "recent" else cfg.keep_newest
        newest = self.writer.newest_below(lo, count + (self.layout.sink_frames if moved else 0))
        newest = [(e, f) for e, f in newest if not sink[0] <= f < sink[1]][:count]
        try:
            return self._select_and_stage(lo, vec, newest, sink if moved else None)
        except NotFound:  # an entry was pruned between the query and the fetch: ask again
            return self._select_and_stage(lo, vec, [], sink if moved else None)

    def _select_and_stage(self, lo: int, vec: np.ndarray, newest: list[tuple[int, int]],
                          sink: Optional[tuple[int, int]] = None) -> Staged:
        cfg, lay = self.config, self.layout
        space = "nam" if cfg.scorer == "nam" else "emb"
        k_total = cfg.k_max if cfg.adaptive_k != "off" else cfg.k
        extra = lay.sink_frames if sink is not None else 0
        k_query = k_total + cfg.keep_newest + extra
        fetched: Optional[QueryFetchResult] = None
        if cfg.scorer == "recent":
            result = None
        elif sink is None:
            # one round trip: the ranking, and the K/V of every frame `select` can pick that the slots lack (the
            # newest records, then per layer the best `scored` others: query_fetch.py's rule is select's)
            forced = list(dict.fromkeys(e for e, _ in newest))
            scored = (cfg.k_max if cfg.adaptive_k != "off" else cfg.k) - len(forced)
            fetched = self.memory.query_fetch(
                cfg.stream, space, vec, k_query, fetch_k=max(0, scored), include=forced,
                resident=[self.slots.resident(layer) for layer in range(lay.layers)],
                exclude_frames=(lo, FUTURE_FRAMES))
            result = fetched.query
        else:  # a recache moved the sink: its hits are masked below, so select's picks are not the rule's
            result = self.memory.query(cfg.stream, space, vec, k_query, exclude_frames=(lo, FUTURE_FRAMES))
        if result is not None and sink is not None:  # hits on frames the moved sink holds: not loaded twice
            held = (result.frames >= sink[0]) & (result.frames < sink[1])
            result = dataclasses.replace(result, ids=np.where(held, -1, result.ids),
                                         scores=np.where(held, -np.inf, result.scores),
                                         frames=np.where(held, -1, result.frames))
        sel = select(result, newest, lay.layers, cfg.k, cfg.adaptive_k, cfg.k_min, cfg.k_max,
                     cfg.adaptive_threshold, skip_frames_below=lay.sink_frames)
        plan: LoadPlan = self.slots.plan(sel)
        return self.slots.stage(plan, partial(self._fetched, fetched))

    def _fetched(self, fetched: Optional[QueryFetchResult], ids: Sequence[int], layers: Sequence[int]) -> np.ndarray:
        """K/V `[n, len(layers), 2, N, H, D]` of a plan group: the query_fetch group that is exactly it (no copy; the
        usual case), else gathered from its groups, else (a frame it did not bring) fetched now."""
        if fetched is not None:
            key = (tuple(ids), tuple(layers))
            for group in fetched.fetched:
                if (group.ids, group.layers) == key:
                    return group.kv
            parts = [[fetched.kv_of(e, layer) for layer in layers] for e in ids]
            if all(p is not None for row in parts for p in row):
                return np.stack([np.stack(row) for row in parts])  # type: ignore[arg-type]
        return self.memory.fetch(self.config.stream, list(ids), list(layers)).kv

    # -- after the chunk -------------------------------------------------------------------------
    def after_chunk(self, chunk_index: int, kv: Any, keys: Optional[Mapping[str, np.ndarray]] = None) -> None:
        """Record chunk `chunk_index`'s prototype frame, if it is a recording chunk (async, bounded).

        `keys` adds or overrides entry key vectors by key space (e.g. {"emb": a frame embedding}).
        """
        cfg = self.config
        if not cfg.enabled or chunk_index % cfg.record_interval:
            return
        first, end = self.layout.chunk_frames(chunk_index)  # the adapter's mapping: chunks may be uneven
        frame = first + cfg.record_frame
        if frame < self.layout.sink_frames or frame >= end:
            return  # sink frames stay in the cache for the whole video; a short chunk lacks record_frame
        views = self.adapter.frame_kv(kv, frame)
        self.writer.submit(chunk_index, frame, self._prompts.get(chunk_index, ""), views, self.adapter, keys,
                           hold=True)

    def _put(self, entries: list) -> list[int]:
        self._ensure_stream()
        return self.memory.put(self.config.stream, entries)

    def _write_failed(self, exc: Exception) -> None:
        self._guard.failure("write", f"{type(exc).__name__}: {exc}")

    # -- lifecycle -------------------------------------------------------------------------------
    def stats(self) -> PluginStats:
        w = self.writer.stats() if self.writer is not None else None
        staging = self.slots.staging_stats()
        return PluginStats(
            chunks=self._chunks, retrievals=self._retrievals, fallbacks=self._fallbacks,
            frames_loaded=self._loaded, frames_moved=self._moved, prefetch_hits=self._prefetch_hits,
            prefetch_misses=self._prefetch_misses, writes_submitted=w.submitted if w else 0,
            writes_written=w.written if w else 0, writes_dropped=w.dropped if w else 0,
            write_failures=w.failed if w else 0, writes_pending=w.pending if w else 0,
            outage_episodes=self._guard.episodes, pinned_bytes=self.pinned.used, frames_direct=staging.direct,
            frames_staged=staging.staged, frames_pageable=staging.pageable)

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait for pending writes (True when none is left)."""
        return True if self.writer is None else self.writer.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush writes (bounded), stop the threads. The memory object stays open: it is the caller's."""
        if self.writer is not None:
            self.writer.flush(timeout_s)
            self.writer.close()
        self._guard.close(timeout_s)
        if self._prefetch is not None:  # its staged frames hold arena leases and a staging lane
            self._prefetch[1].cancel()
            self._prefetch = None
        self.slots.close()  # waits for the copies still reading host staging or the arenas, then lets them go
        if self.pins is not None and not self._pins_released:  # once: the pins may be shared with other plugins
            self._pins_released = True
            self.pins.close()

    def __enter__(self) -> "MemFlowPlugin":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
