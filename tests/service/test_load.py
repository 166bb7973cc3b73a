"""Load: 32 clients, each on its own thread and connection (half on the shared-memory plane, half on the stream
plane) x 4 streams, mixed put / query / fetch / delete for a few seconds against a `memflow-service serve`
subprocess.

Required: no error at all; entry ids unique per stream and contiguous; every fetch bit-exact; every query hit
names an entry that was written, with that entry's frame; and at the end each stream (and the bank) holds
exactly what was acknowledged minus what was deleted, with exact counters.

MEMFLOW_SOAK=1 runs the long form (75 s, as the outside harness did) and prints a JSON summary line.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

from svc_util import DIM, LAYERS, SMALL_ARENA, make_entry, make_spec

from memory_service.client import MemoryClient

SOAK = os.environ.get("MEMFLOW_SOAK", "") not in ("", "0")
THREADS, STREAMS, SECONDS = 32, 4, 75.0 if SOAK else 5.0


class Worker(threading.Thread):
    def __init__(self, n: int, target: str, stop: threading.Event) -> None:
        super().__init__(name=f"load-{n}")
        self.n, self.target, self.stop = n, target, stop
        self.plane = "shm" if n % 2 == 0 else "stream"
        self.rng = np.random.default_rng(n)
        self.acked: dict[str, dict[int, int]] = defaultdict(dict)  # stream -> id -> seed
        self.deleted: dict[str, set[int]] = defaultdict(set)
        self.hits: list[tuple[str, np.ndarray, np.ndarray]] = []  # (stream, ids, frames) of each query
        self.errors: list[str] = []
        self.ops: dict[str, int] = defaultdict(int)
        self.counter = 0

    def run(self) -> None:
        try:
            with MemoryClient(self.target, plane=self.plane, arena_bytes=SMALL_ARENA) as c:
                assert c.plane == self.plane
                while not self.stop.is_set():
                    self.step(c)
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            self.errors.append(f"{self.name} ({self.plane}): {type(exc).__name__}: {exc}")

    def live_ids(self, stream: str) -> list[int]:
        return [i for i in self.acked[stream] if i not in self.deleted[stream]]

    def step(self, c: MemoryClient) -> None:
        stream = f"s{self.rng.integers(STREAMS)}"
        op = self.rng.choice(["put", "query", "fetch", "delete"], p=[0.4, 0.3, 0.2, 0.1])
        mine = self.live_ids(stream)
        if op == "put" or not mine:
            seeds = [(self.n << 20) | (self.counter + j) for j in range(int(self.rng.integers(1, 4)))]
            self.counter += len(seeds)
            ids = c.put(stream, [make_entry(s) for s in seeds])
            assert len(ids) == len(seeds) and not set(ids) & set(self.acked[stream])
            self.acked[stream].update(zip(ids, seeds))
            op = "put"
        elif op == "query":
            r = c.query(stream, "nam", self.rng.standard_normal((LAYERS, DIM)), 4)
            self.hits.append((stream, r.ids.copy(), r.frames.copy()))
        elif op == "fetch":
            ids = list(self.rng.choice(mine, size=min(len(mine), 3), replace=False))
            layers = sorted(self.rng.choice(LAYERS, size=2, replace=False).tolist())
            got = c.fetch(stream, ids, layers=layers).kv
            for n, eid in enumerate(ids):
                want = make_entry(self.acked[stream][eid]).kv[layers]
                assert got[n].tobytes() == want.tobytes(), f"fetch of {stream} entry {eid} is not bit-exact"
        else:
            eid = int(self.rng.choice(mine))
            assert c.delete(stream, [eid]) == 1
            self.deleted[stream].add(eid)
        self.ops[op] += 1


@pytest.mark.slow
def test_mixed_load_on_both_planes(serve, tmp_path):
    proc = serve(tmp_path / "bank")
    with MemoryClient(proc.target, plane="stream") as admin:
        for s in range(STREAMS):
            admin.create_stream(make_spec(f"s{s}"))
        stop = threading.Event()
        workers = [Worker(n, proc.target, stop) for n in range(THREADS)]
        for w in workers:
            w.start()
        stop.wait(SECONDS)
        for _ in range(600):  # on a loaded machine, go on until every operation ran on both planes (<= 60 s)
            done = {(w.plane, op) for w in workers for op, n in w.ops.items() if n}
            if len(done) == 8 or any(w.errors for w in workers):
                break
            time.sleep(0.1)
        stop.set()
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers)
        errors = [e for w in workers for e in w.errors]
        assert errors == []
        totals = {op: sum(w.ops[op] for w in workers) for op in ("put", "query", "fetch", "delete")}
        done = {(w.plane, op) for w in workers for op, n in w.ops.items() if n}
        assert done == {(plane, op) for plane in ("shm", "stream") for op in totals}, totals

        live_total = 0
        for s in range(STREAMS):
            stream = f"s{s}"
            seed_of: dict[int, int] = {}
            deleted: set[int] = set()
            for w in workers:
                assert not set(w.acked[stream]) & set(seed_of), "an entry id was handed out twice"
                seed_of.update(w.acked[stream])
                deleted |= w.deleted[stream]
            assert sorted(seed_of) == list(range(len(seed_of)))  # ids are dense: no put lost or doubled
            live = sorted(set(seed_of) - deleted)
            live_total += len(live)
            assert [m.entry_id for m in admin.entries(stream)] == live
            st = admin.stats(stream)
            assert (st.entries, st.next_entry_id, st.evicted_total) == (len(live), len(seed_of), len(deleted))
            metas = {m.entry_id: m for m in admin.entries(stream)}
            assert all(metas[i].frame_index == seed_of[i] for i in live)
            if live:
                got = admin.fetch(stream, live).kv
                assert got.tobytes() == np.stack([make_entry(seed_of[i]).kv for i in live]).tobytes()
            for w in workers:
                for name, ids, frames in w.hits:
                    if name != stream:
                        continue
                    hit = ids >= 0
                    assert all(i in seed_of for i in ids[hit].tolist()), "a query returned an id never written"
                    assert [seed_of[i] for i in ids[hit].tolist()] == frames[hit].tolist()
        bank = admin.stats()
        assert (bank.entries, len(bank.streams)) == (live_total, STREAMS)
        print(json.dumps({"test": "mixed_load", "clients": THREADS, "seconds": SECONDS, "ops": sum(totals.values()),
                          **totals, "errors": 0, "entries": live_total}))
    assert "failed unexpectedly" not in proc.stderr()
