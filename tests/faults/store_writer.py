"""A store writer to be killed: commits batches of entries through a TensorStore until SIGKILLed.

    python tests/faults/store_writer.py IMPL ROOT

Opens store IMPL (tests/unit/test_store_contract.py STORES) in ROOT, continues from the stream record's
next_id, and prints `ready NEXT_ID`, then after each commit returns one line `ack ID... [del ID]`: a put of 1-8
entries (entry id == seed), every 7th also evicting the oldest entry (announced by `evicting ID` before the
commit: a kill may land after it committed and before its acknowledgement). A line is printed only after its
commit returned, so an `ack` line is an acknowledged commit.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit"))

from test_store_contract import LAYOUT, STORES, Entry, put, record  # noqa: E402


def batch_size(first: int) -> int:
    return 1 + first * 7919 % 8


def main() -> None:
    impl, root = sys.argv[1], sys.argv[2]
    store = STORES[impl].reopen(root)
    with store.view() as v:
        rec = next((s.record for s in v.streams() if s.name == LAYOUT.name), None)
        live = [m.entry_id for m in v.entries(LAYOUT)]
    if rec is None:
        store.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), LAYOUT.sid + 1)
        rec = record(LAYOUT, 0, 0)
    next_id, version = rec["next_id"], rec["version"]
    print(f"ready {next_id}", flush=True)
    while True:
        ids = list(range(next_id, next_id + batch_size(next_id)))
        version += 1
        evict = (live[0],) if version % 7 == 0 and live else ()
        if evict:
            print(f"evicting {evict[0]}", flush=True)
        put(store, [Entry(i) for i in ids], version, evict=evict)
        next_id = ids[-1] + 1
        live = live[len(evict):] + ids
        print("ack " + " ".join(map(str, ids)) + (f" del {evict[0]}" if evict else ""), flush=True)


if __name__ == "__main__":
    main()
