"""Copies: a gather of many byte pieces into one flat buffer, split between threads when it is big.

Owns one measurement-backed rule (issue 15, item 5). A fetch over the shared-memory plane ends in one copy per
stored record, from LMDB's file-backed memory map into the client's arena. One thread copies out of that map at
about half the speed of a copy between anonymous arrays (7 against 12.6 GB/s for 862 MB, a Wan2.1 fetch of 3
frames x 30 layers, on the 2-core machine of the benchmarks: it is bound by the 4 KiB pages it walks, not by the
memory bus), and two threads copy it at 13.4 GB/s. numpy releases the GIL for the copy, so the caller copies
one share and pool threads the others. Small gathers stay on the caller: a hand-off costs tens of microseconds.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Iterator, Optional, Sequence

import numpy as np

# Gathers of at least this many bytes are split. Below it the copy runs from the CPU's caches and a second thread
# only adds its hand-off: out of LMDB's map into a memfd, 2 threads against 1, 5.75 MB 0.47 vs 0.41 ms, 11.5 MB
# 1.08 vs 0.81, 28.8 MB 2.17 vs 2.02; above it, 57.5 MB 5.10 vs 6.15 ms, 86 MB 8.2-10.0 vs 11.2-11.5, 862 MB 64 vs
# 121 ms.
PARALLEL_MIN_BYTES = 32 << 20
# Threads a gather is split between, the caller included. Past 2 the copy measured no faster on 2 cores (86 MB:
# 8.2 ms with 2, 8.1 with 3, 8.6 with 4), and a node serving several generators runs their fetches side by side.
COPIERS = max(1, min(2, os.cpu_count() or 1))

_pool: Optional[ThreadPoolExecutor] = None
_lock = threading.Lock()
_held = threading.local()  # this thread's `batched` pieces, or None


def _copiers() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, COPIERS - 1), thread_name_prefix="memflow-copy")
        return _pool


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


@contextlib.contextmanager
def batched() -> Iterator[None]:
    """Gathers made in this thread inside the block are held and done as one at its end, so that a read of many
    small parts (a QueryFetch's groups; cluster mode reads an entry at a time) is split as its total says. Every
    buffer a held piece views must outlive the block (open the read transaction outside it). A block left by an
    exception copies nothing; an inner block joins the outer one."""
    if getattr(_held, "pieces", None) is not None:
        yield
        return
    _held.pieces = []
    try:
        yield
        pieces = _held.pieces
    finally:
        _held.pieces = None
    _gather(pieces, COPIERS)


def gather(out: np.ndarray, pieces: Sequence[tuple[int, Any]], copiers: Optional[int] = None) -> None:
    """Copy each `(offset, piece)` (a bytes-like object) into the flat uint8 array `out` at `offset`. A gather of
    PARALLEL_MIN_BYTES or more is cut into `copiers` (default COPIERS) runs of about equal bytes, a piece cut where
    a run ends, and the runs are copied at the same time; returns once every byte is in place (inside `batched`:
    at the block's end)."""
    held = getattr(_held, "pieces", None)
    if held is not None and copiers is None:
        held.extend((out, offset, piece) for offset, piece in pieces)
        return
    _gather([(out, offset, piece) for offset, piece in pieces], COPIERS if copiers is None else max(1, int(copiers)))


def _gather(pieces: Sequence[tuple[np.ndarray, int, Any]], threads: int) -> None:
    total = sum(len(memoryview(p).cast("B")) for _, _, p in pieces) if threads > 1 else 0
    if threads == 1 or total < PARALLEL_MIN_BYTES:
        for out, offset, p in pieces:  # slice assignment: ~0.3 us a piece against ~1.5 for np.copyto's call
            view = memoryview(p).cast("B")
            out.data.cast("B")[offset:offset + len(view)] = view
        return
    runs: list[list[tuple[np.ndarray, int, memoryview]]] = [[] for _ in range(threads)]
    share, run, room = -(-total // threads), 0, -(-total // threads)
    for out, offset, piece in pieces:
        view = memoryview(piece).cast("B")
        while len(view):
            take = min(len(view), room)
            runs[run].append((out, offset, view[:take]))
            offset, view, room = offset + take, view[take:], room - take
            if room == 0 and run < threads - 1:
                run, room = run + 1, share
    pending = [_copiers().submit(_copy, r) for r in runs[1:] if r]
    try:
        _copy(runs[0])
    finally:
        wait(pending)  # every run done before the caller's buffers (a read transaction's map) may go
    for f in pending:
        f.result()  # the first run that failed raises its error


def _copy(run: Sequence[tuple[np.ndarray, int, memoryview]]) -> None:
    for out, offset, view in run:
        n = len(view)
        if n:
            np.copyto(out[offset:offset + n], np.frombuffer(view, np.uint8))
