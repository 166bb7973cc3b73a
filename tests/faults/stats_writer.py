"""The process tests/faults/test_stats_crash.py kills: puts entries and queries them, so hits accumulate.

Continues from what the bank holds (entry id == seed, as crash_writer.py). Each step puts one entry, then
queries the `emb` key of one of the recent entries with k=1 (cosine, exact: that entry comes back first), so
the entry's hit count, last hit, importance and decayed frequency change with every query. Statistics are
flushed by the bank on its own (every FLUSH_S seconds, off the put path); this process never closes the bank.
One line per event, flushed, after the call it reports has returned:
    ready N      the bank opened; N entries will be next
    ack I        put returned entry I
    hit I        a query returned entry I first (its hit is counted in memory)

    python tests/faults/stats_writer.py DATA_DIR [--pruner] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/faults/, for crash_writer

import numpy as np  # noqa: E402
from conftest import make_entry, make_spec  # noqa: E402
from crash_writer import emit  # noqa: E402 - the line protocol the crash tests read
from memory_service import LocalMemory  # noqa: E402
from memory_service.config import BankConfig  # noqa: E402

STREAM = "cam0"
FLUSH_S = 0.25
RECENT = 40  # queries go to one of the newest RECENT entries, so most entries are hit several times
CONFIG = BankConfig(map_size=1 << 20, snapshot_on_close=False, hit_flush_interval_s=FLUSH_S)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("--pruner", action="store_true", help="run the bank's upkeep thread (as the service does)")
    ap.add_argument("--limit", type=int, default=100_000, help="stop after this many ids")
    args = ap.parse_args()

    m = LocalMemory(args.data_dir, CONFIG)  # never closed: this process only ever dies by SIGKILL
    if STREAM not in {s.name for s in m.list_streams()}:
        m.create_stream(make_spec(STREAM))
    if args.pruner:
        m.bank.start_pruner(interval_s=1.0)
    seed = m.stats(STREAM).next_entry_id
    rng = np.random.default_rng(seed)
    emit("ready", seed)
    while seed < args.limit:
        if m.put(STREAM, [make_entry(seed)]) != [seed]:
            raise SystemExit(f"put of seed {seed} did not get id {seed}")
        emit("ack", seed)
        target = int(rng.integers(max(0, seed - RECENT + 1), seed + 1))
        got = m.query(STREAM, "emb", make_entry(target).keys["emb"], 1).ids.tolist()
        if got != [target]:
            raise SystemExit(f"query by entry {target}'s own key returned {got}")
        emit("hit", target)
        seed += 1
    emit("done", seed)


if __name__ == "__main__":
    main()
