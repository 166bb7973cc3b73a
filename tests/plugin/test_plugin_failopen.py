"""Fail-open: memory failing, erroring or hanging mid-stream never breaks or stalls generation.

The mid-stream failure runs on every backend of `failing_backend` (plugin_helpers.BACKENDS): a LocalMemory
closed under the plugin, and a real gRPC service killed with SIGKILL.
"""

import logging
import threading
import time

import pytest
import torch

from memory_service import Budget, KeySpace, KVLayout, LocalMemory, StreamSpec
from plugin import MemFlowConfig, MemFlowPlugin, SelfForcingAdapter, StreamConflict
from plugin_helpers import FOX, WHALE, Flaky, Run, failing_backend, make_plugin, tiny_model  # noqa: F401


def test_memory_dying_mid_stream_makes_chunks_memory_free(tiny_model, failing_backend):
    plugin = make_plugin(failing_backend.memory, tiny_model, deadline_s=2.0)
    run = Run(tiny_model, plugin).script([FOX] * 11)
    assert plugin.flush(10.0) and plugin.stats().fallbacks == 0
    failing_backend.fail()  # frame 27 (chunk 9) becomes eligible at chunk 12: it must be fetched from a dead bank
    run.script([FOX] * 3 + [WHALE] * 8, start=11)
    plugin.close()
    stats = plugin.stats()
    assert len(run.outputs) == 22 and all(torch.isfinite(o).all() for o in run.outputs)
    assert stats.fallbacks > 0 and run.reports[12].fallback is not None
    assert all(r.frames == (0, 0, 0, 0) for r in run.reports if r.fallback)
    assert stats.write_failures + stats.writes_dropped > 0  # chunks 12, 15, 18 could not be written


def test_errors_fall_back_and_are_logged_once_per_outage(tiny_model, tmp_path, caplog):
    with LocalMemory(str(tmp_path / "bank")) as inner:
        memory = Flaky(inner)
        memory.methods = {"query"}
        plugin = make_plugin(memory, tiny_model, deadline_s=2.0)
        run = Run(tiny_model, plugin).script([FOX] * 9)
        with caplog.at_level(logging.WARNING, logger="memflow.plugin"):
            memory.mode = "raise"
            run.script([FOX] * 6, start=9)
            memory.mode = "ok"
            run.script([FOX] * 4, start=15)
        plugin.close()
    assert [r.fallback is not None for r in run.reports[9:]] == [True] * 6 + [False] * 4
    assert "ConnectionError" in run.reports[9].fallback
    messages = [r.getMessage() for r in caplog.records if r.name == "memflow.plugin"]
    assert len(messages) == 2, messages
    assert "memory read failed (ConnectionError" in messages[0] and "after 6 failed call(s)" in messages[1]
    assert all(r.frames[0] == 3 for r in run.reports[15:])  # memory is back


