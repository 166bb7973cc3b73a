"""Upkeep: the bank's background thread - pruning off the put path, TTL expiry, and statistics flushes.

Owns what `MemoryBank.start_pruner` starts (the service starts it; a bare LocalMemory has none and prunes
inline, exactly as the policy and planner say, so tests see one deterministic order). While it runs:
- a put evicts inline only what the budget itself demands (the hard promise holds: after `put` returns the
  stream is within its budget); a put that leaves the stream past its budget less the policy's slack (where that
  slack is two entries or more) asks this thread to prune it;
- a prune here takes a snapshot under the stream's lock (frozen metadata and compact keys), ranks and plans
  outside any lock, down to the low-water mark (budget less 1.5 x the slack), and commits the plan in chunks of
  `EVICT_CHUNK` entries, each one small commit under the stream's lock; a victim pinned, deleted or evicted
  meanwhile is skipped, and once the stream is back under the low-water mark only expired entries still go.
  So neither a put nor a query waits for a policy's ranking (redundancy's is O(n^2 d)) or for a large commit;
- every `interval_s` the streams with a TTL are pruned that way too, without puts: an expired entry goes within
  about `interval_s` (or with the next prune for the budget, which takes expired entries first);
- every `hit_flush_interval_s` the retrieval statistics are flushed (MemoryBank.flush).
A prune that fails is logged, naming the stream and the error, and the thread goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from memory_service import eviction
from memory_service.errors import NotFound, ResourceExhausted, Unavailable
from memory_service.pruning.planner import Plan

if TYPE_CHECKING:
    from memory_service.bank import MemoryBank

log = logging.getLogger("memflow.bank")
EVICT_CHUNK = 8  # entries per background commit: a put or query waits for at most one such commit


class Upkeep:
    def __init__(self, bank: "MemoryBank", interval_s: float) -> None:
        self.bank = bank
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._asked: set[str] = set()  # streams a put asked to prune
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memflow-pruner", daemon=True)
        self._thread.start()

    def ask(self, name: str) -> None:
        """Prune `name` soon (called by a put, under the stream's lock: it only records the request)."""
        with self._lock:
            self._asked.add(name)
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        bank = self.bank
        tick = max(0.01, min(self.interval_s, bank.config.hit_flush_interval_s))
        next_ttl = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                names, self._asked = self._asked, set()
            if time.monotonic() >= next_ttl:
                next_ttl = time.monotonic() + self.interval_s
                names |= {name for name, s in list(bank._streams.items()) if eviction.ttl_of(s) is not None}
            for name in sorted(names):
                if bank._serves(name):
                    self.prune(name)
            if time.monotonic() - bank._last_flush >= bank.config.hit_flush_interval_s:
                try:
                    bank.flush()
                except Exception as exc:  # noqa: BLE001 - a full disk: they stay in memory, retried next time
                    log.debug("retrieval statistics not persisted yet: %s", exc)

    def prune(self, name: str) -> None:
        """Down to the stream's low-water mark and every expired entry out, in small commits."""
        bank = self.bank
        try:
            s = bank._stream(name)
            with s.lock:
                pending = eviction.prepare(s, 0, 0, bank.clock(), budget=eviction.low_water(s), slack=(0, 0))
            if pending is None:
                return
            try:
                p = eviction.decide(s, pending)  # outside the lock: the ranking is the expensive part
            except ResourceExhausted:  # pinned entries hold it above the low-water mark: expiry only
                p = eviction.decide(s, eviction.Pending(pending.view, s.spec.budget, pending.stored_entries,
                                                        pending.stored_bytes, 0, 0, 0, 0, False))
            for part in _chunks(p, EVICT_CHUNK):
                with s.lock:
                    if bank._streams.get(name) is not s:
                        return  # dropped (or, in cluster mode, given away) meanwhile
                    part = eviction.still_valid(s, part, bank.clock())
                    if not part.evict and not part.degrade:
                        continue
                    with s.stats_lock:
                        degraded = eviction.apply(bank.store, s, part, s.next_id, bank.config.verify_checksums)
                        eviction.mirror(s, part, degraded, s.next_id)
                time.sleep(0)  # a put or query waiting for the lock goes first, not after every chunk in a row
        except (NotFound, Unavailable):  # dropped since it was asked for, or the bank is closing
            pass
        except Exception as exc:  # noqa: BLE001 - a full disk, a read-only bank: logged, the thread goes on
            log.warning("background prune of stream %r failed (retried in %.0f s): %s: %s", name, self.interval_s,
                        type(exc).__name__, exc)


def _chunks(p: Plan, size: int):
    """The plan in parts of at most `size` entries (degrades first, as the planner ordered them, then evictions)."""
    for i in range(0, len(p.degrade), size):
        yield Plan(degrade=p.degrade[i:i + size], reason=p.reason)
    for i in range(0, len(p.evict), size):
        yield Plan(evict=p.evict[i:i + size], reason=p.reason)
