"""Retrieval: NAM through the bank is the reference formula; scenes that return retrieve their own frames."""

import numpy as np
import pytest
import torch

from memory_service import QueryResult, QueryTrace
from plugin.retrieval import adaptive_count, reference_nam_scores, select
from plugin_helpers import (  # noqa: F401 - fixtures
    CITY, FOX, WHALE, Run, local_memory, make_plugin, memory_backend, tiny_model,
)

REVISIT = [FOX] * 12 + [WHALE] * 12 + [FOX] * 12


def brute_force_choice(model, run, chunk, prompt, k, keep_newest):
    """Per layer: (newest eligible records, top by the reference NAM formula among the rest), as frames."""
    lo = model.layout.window(chunk)[0]
    eligible = sorted(f for f in run.recorded if f < lo)
    newest = eligible[::-1][:keep_newest]
    rest = [f for f in eligible if f not in newest]
    if not rest:
        return [(set(newest), {}) for _ in range(model.cfg.layers)]
    frame_keys = torch.stack([run.recorded[f][:, 0] for f in rest])  # [F, L, N, H, D]
    scores = reference_nam_scores(model.text_keys(prompt), frame_keys)  # [L, F]
    out = []
    for row in scores:
        top = row.argsort(descending=True)[:k - len(newest)].tolist()
        out.append((set(newest), {rest[i]: float(row[i]) for i in top}))
    return out


def test_nam_through_the_bank_equals_brute_force(tiny_model, memory_backend):
    check_nam(tiny_model, memory_backend.memory, k=3, keep_newest=1)


def test_pure_nam_top_k_equals_brute_force(tiny_model, local_memory):
    check_nam(tiny_model, local_memory, k=2, keep_newest=0)


def check_nam(tiny_model, memory, k, keep_newest):
    script = [FOX] * 8 + [WHALE] * 8 + [CITY] * 5 + [FOX] * 5
    plugin = make_plugin(memory, tiny_model, k=k, keep_newest=keep_newest)
    run = Run(tiny_model, plugin).script(script)
    plugin.close()
    checked = 0
    for chunk, (prompt, report) in enumerate(zip(script, run.reports)):
        frames = dict(report.selection.frames)
        want = brute_force_choice(tiny_model, run, chunk, prompt, k, keep_newest)
        for layer, (newest, scored) in enumerate(want):
            got = [frames[e] for e in report.selection.layer_ids[layer]] if report.selection.layer_ids else []
            assert len(got) == len(set(got)), "a frame loaded twice"
            assert set(got) == newest | set(scored), (chunk, layer, got, newest, scored)
            got_scores = dict(zip(got[len(newest):], report.selection.scores[layer])) if scored else {}
            for f, s in scored.items():
                assert got_scores[f] == pytest.approx(s, rel=1e-4, abs=1e-6)
            checked += bool(scored)
    assert checked >= 15 * tiny_model.cfg.layers


