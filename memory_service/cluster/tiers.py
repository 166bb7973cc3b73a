"""Tiers: where a node's payload reads are served from - its local cache, Mooncake (optional), S3 - and what each costs.

Owns the read path of a payload the local cache does not hold, and the accounting of every tier. Promises:
- a read (`read_into`) asks the hot tier (Mooncake Store, when configured) for every layer of every entry the
  local cache missed in one batch call, each raw layer's K/V body landing straight in its place in the caller's
  fetch buffer (no staging, no decode copy) and its header in a small buffer; every layer is verified (bytes that
  crossed the network), and what the hot tier misses, or holds damaged, is read from S3 with one ranged GET per
  entry over the span those layers lie in, decoded into place and queued for promotion into the hot tier
  (cluster/promotion.py: in the background, bounded by bytes, dropped and counted when full; the fetch never
  waits for it and a failed promotion never fails it). A miss, an eviction, a lost store node or a restarted
  master in the hot tier is only slower, never an error: MooncakeTier.get_many answers False and S3 answers;
- writes go through to the hot tier after they are durable in S3 (the hot tier is a cache, never the record), on
  one background thread, in order with the removals, so a put never waits for the pool: a full pool evicts
  (its master, periodically) only after a put found it full, so a pinned layer may need a few tries over ~2 s.
  With the queue full (WRITE_QUEUE jobs), a write-through is dropped and counted; a removal always waits its turn
  (and drops queued promotions of its layers first);
- retention per stream: the newest `pinned_window` entries' layers are hard-pinned in the pool (never evicted);
  an entry that leaves the window is demoted (read back, removed, put again evictable), and the layers of an
  entry that is deleted, evicted or rewritten leave the pool (a pinned one would otherwise stay forever). A node
  that takes a stream over takes its newest `pinned_window` entries as the pinned ones, as its old owner left them;
- hot-tier keys are immutable names of immutable bytes: a payload layer's S3 object and its offset there
  (`<object>@<offset>`); the object is a tag (`hot_tag`), then exactly the header-and-body span S3 holds, so any
  tier's bytes decode the same way. The tag binds the bytes to the key: Mooncake can hand a reader another
  object's bytes (a slot reclaimed under a read in flight by a forced remove, an upsert or an eviction), which are
  a valid header and body of their own and pass the checksum; with the tag they are a miss, read from S3;
- per tier (local, mooncake, s3): reads (local: entries, mooncake: layers, s3: ranged GETs, one per entry),
  bytes and the p50/p99 load time of recent calls, for /metrics.
Every object is written whole by the caller's commit; nothing here decides what is durable.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np

from memory_service.cluster.promotion import PromotionStats, Promotions
from memory_service.cluster.records import Located
from memory_service.cluster.s3 import ObjectStore
from memory_service.errors import DataLoss
from memory_service.store.codec import Header, check, checksum, decode_into

if TYPE_CHECKING:
    from memory_service.cluster.mooncake import MooncakeTier

log = logging.getLogger("memflow.cluster")
TIERS = ("local", "mooncake", "s3")
_RECENT = 2048  # load times kept per tier for the percentiles
PUT_RETRY_S = (0.05, 0.2, 0.5, 1.0, None)  # pauses between the tries of a write-through that found the pool full
WRITE_QUEUE = 256  # write-through jobs waiting at most (each holds one log record's payload arrays)
PROMOTE_QUEUE_BYTES = 256 << 20  # S3 reads waiting for promotion at most (cluster.mooncake_promote_queue_bytes)


TAG_BYTES = 8  # a hot-tier object's leading tag (hot_tag)


def hot_key(object_key: str, offset: int) -> str:
    return f"{object_key}@{offset}"


def hot_tag(key: str, header: "bytes | memoryview | np.ndarray") -> np.ndarray:
    """The TAG_BYTES a hot-tier object starts with: xxh3-64 of its key and its layer's packed header (whose checksum
    covers the body), so bytes of any other object, or a header that is not this layer's, fail the comparison."""
    return np.frombuffer(checksum(key.encode(), header).to_bytes(TAG_BYTES, "little"), np.uint8)


