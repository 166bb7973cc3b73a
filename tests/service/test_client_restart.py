"""One MemoryClient, two threads, a `memflow-service serve` that is killed and restarted under them.

The plugin shares one client between its generator thread and its write-back thread. After a restart the
service has lost every arena registration; the client must register its same segments again without closing
one another thread leases from (that was `TypeError: memoryview ... NoneType`), reconnect quickly (gRPC's
default backoff brought memory back 12.7 s after the new service listened), and never pile up arenas while the
service is down. Real subprocesses on 127.0.0.1, SIGKILL, the same port after each restart. Reconnect times are
printed as a JSON line (`-s` shows it); nothing here asserts a wall-clock time, only that calls succeed again
within a generous deadline.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import traceback

import grpc
import ml_dtypes
import numpy as np
import pytest

from svc_util import DIM, LAYERS, SMALL_ARENA, make_entry, make_spec, start_serve

from memory_service import KeySpace, KVLayout, MemFlowError, NewEntry, ResourceExhausted, StreamSpec
from memory_service.client import MemoryClient
from memory_service.errors import ArenaNotRegistered, FailedPrecondition, StaleLayout
from memory_service.wire import convert
from memory_service.wire.gen import memory_pb2 as pb
from memory_service.wire.gen import memory_pb2_grpc as pb_grpc
from memory_service.shm import NONCE_BYTES, Arena

RESTARTS = 3
BACK_WITHIN_S = 60.0  # a generous bound on a loaded machine; the measured figure is printed, not asserted


def kv_of(*seeds: int) -> bytes:
    return np.stack([make_entry(s).kv for s in seeds]).tobytes()


class Workers:
    """A reader (fetch + query) and a writer (put + fetch back) sharing one client; anything but a MemFlowError
    (which a call may raise while the service is down) is recorded as a failure."""

    def __init__(self, client: MemoryClient, ids: list[int], pause: float = 0.005) -> None:
        self.client, self.ids, self.pause = client, ids, pause
        self.stop = threading.Event()
        self.ok: dict[str, list[float]] = {"reader": [], "writer": []}  # time.monotonic() of each success
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(name,), daemon=True) for name in self.ok]

    def __enter__(self) -> "Workers":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self, name: str) -> None:
        seed = 1000 if name == "writer" else 0
        query = np.ones((LAYERS, DIM), np.float32)
        while not self.stop.is_set():
            try:
                if name == "reader":
                    got = self.client.fetch("cam0", self.ids)
                    assert got.kv.tobytes() == kv_of(*range(len(self.ids))), "fetch returned other bytes"
                    assert self.client.query("cam0", "nam", query, 2).ids.shape == (LAYERS, 2)
                    both = self.client.query_fetch("cam0", "nam", query, 2, include=self.ids[:1])  # one call
                    assert both.fetched[0].ids[0] == self.ids[0], "query_fetch fetched other entries"
                    assert both.fetched[0].kv[0].tobytes() == kv_of(0), "query_fetch returned other bytes"
                else:
                    seed += 1
                    (eid,) = self.client.put("cam0", [make_entry(seed)])
                    assert self.client.fetch("cam0", [eid]).kv.tobytes() == kv_of(seed), "read back other bytes"
                self.ok[name].append(time.monotonic())
            except MemFlowError:
                time.sleep(self.pause)  # the service is down or restarting: try again
            except BaseException:  # noqa: BLE001 - a TypeError, an assertion: the test fails on it
                self.failures.append(f"{name}: {traceback.format_exc()}")
                return

    def first_success_after(self, t0: float, deadline: float) -> dict[str, float]:
        """Seconds from t0 to each thread's first success after t0, waiting until `deadline` (monotonic)."""
        while time.monotonic() < deadline and not self.failures:
            after = {name: [t for t in ts if t > t0] for name, ts in self.ok.items()}
            if all(after.values()):
                return {name: min(ts) - t0 for name, ts in after.items()}
            time.sleep(0.005)
        assert not self.failures, "\n".join(self.failures)
        raise AssertionError(f"no success from every thread within {BACK_WITHIN_S:.0f} s of the restart: "
                             f"{ {n: len(ts) for n, ts in self.ok.items()} } successes so far")


