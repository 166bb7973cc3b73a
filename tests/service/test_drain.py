"""A graceful drain never misreports a write: a stop, or SIGTERM to `memflow-service serve`, under a put load.

Every put answered OK is in the bank after the restart, bit for bit, under the id it was given; every put that
failed is not, and failed with a retryable UNAVAILABLE (or CANCELLED, if it reached grpc at the instant it
stopped), so retrying it is safe. Concurrent putters on both planes; the stop lands while puts are in flight,
so the moment a handler has committed but its answer is not yet on the wire is hit: before the fix grpc's
stop(0) cancelled such calls, and a committed put was answered "Unavailable: Cancelling all calls".
"""

from __future__ import annotations

import signal
import threading

import numpy as np
import pytest

from svc_util import SMALL_ARENA, make_entry, make_spec, wait_in_flight

from memory_service import LocalMemory
from memory_service.client import MemoryClient
from memory_service.config import ServiceConfig
from memory_service.errors import MemFlowError
from memory_service.service.server import MemoryServer

THREADS = 4
SERVERS = 3  # served at once: more drains per second of test
ROUNDS = 3  # 9 drains of a serve process; before the fix about one drain in ten misreported a put
IN_PROCESS_ROUNDS = 20
PER_THREAD = 100_000  # frame index = thread * PER_THREAD + n: each put names its own entry
SEED = 10 * PER_THREAD  # the frame of the entry put before the load starts


class Putter(threading.Thread):
    """Puts one entry at a time until a put fails; records every put's answer by frame index."""

    def __init__(self, target: str, n: int, started: threading.Semaphore) -> None:
        super().__init__(daemon=True)
        self.target, self.n, self.started = target, n, started
        self.ok: dict[int, int] = {}  # frame -> entry id
        self.failed: dict[int, str] = {}  # frame -> the error it got

    def run(self) -> None:
        plane = "shm" if self.n % 2 else "stream"
        try:
            client = MemoryClient(self.target, plane=plane, arena_bytes=SMALL_ARENA, retries=0)
        except MemFlowError:  # the drain began before this client could register its arena
            self.started.release()
            return
        with client:
            for i in range(PER_THREAD):
                frame = self.n * PER_THREAD + i
                try:
                    self.ok[frame] = client.put("cam0", [make_entry(frame)])[0]
                except Exception as exc:  # noqa: BLE001 - every answer is judged in check_bank
                    self.failed[frame] = f"{type(exc).__name__}: {exc}"
                    return
                finally:
                    if i == 2:
                        self.started.release()


def check_bank(data_dir: str, putters: list[Putter]) -> None:
    """After the restart: every OK put is there, bit for bit, under the id it was given; every failed put is
    absent, and failed with UNAVAILABLE - or CANCELLED, for a put that reached grpc as it stopped, before any
    handler took it - so retrying it is safe and right."""
    ok = {f: eid for p in putters for f, eid in p.ok.items()}
    failed = {f: answer for p in putters for f, answer in p.failed.items()}
    with LocalMemory(data_dir) as m:
        entries = {e.frame_index: e.entry_id for e in m.entries("cam0")}
        lost = sorted(set(ok) - set(entries))
        assert not lost, f"acknowledged puts missing after the restart (frames): {lost}"
        committed = {f: a for f, a in failed.items() if f in entries}
        assert not committed, f"puts in the bank whose client was told they failed (frame: answer): {committed}"
        odd = {f: a for f, a in failed.items() if not a.startswith(("Unavailable:", "MemFlowError: CANCELLED"))}
        assert not odd, f"puts that failed with neither UNAVAILABLE nor CANCELLED (frame: answer): {odd}"
        assert set(entries) == set(ok) | {SEED}, sorted(set(entries) - set(ok))
        assert all(entries[f] == eid for f, eid in ok.items())
        ids = sorted(ok.values())
        by_id = {eid: f for f, eid in ok.items()}
        got = m.fetch("cam0", ids).kv
        for n, eid in enumerate(ids):
            assert np.array_equal(got[n].view(np.uint16), np.asarray(make_entry(by_id[eid]).kv).view(np.uint16))


def start_putters(target: str) -> list[Putter]:
    """Create the stream, then THREADS putters, returned once each has had 3 puts answered."""
    with MemoryClient(target, plane="stream") as c:
        c.create_stream(make_spec())
        c.put("cam0", [make_entry(SEED)])  # the stream is never empty, even if no put lands
    started = threading.Semaphore(0)
    putters = [Putter(target, n, started) for n in range(THREADS)]
    for p in putters:
        p.start()
    for _ in putters:
        assert started.acquire(timeout=60)
    return putters


def joined(putters: list[Putter]) -> list[Putter]:
    for p in putters:
        p.join(120)
        assert not p.is_alive()
    return putters


def test_stop_under_puts_acknowledges_exactly_what_committed(tmp_path):
    """The same race in-process, where it is hit far more often (clients and server share one GIL: the stop's
    thread wins it while a finished put's answer waits to be sent; before the fix 13 of 30 drains misreported
    a put) and a drain costs no process start."""
    for r in range(IN_PROCESS_ROUNDS):
        data_dir = str(tmp_path / f"bank{r}")
        srv = MemoryServer(ServiceConfig(data_dir=data_dir, port=0))
        srv.start()
        try:
            putters = start_putters(srv.address)
        finally:
            srv.stop(10.0)
        check_bank(data_dir, joined(putters))


class Round:
    """One served bank under THREADS putters."""

    def __init__(self, serve, data_dir) -> None:
        self.data_dir = str(data_dir)
        self.proc = serve(data_dir, "--metrics-port", "0")
        self.putters = start_putters(self.proc.target)

    def terminate(self) -> None:
        wait_in_flight(self.proc.metrics_port, "Put")
        self.proc.proc.send_signal(signal.SIGTERM)

    def check(self) -> None:
        joined(self.putters)
        assert self.proc.proc.wait(60) == 0, self.proc.stderr()[-3000:]
        assert '"msg": "stopped"' in self.proc.stderr(), self.proc.stderr()[-3000:]
        check_bank(self.data_dir, self.putters)


@pytest.mark.slow
def test_sigterm_under_puts_acknowledges_exactly_what_committed(serve, tmp_path):
    for r in range(ROUNDS):
        rounds = [Round(serve, tmp_path / f"bank{r}-{n}") for n in range(SERVERS)]
        for one in rounds:
            one.terminate()
        for one in rounds:
            one.check()
