"""Shared pieces of the plugin tests: memory backends, the tiny model, a streaming loop.

Not named conftest.py on purpose: tests/unit imports `conftest` by module name, and a second top-level
`conftest` module would shadow it. Test modules import the fixtures below by name.

Backends: `memory_backend` yields a `Backend` (a real memory object plus a `fail()` that takes it down
mid-stream). "local" is a LocalMemory on a tmp dir, failed by closing it; a "grpc" entry (a real server on
port 0 killed with SIGKILL) joins BACKENDS once memory_service.MemoryClient lands.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch

from memory_service import LocalMemory
from plugin import MemFlowConfig, MemFlowPlugin, SelfForcingAdapter
from plugin.reference_model import ReferenceDiT, tiny
from plugin.rope import pair_split

# The tiny model's ops are too small to split across threads; on a loaded 2-core machine two OpenMP
# threads spin against each other (measured 10x slower), so the plugin tests run torch single-threaded.
torch.set_num_threads(1)

FOX = "a red fox runs through deep snow in a pine forest"
WHALE = "a blue whale swims slowly in the dark ocean"
CITY = "a busy city street at night with neon signs and rain"
BACKENDS = ["local"]


@dataclass
class Backend:
    name: str
    memory: Any
    fail: Callable[[], None]


@pytest.fixture(params=BACKENDS)
def memory_backend(request, tmp_path):
    if request.param == "local":
        mem = LocalMemory(str(tmp_path / "bank"))
        yield Backend("local", mem, mem.close)
        mem.close()
    else:  # pragma: no cover - future backends
        raise ValueError(f"unknown memory backend {request.param!r}")


@pytest.fixture(scope="session")
def tiny_model() -> ReferenceDiT:
    return ReferenceDiT(tiny())


def make_plugin(memory: Any, model: ReferenceDiT, store_rotated: bool = True, **config: Any) -> MemFlowPlugin:
    config.setdefault("deadline_s", 30.0)  # tests about results must not depend on the machine's load
    return MemFlowPlugin(memory, MemFlowConfig(**config), SelfForcingAdapter.for_reference(model, store_rotated))


class Run:
    """Streams a prompt script through a model, with or without a plugin; keeps outputs and reports."""

    def __init__(self, model: ReferenceDiT, plugin: Optional[MemFlowPlugin] = None) -> None:
        self.model, self.plugin = model, plugin
        self.state = model.new_state(memory_frames=plugin.memory_frames if plugin else 0)
        self.outputs: list[torch.Tensor] = []
        self.reports: list = []
        self.recorded: dict[int, torch.Tensor] = {}  # frame -> K/V `[L, 2, N, H, D]` right after its chunk

    def chunk(self, index: int, prompt: str, next_prompt: Optional[str] = None) -> torch.Tensor:
        memory = None
        if self.plugin is not None:
            memory = self.plugin.before_chunk(index, prompt, self.state.kv, next_prompt=next_prompt)
            self.reports.append(self.plugin.last_report)
        out = self.model.generate_chunk(self.state, index, prompt, memory)
        if self.plugin is not None:
            cfg = self.plugin.config
            first = index * self.model.cfg.frames_per_chunk
            if cfg.enabled and index % cfg.record_interval == 0 and first >= self.model.cfg.sink_frames:
                views = self.plugin.adapter.frame_kv(self.state.kv, first)
                self.recorded[first] = torch.stack([torch.stack([k, v]) for k, v in views]).clone()
            self.plugin.after_chunk(index, self.state.kv)
        self.outputs.append(out)
        return out

    def script(self, prompts: list[str], start: int = 0) -> "Run":
        for i, prompt in enumerate(prompts):
            nxt = prompts[i + 1] if i + 1 < len(prompts) else None
            self.chunk(start + i, prompt, nxt)
        return self


class Flaky:
    """A real memory behind a switch: normal, raising, or hanging (until released) on chosen methods.

    Wraps a real LocalMemory (no mock of our components): it stands for a service that errors or stalls.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.mode = "ok"  # "ok" | "raise" | "hang" | "slow" (sleeps `delay` seconds, then answers)
        self.delay = 0.0
        self.methods = {"query", "fetch", "put"}
        self.release = threading.Event()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.methods:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.mode == "raise":
                raise ConnectionError(f"memory {name} is down (test)")
            if self.mode == "hang":
                self.release.wait()
            if self.mode == "slow":
                time.sleep(self.delay)
            return attr(*args, **kwargs)

        return call


def brute_force_rope(x, frame, grid_w, theta=10000.0):
    """Wan's 3-D RoPE written out independently: complex pairs times e^(i * position * freq)."""
    n, h, d = x.shape
    ct, ch, cw = pair_split(d)
    out = torch.empty_like(x, dtype=torch.float64)
    for t in range(n):
        pos = (frame, t // grid_w, t % grid_w)
        angles = []
        for p, pairs in zip(pos, (ct, ch, cw)):
            angles += [p * theta ** (-(2.0 * j) / (2.0 * pairs)) for j in range(pairs)]
        rot = torch.polar(torch.ones(len(angles), dtype=torch.float64), torch.tensor(angles, dtype=torch.float64))
        z = torch.view_as_complex(x[t].double().reshape(h, -1, 2).contiguous()) * rot
        out[t] = torch.view_as_real(z).reshape(h, d)
    return out