def test_one_client_in_two_threads_survives_restarts(tmp_path):
    data = str(tmp_path / "bank")
    proc = start_serve(data)
    port = proc.port
    figures = []
    try:
        with MemoryClient(proc.target, plane="shm", arena_bytes=SMALL_ARENA, timeout=10, retries=1) as c:
            c.create_stream(make_spec())
            ids = c.put("cam0", [make_entry(s) for s in range(3)])
            with Workers(c, ids) as w:
                w.first_success_after(time.monotonic(), time.monotonic() + BACK_WITHIN_S)
                for _ in range(RESTARTS):
                    proc.kill()  # SIGKILL: calls in flight die with it, every arena registration is lost
                    time.sleep(3.0)  # down long enough for the threads' calls to fail and the channel to back off
                    proc = start_serve(data, "--port", str(port))
                    listening = time.monotonic()
                    figures.append(w.first_success_after(listening, listening + BACK_WITHIN_S))
                time.sleep(0.3)  # both threads keep working on the last service
            assert not w.failures, "\n".join(w.failures)
            usage = c.arena_usage()
            assert usage.arenas == 1 and usage.registered == 1, usage  # the same arena, registered again
            assert c.stats("cam0").entries >= 3 + RESTARTS
    finally:
        proc.kill()
    print(json.dumps({"reconnect_s": [{k: round(v, 3) for k, v in f.items()} for f in figures]}))


def test_two_threads_while_the_service_keeps_losing_the_arenas(server):
    """What a restart does to the data plane, a hundred times in a few seconds: the service's arena registry
    forgets every arena (in-process, the real registry) while both threads lease, fetch and put."""
    with MemoryClient(server.address, plane="shm", arena_bytes=SMALL_ARENA, timeout=10) as c:
        c.create_stream(make_spec())
        ids = c.put("cam0", [make_entry(s) for s in range(3)])
        with Workers(c, ids, pause=0.0) as w:
            for _ in range(500):
                server.servicer.arenas.close()  # every registration gone, as after a restart
                time.sleep(0.002)
                assert not w.failures, "\n".join(w.failures)
            last = time.monotonic()
            w.first_success_after(last, last + BACK_WITHIN_S)
        assert not w.failures, "\n".join(w.failures)
        gc.collect()  # the threads' last frames may sit in grpc's exception cycles; their results hold leases
        usage = c.arena_usage()
        assert usage.arenas == 1 and usage.leased == 0, usage  # the same segment throughout, nothing left leased


def test_failed_fetches_while_the_service_is_down_hold_no_arena_bytes(tmp_path):
    data = str(tmp_path / "bank")
    proc = start_serve(data)
    try:
        with MemoryClient(proc.target, plane="shm", arena_bytes=SMALL_ARENA, timeout=5, retries=0) as c:
            c.create_stream(make_spec())
            ids = c.put("cam0", [make_entry(s) for s in range(4)])
            before = c.arena_usage()
            port = proc.port
            proc.kill()
            kept = []
            for _ in range(20):
                with pytest.raises(MemFlowError) as failed:
                    c.fetch("cam0", ids)
                kept.append(failed.value)  # kept, as a future or a log keeps it (its traceback holds the frames)
            after = c.arena_usage()
            assert (after.arenas, after.bytes, after.leased) == (before.arenas, before.bytes, 0), (before, after)
            proc = start_serve(data, "--port", str(port))
            deadline = time.monotonic() + BACK_WITHIN_S
            while True:
                try:
                    got = c.fetch("cam0", ids)
                    break
                except MemFlowError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            assert got.kv.tobytes() == kv_of(*range(4))
            assert c.arena_usage().arenas == 1
    finally:
        proc.kill()


