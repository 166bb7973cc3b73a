"""Checkpoints: a stream's take-over replays what its live state needs, not its whole history.

Owns when a stream's log is checkpointed, how a checkpoint is written and the log behind it collected, and how a
take-over reads the log back (records.py owns the objects' schema). Without it the log grows with every put and
every statistics flush for as long as the stream lives (the plugin puts one record per chunk), and a take-over
reads every record one GET after another.

Promises:
- A checkpoint is taken after the owner moved the head itself (records.py: only then is its record at that seq the
  valid one), from the local LMDB under the stream's lock, so it is the state of exactly that head. It is due when
  the records since the last one reach `every` or the live entry count, whichever is more: its bytes (the live
  entries' keys) are at most about the records' own.
- Uploading it and collecting the log behind it run on one background thread per node, off the write path; a
  stream has at most one in flight. Deletion starts only once the checkpoint object is in S3, and keeps every .kv
  object a live entry's payload lies in.
- A failed checkpoint or collection costs nothing but a longer replay: it is logged, and tried again when due.
- A take-over reads the newest valid checkpoint and the records after it with up to `READERS` GETs at once, applied
  in order. A listing raced by the previous owner's collection (an object gone between list and get) is listed and
  read again once: the checkpoint that made it garbage covers it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from memory_service.cluster import records
from memory_service.cluster.s3 import ObjectStore
from memory_service.errors import MemFlowError, NotFound
from memory_service.store.base import StreamLayout
from memory_service.types import EntryMeta

log = logging.getLogger("memflow.cluster")
READERS = 8  # GETs at once while a take-over reads the log


class Checkpoints:
    """A node's checkpoint writer and log reader (see the module doc)."""

    def __init__(self, objects: ObjectStore, every: int) -> None:
        self.objects = objects
        self.every = every
        self.written = 0  # checkpoints in S3 (tests, logs)
        self.collected = 0  # log objects deleted behind them
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memflow-ckpt")
        self._busy: set[str] = set()  # stream prefixes with a checkpoint in flight
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------------------
    def replay(self, prefix: str, layout: StreamLayout, head_seq: int, head_epoch: int
               ) -> tuple[int, Iterator[records.Record]]:
        """(the seq of the checkpoint it starts from, 0 for none; the records to apply, in order)."""
        for attempt in (0, 1):
            plan = records.replay_plan(prefix, self.objects.list(prefix + "log/"), head_seq, head_epoch)
            names = [records.checkpoint_name(prefix, *plan.checkpoint)] if plan.checkpoint else []
            names += [records.object_names(prefix, s, e)[0] for s, e in plan.records]
            try:
                blobs = self._get_all(names)
            except NotFound:
                if attempt:
                    raise
                continue  # the previous owner collected behind a newer checkpoint meanwhile: list again
            kvs = [records.object_names(prefix, *plan.checkpoint)[1]] if plan.checkpoint else []
            kvs += [records.object_names(prefix, s, e)[1] for s, e in plan.records]
            start = plan.checkpoint[0] if plan.checkpoint else 0
            return start, (records.decode(layout, b, kv, name) for b, kv, name in zip(blobs, kvs, names))
        raise AssertionError("unreachable")

    def _get_all(self, names: Sequence[str]) -> list[bytes]:
        if len(names) <= 1:
            return [self.objects.get(n) for n in names]
        with concurrent.futures.ThreadPoolExecutor(min(READERS, len(names)), thread_name_prefix="memflow-replay") as ex:
            return list(ex.map(self.objects.get, names))

    # -- writing ---------------------------------------------------------------------------------------
    def due(self, prefix: str, head_seq: int, last_seq: int, live: int) -> bool:
        with self._lock:
            busy = prefix in self._busy
        return not busy and head_seq - last_seq >= max(self.every, live)

    def write(self, name: str, prefix: str, seq: int, epoch: int, state: "State",
              done: Callable[[int, int], None]) -> None:
        """Upload `state` as the checkpoint of head (seq, epoch) and collect the log behind it, in the background;
        `done(seq, live)` runs once it is in S3."""
        with self._lock:
            if prefix in self._busy:
                return
            self._busy.add(prefix)
        try:
            self._pool.submit(self._write, name, prefix, seq, epoch, state, done)
        except RuntimeError:  # closing
            with self._lock:
                self._busy.discard(prefix)

    def _write(self, name: str, prefix: str, seq: int, epoch: int, state: "State",
               done: Callable[[int, int], None]) -> None:
        try:
            self.objects.put(records.checkpoint_name(prefix, seq, epoch),
                             records.encode_checkpoint(state.record, state.metas, state.keys, state.where))
            self.written += 1
            done(seq, len(state.metas))
            live = {at.key for at in state.where.values()}
            garbage = records.obsolete(prefix, self.objects.list(prefix + "log/"), seq, live)
            self.objects.delete(garbage)
            self.collected += len(garbage)
            log.info("stream %r: checkpoint at record %d (%d entries); %d log objects collected", name, seq,
                     len(state.metas), len(garbage), extra={"stream": name})
        except MemFlowError as exc:
            log.warning("stream %r: checkpoint at record %d not completed (%s); a take-over replays more", name, seq,
                        exc, extra={"stream": name})
        finally:
            with self._lock:
                self._busy.discard(prefix)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no checkpoint is in flight; False if one still is after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._busy:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def close(self) -> None:
        """Finish what is in flight (a checkpoint half-collected is only garbage left for the next one)."""
        self._pool.shutdown(wait=True)


@dataclasses.dataclass(frozen=True)
class State:
    """A stream's live state at one head, as a checkpoint holds it."""

    record: dict  # the stream record (next entry id, version, spec)
    metas: list[EntryMeta]  # live entries, by id
    keys: list[np.ndarray]  # per key space: [n, ...] rows in the order of metas
    where: dict[int, records.Located]  # entry -> its payload layers in S3


def snapshot(view, layout: StreamLayout, where: dict[int, records.Located]) -> Optional[State]:
    """The live state of `layout`'s stream in a local store view (None when the view has no such stream)."""
    stored = next((s for s in view.streams() if s.name == layout.name), None)
    if stored is None or not isinstance(stored.record, dict):
        return None
    metas = sorted(view.entries(layout), key=lambda m: m.entry_id)
    ids = [m.entry_id for m in metas]
    keys = []
    for space, (dtype, shape) in enumerate(layout.key_spaces):
        out = np.empty((len(ids), *shape), dtype)  # [n, ...] in the space's stored dtype
        if ids:
            view.read_keys(layout, space, ids, out)
        keys.append(out)
    return State(dict(stored.record), metas, keys, {e: where[e] for e in ids if e in where})
