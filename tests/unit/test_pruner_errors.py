"""The background pruner (MemoryBank.start_pruner) never swallows a failure silently: a prune it cannot do is
logged, naming the stream and the error, and the thread keeps running. A real bank, a real LMDB directory."""

from __future__ import annotations

import logging
import threading

from conftest import Clock, make_entry, make_spec

from memory_service import LocalMemory


def test_a_failed_background_prune_is_logged_and_the_pruner_keeps_going(tmp_path, caplog):
    clock = Clock()
    with LocalMemory(str(tmp_path), clock=clock) as m:
        m.create_stream(make_spec(policy="ttl(seconds=10)"))
        m.put("cam0", [make_entry(i) for i in range(3)])
    clock.t += 11  # every entry has expired, and a read-only bank may not evict them: each prune fails
    caplog.set_level(logging.WARNING, logger="memflow.bank")
    with LocalMemory(str(tmp_path), read_only=True, clock=clock) as ro:
        ro.bank.start_pruner(interval_s=0.01)
        for _ in range(500):  # bounded wait for two passes of the thread
            if sum("background prune of stream 'cam0' failed" in r.getMessage() for r in caplog.records) >= 2:
                break
            threading.Event().wait(0.01)
        failures = [r for r in caplog.records if "background prune of stream 'cam0' failed" in r.getMessage()]
        assert len(failures) >= 2, [r.getMessage() for r in caplog.records]
        assert "PermissionDenied" in failures[0].getMessage()
        assert ro.stats("cam0").entries == 3  # nothing half-done


def test_a_prune_with_nothing_to_do_writes_nothing(tmp_path):
    """The TTL pruner asks every few seconds; a prune that changes nothing must not commit (in cluster mode each
    commit is an S3 record and an etcd transaction), and one that expires something still does."""
    clock = Clock()
    with LocalMemory(str(tmp_path), clock=clock) as m:
        m.create_stream(make_spec(policy="ttl(seconds=10)"))
        m.put("cam0", [make_entry(i) for i in range(3)])
        s = m.bank._streams["cam0"]
        version = s.version
        assert m.prune("cam0").evicted == () and s.version == version, "a no-op prune committed"
        clock.t += 11
        assert m.prune("cam0").evicted == (0, 1, 2) and s.version == version + 1
