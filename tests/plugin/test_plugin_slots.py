"""Delta loading into the cache's memory slots; prefetch changes timing, never results."""

import torch

from plugin_helpers import FOX, WHALE, Run, local_memory, make_plugin, tiny_model  # noqa: F401 - fixtures

REVISIT = [FOX] * 12 + [WHALE] * 12 + [FOX] * 12


def test_delta_loading_copies_only_frames_not_resident(tiny_model, local_memory):
    plugin = make_plugin(local_memory, tiny_model)
    run = Run(tiny_model, plugin)
    unchanged = changed = 0
    previous = None
    for chunk, prompt in enumerate(REVISIT):
        resident = [set(plugin.slots.resident(layer)) for layer in range(tiny_model.cfg.layers)]
        run.chunk(chunk, prompt)
        report = run.reports[-1]
        selection = report.selection.layer_ids
        new_pairs = sum(len(set(ids) - resident[layer]) for layer, ids in enumerate(selection))
        assert report.loaded == new_pairs, (chunk, report.loaded, new_pairs)
        if selection and selection == previous:
            assert report.loaded == 0 and report.moved == 0
            unchanged += 1
        elif selection:
            changed += 1
        previous = selection
    plugin.close()
    assert unchanged >= 15 and changed >= 8
    assert plugin.stats().frames_loaded == sum(r.loaded for r in run.reports)
    # the active frames of every layer are its last slots: what attention reads
    for layer in range(tiny_model.cfg.layers):
        active = run.reports[-1].selection.layer_ids[layer]
        assert set(plugin.slots.tables[layer][-len(active):]) == set(active)


def test_a_frame_is_never_loaded_twice_nor_while_resident(tiny_model, local_memory):
    plugin = make_plugin(local_memory, tiny_model)
    run = Run(tiny_model, plugin).script(REVISIT)
    plugin.close()
    for chunk, report in enumerate(run.reports):
        lo = tiny_model.layout.window(chunk)[0]
        frames = dict(report.selection.frames)
        for ids in report.selection.layer_ids:
            got = [frames[e] for e in ids]
            assert len(got) == len(set(got))
            assert all(tiny_model.cfg.sink_frames <= f < lo for f in got), (chunk, got, lo)


def test_prefetch_gives_the_same_video(tiny_model, tmp_path):
    from memory_service import LocalMemory

    outputs, selections = [], []
    for prefetch in (False, True):
        with LocalMemory(str(tmp_path / f"bank{prefetch}")) as memory:
            plugin = make_plugin(memory, tiny_model, prefetch=prefetch)
            run = Run(tiny_model, plugin).script(REVISIT)
            plugin.close()
            outputs.append(run.outputs)
            selections.append([r.selection for r in run.reports])
            stats = plugin.stats()
    assert selections[0] == selections[1]
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    assert stats.prefetch_hits == len(REVISIT) - 1 and stats.prefetch_misses == 0
    assert sum(r.prefetched for r in run.reports) == len(REVISIT) - 1


def test_prefetch_with_a_wrong_guess_falls_back_to_a_fresh_query(tiny_model, local_memory):
    plugin = make_plugin(local_memory, tiny_model, prefetch=True)
    run = Run(tiny_model, plugin)
    for chunk, prompt in enumerate(REVISIT):
        run.chunk(chunk, prompt)  # no next_prompt: the plugin guesses "same prompt", wrong at each switch
    plugin.close()
    stats = plugin.stats()
    assert stats.prefetch_misses == 2 and stats.fallbacks == 0
    assert not run.reports[12].prefetched and not run.reports[24].prefetched
