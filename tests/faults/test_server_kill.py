"""SIGKILL the gRPC service at random moments: every put it acknowledged survives, bit-exact and queryable.

A `memflow-service serve` subprocess serves a bank in a tmp dir; a writer here puts entries through
MemoryClient (shared-memory or stream plane, chosen per run) and records each acknowledged id. A timer
SIGKILLs the service at a random moment; the service restarts on the same data dir and the writer goes on.
After a dozen kills: every acknowledged entry is there with its own frame and its own K/V bit for bit, every
entry on disk (acknowledged or not) is a whole entry of some attempted seed, and the indexes, rebuilt after
each kill, find each entry by its own key. Entries are regenerated from their seeds (frame_index == seed),
so the test never trusts what the service says it stored. MEMFLOW_KILL_SEED=n replays one schedule.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from svc_util import SMALL_ARENA, make_entry, make_spec, start_serve  # noqa: E402

from memory_service import MemFlowError  # noqa: E402
from memory_service.client import MemoryClient  # noqa: E402

KILLS = 12


def write_until_killed(proc, plane: str, rng: random.Random, next_seed: int, acked: dict, attempted: set) -> int:
    """Put batches until the service dies under us; returns the next unused seed."""
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        os.kill(proc.proc.pid, signal.SIGKILL)

    # a quarter of the kills may land anywhere (even before the first put); the rest after at least one ack,
    # so that a slow, loaded machine still writes between kills
    early = rng.random() < 0.25
    killer = threading.Timer(rng.uniform(0.02, 0.6), kill)
    with MemoryClient(proc.target, plane=plane, retries=0, timeout=10, arena_bytes=SMALL_ARENA) as c:
        if early:
            killer.start()
        try:
            while True:
                seeds = list(range(next_seed, next_seed + rng.randint(1, 4)))
                next_seed += len(seeds)
                attempted.update(seeds)
                try:
                    ids = c.put("cam0", [make_entry(s) for s in seeds])
                except MemFlowError as exc:
                    fired.wait(10)
                    assert fired.is_set(), f"put failed while the service was up: {type(exc).__name__}: {exc}"
                    break
                assert len(ids) == len(seeds) and not set(ids) & set(acked), "an id was acknowledged twice"
                acked.update(zip(ids, seeds))
                if not killer.is_alive() and not fired.is_set():
                    killer.start()
        finally:
            if not killer.is_alive() and not fired.is_set():
                killer.start()  # an assertion above failed before the first ack: still end the service
            killer.join()
            proc.proc.wait(30)
    assert proc.proc.returncode == -signal.SIGKILL
    return next_seed


def check_bank(target: str, acked: dict, attempted: set, full: bool) -> None:
    with MemoryClient(target, plane="stream", timeout=60) as c:
        metas = {m.entry_id: m for m in c.entries("cam0")}
        missing = sorted(set(acked) - set(metas))
        assert not missing, f"acknowledged entries lost: {missing[:10]}"
        assert all(metas[i].frame_index == acked[i] for i in acked), "an acknowledged id holds another entry"
        assert {m.frame_index for m in metas.values()} <= attempted  # nothing that was never written
        assert c.stats("cam0").entries == len(metas)
        if not full:
            return
        ids = sorted(metas)
        kv = c.fetch("cam0", ids).kv  # every entry on disk is whole: all layers, checksums verified
        for n, eid in enumerate(ids):
            assert kv[n].tobytes() == make_entry(metas[eid].frame_index).kv.tobytes(), f"entry {eid} differs"
        for eid in ids[:: max(1, len(ids) // 40)]:
            r = c.query("cam0", "emb", make_entry(metas[eid].frame_index).keys["emb"], 1)
            assert r.ids.tolist() == [eid] and r.scores[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_acknowledged_puts_survive_sigkill_of_the_service(tmp_path):
    seed = int(os.environ.get("MEMFLOW_KILL_SEED", random.randrange(1 << 30)))
    print(f"kill schedule: MEMFLOW_KILL_SEED={seed}")
    rng = random.Random(seed)
    data = str(tmp_path / "bank")
    acked: dict[int, int] = {}  # entry id -> seed
    attempted: set[int] = set()
    next_seed = 0
    proc = start_serve(data)
    try:
        with MemoryClient(proc.target, plane="stream") as c:
            c.create_stream(make_spec())
        for kill in range(KILLS):
            next_seed = write_until_killed(proc, rng.choice(["shm", "stream"]), rng, next_seed, acked, attempted)
            proc = start_serve(data)
            check_bank(proc.target, acked, attempted, full=kill == KILLS - 1)
        assert len(acked) > KILLS  # the writer really wrote between kills
        print(f"{KILLS} kills, {len(acked)} puts acknowledged, {len(attempted)} attempted")
        assert proc.terminate() == 0
    finally:
        proc.kill()
