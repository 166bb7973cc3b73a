"""Tiers: where a node's payload reads are served from - its local cache, Mooncake (optional), S3 - and what each costs.

Owns the read path of a payload the local cache does not hold, and the accounting of every tier. Promises:
- a read tries the hot tier (Mooncake Store, when configured) layer by layer, and reads what it misses from S3
  with one ranged GET over the span those layers lie in; layers read from S3 are promoted into the hot tier. A
  miss, an eviction, a lost store node or a restarted master in the hot tier is only slower, never an error:
  MooncakeTier.get_into answers False and S3 answers;
- writes go through to the hot tier after they are durable in S3 (the hot tier is a cache, never the record);
- hot-tier keys are immutable names of immutable bytes: a payload layer's S3 object and its offset there
  (`<object>@<offset>`), exactly the header-and-body span S3 holds, so any tier's bytes decode the same way;
- per tier (local, mooncake, s3): reads, bytes and the p50/p99 load time of recent reads, for /metrics.
Every object is written whole by the caller's commit; nothing here decides what is durable.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from memory_service.cluster.records import Located
from memory_service.cluster.s3 import ObjectStore
from memory_service.store.codec import Header

if TYPE_CHECKING:
    from memory_service.cluster.mooncake import MooncakeTier

TIERS = ("local", "mooncake", "s3")
_RECENT = 2048  # load times kept per tier for the percentiles


def hot_key(object_key: str, offset: int) -> str:
    return f"{object_key}@{offset}"


class Tiers:
    def __init__(self, objects: ObjectStore, hot: Optional["MooncakeTier"] = None) -> None:
        self.objects, self.hot = objects, hot
        self._lock = threading.Lock()
        self._reads = dict.fromkeys(TIERS, 0)
        self._bytes = dict.fromkeys(TIERS, 0)
        self._times: dict[str, collections.deque] = {t: collections.deque(maxlen=_RECENT) for t in TIERS}

    def count(self, tier: str, nbytes: int, t0: float) -> None:
        with self._lock:
            self._reads[tier] += 1
            self._bytes[tier] += nbytes
            self._times[tier].append(time.perf_counter() - t0)

    def reads(self, tier: str) -> int:
        with self._lock:
            return self._reads[tier]

    def stats(self) -> dict[str, dict[str, float]]:
        """Per tier: reads, bytes, and p50/p99 of recent load times in ms (0 before the first read)."""
        with self._lock:
            out = {}
            for t in TIERS:
                times = np.array(self._times[t]) * 1e3
                out[t] = {"reads": self._reads[t], "bytes": self._bytes[t],
                          "p50_ms": float(np.percentile(times, 50)) if len(times) else 0.0,
                          "p99_ms": float(np.percentile(times, 99)) if len(times) else 0.0}
            return out

    def write_through(self, kv_key: str, kv_parts: Sequence) -> None:
        """Put a log record's payload layers into the hot tier (parts are header, body, header, body, ...)."""
        if self.hot is None or not kv_parts:
            return
        items, at = [], 0
        for head, body in zip(kv_parts[0::2], kv_parts[1::2]):
            items.append((hot_key(kv_key, at), [memoryview(head), body]))
            at += len(head) + body.nbytes
        self.hot.put(items)

    def read(self, at: Located, layers: Sequence[int]) -> dict[int, tuple[Header, memoryview]]:
        """Layers of one entry not in the local cache: hot tier first, S3 for what it misses (then promoted)."""
        out: dict[int, tuple[Header, memoryview]] = {}
        missing = list(layers)
        if self.hot is not None:
            missing = []
            for j in layers:
                o, h, b = at.layers[j]
                buf = memoryview(bytearray(h + b))
                t0 = time.perf_counter()
                if self.hot.get_into(hot_key(at.key, o), buf):
                    out[j] = (Header.unpack(buf[:h]), buf[h:])
                    self.count("mooncake", h + b, t0)
                else:
                    missing.append(j)
        if missing:
            t0 = time.perf_counter()
            spans = [at.layers[j] for j in missing]
            lo = min(o for o, _, _ in spans)
            hi = max(o + h + b for o, h, b in spans)
            view = memoryview(bytearray(hi - lo))
            self.objects.read_into(at.key, lo, view)
            self.count("s3", hi - lo, t0)
            promote = []
            for j, (o, h, b) in zip(missing, spans):
                span = view[o - lo:o - lo + h + b]
                out[j] = (Header.unpack(span[:h]), span[h:])
                promote.append((hot_key(at.key, o), [span]))
            if self.hot is not None:
                self.hot.put(promote)
        return out
