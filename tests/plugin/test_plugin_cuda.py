"""CUDA: pinned staging + non_blocking loads land the bank's frames in the slots; Wan-shaped streaming runs.

Skipped without a GPU. No timing is asserted (benchmarks time things); these check results only.
"""

import numpy as np
import pytest
import torch

from memory_service import LocalMemory
from plugin.reference_model import ReferenceDiT, tiny, wan_1_3b_shape
from plugin_helpers import FOX, WHALE, Run, make_plugin

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SCRIPT = [FOX] * 9 + [WHALE] * 6 + [FOX] * 6


def test_pinned_non_blocking_slots_hold_the_banks_frames(tmp_path):
    model = ReferenceDiT(tiny(), device="cuda")
    bare = Run(model).script(SCRIPT).outputs
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, model, prefetch=True)
        assert plugin.slots._staging is not None and plugin.slots._staging.is_pinned()
        assert plugin.writer._kv.is_pinned()
        run = Run(model, plugin).script(SCRIPT)
        torch.cuda.synchronize()
        first = next(i for i, r in enumerate(run.reports) if any(r.frames))
        assert all(torch.equal(a, b) for a, b in zip(bare[:first], run.outputs[:first]))
        n, cap = model.cfg.tokens_per_frame, plugin.memory_frames
        report = run.reports[-1]
        for layer, cache in enumerate(run.state.kv):
            m = len(report.selection.layer_ids[layer])
            for slot in range(cap - m, cap):  # active frames are right-aligned in the memory region
                e = plugin.slots.tables[layer][slot]
                want = torch.from_numpy(np.array(memory.fetch(plugin.config.stream, [e], [layer]).kv[0, 0]))
                tokens = slice(slot * n, (slot + 1) * n)
                got = torch.stack([cache["k_full"][0, tokens], cache["v_full"][0, tokens]])
                assert torch.equal(got.cpu(), want)
        plugin.close()
        assert plugin.stats().fallbacks == 0 and plugin.stats().frames_loaded > 0


def test_wan_1_3b_shape_streams_with_memory(tmp_path):
    model = ReferenceDiT(wan_1_3b_shape(), device="cuda")
    with LocalMemory(str(tmp_path / "bank")) as memory:
        plugin = make_plugin(memory, model, record_interval=1, write_queue=2, deadline_s=60.0)
        run = Run(model, plugin).script([FOX] * 5)
        torch.cuda.synchronize()
        plugin.flush(60.0)
        plugin.close()
        assert run.reports[4].frames == (1,) * 30 and run.reports[4].fallback is None  # frame 3 left the window
        assert all(torch.isfinite(o.float()).all() for o in run.outputs)
        assert run.outputs[0].shape == (1, 3, 1560, 16) and run.outputs[0].dtype == torch.bfloat16
        entries = memory.entries(plugin.config.stream)
        assert [e.frame_index for e in entries] == [3, 6, 9, 12] and entries[0].nbytes == 287_539_200
