"""Write-back: recorded frames go to the bank behind the generator's back, through a bounded queue.

Owns the path from a frame in the KV cache to an entry in the bank. Promises:
- bounded memory: host staging for exactly `queue_size` frames (K/V of every layer + per-layer mean keys)
  is allocated once (pinned on CUDA); a pending write (queued or in flight) holds one staging slot;
- when every slot is taken, policy "drop_oldest" drops the oldest queued write (counted) and reuses its
  slot; policy "block" waits for a slot at most `block_s`, then drops the new write (counted); the
  generator never waits longer than that, and never at all under "drop_oldest";
- the generator's thread only enqueues copies; one daemon thread waits for them and puts up to `batch`
  entries per call; a failed put is counted and reported, never raised to the generator;
- on CUDA the copies (device-to-host, non_blocking into page-locked staging inside the plugin's pinned budget;
  pageable, and then synchronous, past it) run on the plugin's copy stream (`MemoryFence`, attention.py), after
  the generator's current stream and every attention stream, so they read the chunk's K/V once written,
  whichever stream wrote them; the generator's streams then wait (on the GPU, no host sync) for the copies
  before their next work, so rolling the window cannot move a frame that is still being read. Each staging
  slot has one CUDA event, made once and re-recorded (nothing is allocated per write), with blocking sync: the
  writer thread waits for it asleep, never spinning a core;
- read-your-writes for retrieval: `wait_frames_below` lets a query wait (bounded) for pending writes of
  frames that have just become eligible, so results do not depend on thread timing;
- retrieval first: a write submitted with `hold=True` (the plugin's after_chunk) waits until
  `release_held()` (the next before_chunk, once its retrieval is done), a newer submit, a flush, a query
  that needs its frame, or `MAX_HOLD_S`. Otherwise the put of chunk n-1's frame would compete for the GIL
  with chunk n's retrieval, which the generator waits for (measured with the tiny model on CPU: before_chunk
  p50 6.8 ms with the write running beside it, of which the retrieval itself was 0.8 ms alone).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from memory_service import NewEntry
from plugin.adapters.base import CacheLayout, GeneratorAdapter
from plugin.attention import MemoryFence
from plugin.kv_slots import to_numpy
from plugin.pinned import PinnedBudget, host_buffer

Put = Callable[[list[NewEntry]], list[int]]
MAX_HOLD_S = 0.5  # a held write goes out after this even when no retrieval releases it


@dataclass
class _Write:
    chunk: int
    frame: int
    prompt: str
    rope_position: Optional[int]
    slot: int
    event: Optional["torch.cuda.Event"]
    extra_keys: Mapping[str, np.ndarray] = field(default_factory=dict)
    held_since: Optional[float] = None  # monotonic time of a held submit; None: free to write


@dataclass(frozen=True)
class WriteStats:
    submitted: int
    written: int
    dropped: int
    failed: int
    pending: int


class WriteBack:
    def __init__(self, layout: CacheLayout, queue_size: int, batch: int, policy: str, block_s: float,
                 put: Put, on_error: Callable[[Exception], None], on_ok: Callable[[], None], *,
                 fence: Optional[MemoryFence] = None, budget: Optional[PinnedBudget] = None) -> None:
        self.layout, self.batch, self.policy, self.block_s = layout, batch, policy, block_s
        self._put, self._on_error, self._on_ok = put, on_error, on_ok
        cuda = layout.device.type == "cuda"
        self._cuda = cuda
        if cuda and fence is None:
            fence = MemoryFence(layout.device, layout.layers)
        self._fence = fence
        self._budget = budget
        lay = layout
        self._kv, kv_pinned = host_buffer((queue_size, lay.layers, 2, lay.tokens_per_frame, lay.heads, lay.head_dim),
                                          lay.dtype, cuda, budget)  # [Q, L, 2, N, H, D]
        self._keys, keys_pinned = host_buffer((queue_size, lay.layers, lay.key_dim), torch.float32, cuda, budget)
        self._reserved = kv_pinned + keys_pinned
        self._kv_async, self._keys_async = kv_pinned > 0, keys_pinned > 0  # page-locked: non_blocking copies
        self._keys_dev = (torch.empty((lay.layers, lay.key_dim), dtype=torch.float32, device=lay.device)
                          if cuda else None)
        self._unrotated = torch.empty((lay.tokens_per_frame, lay.heads, lay.head_dim), dtype=lay.dtype,
                                      device=lay.device)
        # one per staging slot; blocking: the writer thread's wait for it sleeps instead of spinning a core
        self._events = [torch.cuda.Event(blocking=True) for _ in range(queue_size)] if cuda else []
        if fence is not None:
            for t in (self._keys_dev, self._unrotated):
                t.record_stream(fence.stream)  # used on the copy stream only
        self._free = collections.deque(range(queue_size))
        self._queued: collections.deque[_Write] = collections.deque()
        self._in_flight: list[_Write] = []
        self._in_flight_since: Optional[float] = None
        self._records: collections.deque[tuple[int, int]] = collections.deque(maxlen=1024)  # (entry id, frame)
        self._cond = threading.Condition()
        self._closed = False
        self.submitted = self.written = self.dropped = self.failed = 0
        self._thread = threading.Thread(target=self._run, name="memflow-writeback", daemon=True)
        self._thread.start()

    # -- generator thread --------------------------------------------------------------------------
    def submit(self, chunk: int, frame: int, prompt: str, views: Sequence[tuple[torch.Tensor, torch.Tensor]],
               adapter: GeneratorAdapter, extra_keys: Optional[Mapping[str, np.ndarray]] = None,
               hold: bool = False) -> bool:
        """Stage frame `frame` (per-layer K/V views in the cache) for writing; False when it was dropped.
        `hold`: write it only after `release_held()` (or a newer submit, a flush, `MAX_HOLD_S`)."""
        with self._cond:
            self.submitted += 1
            slot = self._acquire()
            if slot is None:
                self.dropped += 1
                return False
        event = None
        if self._fence is None:
            self._stage(slot, frame, views, adapter)
        else:
            with self._fence.copies() as generator:
                self._stage(slot, frame, views, adapter)
                event = self._events[slot]
                event.record(self._fence.stream)
                self._fence.hold_generator(event, generator)  # no window roll before these copies are done
        item = _Write(chunk, frame, prompt, None if not adapter.store_rotated else frame, slot, event,
                      dict(extra_keys or {}), time.monotonic() if hold else None)
        with self._cond:
            self._release()  # at most the newest write is ever held
            self._queued.append(item)
            self._cond.notify_all()
        return True

    def _stage(self, slot: int, frame: int, views: Sequence[tuple[torch.Tensor, torch.Tensor]],
               adapter: GeneratorAdapter) -> None:
        """Copy frame `frame`'s K/V (keys as the bank stores them) and its per-layer mean keys into `slot`."""
        keys_out = self._keys_dev if self._keys_dev is not None else self._keys[slot]  # [L, H*D]
        for layer, (k, v) in enumerate(views):
            ks = adapter.stored_keys(k, frame, out=self._unrotated)  # [N, H, D]
            torch.mean(ks, dim=0, dtype=torch.float32, out=keys_out[layer].view(k.shape[1], k.shape[2]))
            self._kv[slot, layer, 0].copy_(ks, non_blocking=self._kv_async)
            self._kv[slot, layer, 1].copy_(v, non_blocking=self._kv_async)
        if self._keys_dev is not None:
            self._keys[slot].copy_(keys_out, non_blocking=self._keys_async)

    def release_held(self) -> None:
        with self._cond:
            self._release()

    def _release(self, below_frame: Optional[int] = None) -> None:
        """Under the lock: let held writes go (only those of frames < `below_frame` when given)."""
        for w in self._queued:
            if w.held_since is not None and (below_frame is None or w.frame < below_frame):
                w.held_since = None
                self._cond.notify_all()

    def _ready(self) -> int:
        """Under the lock: how many queued writes (a prefix: order is kept) may be written now."""
        now = time.monotonic()
        for n, w in enumerate(self._queued):
            if w.held_since is not None and now - w.held_since < MAX_HOLD_S:
                return n
        return len(self._queued)

    def _acquire(self) -> Optional[int]:
        if self._free:
            return self._free.popleft()
        if self.policy == "drop_oldest":
            if self._queued:
                victim = self._queued.popleft()
                self.dropped += 1
                self._cond.notify_all()
                return victim.slot
            return None
        self._cond.wait_for(lambda: bool(self._free) or self._closed, timeout=self.block_s)
        return self._free.popleft() if self._free else None

    # -- reads -------------------------------------------------------------------------------------
    def newest_below(self, frame: int, count: int) -> list[tuple[int, int]]:
        """(entry id, frame) of the `count` newest written records with frame < `frame`, newest first."""
        out: list[tuple[int, int]] = []
        if count <= 0:
            return out
        with self._cond:
            for eid, f in reversed(self._records):
                if f < frame:
                    out.append((eid, f))
                    if len(out) == count:
                        break
        return out

    def wait_frames_below(self, frame: int, timeout_s: float) -> bool:
        """Wait until no pending write holds a frame < `frame` (they became eligible for retrieval).

        Returns at once (False) while a put has been running longer than `block_s`: a stuck writer must
        not cost every read its deadline.
        """
        with self._cond:
            self._release(below_frame=frame)
            since = self._in_flight_since
            if since is not None and time.monotonic() - since > self.block_s:
                return False
            return self._cond.wait_for(
                lambda: not any(w.frame < frame for w in (*self._queued, *self._in_flight)), timeout=timeout_s)

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        with self._cond:
            self._release()
            return self._cond.wait_for(lambda: not self._queued and not self._in_flight, timeout=timeout_s)

    def stats(self) -> WriteStats:
        with self._cond:
            return WriteStats(self.submitted, self.written, self.dropped, self.failed,
                              len(self._queued) + len(self._in_flight))

    def close(self) -> None:
        with self._cond:
            self._release()
            self._closed = True
            self._cond.notify_all()
        if self._budget is not None and self._reserved:
            self._budget.release(self._reserved)  # the staging goes with this object; no new write can start
            self._reserved = 0

    # -- writer thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready() and not (self._closed and not self._queued):
                    self._cond.wait(timeout=MAX_HOLD_S if self._queued else None)
                if not self._queued:
                    return
                batch = [self._queued.popleft() for _ in range(min(self.batch, self._ready()))]
                self._in_flight, self._in_flight_since = batch, time.monotonic()
            ids: list[int] = []
            try:
                entries = [self._entry(w) for w in batch]
                ids = list(self._put(entries))
                self._on_ok()
            except Exception as exc:  # noqa: BLE001 - a failed write is counted, never raised
                self._on_error(exc)
            with self._cond:
                if ids:
                    self.written += len(batch)
                    self._records.extend((int(eid), w.frame) for eid, w in zip(ids, batch))
                else:
                    self.failed += len(batch)
                self._free.extend(w.slot for w in batch)
                self._in_flight, self._in_flight_since = [], None
                self._cond.notify_all()

    def _entry(self, w: _Write) -> NewEntry:
        if w.event is not None:
            w.event.synchronize()
        nam = self._keys[w.slot].numpy()  # [L, H*D] float32, a view: valid until the slot is released
        keys = {"nam": nam, "emb": nam.mean(axis=0)}
        keys.update(w.extra_keys)
        return NewEntry(frame_index=w.frame, chunk_index=w.chunk, prompt=w.prompt, keys=keys,
                        kv=to_numpy(self._kv[w.slot]), rope_position=w.rope_position)
