"""MemFlow demo: a long multi-scene story streamed through the plugin and a pruned memory bank.

Streams `--chunks` chunks (default 240) of the tiny reference model through `MemFlowPlugin` with a prompt
script whose scenes return after long gaps, on a bank with an entry budget and a pruning policy. Memory is a
`LocalMemory` on a temporary directory, a `memflow-service` the demo starts on a temporary directory
(`--service`, what `make demo` runs), or `memory_service.MemoryClient(--target)` for a running service.
Prints a per-scene retrieval summary (how much of what each scene retrieved was recorded under its own
prompt, and how much came from an earlier visit), one JSON line of totals, and writes a PNG: for each
chunk, which past chunks its memory frames came from (retrieval map), and the bank size over time.

    python benchmarks/demo.py [--chunks 240] [--budget 40] [--policy lfu] [--service | --target host:port]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import running_service  # noqa: E402
from plugin import MemFlowConfig, MemFlowPlugin, SelfForcingAdapter  # noqa: E402
from plugin.reference_model import ReferenceDiT, tiny  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCENES = {
    "fox": "a red fox runs through deep snow in a pine forest",
    "whale": "a blue whale swims slowly in the dark ocean",
    "city": "a busy city street at night with neon signs and rain",
    "desert": "a camel caravan crosses golden sand dunes at sunset",
}
STORY = ["fox", "whale", "city", "fox", "desert", "whale", "fox", "city"]


def script(chunks: int) -> list[str]:
    """Scene name per chunk: the story's scenes in equal parts (the last one takes the remainder)."""
    per = max(1, chunks // len(STORY))
    names = [STORY[min(i // per, len(STORY) - 1)] for i in range(chunks)]
    return names


@contextlib.contextmanager
def open_memory(args: argparse.Namespace, tmp: str):
    """The bank the demo streams into: a service it starts (--service), one it is pointed at (--target), or an
    in-process LocalMemory."""
    from memory_service import LocalMemory, MemoryClient

    if args.service:
        with running_service(os.path.join(tmp, "service")) as target, MemoryClient(target) as client:
            print(f"memflow-service started on {target} (data in a temporary directory)")
            yield client
    elif args.target:
        with MemoryClient(args.target) as client:
            yield client
    else:
        with LocalMemory(tmp) as memory:
            yield memory


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)  # tiny ops: threads only spin against each other on a small machine
    names = script(args.chunks)
    model = ReferenceDiT(tiny(seed=args.seed))
    fpc = model.cfg.frames_per_chunk
    cfg = MemFlowConfig(stream=f"demo-{int(time.time())}", max_entries=args.budget, policy=args.policy,
                        prefetch=args.prefetch, deadline_s=args.deadline)
    try:
        import tqdm  # noqa: F401 - only whether it is installed
        from common import progress
    except ImportError:  # tqdm is in the bench extra; the demo still runs without a bar
        def progress(it, **_):
            return it
    with tempfile.TemporaryDirectory(prefix="memflow-demo-") as tmp, open_memory(args, tmp) as memory:
        plugin = MemFlowPlugin(memory, cfg, SelfForcingAdapter.for_reference(model))
        state = model.new_state(memory_frames=plugin.memory_frames)
        reports, bank = [], []
        t0 = time.perf_counter()
        for i in progress(range(args.chunks), desc="chunks", unit="chunk"):
            prompt = SCENES[names[i]]
            nxt = SCENES[names[i + 1]] if i + 1 < args.chunks else None
            mem = plugin.before_chunk(i, prompt, state.kv, next_prompt=nxt)
            model.generate_chunk(state, i, prompt, mem)
            plugin.after_chunk(i, state.kv)
            reports.append(plugin.last_report)
            bank.append(memory.stats(cfg.stream).entries)
        seconds = time.perf_counter() - t0
        plugin.flush(10.0)
        plugin.close()
        final = memory.stats(cfg.stream)
        stats = plugin.stats()
    rows = summarize(names, reports, fpc)
    print_summary(rows)
    totals = {"demo": "memflow", "chunks": args.chunks, "seconds": round(seconds, 2),
              "ms_per_chunk": round(seconds / args.chunks * 1e3, 1), "budget": args.budget, "policy": args.policy,
              "bank_entries": final.entries, "evicted": final.evicted_total, "fallbacks": stats.fallbacks,
              "frames_loaded": stats.frames_loaded, "writes_dropped": stats.writes_dropped,
              "on_scene": round(sum(r["on_scene_n"] for r in rows) / max(1, sum(r["scored"] for r in rows)), 3)}
    print(json.dumps(totals))
    plot(names, reports, bank, args, fpc, Path(args.out))
    return totals


def summarize(names: list[str], reports: list, fpc: int) -> list[dict]:
    """One row per scene visit: where its score-chosen memory frames came from."""
    visits, seen = [], Counter()
    for i, name in enumerate(names):
        if i == 0 or name != names[i - 1]:
            seen[name] += 1
            visits.append({"scene": name, "visit": seen[name], "start": i, "end": i})
        visits[-1]["end"] = i + 1
    for v in visits:
        scored = on_scene = earlier = loaded = fallbacks = with_memory = 0
        for i in range(v["start"], v["end"]):
            r = reports[i]
            loaded += r.loaded
            fallbacks += r.fallback is not None
            with_memory += any(r.frames)
            frames = dict(r.selection.frames)
            for ids in r.selection.layer_ids:
                for e in ids[1:]:  # ids[0]: the newest record, kept regardless of its score
                    src = frames[e] // fpc
                    scored += 1
                    on_scene += names[src] == v["scene"]
                    earlier += names[src] == v["scene"] and src < v["start"]
        v.update(chunks=v["end"] - v["start"], scored=scored, on_scene_n=on_scene,
                 on_scene=on_scene / scored if scored else float("nan"),
                 earlier_visit=earlier / scored if scored else float("nan"),
                 loads_per_chunk=loaded / (v["end"] - v["start"]), fallbacks=fallbacks, with_memory=with_memory)
    return visits


def print_summary(rows: list[dict]) -> None:
    print(f"\n{'scene':<8}{'visit':>6}{'chunks':>10}{'w/ memory':>11}{'on-scene':>10}{'from earlier':>14}"
          f"{'loads/chunk':>13}{'fallbacks':>11}")
    for r in rows:
        print(f"{r['scene']:<8}{r['visit']:>6}{r['start']:>5}-{r['end'] - 1:<4}{r['with_memory']:>11}"
              f"{r['on_scene']:>10.0%}{r['earlier_visit']:>14.0%}{r['loads_per_chunk']:>13.1f}{r['fallbacks']:>11}")
    print("on-scene: share of score-chosen memory frames (all layers) recorded under the chunk's own prompt;\n"
          "from earlier: share recorded during an earlier visit of the scene (the newest record is not counted)\n")


def plot(names: list[str], reports: list, bank: list[int], args: argparse.Namespace, fpc: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(SCENES)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            for ax in (top, bottom):
                ax.axvspan(start - 0.5, i - 0.5, color=colors[names[start]], alpha=0.08, lw=0)
            top.text((start + i) / 2, len(names) * 1.01, names[start], ha="center", va="bottom", fontsize=9)
            start = i
    xs, ys, cs, sizes = [], [], [], []
    for i, r in enumerate(reports):
        frames = dict(r.selection.frames)
        layers = max(1, len(r.selection.layer_ids))
        count = Counter(frames[e] // fpc for ids in r.selection.layer_ids for e in ids)
        for src, n in count.items():
            xs.append(i)
            ys.append(src)
            cs.append(colors[names[src]])
            sizes.append(4 + 14 * n / layers)
    top.scatter(xs, ys, c=cs, s=sizes, marker="s", lw=0)
    top.plot([0, len(names)], [0, len(names)], color="grey", lw=0.5, ls="--")
    top.set_ylabel("retrieved from chunk")
    top.set_ylim(-1, len(names) * 1.06)
    top.set_title(f"MemFlow retrieval map: {len(names)} chunks, budget {args.budget} entries, policy {args.policy} "
                  "(marker colour = scene the frame was recorded in, size = share of layers)")
    bottom.plot(range(len(bank)), bank, color="black", lw=1)
    bottom.axhline(args.budget, color="red", lw=0.8, ls=":", label=f"budget ({args.budget})")
    bottom.set_ylabel("bank entries")
    bottom.set_xlabel("chunk")
    bottom.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=240)
    parser.add_argument("--budget", type=int, default=40, help="bank entries kept (records beyond are pruned)")
    parser.add_argument("--policy", default="lfu", help="pruning policy expression, e.g. fifo, lru, lfu, importance")
    parser.add_argument("--target", default=None, help="host:port of a memflow service (default: in-process bank)")
    parser.add_argument("--service", action="store_true", help="start memflow-service on a temporary data dir and "
                                                                   "stream through it (what `make demo` does)")
    parser.add_argument("--prefetch", action="store_true", help="overlap chunk n+1's retrieval with chunk n")
    parser.add_argument("--deadline", type=float, default=1.0, help="seconds a memory read may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "demo.png"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
