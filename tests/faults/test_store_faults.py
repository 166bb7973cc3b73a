"""The TensorStore contract under faults, for every store in tests/unit/test_store_contract.py STORES.

kill -9: a real writer process (store_writer.py) commits batches and prints each commit after it returns; it is
SIGKILLed at random moments and restarted on the same directory, and the store must then hold every
acknowledged entry bit for bit, none that was acknowledged as evicted, and every entry whole (no half commit).
Full disk (a real 4 MiB tmpfs, the fixture of tests/faults/conftest.py): a commit that does not fit is
ResourceExhausted and leaves the store exactly as it was, readable; commits that free space still commit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tiny_disk import tiny_disk  # noqa: F401 - the fixture, found by pytest through this name

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from test_store_contract import LAYOUT, STORES, Entry, assert_holds, put, record  # noqa: E402

from memory_service.errors import ResourceExhausted  # noqa: E402
from memory_service.store import Commit  # noqa: E402

WRITER = str(Path(__file__).resolve().parent / "store_writer.py")
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(params=sorted(STORES))
def impl(request) -> str:
    return request.param


def run_and_kill(impl: str, root: str, delay: float) -> list[list[str]]:
    """Start a writer, SIGKILL it `delay` seconds after it is ready (or while it starts); its complete lines."""
    proc = subprocess.Popen([sys.executable, WRITER, impl, root], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[list[str]] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if line.endswith("\n"):  # a pipe write of one short line is atomic: never half an acknowledgement
                lines.append(line.split())
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if delay >= 0:
        assert ready.wait(60), "the writer never got ready"
    time.sleep(abs(delay))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    assert proc.returncode == -signal.SIGKILL, f"writer failed:\n{proc.stderr.read()[-3000:]}"
    return lines


@pytest.mark.slow
def test_kill_9_mid_write_loses_nothing_acknowledged(impl, tmp_path):
    root = str(tmp_path / "store")
    rng = random.Random(20261201)
    acked: set[int] = set()
    deleted: set[int] = set()  # acknowledged evictions
    maybe: set[int] = set()  # evictions announced, acknowledged or not
    for cycle in range(8):
        # mostly mid-commit; every fourth kill lands while the writer starts and opens the store
        lines = run_and_kill(impl, root, -rng.uniform(0, 0.4) if cycle % 4 == 3 else rng.uniform(0.05, 0.5))
        if lines and lines[0][0] == "ready":
            assert int(lines[0][1]) >= max(acked, default=-1) + 1  # it went on where the store left off
        for words in lines:
            if words[0] == "ack":
                cut = words.index("del") if "del" in words else len(words)
                acked |= {int(i) for i in words[1:cut]}
                deleted |= {int(i) for i in words[cut + 1:]}
            elif words[0] == "evicting":
                maybe.add(int(words[1]))
    assert len(acked) > 50 and deleted
    store = STORES[impl].reopen(root)
    try:
        with store.view() as v:
            present = {m.entry_id for m in v.entries(LAYOUT)}
            rec = next(s.record for s in v.streams() if s.name == LAYOUT.name)
        lost = acked - maybe - present
        assert not lost, f"lost acknowledged entries {sorted(lost)[:10]}"
        assert not present & deleted, "an acknowledged eviction came back"
        assert rec["next_id"] > max(present)
        assert_holds(store, {i: Entry(i) for i in present})  # every entry there is whole and bit-exact
    finally:
        store.close()


def test_full_disk_is_resource_exhausted_and_the_store_stays_readable(impl, tiny_disk):  # noqa: F811
    root = os.path.join(tiny_disk, "store")
    store = STORES[impl].reopen(root)
    try:
        store.create_stream(LAYOUT.name, record(LAYOUT, 0, 0), LAYOUT.sid + 1)
        held: dict[int, Entry] = {}
        version = 0
        with pytest.raises(ResourceExhausted, match="disk full"):
            for _ in range(10_000):  # 4 MiB holds a few thousand 1 KiB entries at most
                batch = [Entry(i) for i in range(len(held), len(held) + 16)]
                version += 1
                put(store, batch, version)
                held.update((e.meta.entry_id, e) for e in batch)
        with store.view() as v:
            before = v.contents(LAYOUT.sid)
        assert len(held) > 100
        assert_holds(store, held)  # the failed commit left nothing, and everything committed reads back
        with pytest.raises(ResourceExhausted):  # still full: refused again, still nothing left behind
            put(store, [Entry(i) for i in range(len(held), len(held) + 16)], version + 1)
        with store.view() as v:
            assert v.contents(LAYOUT.sid) == before
        # commits that free space go through on the full disk, and make room for new entries
        victims = tuple(sorted(held)[:64])
        store.commit(LAYOUT, Commit(record=record(LAYOUT, len(held), version + 1), evict=victims))
        for eid in victims:
            del held[eid]
        new = [Entry(i) for i in range(max(held) + 1, max(held) + 9)]
        put(store, new, version + 2)
        held.update((e.meta.entry_id, e) for e in new)
        assert_holds(store, held)
        store.close()
        store = STORES[impl].reopen(root)  # and a reopen on the full disk sees it all
        assert_holds(store, held)
        store.drop_stream(LAYOUT.name, LAYOUT.sid)
        with store.view() as v:
            assert not list(v.streams()) and not v.contents(LAYOUT.sid).entries
    finally:
        store.close()
