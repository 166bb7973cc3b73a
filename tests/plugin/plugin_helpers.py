"""Shared pieces of the plugin tests: memory backends, the tiny model, a streaming loop.

Not named conftest.py on purpose: tests/unit imports `conftest` by module name, and a second top-level
`conftest` module would shadow it. Test modules import the fixtures below by name.

Backends (BACKENDS): "local" is a LocalMemory on a tmp dir; "grpc" is a MemoryClient talking to a real
`memflow-service serve` subprocess on a free port. `memory_backend` yields a `Backend` for tests about
results (grpc: one server for the session, each plugin on its own stream, see `make_plugin`);
`failing_backend` yields one whose `fail()` takes it down mid-stream (local: close it; grpc: a server of its
own, killed with SIGKILL).
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
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
BACKENDS = ["local", "grpc"]
REPO = Path(__file__).resolve().parents[2]
_STREAMS = itertools.count()


@dataclass
class Backend:
    name: str
    memory: Any
    fail: Callable[[], None]


_SHARED: dict[str, Any] = {}


def shared_service() -> str:
    """One `memflow-service serve` for the session's result tests, started on first use, killed at exit.

    (A module-level singleton rather than a session fixture: test modules import fixtures by name, and a
    fixture reached only through another fixture would have to be imported everywhere too.)
    """
    if "target" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="memflow-plugin-service-"))
        proc, _SHARED["target"] = start_service(root / "bank")
        atexit.register(lambda: (kill(proc), shutil.rmtree(root, ignore_errors=True)))
    return _SHARED["target"]


def _cannot_fail() -> None:
    raise RuntimeError("memory_backend is shared; use the failing_backend fixture to take memory down")


@pytest.fixture(params=BACKENDS)
def memory_backend(request, tmp_path):
    if request.param == "local":
        with LocalMemory(str(tmp_path / "bank")) as mem:
            yield Backend("local", mem, _cannot_fail)
    else:
        from memory_service import MemoryClient

        with MemoryClient(shared_service(), timeout=10.0) as client:
            yield Backend("grpc", client, _cannot_fail)


@pytest.fixture
def local_memory(tmp_path):
    """A LocalMemory for tests whose subject is the plugin's own logic (backends are covered elsewhere)."""
    with LocalMemory(str(tmp_path / "bank")) as mem:
        yield mem


_BARE: dict[tuple, list] = {}


def bare_outputs(model: ReferenceDiT, prompts: list[str]) -> list[torch.Tensor]:
    """The bare model's outputs for a script (deterministic, so computed once per model and script)."""
    key = (id(model), tuple(prompts))
    if key not in _BARE:
        _BARE[key] = Run(model).script(prompts).outputs
    return _BARE[key]


@pytest.fixture(params=BACKENDS)
def failing_backend(request, tmp_path):
    if request.param == "local":
        mem = LocalMemory(str(tmp_path / "bank"))
        yield Backend("local", mem, mem.close)
        mem.close()
    else:
        from memory_service import MemoryClient

        proc, target = start_service(tmp_path / "served")
        client = MemoryClient(target, timeout=10.0)
        try:
            yield Backend("grpc", client, lambda: kill(proc))
        finally:
            client.close()
            kill(proc)


def start_service(data_dir: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """`memflow-service serve` on a free port; returns the process and its "host:port" once it serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMFLOW_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(data_dir.parent / "serve.stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "memory_service.cli", "serve", "--data-dir", str(data_dir),
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            found = re.search(r"serving .* on (\S+):(\d+)", proc.stdout.readline())
            if found:
                return proc, f"127.0.0.1:{found.group(2)}"
    kill(proc)
    raise RuntimeError("memflow-service serve did not come up:\n"
                       + (data_dir.parent / "serve.stderr").read_text(errors="replace")[-2000:])


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)


@pytest.fixture(scope="session")
def tiny_model() -> ReferenceDiT:
    return ReferenceDiT(tiny())


def make_plugin(memory: Any, model: ReferenceDiT, store_rotated: bool = True, **config: Any) -> MemFlowPlugin:
    config.setdefault("deadline_s", 30.0)  # tests about results must not depend on the machine's load
    # chunk-synchronous retrieval unless a test asks for prefetch (the default since it was measured): fail-open
    # tests count which chunk's retrieval meets an outage; prefetch's own tests show it changes no result
    config.setdefault("prefetch", False)
    config.setdefault("stream", f"video-{next(_STREAMS)}")  # banks may be shared (grpc): one stream per plugin
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
        # query_fetch is a query and a fetch in one call: it fails (or stalls) when either of them does
        if name not in self.methods and not (name == "query_fetch" and self.methods & {"query", "fetch"}):
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