def test_a_stream_created_anew_with_a_larger_layout_is_fetched_right(server):
    small = KVLayout(layers=2, heads=2, head_dim=8, tokens_per_frame=4)
    large = KVLayout(layers=6, heads=2, head_dim=8, tokens_per_frame=16)
    rng = np.random.default_rng(0)

    def entry(layout: KVLayout) -> NewEntry:
        kv = rng.standard_normal(layout.shape).astype(ml_dtypes.bfloat16)
        return NewEntry(0, 0, "", {"e": rng.standard_normal(4).astype(np.float32)}, kv)

    with MemoryClient(server.address, plane="shm", arena_bytes=SMALL_ARENA) as a, \
            MemoryClient(server.address, plane="stream") as b:
        a.create_stream(StreamSpec("s", {"e": KeySpace(4)}, kv=small))  # a knows this layout: it made it
        first = entry(small)
        (eid,) = a.put("s", [first])
        assert a.fetch("s", [eid]).kv.tobytes() == first.kv[None].tobytes()
        b.drop_stream("s")  # another client replaces the stream with a layout 12x larger
        b.create_stream(StreamSpec("s", {"e": KeySpace(4)}, kv=large))
        second = entry(large)
        (eid,) = b.put("s", [second])
        got = a.fetch("s", [eid])  # sized by the old layout: StaleLayout, the layout reloaded, the fetch rerun
        assert got.kv.shape == (1, *large.shape) and got.kv.tobytes() == second.kv[None].tobytes()


def test_refined_errors_travel_as_their_status_code_and_reason(server):
    with MemoryClient(server.address, plane="stream") as c:
        c.create_stream(make_spec())
        c.put("cam0", [make_entry(0)])
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.MemoryServiceStub(channel)
    arena = Arena(1 << 16)

    def failure(call) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            call()
        return e.value

    def mapped(e: grpc.RpcError) -> Exception:  # what MemoryClient raises for it
        return convert.error_from(e.code(), e.details(), e.trailing_metadata())

    try:
        fetch = pb.FetchRequest(stream="cam0", ids=[0], plane=pb.DATA_PLANE_SHM, arena_id="feedfacefeedface",
                                arena_offset=4096, arena_bytes=1 << 15)
        e = failure(lambda: list(stub.Fetch(fetch)))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION  # a client that knows no reasons still gets this
        assert (convert.ERROR_REASON_KEY, ArenaNotRegistered.reason) in tuple(e.trailing_metadata())
        err = mapped(e)
        assert type(err) is ArenaNotRegistered and isinstance(err, FailedPrecondition) and str(err) == e.details()

        fetch.arena_id = stub.RegisterArena(pb.RegisterArenaRequest(shm_name=arena.name, size=arena.size,
                                                                    nonce=arena.nonce)).arena_id
        fetch.arena_bytes = 1  # fewer bytes than the stream's layout needs
        err = mapped(failure(lambda: list(stub.Fetch(fetch))))
        assert type(err) is StaleLayout and "is stale" in str(err)

        e = failure(lambda: stub.RegisterArena(pb.RegisterArenaRequest(shm_name=arena.name, size=arena.size,
                                                                       nonce=b"x" * NONCE_BYTES)))
        assert not any(k == convert.ERROR_REASON_KEY for k, _ in e.trailing_metadata() or ())
        assert type(mapped(e)) is FailedPrecondition  # an unrefined failure stays its code's class
        # a reason this client does not know, or one that belongs to another code, leaves the code's class
        assert type(convert.error_from(grpc.StatusCode.FAILED_PRECONDITION, "m",
                                       ((convert.ERROR_REASON_KEY, "SOMETHING_NEW"),))) is FailedPrecondition
        assert type(convert.error_from(grpc.StatusCode.NOT_FOUND, "m",
                                       ((convert.ERROR_REASON_KEY, StaleLayout.reason),))).__name__ == "NotFound"
    finally:
        arena.close()
        channel.close()


def test_arenas_are_bounded_and_reused(server):
    with MemoryClient(server.address, plane="shm", arena_bytes=16 << 10, max_arenas=2) as c:
        c.create_stream(make_spec())
        ids = c.put("cam0", [make_entry(s) for s in range(2)])
        held = []
        with pytest.raises(ResourceExhausted, match="max_arenas=2"):
            for _ in range(100):  # each result holds its arena bytes; 16 KiB arenas hold 3 such leases
                held.append(c.fetch("cam0", ids[:1]))
        assert 2 <= len(held) <= 6 and c.arena_usage().arenas == 2
        assert all(r.kv.tobytes() == kv_of(0) for r in held)  # results kept alive were never overwritten
        held.clear()  # the leases go with the arrays
        assert c.arena_usage().leased == 0
        for _ in range(20):
            assert c.fetch("cam0", ids).kv.tobytes() == kv_of(0, 1)
        assert c.arena_usage().arenas <= 2
