"""Overhead: how much slower is generation with memory, and where does the time go?

The reference model (plugin.reference_model) streams chunks under five modes, each against a bank pre-filled
with N frames (N = 10, 1e3, 1e4 by default):
  none            the bare model, no plugin (the baseline every ratio is against)
  fixed           the plugin with scorer="recent": always the k newest records, no query (the paper's +12%)
  memflow_local   MemFlow (NAM, k=3) through an in-process LocalMemory
  memflow_shm     MemFlow through the gRPC service on this host, shared-memory data plane
  memflow_stream  MemFlow through the gRPC service, streaming data plane
The modes run in rounds (each mode a few chunks, then the next), so the noise of a shared machine falls on
all modes alike. Rows: `mode, bank_frames, chunk_ms_p50, chunk_ms_p99, overhead_pct` (p50 against `none` at the
same bank size in the same run), and where the time goes per chunk: `before_ms` (query + fetch + slot load,
as the generator waits for it), `after_ms` (handing the write-back over), `loads_per_chunk` (frame-layers
copied into slots), `fallbacks`, and `before_pct_of_wan_chunk` (before_ms against a 640 ms Wan2.1-1.3B
chunk on an H100 - a projection, since the tiny model's own chunks are much shorter).

    python benchmarks/overhead.py [--quick] [--model tiny|wan_1_3b_shape] [--device cpu|cuda] [--bank-sizes 10,1000]
        [--prefetch] [--distractors full|keys] [--real-frames N]

Prefilled entries are noisy copies of `--real-frames` real frames of the model (keys and K/V), so scores and loads
behave as in a real stream; their frame indices lie after the sink and before the first measured chunk's window.
At Wan's shape one frame's K/V is 287.5 MB, so a bank of 1e4 full frames (2.9 TB) fits no test machine:
`--distractors keys` (the default for wan_1_3b_shape) banks the real frames with K/V and every other entry keys
only, with keys of 1/1000 the norm, so retrieval still scans all N entries per layer (the cost that grows with the
bank) and only frames the query ranks first are fetched (as in a full bank, where only the top k are fetched).
`--prefetch` turns on the plugin's prefetch (retrieval of chunk n+1 during chunk n); rows say which.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, percentiles, running_service  # noqa: E402

from memory_service import LocalMemory, MemoryClient, NewEntry  # noqa: E402
from plugin import MemFlowConfig, MemFlowPlugin, SelfForcingAdapter  # noqa: E402
from plugin import reference_model as rm  # noqa: E402

MODES = ("none", "fixed", "memflow_local", "memflow_shm", "memflow_stream")
PROMPTS = ("a red fox runs through deep snow in a pine forest", "a blue whale swims slowly in the dark ocean",
           "a busy city street at night with neon signs and rain")
WARMUP_CHUNKS = 8  # the first window fills and prefilled frames become eligible
# A Wan2.1-1.3B chunk (3 latent frames) takes about 640 ms on one H100 (DESIGN.md): the tiny CPU model's chunk is
# far shorter, so its overhead_pct overstates what the same memory work costs a real generator. The memory
# work (before_ms) is also reported as a share of that chunk, labelled as the projection it is.
WAN_CHUNK_MS = 640.0


def prompt_of(chunk: int) -> str:
    return PROMPTS[(chunk // 10) % len(PROMPTS)]


def sample_frames(model: rm.ReferenceDiT, adapter: SelfForcingAdapter, count: int):
    """K/V `[L, 2, N, H, D]` (numpy, the bank's dtype) and NAM keys `[L, H*D]` of `count` real frames."""
    state = model.new_state()
    kvs, keys = [], []
    for chunk in range(count):
        model.generate_chunk(state, chunk, prompt_of(chunk))
        frame = chunk * model.cfg.frames_per_chunk
        kvs.append(_to_numpy(adapter.frame_kv(state.kv, frame)))
        keys.append(model.frame_nam_key(state, frame))
    return kvs, keys


def _to_numpy(views) -> np.ndarray:
    """Per-layer (K, V) views `[N, H, D]` -> one `[L, 2, N, H, D]` array in the model's dtype (bf16 via int16)."""
    import ml_dtypes

    kv = torch.stack([torch.stack([k, v]) for k, v in views]).cpu()
    if kv.dtype == torch.bfloat16:
        return kv.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return kv.numpy()


def prefill(memory, plugin: MemFlowPlugin, kvs, keys, n: int, first_frame: int, last_frame: int, seed: int,
            distractors: str = "full") -> None:
    rng = np.random.default_rng(seed)
    stream = plugin.config.stream
    batch = []
    for i in range(n):
        j = i % len(kvs)
        nam = keys[j] * (1 + 0.05 * rng.standard_normal(keys[j].shape).astype(np.float32))
        kv = kvs[j]
        if distractors == "keys" and i >= len(kvs):  # keys only, ranked below every real frame (see docstring)
            nam = 1e-3 * np.abs(keys[j]).mean() * rng.standard_normal(keys[j].shape).astype(np.float32)
            kv = None
        frame = first_frame + i % max(1, last_frame - first_frame)
        batch.append(NewEntry(frame, frame // 3, "prefill", {"nam": nam, "emb": nam.mean(axis=0)}, kv=kv))
        # at most ~256 MB of K/V per put (one Wan-shape frame): a put's K/V pass through the client's arena
        if len(batch) == 64 or i == n - 1 or sum(e.kv.nbytes for e in batch if e.kv is not None) >= 256 << 20:
            memory.put(stream, batch)
            batch = []


class Runner:
    """One mode's generator: model state, plugin, and per-chunk timings."""

    def __init__(self, mode: str, model: rm.ReferenceDiT, memory, args) -> None:
        self.mode, self.model = mode, model
        self.plugin = None
        if mode != "none":
            cfg = MemFlowConfig(stream=f"bench-{mode}", scorer="recent" if mode == "fixed" else "nam",
                                deadline_s=args.deadline_s, on_existing="reuse", prefetch=args.prefetch)
            self.plugin = MemFlowPlugin(memory, cfg, SelfForcingAdapter.for_reference(model))
        self.state = model.new_state(memory_frames=self.plugin.memory_frames if self.plugin else 0)
        self.next = 0
        self.total, self.before, self.after, self.loads = [], [], [], []

    def chunk(self, measure: bool) -> None:
        i = self.next
        sync = torch.cuda.synchronize if self.model.device_.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        mem = self.plugin.before_chunk(i, prompt_of(i), self.state.kv) if self.plugin else None
        t1 = time.perf_counter()
        self.model.generate_chunk(self.state, i, prompt_of(i), mem)
        sync()
        t2 = time.perf_counter()
        if self.plugin:
            self.plugin.after_chunk(i, self.state.kv)
        t3 = time.perf_counter()
        self.next += 1
        if measure:
            self.total.append(t3 - t0)
            self.before.append(t1 - t0)
            self.after.append(t3 - t2)
            self.loads.append(self.plugin.last_report.loaded if self.plugin else 0)


def run_size(res: Results, model, adapter, kvs, keys, n: int, args, tmp: str) -> None:
    with contextlib.ExitStack() as stack:
        local = stack.enter_context(LocalMemory(f"{tmp}/local-{n}"))
        target = stack.enter_context(running_service(f"{tmp}/svc-{n}"))
        shm = stack.enter_context(MemoryClient(target, plane="shm"))
        stream = stack.enter_context(MemoryClient(target, plane="stream"))
        backends = {"none": None, "fixed": local, "memflow_local": local, "memflow_shm": shm, "memflow_stream": stream}
        modes = [m for m in MODES if m in args.modes]
        runners = {m: Runner(m, model, backends[m], args) for m in modes}
        sink = model.cfg.sink_frames
        lo = WARMUP_CHUNKS * model.cfg.frames_per_chunk - model.cfg.window_frames
        for m, r in runners.items():
            if r.plugin is not None and m != "fixed":
                prefill(backends[m], r.plugin, kvs, keys, n, sink, max(sink + 1, lo), args.seed, args.distractors)
        for m, r in runners.items():  # warm-up, not measured
            for _ in range(WARMUP_CHUNKS):
                r.chunk(False)
        for _ in range(args.rounds):
            for m, r in runners.items():
                for _ in range(args.chunks_per_round):
                    r.chunk(True)
                if r.plugin:
                    r.plugin.flush(5.0)
        base = float(np.median(runners["none"].total)) if "none" in runners else float("nan")
        for m, r in runners.items():
            p50, p99 = percentiles(r.total)
            stats = r.plugin.stats() if r.plugin else None
            res.add(mode=m, bank_frames=n if m not in ("none", "fixed") else 0, model=args.model, device=args.device,
                    chunks=len(r.total), chunk_ms_p50=p50, chunk_ms_p99=p99, overhead_pct=(p50 / 1e3 / base - 1) * 100,
                    before_ms=percentiles(r.before)[0], after_ms=percentiles(r.after)[0],
                    loads_per_chunk=float(np.mean(r.loads)), fallbacks=stats.fallbacks if stats else 0,
                    bank_size=n, before_pct_of_wan_chunk=percentiles(r.before)[0] / WAN_CHUNK_MS * 100,
                    prefetch=args.prefetch, distractors=args.distractors,
                    frames_direct=stats.frames_direct if stats else 0,
                    frames_staged=stats.frames_staged if stats else 0,
                    frames_pageable=stats.frames_pageable if stats else 0,
                    pinned_bytes=stats.pinned_bytes if stats else 0)
            if r.plugin:
                r.plugin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bank sizes 10 and 1000, fewer chunks")
    parser.add_argument("--model", default="tiny", choices=["tiny", "wan_1_3b_shape"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bank-sizes", default=None, help="comma-separated prefilled frames (default 10,1000,10000)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--chunks-per-round", type=int, default=10)
    parser.add_argument("--deadline-s", type=float, default=1.0, help="plugin fail-open deadline")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefetch", action="store_true", help="the plugin's prefetch on (default off)")
    parser.add_argument("--distractors", choices=["full", "keys"], default=None,
                        help="banked entries past the real frames: full K/V copies or keys only (default: keys for "
                             "wan_1_3b_shape, whose full frames are 287.5 MB each)")
    parser.add_argument("--real-frames", type=int, default=None,
                        help="distinct real frames banked (default 30; 8 at Wan's shape)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    sizes = [int(x) for x in (args.bank_sizes or ("10,1000" if args.quick else "10,1000,10000")).split(",")]
    args.rounds = args.rounds or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    cfg = rm.tiny() if args.model == "tiny" else rm.wan_1_3b_shape()
    model = rm.ReferenceDiT(cfg, device=args.device)
    adapter = SelfForcingAdapter.for_reference(model)
    wan = args.model == "wan_1_3b_shape"
    args.distractors = args.distractors or ("keys" if wan else "full")
    kvs, keys = sample_frames(model, adapter, args.real_frames or (8 if wan else 30))
    res = Results("overhead", Path(args.out))
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="memflow-overhead-") as tmp:  # each size's banks go when it ends
            run_size(res, model, adapter, kvs, keys, n, args, tmp)
    print(f"wrote {res.close()}", file=sys.stderr)


if __name__ == "__main__":
    main()
