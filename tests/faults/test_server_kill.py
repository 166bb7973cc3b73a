"""SIGKILL the gRPC service at random moments under writes on both data planes: every put it acknowledged
survives, bit-exact and queryable.

A `memflow-service serve` subprocess serves a bank in a tmp dir whose LMDB map starts at 1 MiB
(MEMFLOW_BANK__MAP_SIZE), so it doubles several times during the run and kills land in and around map growth.
In every round two writers put at once through MemoryClient - one on the shared-memory plane, one on the stream
plane - and record each acknowledged id; a timer SIGKILLs the service at a random moment; the service restarts
on the same data dir and the next round goes on. After each restart every acknowledged entry is there with its
own frame; every fourth round and after the last, each entry's K/V is compared bit for bit with what its seed
makes, every entry on disk (acknowledged or not) is a whole entry of some attempted seed, and the indexes,
rebuilt after each kill, find entries by their own keys. Entries are regenerated from their seeds
(frame_index == seed), so the test never trusts what the service says it stored.

MEMFLOW_KILL_SEED=n replays one schedule; MEMFLOW_SOAK=1 runs the long form (50 kills, as the outside harness
did), printing one JSON line per round and a summary.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from svc_util import SMALL_ARENA, make_entry, make_spec, start_serve  # noqa: E402

from memory_service import MemFlowError  # noqa: E402
from memory_service.client import MemoryClient  # noqa: E402

SOAK = os.environ.get("MEMFLOW_SOAK", "") not in ("", "0")
KILLS = 50 if SOAK else 10
MAP_SIZE = 1 << 20  # the initial LMDB map: a few hundred entries fill it
PLANES = ("shm", "stream")


def serve(data: str):
    return start_serve(data, prefix=["env", f"MEMFLOW_BANK__MAP_SIZE={MAP_SIZE}"])


class Round:
    """One service life: a writer per plane puts until the service dies under them."""

    def __init__(self, proc, rng: random.Random, seeds: itertools.count, acked: dict, attempted: set) -> None:
        self.proc, self.rng, self.seeds, self.acked, self.attempted = proc, rng, seeds, acked, attempted
        self.lock = threading.Lock()
        self.fired = threading.Event()
        self.first_ack = threading.Event()
        self.errors: list[str] = []
        self.puts = dict.fromkeys(PLANES, 0)

    def kill(self) -> None:
        self.fired.set()
        os.kill(self.proc.proc.pid, signal.SIGKILL)

    def write(self, plane: str, batch_sizes: random.Random) -> None:
        try:
            with MemoryClient(self.proc.target, plane=plane, retries=0, timeout=10, arena_bytes=SMALL_ARENA) as c:
                assert c.plane == plane
                while True:
                    with self.lock:
                        seeds = [next(self.seeds) for _ in range(batch_sizes.randint(1, 4))]
                        self.attempted.update(seeds)
                    try:
                        ids = c.put("cam0", [make_entry(s) for s in seeds])
                    except MemFlowError as exc:
                        self.fired.wait(10)
                        assert self.fired.is_set(), f"{plane} put failed while the service was up: " \
                                                    f"{type(exc).__name__}: {exc}"
                        return
                    with self.lock:
                        assert len(ids) == len(seeds) and not set(ids) & set(self.acked), "an id acknowledged twice"
                        self.acked.update(zip(ids, seeds))
                        self.puts[plane] += 1
                    self.first_ack.set()
        except MemFlowError as exc:  # the service died before this writer's client was up
            if not self.fired.wait(10):
                self.errors.append(f"{plane}: {type(exc).__name__}: {exc}")
        except AssertionError as exc:
            self.errors.append(str(exc))
        finally:
            self.first_ack.set()  # never leave the killer waiting on a writer that gave up

    def run(self) -> None:
        # a quarter of the kills may land anywhere (even before the first put); the rest after at least one ack,
        # so that a slow, loaded machine still writes between kills
        early = self.rng.random() < 0.25
        delay = self.rng.uniform(0.02, 0.6)
        writers = [threading.Thread(target=self.write, args=(plane, random.Random(self.rng.random())))
                   for plane in PLANES]
        for w in writers:
            w.start()
        if not early:
            self.first_ack.wait(60)
        threading.Timer(delay, self.kill).start()
        for w in writers:
            w.join(60)
        self.proc.proc.wait(30)
        assert not any(w.is_alive() for w in writers), "a writer hung after the kill"
        assert self.errors == []
        assert self.proc.proc.returncode == -signal.SIGKILL


def check_bank(target: str, acked: dict, attempted: set, full: bool) -> int:
    """Hold the restarted service to every acknowledged put; returns the bank's LMDB map size."""
    with MemoryClient(target, plane="stream", timeout=60) as c:
        metas = {m.entry_id: m for m in c.entries("cam0")}
        missing = sorted(set(acked) - set(metas))
        assert not missing, f"acknowledged entries lost: {missing[:10]}"
        assert all(metas[i].frame_index == acked[i] for i in acked), "an acknowledged id holds another entry"
        assert {m.frame_index for m in metas.values()} <= attempted  # nothing that was never written
        assert c.stats("cam0").entries == len(metas)
        if full:
            ids = sorted(metas)
            for chunk in range(0, len(ids), 256):  # every entry on disk is whole: all layers, checksums verified
                part = ids[chunk:chunk + 256]
                kv = c.fetch("cam0", part).kv
                for n, eid in enumerate(part):
                    assert kv[n].tobytes() == make_entry(metas[eid].frame_index).kv.tobytes(), f"entry {eid} differs"
            for eid in ids[:: max(1, len(ids) // 40)]:
                r = c.query("cam0", "emb", make_entry(metas[eid].frame_index).keys["emb"], 1)
                assert r.ids.tolist() == [eid] and r.scores[0] == pytest.approx(1.0, abs=1e-5)
        return c.stats().map_size


@pytest.mark.slow
def test_acknowledged_puts_on_both_planes_survive_sigkill_while_the_map_grows(tmp_path):
    seed = int(os.environ.get("MEMFLOW_KILL_SEED", random.randrange(1 << 30)))
    print(f"kill schedule: MEMFLOW_KILL_SEED={seed}")
    rng = random.Random(seed)
    data = str(tmp_path / "bank")
    acked: dict[int, int] = {}  # entry id -> seed
    attempted: set[int] = set()
    seeds = itertools.count()
    puts = dict.fromkeys(PLANES, 0)
    proc = serve(data)
    try:
        with MemoryClient(proc.target, plane="stream") as c:
            c.create_stream(make_spec())
            assert c.stats().map_size == MAP_SIZE
        map_size = MAP_SIZE
        for kill in range(KILLS):
            r = Round(proc, rng, seeds, acked, attempted)
            r.run()
            for plane in PLANES:
                puts[plane] += r.puts[plane]
            proc = serve(data)
            map_size = check_bank(proc.target, acked, attempted, full=kill % 4 == 3 or kill == KILLS - 1)
            if SOAK:
                print(json.dumps({"round": kill, "acked": len(acked), "puts": r.puts, "map_size": map_size}))
        assert all(n > 0 for n in puts.values()), f"a plane never wrote between kills: {puts}"
        assert len(acked) > KILLS  # the writers really wrote between kills
        assert map_size > MAP_SIZE, "the LMDB map never grew: the kills never met a map growth"
        print(json.dumps({"test": "server_kill", "kills": KILLS, "acked": len(acked), "attempted": len(attempted),
                          "puts": puts, "lost": 0, "map_size": map_size}))
        assert proc.terminate() == 0
    finally:
        proc.kill()