def test_scene_revisit_retrieves_the_first_visit(tiny_model, memory_backend):
    plugin = make_plugin(memory_backend.memory, tiny_model)
    run = Run(tiny_model, plugin).script(REVISIT)
    plugin.close()
    fox_frames = {f for f in run.recorded if REVISIT[f // 3] == FOX}
    for chunk in range(24, 36):
        report = run.reports[chunk]
        frames = dict(report.selection.frames)
        for layer, ids in enumerate(report.selection.layer_ids):
            scored = [frames[e] for e in ids[1:]]  # ids[0] is the newest record, kept regardless of score
            assert len(scored) == 2 and set(scored) <= fox_frames, (chunk, layer, scored)
            if chunk < 27:  # the second visit's records are still in the window: only the first visit qualifies
                assert all(f < 36 for f in scored), (chunk, layer, scored)
    for chunk in range(21, 24):  # the whale scene, once two of its records are out of the window
        frames = dict(run.reports[chunk].selection.frames)
        assert all(REVISIT[frames[e] // 3] == WHALE for ids in run.reports[chunk].selection.layer_ids for e in ids)


def test_embedding_scorer_ranks_by_cosine_of_layer_means(tiny_model, local_memory):
    plugin = make_plugin(local_memory, tiny_model, scorer="embedding", k=2, keep_newest=0)
    run = Run(tiny_model, plugin).script(REVISIT)
    plugin.close()
    for chunk in (24, 30, 35):
        lo = tiny_model.layout.window(chunk)[0]
        eligible = sorted(f for f in run.recorded if f < lo)
        query = tiny_model.text_keys(REVISIT[chunk]).double().mean(dim=(0, 1)).flatten()  # [H*D]
        emb = [run.recorded[f][:, 0].double().mean(dim=(0, 1)).flatten() for f in eligible]
        cos = torch.stack([torch.nn.functional.cosine_similarity(query, e, dim=0) for e in emb])
        want = {eligible[i] for i in cos.topk(2).indices.tolist()}
        report = run.reports[chunk]
        frames = dict(report.selection.frames)
        assert len(set(report.selection.layer_ids)) == 1  # one ranking for every layer
        assert {frames[e] for e in report.selection.layer_ids[0]} == want
        assert want <= {f for f in run.recorded if REVISIT[f // 3] == FOX}


def test_adaptive_count_threshold_and_gap():
    scores = np.array([[10.0, 9.5, 9.2, 3.0, 2.9], [8.0, 7.9, 2.0, 1.0, -np.inf]])
    assert adaptive_count(scores, "threshold", 0.1, 1, 5) == 3  # per layer 3 and 2: mean 2.5 rounds up
    assert adaptive_count(scores, "threshold", 0.01, 1, 5) == 1  # 9.5 < 9.9 and 7.9 < 7.92
    assert adaptive_count(scores, "gap", 0.0, 1, 5) == 3  # largest drops after 3 and after 2
    assert adaptive_count(scores, "gap", 0.0, 4, 5) == 4  # clamped to k_min
    assert adaptive_count(scores, "threshold", 0.1, 1, 2) == 2  # only the first k_max scores count
    assert adaptive_count(np.full((2, 3), -np.inf), "gap", 0.0, 0, 3) == 0


def result(ids, scores, frames):
    return QueryResult(np.array(ids), np.array(scores, np.float32), np.array(frames), QueryTrace(0, ()))


def test_select_keeps_newest_once_skips_sink_and_padding():
    res = result([[7, 5, 2, -1], [5, 7, 4, -1]], [[9, 8, 7, -np.inf], [9, 8, 7, -np.inf]],
                 [[21, 15, 1, -1], [15, 21, 12, -1]])
    sel = select(res, newest=[(7, 21)], layers=2, k=3, skip_frames_below=3)
    assert sel.layer_ids == ((7, 5), (7, 5, 4))  # layer 0: id 2 is a sink frame, skipped; 7 not twice
    assert dict(sel.frames) == {7: 21, 5: 15, 4: 12}
    one = select(result([3, 1], [0.9, 0.5], [30, 9]), newest=[], layers=3, k=2)
    assert one.layer_ids == ((3, 1),) * 3
    assert select(None, newest=[(4, 12)], layers=2, k=3).layer_ids == ((4,), (4,))


def test_adaptive_k_varies_within_bounds(tiny_model, local_memory):
    plugin = make_plugin(local_memory, tiny_model, adaptive_k="gap", k_min=1, k_max=4)
    assert plugin.memory_frames == 4
    run = Run(tiny_model, plugin).script(REVISIT)
    plugin.close()
    totals = [r.frames[0] for r in run.reports[9:]]
    assert all(1 <= t <= 4 for t in totals) and len(set(totals)) >= 2, totals
    assert all(len(set(r.frames)) == 1 for r in run.reports)  # one k per chunk


def test_embedding_scorer_with_caller_keys_and_queries(tiny_model, local_memory):
    """Any key space: the caller supplies entry keys (after_chunk keys=) and query vectors (before_chunk query=)."""
    plugin = make_plugin(local_memory, tiny_model, scorer="embedding", k=1, keep_newest=0)
    state = tiny_model.new_state(memory_frames=plugin.memory_frames)
    scene_of = {FOX: 0, WHALE: 1, CITY: 2}
    script = [FOX] * 6 + [WHALE] * 6 + [CITY] * 6 + [FOX] * 6
    checked = 0
    for chunk, prompt in enumerate(script):
        onehot = np.eye(tiny_model.cfg.dim, dtype=np.float32)[scene_of[prompt]]
        mem = plugin.before_chunk(chunk, prompt, state.kv, query=onehot)
        tiny_model.generate_chunk(state, chunk, prompt, mem)
        plugin.after_chunk(chunk, state.kv, keys={"emb": onehot})
        frames = dict(plugin.last_report.selection.frames)
        lo = tiny_model.layout.window(chunk)[0]
        if any(script[c] == prompt for c in range(3, chunk + 1, 3) if 3 * c < lo):  # a record of this scene is eligible
            assert [script[f // 3] for f in frames.values()] == [prompt], (chunk, frames)
            checked += 1
    plugin.close()
    assert checked >= 12


def test_recent_scorer_loads_the_k_newest_records_without_querying(tiny_model, local_memory):
    """The fixed strategy (the paper's comparison): always the k newest eligible records, whatever the prompt."""
    plugin = make_plugin(local_memory, tiny_model, scorer="recent", k=2, keep_newest=1)
    run = Run(tiny_model, plugin)
    prompts = [FOX] * 12 + [WHALE] * 6
    for i, p in enumerate(prompts):
        run.chunk(i, p)
    fpc = tiny_model.cfg.frames_per_chunk
    for report in run.reports[6:]:
        lo = tiny_model.layout.window(report.chunk_index)[0]
        eligible = sorted(f for f in run.recorded if f < lo and f >= tiny_model.cfg.sink_frames)
        got = {f for _, f in report.selection.frames}
        assert got == set(eligible[::-1][:2]), report.chunk_index
        if report.chunk_index >= 9:
            assert len(got) == 2 and all(f < fpc * report.chunk_index for f in got)