def test_a_hanging_memory_costs_at_most_one_deadline(tiny_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as inner:
        memory = Flaky(inner)
        plugin = make_plugin(memory, tiny_model, deadline_s=1.0, write_queue=2)
        run = Run(tiny_model, plugin).script([FOX] * 9)
        plugin.flush(10.0)
        memory.mode = "hang"
        run.script([FOX] * 8, start=9)
        reasons = [r.fallback for r in run.reports[9:]]
        assert all(reasons), reasons
        assert "deadline" in reasons[0] and all("still running" in r for r in reasons[1:])
        assert plugin.stats().writes_pending <= 2  # the write queue stays bounded while put hangs
        memory.mode = "ok"
        memory.release.set()
        assert plugin.flush(10.0)
        run.script([FOX] * 3, start=17)
        plugin.close()
    assert run.reports[-1].fallback is None and run.reports[-1].frames[0] == 3


def test_a_slow_memory_never_builds_a_backlog(tiny_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as inner:
        memory = Flaky(inner)
        memory.methods = {"query"}
        plugin = make_plugin(memory, tiny_model, deadline_s=0.05, prefetch=True)
        run = Run(tiny_model, plugin).script([FOX] * 8)
        memory.mode, memory.delay = "slow", 0.3  # every read is 6 deadlines late
        outstanding = []
        for i in range(8, 20):
            run.chunk(i, FOX, FOX)
            outstanding.append(plugin._guard._outstanding)
        plugin.close()
    assert max(outstanding) <= 2, outstanding
    assert plugin.stats().fallbacks >= 10 and len(run.outputs) == 20


def test_existing_stream_with_another_layout_is_a_clear_error(tiny_model, tmp_path):
    with LocalMemory(str(tmp_path / "bank")) as memory:
        memory.create_stream(StreamSpec("memflow", {"nam": KeySpace(128, per_layer=True)},
                                        kv=KVLayout(4, 4, 32, 16, "bfloat16")))
        with pytest.raises(StreamConflict, match="exists with KV layout"):
            make_plugin(memory, tiny_model, stream="memflow", on_existing="reuse")
        with pytest.raises(StreamConflict, match="already exists"):
            make_plugin(memory, tiny_model, stream="memflow", on_existing="error")
        plugin = make_plugin(memory, tiny_model, stream="memflow", on_existing="replace", max_entries=5)
        spec = {s.name: s for s in memory.list_streams()}["memflow"]
        assert spec.kv.dtype == "float32" and spec.budget == Budget(max_entries=5)
        plugin.close()
        make_plugin(memory, tiny_model, stream="memflow", on_existing="reuse").close()  # the same layout is reused


def test_a_second_video_never_continues_the_first_videos_stream_silently(tiny_model, tmp_path):
    adapter = SelfForcingAdapter.for_reference(tiny_model)
    defaults = MemFlowConfig(deadline_s=30.0)  # the default stream name, the default on_existing
    with LocalMemory(str(tmp_path / "bank")) as memory:
        first = MemFlowPlugin(memory, defaults, adapter)
        Run(tiny_model, first).script([FOX] * 7)
        first.close()
        recorded = memory.stats(defaults.stream).entries
        assert recorded == 2  # chunks 3 and 6
        first.writer._thread.join(10.0)
        writers = sum(t.name == "memflow-writeback" and t.is_alive() for t in threading.enumerate())
        with pytest.raises(StreamConflict, match=r"stream 'memflow' already exists .*MemFlowConfig\(stream=\.\.\.\)"
                                                 r".*on_existing='reuse' to continue it"):
            MemFlowPlugin(memory, defaults, adapter)
        assert memory.stats(defaults.stream).entries == recorded  # refused before touching the stream
        for _ in range(200):  # the refused plugin was closed: its writer thread ends (bounded wait, no timing asserted)
            if sum(t.name == "memflow-writeback" and t.is_alive() for t in threading.enumerate()) == writers:
                break
            time.sleep(0.05)
        assert sum(t.name == "memflow-writeback" and t.is_alive() for t in threading.enumerate()) == writers
        MemFlowPlugin(memory, defaults.replace(on_existing="reuse"), adapter).close()
        assert memory.stats(defaults.stream).entries == recorded
        MemFlowPlugin(memory, defaults.replace(stream="video-2"), adapter).close()  # its own stream: no question
        MemFlowPlugin(memory, defaults.replace(on_existing="replace"), adapter).close()
        assert memory.stats(defaults.stream).entries == 0


def test_a_cache_without_memory_slots_is_refused(tiny_model, tmp_path):
    plugin = make_plugin(LocalMemory(str(tmp_path / "bank")), tiny_model)
    state = tiny_model.new_state()  # memory_frames=0
    with pytest.raises(ValueError, match="reserves 0 memory frames per layer, the plugin needs 3"):
        plugin.before_chunk(0, FOX, state.kv)
    plugin.close()
