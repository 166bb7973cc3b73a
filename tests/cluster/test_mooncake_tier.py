"""MooncakeTier against a real Mooncake Store (master + 2 store nodes on loopback, tests/cluster/mooncake_servers.py).

What a bug would break: bytes come back bit-exact (several parts, across clients, into registered memory); puts
are written from where their parts lie (objects far larger than the client's local buffer, many parts or one),
and a put on an existing key replaces it (one part or several); a
miss, a size mismatch, a dead store node, a restarted master and an evicted key are all False and never raise;
puts work again once the cluster is back; hard-pinned objects outlive a flood that evicts unpinned ones; the
counters in stats() add up. Throughput against raw loopback TCP is printed, never asserted (benchmarks/ owns it).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from mooncake_servers import mooncake  # noqa: F401 - the fixture, found by pytest through this name

from memory_service.cluster.mooncake import READER_NICE, MooncakeTier
from memory_service.errors import Unavailable

MB = 1 << 20


def _key(tag: str) -> str:
    return f"test/{tag}/{uuid.uuid4().hex}"  # the fixture's pool is shared by every test of the run


def _parts(seed: int, sizes: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


def _views(parts: list[np.ndarray]) -> list[memoryview]:
    return [p.data for p in parts]


@pytest.fixture
def tier(mooncake):  # noqa: F811 - the fixture above
    with MooncakeTier(mooncake.master, mooncake.metadata) as t:
        yield t


def _eventually_put(t: MooncakeTier, items, within_s: float = 20.0) -> int:
    """Put until it stores everything or `within_s` passes (the cluster settling after a restart)."""
    deadline = time.monotonic() + within_s
    while True:
        stored = t.put(items)
        if stored == len(items) or time.monotonic() > deadline:
            return stored
        time.sleep(0.2)


def test_round_trip_is_bit_exact_from_several_parts(tier):
    # an ~8 MB object from uneven parts (one a bfloat16-sized uint16 view), and a small one in the same batch
    parts = _parts(1, [3 * MB + 7, 5 * MB - 7, 4096])
    as_u16 = parts[1][: (parts[1].nbytes // 2) * 2].view(np.uint16)  # a part that is not uint8
    big, small = _key("big"), _key("small")
    objs = [parts[0], as_u16, parts[2]]
    small_parts = _parts(2, [100, 0, 23])
    assert tier.put([(big, [memoryview(o) for o in objs]), (small, _views(small_parts))]) == 2
    want = np.concatenate([o.reshape(-1).view(np.uint8) for o in objs])
    out = np.empty(want.nbytes, np.uint8)
    assert tier.get_into(big, out.data)
    assert np.array_equal(out, want)
    out2 = np.empty(123, np.uint8)
    assert tier.get_into(small, out2.data)
    assert np.array_equal(out2, np.concatenate(small_parts))
    # a buffer of the wrong size is not a hit: shorter (-600) or longer (a short read)
    assert not tier.get_into(small, np.empty(122, np.uint8).data)
    assert not tier.get_into(small, np.empty(124, np.uint8).data)
    # the same key written again (one part: upsert) serves the new bytes, not the old
    again = _parts(3, [123])
    assert tier.put([(small, _views(again))]) == 1
    assert tier.get_into(small, out2.data) and np.array_equal(out2, again[0])


def test_a_put_on_an_existing_key_replaces_it_and_a_re_put_is_bit_exact(tier):
    # the wheel's multi-buffer put keeps an existing key's old value: a multi-part put must not (it removes first)
    key = _key("replace")
    first, second = _parts(80, [28, 2 * MB + 1]), _parts(81, [28, 2 * MB + 1])
    out = np.empty(2 * MB + 29, np.uint8)
    assert tier.put([(key, _views(first))]) == 1
    assert tier.put([(key, _views(second))]) == 1
    assert tier.get_into(key, out.data) and np.array_equal(out, np.concatenate(second))
    assert tier.put([(key, _views(second))]) == 1  # the same immutable bytes again (a retried write-through)
    assert tier.get_into(key, out.data) and np.array_equal(out, np.concatenate(second))
    # another size, and one part after several: the key serves exactly the last object
    shorter = _parts(82, [MB])
    assert tier.put([(key, _views(shorter))]) == 1
    assert not tier.get_into(key, out.data)  # the old length is not a hit
    got = np.empty(MB, np.uint8)
    assert tier.get_into(key, got.data) and np.array_equal(got, shorter[0])
    # put_each answers per item; an empty object is not stored (and not an error)
    fresh = _key("replace-fresh")
    assert tier.put_each([(fresh, _views(first)), (_key("empty"), [np.empty(0, np.uint8).data])]) == [True, False]
    assert tier.stats()["skipped"] >= 1


def test_puts_are_written_from_where_their_parts_lie(mooncake):  # noqa: F811
    # a client whose local buffer (the wheel's copy path: put_parts / upsert_parts answer -600 past it) is 16 MB:
    # objects of 40 MB, of three parts and of one, can only be stored straight from the caller's buffers
    with MooncakeTier(mooncake.master, mooncake.metadata, local_buffer_bytes=16 * MB) as t:
        parts = _parts(83, [28, 20 * MB, 20 * MB - 28])
        single = _parts(84, [40 * MB])
        keys = [_key("zero-copy-parts"), _key("zero-copy-one")]
        assert t.put([(keys[0], _views(parts)), (keys[1], _views(single))]) == 2
        out = np.empty(40 * MB, np.uint8)
        assert t.get_into(keys[0], out.data) and np.array_equal(out, np.concatenate(parts))
        assert t.get_into(keys[1], out.data) and np.array_equal(out, single[0])
        assert t.stats()["bytes_in"] == 80 * MB
        t.remove(keys)


def test_registered_memory_is_read_into_and_written_from_directly(mooncake):  # noqa: F811
    with MooncakeTier(mooncake.master, mooncake.metadata) as t:
        arena = np.zeros(8 * MB, np.uint8)
        t.register(arena)
        key, parts = _key("arena-read"), _parts(4, [MB, MB + 3])
        staged = np.concatenate(parts)
        arena[4 * MB : 4 * MB + staged.nbytes] = staged
        # written from the arena, read back into another window of it
        assert t.put([(key, [arena[4 * MB : 4 * MB + staged.nbytes].data])]) == 1
        window = arena[1000 : 1000 + staged.nbytes]
        assert t.get_into(key, window.data)
        assert np.array_equal(window, staged)
        assert not arena[:1000].any() and not arena[1000 + staged.nbytes : 4 * MB].any()  # nothing outside it
        assert t.stats()["skipped"] == 0
        t.unregister(arena)


@pytest.mark.parametrize("register_calls", [False, True], ids=["tcp-unregistered", "registered-for-the-call"])
def test_get_many_scatters_each_object_over_its_parts_in_one_call(mooncake, register_calls):  # noqa: F811
    # what the read path does: a layer's header into a small buffer, its body straight into the fetch buffer; the
    # bodies of one entry's layers lie side by side there (one span), the headers side by side in another
    with MooncakeTier(mooncake.master, mooncake.metadata, register_calls=register_calls) as t:
        heads, bodies = _parts(60, [28, 28, 28]), _parts(61, [MB, MB + 5, 3])
        keys = [_key(f"scatter{i}") for i in range(3)]
        assert t.put([(k, [h.data, b.data]) for k, h, b in zip(keys, heads, bodies)]) == 3
        head_buf = np.zeros(3 * 28, np.uint8)
        fetch = np.zeros(2 * MB + 8, np.uint8)
        at = [0, MB, 2 * MB + 5]
        items = [(k, [head_buf[28 * i:28 * (i + 1)], fetch[at[i]:at[i] + bodies[i].nbytes]]) for i, k in enumerate(keys)]
        absent = (_key("scatter-absent"), [np.zeros(16, np.uint8)])
        wrong = (keys[2], [np.zeros(28, np.uint8), np.zeros(2, np.uint8)])  # one byte short of the object: a miss
        before = t.stats()
        assert t.get_many([items[0], absent, items[1], wrong, items[2]]) == [True, False, True, False, True]
        assert np.array_equal(head_buf, np.concatenate(heads))
        assert np.array_equal(fetch[:2 * MB + 8], np.concatenate(bodies))
        after = t.stats()
        assert after["hits"] - before["hits"] == 3 and after["misses"] - before["misses"] == 2
        assert after["bytes_out"] - before["bytes_out"] == sum(h.nbytes + b.nbytes for h, b in zip(heads, bodies))
        assert t._memory.in_flight() == 0  # what a call (the put, the get) registered for itself is released with it
        # the same buffers again (registered for the call again, or still nothing registered over TCP)
        fetch[:] = 0
        assert all(t.get_many(items)) and np.array_equal(fetch, np.concatenate(bodies))


def test_a_missing_key_is_false_and_counted_as_a_miss(tier):
    before = tier.stats()
    assert not tier.get_into(_key("never-put"), np.empty(4096, np.uint8).data)
    after = tier.stats()
    assert after["misses"] == before["misses"] + 1 and after["errors"] == before["errors"]  # -704 is a miss only


def test_put_on_one_node_is_read_on_another(mooncake):  # noqa: F811
    with MooncakeTier(mooncake.master, mooncake.metadata) as a, MooncakeTier(mooncake.master, mooncake.metadata) as b:
        key, parts = _key("across"), _parts(5, [2 * MB, 3 * MB + 1])
        assert a.put([(key, _views(parts))]) == 1
        out = np.empty(5 * MB + 1, np.uint8)
        assert b.get_into(key, out.data)
        assert np.array_equal(out, np.concatenate(parts))
        assert b.stats()["hits"] == 1 and b.stats()["bytes_out"] == out.nbytes
        assert a.stats()["bytes_in"] == out.nbytes


def test_a_killed_store_node_never_fails_a_read_and_puts_work_after_restart(mooncake):  # noqa: F811
    with MooncakeTier(mooncake.master, mooncake.metadata, replicas=2) as t:
        objs = {_key("kill"): _parts(10 + i, [MB + i]) for i in range(4)}
        assert t.put([(k, _views(p)) for k, p in objs.items()]) == 4
        mooncake.kill_store(0)
        try:
            for key, parts in objs.items():  # before the master expires the node: a hit or a miss (-800), no raise
                out = np.empty(sum(p.nbytes for p in parts), np.uint8)
                if t.get_into(key, out.data):
                    assert np.array_equal(out, np.concatenate(parts))
            mooncake.wait_ready()  # the master has expired the dead node (client_ttl)
            for key, parts in objs.items():  # each object had its second replica on the survivor
                out = np.empty(sum(p.nbytes for p in parts), np.uint8)
                assert t.get_into(key, out.data), t.last_error
                assert np.array_equal(out, np.concatenate(parts))
        finally:
            mooncake.restart_store(0)
        fresh = {_key("after-restart"): _parts(20 + i, [MB]) for i in range(4)}
        assert _eventually_put(t, [(k, _views(p)) for k, p in fresh.items()]) == 4
        for key, parts in fresh.items():
            out = np.empty(MB, np.uint8)
            assert t.get_into(key, out.data) and np.array_equal(out, parts[0])


def test_a_restarted_master_loses_keys_as_misses_and_puts_resume(mooncake, tier):  # noqa: F811
    key, parts = _key("before-master-restart"), _parts(30, [MB])
    assert tier.put([(key, _views(parts))]) == 1
    mooncake.restart_master()
    out = np.empty(MB, np.uint8)
    for _ in range(3):  # the first call after the restart fails its RPC (-900), later ones miss (-704)
        assert not tier.get_into(key, out.data)
    key2, parts2 = _key("after-master-restart"), _parts(31, [MB])
    assert _eventually_put(tier, [(key2, _views(parts2))]) == 1
    assert tier.get_into(key2, out.data) and np.array_equal(out, parts2[0])


def test_a_master_down_is_bypassed_after_one_failure_and_used_again_once_back(mooncake, tier):  # noqa: F811
    key, parts = _key("master-down"), _parts(32, [MB])
    assert tier.put([(key, _views(parts))]) == 1
    mooncake.kill_master()
    try:
        out = np.empty(MB, np.uint8)
        assert not tier.get_into(key, out.data)  # this one waits for the master (-900)
        assert tier.stats()["master_unreachable"]
        before = tier.stats()["bypassed"]
        assert not tier.get_into(key, out.data) and tier.put([(key, _views(parts))]) == 0
        tier.remove([key])
        assert tier.stats()["bypassed"] == before + 3  # none of them went to the master
    finally:
        mooncake.restart_master()
    key2, parts2 = _key("master-back"), _parts(33, [MB])
    assert _eventually_put(tier, [(key2, _views(parts2))]) == 1  # the probe found the master again
    assert not tier.stats()["master_unreachable"]
    assert tier.get_into(key2, out.data) and np.array_equal(out, parts2[0])


def test_eviction_at_capacity_is_a_miss_and_pinned_objects_stay(mooncake, tier):  # noqa: F811
    pinned = {_key("pinned"): _parts(40 + i, [2 * MB]) for i in range(2)}
    assert tier.put([(k, _views(p)) for k, p in pinned.items()], pin=True) == 2
    capacity = mooncake.segment_bytes * mooncake.running_stores()
    obj = 8 * MB
    flood = [_key("flood") for _ in range(int(1.5 * capacity) // obj)]  # half again the pool's size
    payload = _parts(50, [obj])[0]
    stored = 0
    for i in range(0, len(flood), 4):
        stored += tier.put([(k, [payload.data]) for k in flood[i : i + 4]])
    out = np.empty(obj, np.uint8)
    hits = [tier.get_into(k, out.data) for k in flood]  # no raise, whatever was evicted
    assert stored * obj > capacity, "the flood did not go past the pool's capacity"
    assert not all(hits[: len(hits) // 3]), "nothing old was evicted"
    # a put that meets a full pool can fail (-200) while the master evicts, so the last one is retried
    last = _key("after-flood")
    assert _eventually_put(tier, [(last, [payload.data])]) == 1
    assert tier.get_into(last, out.data) and np.array_equal(out, payload)
    for key, parts in pinned.items():
        got = np.empty(2 * MB, np.uint8)
        assert tier.get_into(key, got.data) and np.array_equal(got, parts[0])
    tier.remove(list(pinned) + flood)
    assert not any(tier.get_into(k, np.empty(2 * MB, np.uint8).data) for k in pinned)


def test_concurrent_puts_and_gets_are_bit_exact(tier):
    failures: list[str] = []

    def worker(w: int) -> None:
        out = np.empty(MB + w, np.uint8)
        for i in range(6):
            key, parts = _key(f"thread{w}"), _parts(100 * w + i, [MB // 2, MB // 2 + w])
            if tier.put([(key, _views(parts))]) != 1:
                failures.append(f"{key}: put")
            elif not tier.get_into(key, out.data) or not np.array_equal(out, np.concatenate(parts)):
                failures.append(f"{key}: get")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []


def test_stats_add_up(tier):
    keys = [_key("stats") for _ in range(3)]
    parts = _parts(60, [MB])
    assert tier.put([(k, _views(parts)) for k in keys]) == 3
    out = np.empty(MB, np.uint8)
    assert all(tier.get_into(k, out.data) for k in keys)
    assert not tier.get_into(_key("absent"), out.data)
    s = tier.stats()
    assert (s["puts"], s["hits"], s["misses"]) == (3, 3, 1)
    assert s["bytes_in"] == s["bytes_out"] == 3 * MB
    assert 0 < s["get_p50_ms"] <= s["get_p99_ms"] and s["miss_p99_ms"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_puts_and_gets_run_on_niced_io_threads_and_the_caller_keeps_its_priority(tier):
    # the wheel busy-polls while a transfer runs: that poller must be a low-priority thread, never the caller
    key, parts = _key("nice"), _parts(62, [MB])
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert tier.put([(key, _views(parts))]) == 1
    out = np.empty(MB, np.uint8)
    assert tier.get_into(key, out.data) and np.array_equal(out, parts[0])
    readers = [t for t in threading.enumerate() if t.name.startswith("mooncake-io")]
    assert readers, "the calls ran on no I/O thread"
    assert all(os.getpriority(os.PRIO_PROCESS, t.native_id) == READER_NICE for t in readers)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_an_unreachable_master_is_unavailable(mooncake):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port}"):
        MooncakeTier(f"127.0.0.1:{port}", mooncake.metadata)


def _raw_tcp_gbps(buf: np.ndarray) -> float:
    """Send `buf` over a loopback TCP connection into a pre-touched buffer; GB/s of the receive."""
    server = socket.create_server(("127.0.0.1", 0))
    sink = np.zeros_like(buf)
    took: list[float] = []

    def receive() -> None:
        conn, _ = server.accept()
        with conn:
            view, got = memoryview(sink), 0
            started = time.perf_counter()
            while got < sink.nbytes:
                got += conn.recv_into(view[got:])
            took.append(time.perf_counter() - started)

    thread = threading.Thread(target=receive)
    thread.start()
    with socket.create_connection(server.getsockname()) as c:
        c.sendall(memoryview(buf))
    thread.join()
    server.close()
    assert np.array_equal(sink, buf)
    return buf.nbytes / took[0] / 1e9


def test_print_throughput_against_raw_loopback_tcp(tier):
    obj = _parts(70, [64 * MB])[0]
    out = np.zeros(64 * MB, np.uint8)  # pre-touched, as the service's arenas are
    arena = np.zeros(64 * MB, np.uint8)
    tier.register(arena)  # the zero-copy path: read straight into registered memory
    took: dict[str, list[float]] = {"put": [], "get_into": [], "get_into_registered": []}  # put: unregistered
    for _ in range(3):
        key = _key("throughput")
        for name, call in (("put", lambda: tier.put([(key, [obj.data])]) == 1),
                           ("get_into", lambda: tier.get_into(key, out.data)),
                           ("get_into_registered", lambda: tier.get_into(key, arena.data))):
            started = time.perf_counter()
            assert call(), name
            took[name].append(time.perf_counter() - started)
        tier.remove([key])
    assert np.array_equal(out, obj) and np.array_equal(arena, obj)
    tier.unregister(arena)
    raw = max(_raw_tcp_gbps(obj) for _ in range(3))
    gbps = {f"{name}_gbps": round(obj.nbytes / min(t) / 1e9, 2) for name, t in took.items()}
    print(json.dumps({"bench": "mooncake_tier_64MB", **gbps, "raw_loopback_tcp_gbps": round(raw, 2),
                      "get_over_raw": round(gbps["get_into_gbps"] / raw, 2),
                      "registered_get_over_raw": round(gbps["get_into_registered_gbps"] / raw, 2), "target": 0.5}))
