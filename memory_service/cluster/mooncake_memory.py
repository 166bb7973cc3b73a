"""Memory the Mooncake transfer engine may move bytes from or into, for one client (cluster/mooncake.py).

Owns the client's registrations: buffers registered for good (the caller's arenas: kept alive here until
unregistered) and spans registered only for one put or read in flight. Promises:
- `covers(addr, n)` says whether a range lies inside one buffer registered for good;
- `for_call(parts)` registers, for the duration of its block, the spans of `parts` that nothing registered for good
  covers; adjacent or overlapping parts (the layers of one entry in a fetch buffer) become one span, so a fetch
  registers a few spans, not one per layer, and a span that another call holds is shared (counted), never
  registered twice. Over TCP it registers nothing unless told to: the transport sends from and receives into any
  local address, and each registration publishes the segment's descriptor to the metadata server (an HTTP round
  trip, and a failure while the master is down, measured); RDMA needs it, so the NIC may read or write there (and
  it pins pages: long-lived buffers are better registered once);
- `close` unregisters everything registered for good. Thread-safe.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np

from memory_service.errors import InvalidArgument, Unavailable


def flat(view: memoryview | np.ndarray | bytes | bytearray) -> np.ndarray:
    """A flat uint8 numpy view of a C-contiguous buffer (any dtype, bfloat16 included), never a copy."""
    if isinstance(view, np.ndarray):
        if not view.flags.c_contiguous:
            raise InvalidArgument(f"a non-contiguous array {view.shape}; expected C-contiguous")
        return view.reshape(-1).view(np.uint8)
    mv = memoryview(view)
    if not mv.c_contiguous:
        raise InvalidArgument(f"a non-contiguous memoryview {mv.shape}; expected C-contiguous")
    return np.frombuffer(mv, dtype=np.uint8) if mv.nbytes else np.empty(0, np.uint8)


class Registrations:
    """One client's registered memory; see the module doc. `store` is its MooncakeDistributedStore."""

    def __init__(self, store, register_calls: bool) -> None:
        self._store = store
        self.register_calls = register_calls
        self._lock = threading.Lock()
        self._kept: list[tuple[int, int, np.ndarray]] = []  # (address, size, the array kept alive)
        self._transient: dict[tuple[int, int], int] = {}  # [start, end) registered for calls -> how many hold it

    def register(self, buffer: memoryview | np.ndarray) -> None:
        arr = flat(buffer)
        addr = arr.ctypes.data
        rc = self._store.register_buffer(addr, arr.nbytes)
        if rc != 0:
            raise Unavailable(f"Mooncake refused to register {arr.nbytes} bytes at {addr:#x} ({rc})")
        with self._lock:
            self._kept.append((addr, arr.nbytes, arr))

    def unregister(self, buffer: memoryview | np.ndarray) -> None:
        addr = flat(buffer).ctypes.data
        with self._lock:
            self._kept = [r for r in self._kept if r[0] != addr]
        self._store.unregister_buffer(addr)

    def covers(self, addr: int, n: int) -> bool:
        with self._lock:
            return any(a <= addr and addr + n <= a + size for a, size, _ in self._kept)

    def in_flight(self) -> int:
        """Spans registered for calls now in flight (0 between calls)."""
        with self._lock:
            return len(self._transient)

    @contextlib.contextmanager
    def for_call(self, parts: list[np.ndarray]) -> Iterator[None]:
        if not self.register_calls:
            yield
            return
        spans: list[list[int]] = []  # [start, end), merged
        for addr, n in sorted((f.ctypes.data, f.nbytes) for f in parts):
            if self.covers(addr, n):
                continue
            if spans and addr <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], addr + n)
            else:
                spans.append([addr, addr + n])
        held: list[tuple[int, int]] = []
        try:
            for start, end in spans:
                with self._lock:
                    count = self._transient.get((start, end), 0)
                    if count == 0:
                        rc = self._store.register_buffer(start, end - start)
                        if rc != 0:
                            raise Unavailable(f"Mooncake refused to register {end - start} bytes at {start:#x} ({rc})")
                    self._transient[(start, end)] = count + 1
                held.append((start, end))
            yield
        finally:
            for span in held:
                with self._lock:
                    self._transient[span] -= 1
                    if self._transient[span] == 0:
                        del self._transient[span]
                        self._store.unregister_buffer(span[0])

    def close(self) -> None:
        with self._lock:
            kept, self._kept = self._kept, []
        for addr, _, _ in kept:
            with contextlib.suppress(Exception):  # noqa: BLE001 - closing anyway
                self._store.unregister_buffer(addr)
