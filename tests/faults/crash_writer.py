"""The process tests/faults/test_crash.py kills: opens a LocalMemory on a data dir and puts entries forever.

Continues from what the bank holds (the next seed is the stream's next entry id, so entry id == seed and every
entry regenerates bit for bit from `conftest.make_entry(id)`). Prints one line per event, flushed, after the
call it reports has returned, so a line on stdout is a promise the killer may hold the bank to:
    ready N        the bank opened (indexes rebuilt or loaded and caught up); N entries will be next
    ack I J ...    put returned these ids (one batch; batch sizes 1-3 so all-or-nothing is visible)
    del I ...      delete returned (--delete: ids = 3 mod 4 are deleted right after their put)
    snap N         snapshot() returned after N ids were assigned (--snapshot-every puts)

    python tests/faults/crash_writer.py DATA_DIR [--ann] [--delete] [--snapshot-every N] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

from conftest import DIM, EMB, make_entry, make_spec  # noqa: E402
from memory_service import KeySpace, LocalMemory  # noqa: E402
from memory_service.config import BankConfig  # noqa: E402

STREAM = "cam0"
# A 256 KiB initial map doubles several times during a run: kills also land in and around map growth.
CONFIG = BankConfig(map_size=256 << 10, snapshot_on_close=False, hit_flush_interval_s=3600.0)


def spec(ann: bool):
    if not ann:
        return make_spec(STREAM)
    # Per-layer HNSW: its snapshot carries tombstones, so catch-up after a kill has real work to do.
    return make_spec(STREAM, key_spaces={"nam": KeySpace(DIM, per_layer=True, index="hnsw"),
                                         "emb": KeySpace(EMB, metric="cosine")})


def batch_size(seed: int) -> int:
    return 1 + seed % 3


def emit(*words) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("--ann", action="store_true", help="per-layer HNSW key space instead of flat")
    ap.add_argument("--delete", action="store_true", help="delete ids = 3 mod 4 right after their put")
    ap.add_argument("--snapshot-every", type=int, default=0, help="snapshot() after every N puts (0: never)")
    ap.add_argument("--limit", type=int, default=100_000, help="stop after this many ids")
    args = ap.parse_args()

    m = LocalMemory(args.data_dir, CONFIG)  # never closed: this process only ever dies by SIGKILL
    if STREAM not in {s.name for s in m.list_streams()}:
        m.create_stream(spec(args.ann))
    seed = m.stats(STREAM).next_entry_id
    emit("ready", seed)
    puts = 0
    while seed < args.limit:
        n = batch_size(seed)
        ids = m.put(STREAM, [make_entry(s) for s in range(seed, seed + n)])
        if ids != list(range(seed, seed + n)):
            raise SystemExit(f"ids {ids} for seeds {seed}..{seed + n - 1}: entry id must equal seed")
        emit("ack", *ids)
        seed += n
        puts += 1
        victims = [i for i in ids if i % 4 == 3] if args.delete else []
        if victims:
            m.delete(STREAM, victims)
            emit("del", *victims)
        if args.snapshot_every and puts % args.snapshot_every == 0:
            m.bank.snapshot()
            emit("snap", seed)
    emit("done", seed)


if __name__ == "__main__":
    main()
