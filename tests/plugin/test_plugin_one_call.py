"""One round trip per chunk: the plugin's retrieval is one `query_fetch` call, on every backend and data plane.

A real memory (LocalMemory, or a MemoryClient on the shared-memory or the stream plane of a real
`memflow-service serve`) behind a recorder that only notes which protocol calls the plugin makes. A chunk's
retrieval must be exactly one query_fetch - no query, no fetch - while frames are still loaded into the slots,
and the generated video must be the same, bit for bit, on all three.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from memory_service import LocalMemory, MemoryClient
from plugin_helpers import CITY, FOX, WHALE, Run, make_plugin, shared_service, tiny_model  # noqa: F401 - fixture

READS = {"query", "fetch", "query_fetch"}
PROMPTS = [FOX] * 8 + [WHALE] * 6 + [CITY] * 3 + [FOX] * 5


class Recorder:
    """A real memory that notes the name of every read call made on it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in READS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.calls.append(name)
            return attr(*args, **kwargs)

        return call


def run_on(kind: str, model, tmp_path) -> tuple[list[torch.Tensor], list[list[str]], int]:
    """(outputs, the read calls of each chunk's before_chunk, frames loaded) of PROMPTS on backend `kind`."""
    memory = (LocalMemory(str(tmp_path / "bank")) if kind == "local"
              else MemoryClient(shared_service(), plane=kind, timeout=10.0))
    with memory:
        rec = Recorder(memory)
        plugin = make_plugin(rec, model)
        run = Run(model, plugin)
        per_chunk = []
        for i, prompt in enumerate(PROMPTS):
            plugin.flush(10.0)  # the last chunk's record is in the bank: every chunk sees the same bank
            start = len(rec.calls)
            run.chunk(i, prompt, PROMPTS[i + 1] if i + 1 < len(PROMPTS) else None)
            per_chunk.append(rec.calls[start:])
            assert plugin.last_report.fallback is None, plugin.last_report.fallback
        loaded = plugin.stats().frames_loaded
        plugin.close()
    return run.outputs, per_chunk, loaded


@pytest.mark.parametrize("kind", ["local", "shm", "stream"])
def test_each_chunk_is_one_query_fetch(kind, tiny_model, tmp_path):  # noqa: F811 - the fixture
    _, per_chunk, loaded = run_on(kind, tiny_model, tmp_path)
    assert loaded > 0  # frames did come through the one call
    assert all(calls == ["query_fetch"] for calls in per_chunk), per_chunk


def test_same_video_on_every_plane(tiny_model, tmp_path):  # noqa: F811 - the fixture
    local = run_on("local", tiny_model, tmp_path / "local")[0]
    for kind in ("shm", "stream"):
        outputs = run_on(kind, tiny_model, tmp_path / kind)[0]
        assert all(torch.equal(a, b) for a, b in zip(local, outputs)), kind
