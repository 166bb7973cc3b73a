"""Write-back: recorded frames land in the bank intact; the queue is bounded; full means drop or bounded block."""

import time

import numpy as np
import torch

from memory_service import LocalMemory
from plugin.writeback import MAX_HOLD_S
from plugin_helpers import FOX, WHALE, Flaky, Run, make_plugin, tiny_model  # noqa: F401


def test_recorded_entries_are_the_cached_frames(tiny_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, tiny_model)
        run = Run(tiny_model, plugin).script([FOX] * 7 + [WHALE] * 6)
        assert plugin.flush(10.0)
        plugin.close()
        entries = memory.entries(plugin.config.stream)
        assert [(e.frame_index, e.chunk_index, e.prompt, e.rope_position) for e in entries] == [
            (9, 3, FOX, 9), (18, 6, FOX, 18), (27, 9, WHALE, 27), (36, 12, WHALE, 36)]
        fetched = memory.fetch(plugin.config.stream, [e.entry_id for e in entries]).kv  # [n, L, 2, N, H, D]
        for e, kv in zip(entries, fetched):
            assert torch.equal(torch.from_numpy(np.array(kv)), run.recorded[e.frame_index])
    assert plugin.stats().writes_written == 4


def test_write_back_waits_for_the_next_retrieval(tiny_model, tmp_path):
    """A chunk's write goes out after the next chunk's retrieval (so it never competes with it), or on its own
    after MAX_HOLD_S when no chunk follows."""
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, tiny_model)  # records chunks 3, 6, ...
        run = Run(tiny_model, plugin).script([FOX] * 4)
        time.sleep(MAX_HOLD_S / 3)
        stats = plugin.stats()
        assert (stats.writes_written, stats.writes_pending) == (0, 1)  # chunk 3's write waits for chunk 4
        run.script([FOX], start=4)
        assert plugin.flush(10.0) and plugin.stats().writes_written == 1
        run.script([FOX] * 2, start=5)  # chunk 6 records; nothing retrieves after it
        deadline = time.monotonic() + MAX_HOLD_S + 10.0
        while plugin.stats().writes_written < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert plugin.stats().writes_written == 2  # went out by itself, with no flush
        plugin.close()
        assert [e.frame_index for e in memory.entries(plugin.config.stream)] == [9, 18]


def test_unrotated_entries_say_so(tiny_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, tiny_model, store_rotated=False)
        Run(tiny_model, plugin).script([FOX] * 7)
        plugin.flush(10.0)
        plugin.close()
        assert [e.rope_position for e in memory.entries(plugin.config.stream)] == [None, None]


def test_full_queue_drops_the_oldest_write(tiny_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as inner:
        memory = Flaky(inner)
        memory.methods = {"put"}
        plugin = make_plugin(memory, tiny_model, record_interval=1, write_queue=3, write_batch=2, deadline_s=0.5)
        run = Run(tiny_model, plugin).script([FOX] * 2)
        assert plugin.flush(10.0)
        memory.mode = "hang"
        run.script([FOX] * 10, start=2)  # 10 records; one batch blocks in put, the rest queue
        stats = plugin.stats()
        assert stats.writes_pending == 3 and stats.writes_dropped >= 6
        memory.mode = "ok"
        memory.release.set()
        assert plugin.flush(10.0)
        plugin.close()
        frames = [e.frame_index for e in inner.entries(plugin.config.stream)]
    stats = plugin.stats()
    assert stats.writes_written + stats.writes_dropped == stats.writes_submitted == 11
    assert frames == sorted(frames) and frames[-1] == 33  # the newest write survived; older ones were dropped


def test_blocking_policy_waits_at_most_the_deadline_then_drops(tiny_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as inner:
        memory = Flaky(inner)
        memory.methods = {"put"}
        plugin = make_plugin(memory, tiny_model, record_interval=1, write_queue=1, write_batch=1,
                             write_policy="block", deadline_s=0.05)
        run = Run(tiny_model, plugin).script([FOX] * 2)
        plugin.flush(10.0)
        memory.mode = "hang"
        run.script([FOX] * 4, start=2)
        assert plugin.stats().writes_dropped == 3  # chunk 2's write holds the only slot
        memory.mode = "ok"
        memory.release.set()
        plugin.flush(10.0)
        plugin.close()
    assert plugin.stats().writes_written == 2


def test_failed_puts_are_counted_not_raised(tiny_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as inner:
        memory = Flaky(inner)
        memory.methods = {"put"}
        memory.mode = "raise"
        plugin = make_plugin(memory, tiny_model)
        Run(tiny_model, plugin).script([FOX] * 10)
        plugin.flush(10.0)
        plugin.close()
    stats = plugin.stats()
    assert stats.write_failures == 3 and stats.writes_written == 0 and stats.fallbacks == 0
