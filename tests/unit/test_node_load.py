"""benchmarks/node_load.py's machinery end to end, tiny: a real `memflow-service serve`, two real generator
processes over the shm plane, both modes, and the row shape that benchmarks/report.py renders.

What it pins is shape, never speed (no timed asserts): one row per (mode, process count), ratios only where the
generators were not paced, per-process percentiles for every process, and 1.0 as the growth of the first count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import node_load  # noqa: E402


def test_two_generators_on_one_service_give_one_row_per_mode_and_count(tmp_path):
    node_load.main(["--procs", "1,2", "--tokens", "8", "--kv-frames", "3", "--distractors", "4", "--seconds", "0.15",
                    "--gpu-ms", "5", "--out", str(tmp_path), "--no-plot"])
    lines = [json.loads(line) for line in (tmp_path / "node_load.jsonl").read_text().splitlines()]
    header, rows = lines[0], lines[1:]
    assert "machine" in header and header["command"].startswith("python ")  # the argv of whatever ran it
    assert [(r["mode"], r["call"], r["procs"]) for r in rows] == [
        (m, c, n) for n in (1, 2) for c in ("query+fetch", "query_fetch") for m in ("saturated", "paced")]
    fetch_bytes = 3 * node_load.LAYERS * 2 * 8 * node_load.HEADS * node_load.HEAD_DIM * 2  # 3 frames, bf16
    for r in rows:
        assert r["chunks"] > 0 and r["fetch_mb"] == round(fetch_bytes / 1e6, 4)
        assert len(r["before_p50_ms_per_proc"]) == len(r["before_p99_ms_per_proc"]) == r["procs"]
        assert r["before_p50_ms"] <= r["before_p99_ms"]
        assert r["agg_fetch_gbps"] > 0 and r["service_cpu_cores"] >= 0 and r["memcpy_n_gbps"] > 0
        assert ("ratio_to_memcpy" in r) == (r["mode"] == "saturated")
        assert r["gpu_ms"] == (5.0 if r["mode"] == "paced" else 0.0)
        assert r["moved_mb_per_chunk"] == r["fetch_mb"]  # 3 frames x 30 layers a chunk, by either call
        assert ("query_p99_ms" in r) == (r["call"] == "query+fetch")  # one call has no query time of its own
    assert [r["p99_growth"] for r in rows[:4]] == [1.0] * 4
