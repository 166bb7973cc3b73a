"""kill -9 while putting and querying: every acknowledged entry survives; retrieval statistics are at most about
one flush interval old.

Statistics are flushed off the put path (memory_service/bank.py), so a crash may lose the hits of the last
interval - never an entry. A real writer process (stats_writer.py) puts entries and queries them, printing each
acknowledged put and each query's hit; the test SIGKILLs it at a random moment, reopens the bank and holds it to:
- every acknowledged entry is there, whole and bit-exact (test_crash.verify);
- for every entry, the hits on disk gained in this run are no more than the queries that hit it (one more for
  a query in flight at the kill) and no fewer than those acknowledged before kill - (interval + margin): the
  margin covers the flush's own write and a loaded machine's scheduling, and is far below the run's length;
- what is on disk is one consistent set of statistics per entry (a k=1 query adds 1 to hits and importance).
With and without the bank's upkeep thread (the service runs it; a bare LocalMemory flushes on a one-shot thread
a query or put starts).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import stats_writer
from test_crash import verify

from memory_service import LocalMemory
from memory_service.config import BankConfig

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stats_writer.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARGIN_S = 2.0  # on top of the flush interval; each run lasts at least RUN_S
RUN_S = (4.0, 5.0)


class Writer:
    """The writer process and its lines, each stamped with the monotonic time it arrived (never before the call it
    reports returned)."""

    def __init__(self, data_dir: str, *flags: str) -> None:
        self.lines: list[tuple[float, list[str]]] = []
        self.proc = subprocess.Popen([sys.executable, WRITER, data_dir, *flags], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.endswith("\n"):
                self.lines.append((time.monotonic(), line.split()))
                self.ready.set()
        self.ready.set()

    def kill(self) -> float:
        killed = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join()
        assert self.proc.returncode == -signal.SIGKILL, f"writer failed:\n{self.proc.stderr.read()[-3000:]}"
        return killed

    def ids(self, word: str, before: float = float("inf")) -> list[int]:
        return [int(w[1]) for t, w in self.lines if w[0] == word and t < before]


def hits_on_disk(data_dir: str) -> dict[int, tuple[int, float]]:
    """entry id -> (hit count, importance) as stored, read by a bank that writes nothing."""
    with LocalMemory(data_dir, BankConfig(snapshot_on_close=False), read_only=True) as m:
        return {e.entry_id: (e.hit_count, e.importance) for e in m.entries(stats_writer.STREAM)}


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--pruner",)], ids=["one-shot-flush", "upkeep-thread"])
def test_sigkill_loses_no_entry_and_at_most_an_interval_of_statistics(tmp_path, flags):
    data = str(tmp_path / "bank")
    rng = random.Random(int(os.environ.get("MEMFLOW_CRASH_SEED", "20261202")))
    acked: set[int] = set()
    before = {}  # hits on disk before this run
    for _ in range(2):
        w = Writer(data, *flags)
        assert w.ready.wait(60), "writer never started"
        time.sleep(rng.uniform(*RUN_S))
        killed = w.kill()
        acked |= set(w.ids("ack"))
        assert w.ids("hit"), "the writer answered no query"
        after = hits_on_disk(data)
        queried = {}
        for eid in w.ids("hit"):
            queried[eid] = queried.get(eid, 0) + 1
        settled = {}  # queries acknowledged long enough before the kill that a flush must have covered them
        for eid in w.ids("hit", before=killed - stats_writer.FLUSH_S - MARGIN_S):
            settled[eid] = settled.get(eid, 0) + 1
        assert settled, "the run was too short to check what a flush covers"
        in_flight = 1  # the query after the last printed hit may have counted (and been flushed) unprinted
        for eid, (hits, importance) in after.items():
            hits0, importance0 = before.get(eid, (0, 0.0))
            gained = hits - hits0
            assert settled.get(eid, 0) <= gained <= queried.get(eid, 0) + in_flight, \
                f"entry {eid}: {gained} hits persisted, {settled.get(eid, 0)} settled and {queried.get(eid, 0)} made"
            # a k=1 query adds 1 to both: one flush wrote both fields of one record
            assert importance - importance0 == gained, f"entry {eid}: importance +{importance - importance0}, " \
                f"hits +{gained}"
        verify(data, acked, set())  # every acknowledged entry whole, bit-exact and queryable (this counts hits)
        before = hits_on_disk(data)
