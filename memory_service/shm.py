"""Shared-memory segments for the same-host data plane (DESIGN.md "Control plane and data plane").

Owns the two halves of an arena:
- `Arena` (client side): a POSIX shared-memory segment the client creates, pre-faults once (first-touch
  page faults make a fresh segment several times slower than a warm one) and reuses for every call. Space
  is handed out as leases: `lease(nbytes)` returns a writable buffer object whose lifetime is the lease, so a
  numpy array built on it (and every view of that array) keeps its bytes reserved, and the bytes go back to
  the arena when the last array over them is garbage-collected. Fetch results are such arrays: zero copy
  to the caller, never overwritten under them.
- `attach(name)` (service side): maps a client's segment without adopting it, so the service never
  unlinks it. Python < 3.13 registers every attached segment with the resource tracker, which would unlink
  the client's segment when the service exits; we unregister it right after attaching.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import secrets
import sys
import threading
import weakref
from multiprocessing import resource_tracker, shared_memory
from typing import Optional

import numpy as np

from memory_service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

ALIGN = 4096
NONCE_BYTES = 16


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Segment(shared_memory.SharedMemory):
    """A SharedMemory whose finalizer tolerates arrays that still view it (they keep the mapping alive)."""

    def __del__(self) -> None:
        try:
            self.close()
        except BufferError:
            pass


_CREATED_HERE: set[str] = set()  # segments this process created (and its resource tracker already knows)


def attach(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without taking ownership (the service side)."""
    try:
        if sys.version_info >= (3, 13):
            return Segment(name=name, track=False)
        seg = Segment(name=name)
    except FileNotFoundError:
        raise FailedPrecondition(
            f"shared-memory segment {name!r} is not visible to the service (another host or /dev/shm "
            "namespace?); expected a segment on the service's host, or use the stream data plane"
        ) from None
    except PermissionError as exc:
        raise FailedPrecondition(f"the service may not map shared-memory segment {name!r} ({exc}); expected a "
                                 "segment the service's user can read and write, or use the stream data plane") from None
    except (OSError, ValueError) as exc:  # a name the OS refuses (EINVAL, too long), an empty segment
        raise InvalidArgument(f"shared-memory segment {name!r} cannot be mapped: {exc}; expected the name of a "
                              "non-empty segment the client created") from None
    if seg._name not in _CREATED_HERE:  # type: ignore[attr-defined]
        # the client owns it: never let this process's resource tracker unlink it at exit
        resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
    return seg


@functools.lru_cache(maxsize=256)
def _region_type(nbytes: int) -> type:
    # A Python subclass of a ctypes array accepts weak references, which is what ties a lease to the
    # lifetime of the arrays built on it (numpy keeps the buffer provider alive as `base`).
    return type(f"Region{nbytes}", (ctypes.c_ubyte * nbytes,), {})


class Arena:
    """A client-owned, pre-faulted shared-memory segment with a first-fit lease allocator."""

    def __init__(self, size: int, prefault: bool = True) -> None:
        if size < ALIGN:
            raise InvalidArgument(f"arena size {size} is below the minimum of {ALIGN} bytes")
        self.size = _align(size)
        try:
            self.segment = Segment(create=True, size=self.size)
        except OSError as exc:
            raise ResourceExhausted(f"cannot create a {self.size}-byte shared-memory arena: {exc}") from None
        self.name = self.segment.name
        _CREATED_HERE.add(self.segment._name)  # type: ignore[attr-defined]
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        buf = np.frombuffer(self.segment.buf, np.uint8)
        if prefault:
            buf.fill(0)  # touch every page once, here, instead of inside the first fetch
        buf[:NONCE_BYTES] = np.frombuffer(self.nonce, np.uint8)
        self._base = buf.__array_interface__["data"][0]
        del buf
        self._lock = threading.RLock()
        self._free: list[tuple[int, int]] = [(ALIGN, self.size - ALIGN)]  # (offset, size), sorted; page 0 = nonce
        self.live = 0
        self._closed = False

    def __len__(self) -> int:
        return self.size

    def lease(self, nbytes: int) -> Optional[tuple[int, object]]:
        """(offset, buffer) of `nbytes` reserved bytes, or None when no free run is large enough."""
        want = _align(max(1, nbytes))
        with self._lock:
            for i, (off, size) in enumerate(self._free):
                if size >= want:
                    if size == want:
                        del self._free[i]
                    else:
                        self._free[i] = (off + want, size - want)
                    region = _region_type(nbytes).from_buffer(self.segment.buf, off)
                    weakref.finalize(region, self._release, off, want)
                    self.live += 1
                    return off, region
        return None

    def _release(self, off: int, size: int) -> None:
        with self._lock:
            self.live -= 1
            i = bisect.bisect(self._free, (off, size))
            self._free.insert(i, (off, size))
            # merge with the right and then the left neighbour
            if i + 1 < len(self._free) and off + size == self._free[i + 1][0]:
                self._free[i] = (off, size + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
                self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
                del self._free[i]

    def contains(self, arr: np.ndarray) -> Optional[int]:
        """The arena offset of `arr` when its bytes lie inside this arena (C-contiguous), else None."""
        if not arr.flags.c_contiguous:
            return None
        start = arr.__array_interface__["data"][0]
        if self._base <= start and start + arr.nbytes <= self._base + self.size:
            return start - self._base
        return None

    def close(self) -> None:
        """Unlink the segment; unmap it now unless leases still hold arrays over it (then at their end)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.segment.unlink()
        except FileNotFoundError:
            pass
        try:
            self.segment.close()
        except BufferError:
            pass  # live arrays still view it; the mapping goes away with them

