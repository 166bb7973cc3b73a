"""A real full disk: the bank on a 4 MiB tmpfs fills up. A failing put is RESOURCE_EXHAUSTED and changes nothing;
deletes and drops still commit and the space they free takes new puts; queries never write; a close (and a
SIGTERM'd `memflow-service serve`) on the full disk ends cleanly, leaves no partial file, and the next start
serves everything that was acknowledged.

Needs permission to mount tmpfs (root, as on CI and developer machines here); skips cleanly elsewhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_disk import tiny_disk  # noqa: F401 - the fixture, found by pytest through this name

from conftest import DIM, EMB, make_entry, make_spec
from memory_service import Budget, KeySpace, LocalMemory, ResourceExhausted
from memory_service import bank as bank_module
from memory_service.config import BankConfig, IndexParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from svc_util import start_serve  # noqa: E402

from memory_service.client import MemoryClient  # noqa: E402

CONFIG = BankConfig(map_size=64 << 20, snapshot_on_close=False)


def fill(m, stream: str, acked: dict[int, int], next_seed: int, batch: int = 1) -> int:
    """Put entries of fresh seeds into `stream` until the disk refuses; returns the next unused seed."""
    with pytest.raises(ResourceExhausted, match="disk full"):
        for _ in range(100_000):  # 4 MiB holds a few thousand 1.3 KiB entries at most
            seeds = list(range(next_seed, next_seed + batch))
            next_seed += batch
            acked.update(zip(m.put(stream, [make_entry(s) for s in seeds]), seeds))
    return next_seed


def assert_holds(m, stream: str, acked: dict[int, int]) -> None:
    """Exactly the acknowledged entries, each with its own K/V bit for bit."""
    ids = sorted(acked)
    assert [e.entry_id for e in m.entries(stream)] == ids
    if ids:
        got = m.fetch(stream, ids).kv
        assert got.tobytes() == np.stack([make_entry(acked[i]).kv for i in ids]).tobytes()


def no_partial_files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tmp" in f]


def test_full_disk_is_resource_exhausted_and_bank_stays_readable(tiny_disk):
    data = tiny_disk + "/bank"
    with LocalMemory(data, CONFIG) as m:
        m.create_stream(make_spec())
        acked: list[int] = []
        with pytest.raises(ResourceExhausted, match="disk full"):
            for i in range(10_000):  # 4 MiB holds a few thousand 1.3 KiB entries at most
                acked += m.put("cam0", [make_entry(i) for i in range(i * 8, i * 8 + 8)])
        before = m.stats("cam0")
        assert before.entries == len(acked) > 0
        kv = m.fetch("cam0", acked).kv  # everything acknowledged is readable and verifies its checksum
        assert np.array_equal(kv[-1], make_entry(acked[-1]).kv)
        q = make_entry(acked[0]).keys["emb"]
        assert m.query("cam0", "emb", q, 1).ids.tolist() == [acked[0]]
        with pytest.raises(ResourceExhausted):  # larger than what is left: refused, nothing changes
            m.put("cam0", [make_entry(10**6 + i) for i in range(512)])
        assert m.stats("cam0") == before
        assert np.array_equal(m.fetch("cam0", acked).kv, kv)
    with LocalMemory(data, BankConfig(snapshot_on_close=False)) as m:  # reopens after the failures
        assert m.stats("cam0").entries == len(acked)


@pytest.mark.parametrize("kind", ["flat", "ivfsq"])
def test_a_commit_refused_at_its_fsync_takes_out_the_index_adds_that_ran_beside_it(tiny_disk, monkeypatch, kind):
    """A put's index adds start once its LMDB puts are staged and run beside the commit's page writes and fsync
    (Bank.put, _Adds; keys of BESIDE_MIN_BYTES and more, 0 here). On a full disk the commit itself fails, after
    the adds ran: they must come out again, so that no query answers with an entry that was never stored, and
    every index is byte for byte what it was. `ivfsq`: the per-layer key space is a trained IVF (32 entries, 4
    lists), whose adds go beside the commit too; taking them out must put each list back in its order."""
    monkeypatch.setattr(bank_module, "BESIDE_MIN_BYTES", 0)
    config = CONFIG
    if kind == "ivfsq":
        config = BankConfig(map_size=64 << 20, snapshot_on_close=False,
                            index=IndexParams(ivf_nlist=4, ivf_train_min=32, ivf_nprobe=2, ivf_refine=2))
    with LocalMemory(tiny_disk + "/bank", config) as m:
        spaces = {"nam": KeySpace(DIM, per_layer=True, index=kind), "emb": KeySpace(EMB, metric="cosine")}
        m.create_stream(make_spec(key_spaces=spaces))
        probes = [make_entry(seed) for seed in (5, 77)]
        spaces_held = m.bank._streams["cam0"].spaces.values()

        def held() -> list:  # every index's bytes and tombstones, as a snapshot would write them
            return [(data, tomb.tobytes()) for space in spaces_held for data, tomb in space.dump()]

        def answers() -> tuple:
            return tuple((r.ids.tobytes(), r.scores.tobytes()) for e in probes for space in ("nam", "emb")
                         for r in [m.query("cam0", space, e.keys[space], 4)])

        acked: dict[int, int] = {}
        refused = None
        for start in range(0, 100_000, 16):  # 4 MiB holds a few thousand 1.3 KiB entries at most
            before, stats = answers(), m.stats("cam0")
            indexes = held()
            batch = [make_entry(10**6 + start + i) for i in range(16)]
            try:
                acked.update(zip(m.put("cam0", batch), range(start, start + 16)))
            except ResourceExhausted as exc:
                assert "disk full" in str(exc)
                refused = batch
                break
        assert refused is not None and acked
        assert all(space.undoable for space in spaces_held)  # so the adds went beside the commit
        if kind == "ivfsq":
            assert not m.bank._streams["cam0"].spaces["nam"].indexes[0].exact  # trained
        assert answers() == before and m.stats("cam0") == stats
        assert held() == indexes
        for e in refused:  # each refused key's best match is a stored entry, never an id past the last one
            for space in ("nam", "emb"):
                ids = m.query("cam0", space, e.keys[space], 2).ids
                assert set(ids[ids >= 0].ravel().tolist()) <= set(acked)


def test_delete_on_a_full_disk_commits_and_its_space_takes_new_puts(tiny_disk):
    data = tiny_disk + "/bank"
    with LocalMemory(data, CONFIG) as m:
        m.create_stream(make_spec())
        acked: dict[int, int] = {}
        seed = fill(m, "cam0", acked, 0)
        for rnd in range(4):  # again and again: each delete on the full disk commits, each refill reuses it
            victims = sorted(acked)[:100]
            assert m.delete("cam0", victims) == 100
            for eid in victims:
                del acked[eid]
            assert m.stats("cam0").entries == len(acked)
            before = len(acked)
            seed = fill(m, "cam0", acked, seed)
            assert len(acked) - before >= 50, f"round {rnd}: only {len(acked) - before} puts fit after 100 deletes"
        assert_holds(m, "cam0", acked)
    with LocalMemory(data, CONFIG) as m:
        assert_holds(m, "cam0", acked)


def test_drop_on_a_full_disk_commits_and_its_space_takes_new_puts(tiny_disk):
    data = tiny_disk + "/bank"
    with LocalMemory(data, CONFIG) as m:
        m.create_stream(make_spec("keep"))
        m.create_stream(make_spec("big"))
        keep: dict[int, int] = {}
        big: dict[int, int] = {}
        for seed in range(0, 600, 4):  # about a third of the disk
            keep.update(zip(m.put("keep", [make_entry(s) for s in range(seed, seed + 4)]), range(seed, seed + 4)))
        seed = fill(m, "big", big, 600, batch=4)  # the rest of the disk: about 2 MiB
        assert len(big) > 400
        m.drop_stream("big")
        assert [s.name for s in m.list_streams()] == ["keep"]
        before = len(keep)
        seed = fill(m, "keep", keep, seed)
        assert len(keep) - before >= len(big) // 2, f"{len(keep) - before} puts fit where {len(big)} entries were"
        assert_holds(m, "keep", keep)
    with LocalMemory(data, CONFIG) as m:
        assert [s.name for s in m.list_streams()] == ["keep"]
        assert_holds(m, "keep", keep)


def test_a_stream_at_its_budget_keeps_taking_puts_on_a_full_disk(tiny_disk):
    data = tiny_disk + "/bank"
    with LocalMemory(data, CONFIG) as m:
        m.create_stream(make_spec("ring", budget=Budget(max_entries=200)))  # FIFO: each put past it evicts
        m.create_stream(make_spec("fill"))
        for seed in range(200):
            m.put("ring", [make_entry(seed)])
        fill(m, "fill", {}, 10_000)
        for seed in range(20_000, 20_300):  # every put evicts the oldest: the room it needs is the room it frees
            m.put("ring", [make_entry(seed)])
        entries = m.entries("ring")
        assert 190 <= len(entries) <= 200
        assert [e.frame_index for e in entries] == list(range(20_300 - len(entries), 20_300))
        assert_holds(m, "ring", {e.entry_id: e.frame_index for e in entries})


def test_queries_on_a_full_disk_never_fail_and_close_is_clean(tiny_disk):
    data = tiny_disk + "/bank"
    # statistics due at every query, and snapshots on close: both are writes the full disk refuses
    config = BankConfig(map_size=64 << 20, hit_flush_interval_s=0.0)
    with LocalMemory(data, config) as m:
        m.create_stream(make_spec())
        acked: dict[int, int] = {}
        fill(m, "cam0", acked, 0, batch=8)
        for seed in list(acked.values())[::3]:  # hits on a third of the bank: many dirty statistics
            e = make_entry(seed)
            assert seed in m.query("cam0", "emb", e.keys["emb"], 4).frames.tolist()
            m.query("cam0", "nam", e.keys["nam"], 2)
        with pytest.raises(ResourceExhausted):
            m.put("cam0", [make_entry(10**6 + i) for i in range(64)])
        hits = {e.entry_id: e.hit_count for e in m.entries("cam0")}
        assert sum(hits.values()) >= len(acked) // 3
    # the close skipped what did not fit (statistics, snapshots) and left no partial file behind
    assert no_partial_files(tiny_disk) == []
    with LocalMemory(data, CONFIG) as m:
        assert_holds(m, "cam0", acked)
        e = make_entry(acked[0])
        assert m.query("cam0", "emb", e.keys["emb"], 1).ids.tolist() == [0]


def test_sigterm_of_the_service_on_a_full_disk_exits_cleanly_and_restart_serves_everything(tiny_disk, tmp_path):
    data = tiny_disk + "/bank"
    logs = str(tmp_path)  # the service's stderr must not need the full disk
    proc = start_serve(data, log_dir=logs)
    acked: dict[int, int] = {}
    try:
        with MemoryClient(proc.target, plane="stream", timeout=60) as c:
            c.create_stream(make_spec())
            seed = 0
            with pytest.raises(ResourceExhausted, match="disk full"):
                for _ in range(100_000):
                    seeds = list(range(seed, seed + 8))
                    seed += 8
                    acked.update(zip(c.put("cam0", [make_entry(s) for s in seeds]), seeds))
            for s in list(acked.values())[::4]:  # queries on the full disk: never an error
                assert s in c.query("cam0", "emb", make_entry(s).keys["emb"], 2).frames.tolist()
            victims = sorted(acked)[:16]  # a delete on the full disk through the service
            assert c.delete("cam0", victims) == 16
            for eid in victims:
                del acked[eid]
        # the close on SIGTERM flushes statistics and writes snapshots: neither fits; it still ends cleanly
        assert proc.terminate() == 0, proc.stderr()[-3000:]
        assert "Traceback" not in proc.stderr()
        assert no_partial_files(tiny_disk) == []
        proc = start_serve(data, log_dir=logs)
        with MemoryClient(proc.target, plane="stream", timeout=60) as c:
            assert_holds(c, "cam0", acked)
            first = min(acked)
            assert c.query("cam0", "emb", make_entry(acked[first]).keys["emb"], 1).ids.tolist() == [first]
        assert proc.terminate() == 0, proc.stderr()[-3000:]
    finally:
        proc.kill()
