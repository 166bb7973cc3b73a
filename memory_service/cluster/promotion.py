"""Promotions: what a node read from S3 goes into the hot tier in the background, never on the fetch's thread.

Owns the queue between an S3 read-through (cluster/tiers.py) and `MooncakeTier.put`, and one thread that drains
it. Promises:
- `submit` never waits: it queues the layers (their buffers are kept alive, never copied) unless the bytes held
  by the queue, the promotion in flight included, would pass `max_bytes`; then the promotion is dropped and
  counted (`dropped`). One promotion larger than `max_bytes` is taken only while nothing else is held (a 287.5 MB
  frame read in one GET must still reach the pool under a 256 MiB bound): the bound is max(max_bytes, one read).
  A fetch has its bytes before it submits, so a slow or full pool only costs the promotion;
- a promotion replaces what the pool holds under its keys (a layer the pool held damaged is read from S3 and
  promoted over it: `MooncakeTier.put` upserts one-part objects), and its failure is counted (`failed`), logged
  by the tier, and never reaches a fetch;
- `discard(keys)` drops queued promotions of layers that left the stream (deleted, evicted, rewritten), so they do
  not come back into the pool; one in flight, or one whose S3 read was under way, may still land: an unpinned
  object under an immutable name that nothing reads again, evicted in time;
- `hold()` (a context manager) keeps the thread from starting promotions while it is held, and `flush()` waits
  until the queue is empty and none is in flight: what lets a test see a full queue or a promoted layer without
  sleeping;
- `close` drops what is queued (counted), lets the promotion in flight end and stops the thread; it does not wait
  for a hold to end. Thread-safe.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from memory_service.cluster.mooncake import MooncakeTier

log = logging.getLogger("memflow.cluster")
CLOSE_WAIT_S = 30.0  # a promotion in flight while the master is unreachable waits ~4.3 s for it


@dataclasses.dataclass(frozen=True)
class PromotionStats:
    """Layers promoted, dropped (queue full, closed, discarded) and failed (the pool refused) since start; what
    waits now (layers, bytes held)."""

    promoted: int
    dropped: int
    failed: int
    queued: int
    queued_bytes: int


class Promotions:
    def __init__(self, hot: "MooncakeTier", max_bytes: int) -> None:
        self.hot, self.max_bytes = hot, max_bytes
        self._cond = threading.Condition()
        # (layers: (hot-tier key, [one flat view]), the bytes they keep alive)
        self._queue: collections.deque[tuple[list[tuple[str, list[np.ndarray]]], int]] = collections.deque()
        self._held_bytes = 0  # queued and in flight
        self._busy = False
        self._holds = 0
        self._closed = False
        self._promoted = self._dropped = self._failed = 0
        self._thread: Optional[threading.Thread] = threading.Thread(target=self._run, name="memflow-hot-promote",
                                                                    daemon=True)
        self._thread.start()

    def submit(self, layers: list[tuple[str, list[np.ndarray]]], nbytes: int) -> bool:
        """Queue `layers` (keeping `nbytes` alive) for the pool; False when dropped (queue full or closed)."""
        if not layers:
            return True
        with self._cond:
            if self._closed or self.max_bytes <= 0 or (self._held_bytes and self._held_bytes + nbytes > self.max_bytes):
                self._dropped += len(layers)
                return False
            self._queue.append((layers, nbytes))
            self._held_bytes += nbytes
            self._cond.notify_all()
        return True

    def discard(self, keys: Sequence[str]) -> None:
        """Drop queued promotions of these keys (layers that left their stream)."""
        gone = set(keys)
        with self._cond:
            kept: collections.deque = collections.deque()
            for layers, nbytes in self._queue:
                left = [item for item in layers if item[0] not in gone]
                self._dropped += len(layers) - len(left)
                if left:
                    kept.append((left, nbytes))
                else:
                    self._held_bytes -= nbytes
            self._queue = kept

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._holds or not self._queue):
                    self._cond.wait()
                if self._closed:
                    return
                layers, nbytes = self._queue.popleft()
                self._busy = True
            stored = 0
            try:
                stored = self.hot.put(layers)  # never raises for the pool's failures (counted there)
            except Exception as exc:  # noqa: BLE001 - a promotion is an optimisation: it never fails anything
                log.warning("hot tier: a promotion failed: %s: %s", type(exc).__name__, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._held_bytes -= nbytes
                    self._promoted += stored
                    self._failed += len(layers) - stored
                    self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait until nothing is queued or in flight (False if `timeout_s` passed first). Under a hold, only
        `timeout_s` ends the wait."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed or (not self._queue and not self._busy), timeout_s)

    def stats(self) -> PromotionStats:
        with self._cond:
            return PromotionStats(self._promoted, self._dropped, self._failed,
                                  sum(len(layers) for layers, _ in self._queue), self._held_bytes)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for layers, nbytes in self._queue:
                self._dropped += len(layers)
                self._held_bytes -= nbytes
            self._queue.clear()
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(CLOSE_WAIT_S)
            if thread.is_alive():
                log.warning("hot tier: a promotion still in flight after %.0f s; closing without it", CLOSE_WAIT_S)
