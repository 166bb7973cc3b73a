"""What every benchmark shares: the machine line, JSON-lines output, percentiles, a memcpy baseline, progress bars.

A results file (benchmarks/results/NAME.jsonl) starts with one `{"machine": {...}, "command": "..."}` line
(benchmarks/report.py shows it above the table) followed by one JSON object per row; rows are also printed to
stdout as they are measured.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


if not _is_terminal(sys.stderr):
    # Libraries' own bars too (a model loader's "Loading weights"): tqdm and Hugging Face read these switches
    # when they are first imported, which is after this module in every benchmark.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


class FullCollections:
    """Counts the garbage collector's full (oldest-generation) collections inside `with` blocks, and the longest in
    ms: whatever ran when one started waited for all of it (at 1e5 entries a full collection took 40-140 ms).
    Counts add up over blocks until `reset()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count, self.max_ms, self._start = 0, 0.0, None

    def _seen(self, phase: str, info: dict) -> None:
        if info["generation"] != len(gc.get_count()) - 1:  # the oldest generation
            return
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.count += 1
            self.max_ms = max(self.max_ms, (time.perf_counter() - self._start) * 1e3)

    def __enter__(self) -> "FullCollections":
        gc.callbacks.append(self._seen)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._seen)


class Results:
    """Collects rows, prints each as a JSON line, and writes `out_dir/name.jsonl` on `close()`."""

    def __init__(self, name: str, out_dir: Path = RESULTS) -> None:
        self.path = Path(out_dir) / f"{name}.jsonl"
        self.rows: list[dict] = []
        self.header = {"machine": machine(), "command": " ".join(["python", *sys.argv])}

    def add(self, **row) -> dict:
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def close(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            for obj in [self.header, *self.rows]:
                f.write(json.dumps(obj) + "\n")
        return self.path


def progress(iterable=None, **kw):
    """A tqdm progress bar on stderr when stderr is a terminal; silent when it is a file or a pipe (a bar redrawn
    ten times a second would flood a log with frames; the JSON rows already say how far a run got)."""
    from tqdm import tqdm

    stream = kw.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=not _is_terminal(stream), **kw)


def timed(fn, reps: int, warm: bool = True) -> list[float]:
    """Seconds of each of `reps` calls of `fn`; with `warm`, one call first outside the timing (a channel's set-up,
    first-touch of pages)."""
    if warm:
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def percentiles(samples_s: Iterable[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    arr = np.asarray(list(samples_s), np.float64) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def memcpy_gbps(nbytes: int, reps: int = 5) -> float:
    """Best-of-`reps` bandwidth of np.copyto between two warm buffers of `nbytes` (GB/s, 1e9 bytes)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


@contextlib.contextmanager
def running_service(data_dir: str) -> Iterator[str]:
    """`memflow-service serve` on `data_dir` and a free port, in its own process; yields its target."""
    with service_process(data_dir) as (target, _):
        yield target


@contextlib.contextmanager
def service_process(data_dir: str, *extra: str, env: Optional[dict] = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """As running_service, with more `serve` flags and environment; yields (target, the server's Popen) so a
    benchmark can watch the server process itself (its CPU time, its threads)."""
    proc = subprocess.Popen([sys.executable, "-m", "memory_service.cli", "serve", "--data-dir", data_dir,
                             "--port", "0", "--log-level", "warning", *extra], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r" on (\S+:\d+)", line)
        if not m:
            raise SystemExit(f"memflow-service did not start: {line!r}")
        yield m.group(1), proc
    finally:
        proc.terminate()
        proc.wait(30)