class Tiers:
    def __init__(self, objects: ObjectStore, hot: Optional["MooncakeTier"] = None, pinned_window: int = 3,
                 promote_queue_bytes: int = PROMOTE_QUEUE_BYTES) -> None:
        self.objects, self.hot = objects, hot
        # no hot tier, or promotion off (a bound of 0): no queue and no thread
        self.promotions = Promotions(hot, promote_queue_bytes) if hot is not None and promote_queue_bytes > 0 else None
        self.pinned_window = pinned_window
        self._pinned: dict[str, collections.OrderedDict[int, Located]] = {}  # stream -> pinned entries, oldest first
        self._lock = threading.Lock()
        self.dropped = 0  # write-throughs dropped on a full queue
        self._jobs: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self._worker: Optional[threading.Thread] = None
        if hot is not None:
            self._worker = threading.Thread(target=self._work, name="memflow-hot-tier", daemon=True)
            self._worker.start()
        self._reads = dict.fromkeys(TIERS, 0)
        self._bytes = dict.fromkeys(TIERS, 0)
        self._times: dict[str, collections.deque] = {t: collections.deque(maxlen=_RECENT) for t in TIERS}

    def count(self, tier: str, nbytes: int, t0: float, reads: int = 1) -> None:
        """`reads` payload layers served by `tier` in one call that began at t0 (one load time sample)."""
        with self._lock:
            self._reads[tier] += reads
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

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                fn, args = job
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - the hot tier is a cache: its failures never reach a call
                log.warning("hot tier job failed: %s: %s", type(exc).__name__, exc)
            finally:
                self._jobs.task_done()

    def drain(self) -> None:
        """Wait until every write-through and removal submitted so far is done (tests, close)."""
        if self._worker is not None:
            self._jobs.join()

    def promotion_stats(self) -> PromotionStats:
        """Layers promoted into the hot tier after S3 reads, dropped (queue full), failed; what waits now."""
        return self.promotions.stats() if self.promotions is not None else PromotionStats(0, 0, 0, 0, 0)

    @contextlib.contextmanager
    def hold_promotions(self) -> Iterator[None]:
        """No promotion starts while this is held (they queue, or drop once the queue is full): tests."""
        if self.promotions is None:
            yield
            return
        with self.promotions.hold():
            yield

    def flush_promotions(self, timeout_s: Optional[float] = None) -> bool:
        """Wait until every promotion submitted so far is done (tests); False if `timeout_s` passed first."""
        return self.promotions.flush(timeout_s) if self.promotions is not None else True

    def close(self) -> None:
        if self.promotions is not None:
            self.promotions.close()  # what waits is dropped: promotions only save later S3 reads
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None

    def write_through(self, stream: str, kv_key: str, kv_parts: Sequence, where: dict[int, Located]) -> None:
        """Queue a log record's payload layers for the hot tier (`kv_parts`: header, body, header, body, ... at the
        offsets `where` names), the entries pinned while they are among the stream's newest."""
        if self.hot is None or not kv_parts:
            return
        try:
            self._jobs.put_nowait((self._write, (stream, kv_key, kv_parts, where)))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _write(self, stream: str, kv_key: str, kv_parts: Sequence, where: dict[int, Located]) -> None:
        assert self.hot is not None
        by_offset, at = {}, 0
        for head, body in zip(kv_parts[0::2], kv_parts[1::2]):
            by_offset[at] = (memoryview(head), body)
            at += len(head) + body.nbytes
        pin = self.pinned_window > 0
        for eid, loc in sorted(where.items()):
            items = []
            for o, _, _ in loc.layers:
                key, (head, body) = hot_key(kv_key, o), by_offset[o]
                items.append((key, [hot_tag(key, head), head, body]))
            for pause in PUT_RETRY_S:  # a full pool evicts (its master, in the background) after a put fails
                stored = self.hot.put_each(items, pin=pin)
                items = [item for item, ok in zip(items, stored) if not ok]  # a retry puts only what failed
                if not items or pause is None:
                    break
                time.sleep(pause)
            if pin:
                with self._lock:
                    self._pinned.setdefault(stream, collections.OrderedDict())[eid] = loc
        self._demote(stream)

    def _demote(self, stream: str) -> None:
        """Entries past the pinned window become evictable: read back, removed, put again unpinned."""
        assert self.hot is not None
        with self._lock:
            pinned = self._pinned.get(stream, collections.OrderedDict())
            old = [pinned.popitem(last=False)[1] for _ in range(max(0, len(pinned) - self.pinned_window))]
        for loc in old:
            for o, h, b in loc.layers:
                key, buf = hot_key(loc.key, o), np.empty(TAG_BYTES + h + b, np.uint8)
                held = self.hot.get_into(key, buf.data)
                self.hot.remove([key])
                if held:
                    self.hot.put([(key, [buf.data])])

    def forget(self, stream: str, gone: Sequence[Located]) -> None:
        """Layers that no longer belong to the stream (deleted, evicted, rewritten, dropped) leave the pool (queued
        behind the write-throughs, so a layer still on its way in is removed after it lands)."""
        if self.hot is None or not gone:
            return
        if self.promotions is not None:
            self.promotions.discard([hot_key(loc.key, o) for loc in gone for o, _, _ in loc.layers])
        self._jobs.put((self._remove, (stream, list(gone))))

    def _remove(self, stream: str, gone: list[Located]) -> None:
        assert self.hot is not None
        with self._lock:
            pinned = self._pinned.get(stream, collections.OrderedDict())
            for eid in [e for e, loc in pinned.items() if loc in gone]:
                del pinned[eid]
        self.hot.remove([hot_key(loc.key, o) for loc in gone for o, _, _ in loc.layers])

    def adopt(self, stream: str, where: dict[int, Located]) -> None:
        """A stream taken over: its newest entries are the pinned ones (as the old owner left them)."""
        newest = sorted(where)[-self.pinned_window:] if self.pinned_window > 0 else []
        with self._lock:
            self._pinned[stream] = collections.OrderedDict((e, where[e]) for e in newest)

    def release(self, stream: str) -> None:
        """This node no longer owns the stream: its pins are the next owner's to manage."""
        with self._lock:
            self._pinned.pop(stream, None)

    def read_into(self, entries: Sequence[tuple[Located, np.ndarray, str]], layers: Sequence[int]) -> None:
        """Layers of entries that the local cache does not hold, each (where its payload lies, its rows of the fetch
        buffer `[len(layers), 2, T, H, D]` in the logical dtype, its name in errors) decoded into those rows: the
        hot tier first, all entries' layers in one batch, then S3 for what it missed, one ranged GET per entry (and
        promoted). Every layer is verified (bytes that crossed the network); hot-tier bytes that fail are a miss."""
        missing = [list(range(len(layers))) for _ in entries]
        if self.hot is not None:
            missing = self._read_hot(entries, layers)
        for (at, out, what), todo in zip(entries, missing):
            if todo:
                self._read_s3(at, [layers[i] for i in todo], [out[i] for i in todo], what)

    def _read_s3(self, at: Located, layers: Sequence[int], out: Sequence[np.ndarray], what: str) -> None:
        """`layers` of one entry in one ranged GET, each decoded into its `out` view `[2, T, H, D]`, then queued for
        promotion (the GET's buffer itself, kept alive by the queue: no copy)."""
        t0 = time.perf_counter()
        spans = [at.layers[j] for j in layers]
        lo = min(o for o, _, _ in spans)
        hi = max(o + h + b for o, h, b in spans)
        got = np.empty(hi - lo, np.uint8)  # [the span's bytes]
        view = got.data
        self.objects.read_into(at.key, lo, view)
        promote = []
        for i, (j, (o, h, b)) in enumerate(zip(layers, spans)):
            span = view[o - lo:o - lo + h + b]
            decode_into(Header.unpack(span[:h]), span[h:], out[i], True, f"{what} layer {j} (S3)")
            key = hot_key(at.key, o)  # its tag from the header as read here, so a later change of `got` shows
            promote.append((key, [hot_tag(key, span[:h]), got[o - lo:o - lo + h + b]]))
        self.count("s3", hi - lo, t0)  # one ranged GET
        if self.promotions is not None:
            self.promotions.submit(promote, got.nbytes)

    def _read_hot(self, entries: Sequence[tuple[Located, np.ndarray, str]], layers: Sequence[int]) -> list[list[int]]:
        """The hot tier's part of read_into; per entry, the positions in `layers` it did not serve.

        A raw body is exactly its layer of the fetch buffer, so it is read straight there (no copy: its header goes
        to a small buffer, both in one scattered read of the `<object>@<offset>` span); another codec (fp8) lands
        in a buffer of its own and is decoded from there."""
        assert self.hot is not None
        t0 = time.perf_counter()
        heads = np.empty(sum(at.layers[j][1] for at, _, _ in entries for j in layers), np.uint8)  # [header bytes]
        tags = np.empty((len(entries) * len(layers), TAG_BYTES), np.uint8)  # [layer read, tag]
        items: list[tuple[str, list[np.ndarray]]] = []
        places, at_head = [], 0
        for at, out, _ in entries:
            for i, j in enumerate(layers):
                o, h, b = at.layers[j]
                dest = out[i]  # [2, T, H, D]
                direct = dest.flags.c_contiguous and dest.nbytes == b
                body = dest.reshape(-1).view(np.uint8) if direct else np.empty(b, np.uint8)
                key, tag = hot_key(at.key, o), tags[len(items)]
                items.append((key, [tag, heads[at_head:at_head + h], body]))
                places.append((key, tag, heads[at_head:at_head + h], body, direct))
                at_head += h
        hits = iter(self.hot.get_many(items))
        places_in = iter(places)
        missing: list[list[int]] = []
        served = nbytes = 0
        for _, out, what in entries:
            missing.append([])
            for i, j in enumerate(layers):
                hit, (key, tag, head, body, direct) = next(hits), next(places_in)
                if hit:
                    try:
                        if not np.array_equal(tag, hot_tag(key, head)):
                            raise DataLoss(f"{what} layer {j}: the pool's object under {key!r} is not that layer's "
                                           "(its tag does not match: another object's bytes)")
                        header = Header.unpack(head.data)
                        if direct and header.codec == "raw":
                            check(header, body.data, out[i].shape, out[i].dtype, True, f"{what} layer {j}")
                        else:  # decoded from a copy: an fp8 body of a float8 stream is as long as its raw one
                            decode_into(header, body.copy().data if direct else body.data, out[i], True,
                                        f"{what} layer {j}")
                        served, nbytes = served + 1, nbytes + TAG_BYTES + head.nbytes + body.nbytes
                        continue
                    except DataLoss as exc:  # the cache's bytes are bad: S3 has the record
                        log.warning("hot tier: %s; reading it from S3", exc)
                missing[-1].append(i)
        if served:
            self.count("mooncake", nbytes, t0, served)
        return missing
