"""Buffers: big uint8 buffers reused once nothing refers to them, instead of fresh ones the kernel must fault in.

Owns one rule, used by both halves of the streaming plane: MemoryClient gathers an answer's K/V into one
(stream_plane.py), and the service gathers a Put's (service/servicer.py). A fresh allocation of N bytes costs a
page fault and a zeroed page per 4 KiB on first write - about 40% of the client's CPU for a 287.5 MB frame fetch
(perf: clear_page_erms under the gather's memmove), and ~25% of the service's time in a 64-entry stream-plane put
of 35 MB (py-spy: the gather's copy into np.empty). A buffer is handed out again only when nothing but the
recycler refers to it: every array made from it is a numpy view whose base is the buffer, and every view (or
memoryview, or tensor made from one) holds a reference to it, so its reference count says whether any is alive.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

# Answers at least this big are gathered into recycled buffers; smaller ones come from malloc's own free lists,
# which already reuse warm memory.
RECYCLE_MIN_BYTES = 1 << 20
# At most this many buffers are remembered (the most recently used): one for the answer the caller is using now,
# one for the next (a prefetch overlapping it). The most held beyond what the caller holds is these buffers.
RECYCLE_SLOTS = 2


class Buffers:
    """Buffers of `min_bytes` to `max_bytes`, reused once every array over them is gone (thread-safe).

    A buffer is free when nothing but this recycler refers to it: every array a result hands out is a numpy view
    whose base is the buffer, and every view (or memoryview, or tensor made from one) holds a reference to it, so
    its reference count says whether any is alive. A buffer still referred to is never handed out again.
    """

    def __init__(self, slots: int = RECYCLE_SLOTS, min_bytes: int = RECYCLE_MIN_BYTES,
                 max_bytes: int = 1 << 62) -> None:
        self.slots, self.min_bytes, self.max_bytes = int(slots), int(min_bytes), int(max_bytes)
        self._held: list[np.ndarray] = []  # most recently handed out last
        self._lock = threading.Lock()
        # what _refs says of a buffer only the list holds, measured through the same code (interpreters differ
        # in how many references a call's argument adds)
        self._alone = _refs([np.empty(0, np.uint8)], 0)

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of exactly `nbytes` that no one else refers to: a free remembered one, else a new one."""
        if not self.min_bytes <= nbytes <= self.max_bytes or not self.slots:
            return np.empty(nbytes, np.uint8)
        with self._lock:
            held = self._held
            free = [i for i in range(len(held)) if held[i].nbytes == nbytes and _refs(held, i) == self._alone]
            if free:
                buf = held.pop(free[-1])
            else:
                buf = np.empty(nbytes, np.uint8)
                if len(held) >= self.slots:
                    del held[0]  # forgotten, not freed: a caller may still hold it
            held.append(buf)
            return buf

    def clear(self) -> None:
        """Forget every buffer (the memory goes once the caller's arrays over it do)."""
        with self._lock:
            self._held.clear()


def _refs(held: list, i: int) -> int:
    return sys.getrefcount(held[i])
