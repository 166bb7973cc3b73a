"""Invisible when off: the plugin disabled, or with nothing to retrieve, is the bare model bit for bit."""

import torch

from plugin_helpers import (  # noqa: F401 - fixtures
    FOX, WHALE, Run, bare_outputs, local_memory, make_plugin, memory_backend, tiny_model,
)

SCRIPT = [FOX] * 6 + [WHALE] * 6 + [FOX] * 6


def test_disabled_plugin_is_bit_identical_and_touches_no_memory(tiny_model, local_memory):
    bare = bare_outputs(tiny_model, SCRIPT)
    plugin = make_plugin(local_memory, tiny_model, enabled=False)
    assert plugin.memory_frames == 0
    run = Run(tiny_model, plugin).script(SCRIPT)
    plugin.close()
    assert all(torch.equal(a, b) for a, b in zip(bare, run.outputs))
    assert local_memory.list_streams() == []


def test_empty_bank_is_bit_identical(tiny_model, memory_backend):
    bare = bare_outputs(tiny_model, SCRIPT)
    # chunk 0 is the sink, so nothing is ever recorded: every chunk queries an empty bank
    plugin = make_plugin(memory_backend.memory, tiny_model, record_interval=1000)
    run = Run(tiny_model, plugin).script(SCRIPT)
    plugin.close()
    assert all(torch.equal(a, b) for a, b in zip(bare, run.outputs))
    assert all(r.fallback is None and r.selection.layer_ids in ((), ((),) * 4) for r in run.reports)
    assert plugin.stats().retrievals == len(SCRIPT)


def test_memory_is_invisible_until_a_frame_is_loaded_then_changes_the_output(tiny_model, local_memory):
    bare = bare_outputs(tiny_model, SCRIPT)
    plugin = make_plugin(local_memory, tiny_model)
    run = Run(tiny_model, plugin).script(SCRIPT)
    plugin.close()
    first = next(i for i, r in enumerate(run.reports) if any(r.frames))
    assert first == 6  # frame 9 (chunk 3's first) leaves the 9-frame window when chunk 6 starts
    assert all(torch.equal(a, b) for a, b in zip(bare[:first], run.outputs[:first]))
    assert not torch.equal(bare[first], run.outputs[first])
