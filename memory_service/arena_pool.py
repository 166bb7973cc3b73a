"""ArenaPool: one MemoryClient's shared-memory arenas and their registrations at the service, for many threads.

Owns the client half of the shared-memory data plane's bookkeeping (the segments themselves are shm.Arena).
Promises:
- `lease(nbytes)` hands out reserved bytes of an arena; a new arena is made only when no arena has room, and
  arenas nobody leases are let go then. At most `max_arenas` arenas exist at once (ResourceExhausted past that,
  saying why), so neither live results nor failing calls can make segments pile up;
- registration at the service is lazy and repeatable: an arena gets its id when a call first needs one
  (`arena_id`). When the service says an id is unknown (errors.ArenaNotRegistered: it restarted), `lost(id)`
  forgets that id and every id registered before it, and the same segments are registered again on their next
  use. A lease, the arrays over it and the thread using it survive a restart untouched: no arena is ever
  closed while a lease or a call holds it. A registration that fails (the service is down) costs no segment:
  the arena stays here, unregistered, for the next try;
- one lock guards the arenas and their ids, and registration runs under it, so two threads that find their
  arena lost register it once between them.
Sealed memfd arenas are made until the service shows it cannot open them (another PID namespace); then POSIX
segments (shm.Arena's two kinds).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from memory_service.errors import FailedPrecondition, MemFlowError, ResourceExhausted
from memory_service.shm import ALIGN, MEMFD_PREFIX, Arena

log = logging.getLogger("memflow.client")


@dataclass(frozen=True)
class ArenaUsage:
    """What a client holds in shared memory right now."""

    arenas: int  # segments
    bytes: int  # their total size
    leased: int  # live leases: fetch results, arena_array buffers and calls in flight over arena bytes
    registered: int  # arenas the service holds an id for, as far as this client knows


class _Slot:
    __slots__ = ("arena", "arena_id", "seq")

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.arena_id: Optional[str] = None
        self.seq = 0  # order of its registration among this pool's registrations


class ArenaPool:
    def __init__(self, register: Callable[[Arena], str], release: Callable[[str], None], min_bytes: int,
                 max_arenas: int = 16) -> None:
        """`register(arena) -> arena id` and `release(arena id)` are the service calls; `min_bytes` is the size of
        an arena unless a lease needs more."""
        if max_arenas < 1:
            raise ValueError(f"max_arenas is {max_arenas}, expected at least 1")
        self._register = register
        self._release = release
        self.min_bytes = int(min_bytes)
        self.max_arenas = int(max_arenas)
        self._slots: list[_Slot] = []
        self._lock = threading.RLock()
        self._seq = 0
        self._sealed = True  # sealed memfds until the service shows it cannot open them
        self._closed = False

    # -- arenas -------------------------------------------------------------------------------------
    def open(self) -> None:
        """Make and register the first arena now: raises what the service says when it cannot use shared memory."""
        with self._lock:
            while True:
                slot = self._add(self.min_bytes)
                try:
                    self._ensure_registered(slot)
                    return
                except BaseException as exc:
                    self._slots.remove(slot)
                    slot.arena.close()
                    if not (isinstance(exc, FailedPrecondition) and self._sealed
                            and slot.arena.name.startswith(MEMFD_PREFIX)):
                        raise
                # The service cannot open this process's memfds (another PID namespace): a POSIX segment may
                # still be visible to it (a shared /dev/shm); it moves such bytes with pread/pwrite, not memcpy.
                self._sealed = False

    def lease(self, nbytes: int) -> tuple[_Slot, int, object]:
        """(slot, offset, buffer) of `nbytes` reserved bytes; the bytes stay reserved while the buffer lives."""
        with self._lock:
            self._check_open()
            for slot in reversed(self._slots):  # the newest arena is the largest
                got = slot.arena.lease(nbytes)
                if got is not None:
                    return slot, got[0], got[1]
            slot = self._add(max(self.min_bytes, 1 << (nbytes + 2 * ALIGN - 1).bit_length()))
            got = slot.arena.lease(nbytes)
            assert got is not None, "a fresh arena sized for the lease has room for it"
            return slot, got[0], got[1]

    def locate(self, arrays: Sequence[np.ndarray]) -> Optional[tuple[_Slot, int]]:
        """(slot, offset) when the arrays lie back to back in one arena (they keep its lease alive), else None."""
        with self._lock:
            for slot in self._slots:
                first = slot.arena.contains(arrays[0])
                if first is None:
                    continue
                pos = first
                for a in arrays:
                    if slot.arena.contains(a) != pos:
                        return None
                    pos += a.nbytes
                return slot, first
        return None

    def arena_id(self, slot: _Slot) -> str:
        """The service's id of the slot's arena, registering it (again) first when it has none."""
        with self._lock:
            self._check_open()
            return self._ensure_registered(slot)

    def lost(self, arena_id: Optional[str]) -> None:
        """The service does not know `arena_id`: it lost every registration up to that one (a restart)."""
        if arena_id is None:
            return
        with self._lock:
            gone = next((s for s in self._slots if s.arena_id == arena_id), None)
            if gone is None:  # another thread saw it first and registered again; or the arena is let go
                return
            log.info("memflow: the service lost arena %s (restart?); registering the same segments again", arena_id)
            for s in self._slots:
                if s.arena_id is not None and s.seq <= gone.seq:
                    s.arena_id = None

    def usage(self) -> ArenaUsage:
        with self._lock:
            return ArenaUsage(arenas=len(self._slots), bytes=sum(s.arena.size for s in self._slots),
                              leased=sum(s.arena.live for s in self._slots),
                              registered=sum(s.arena_id is not None for s in self._slots))

    def close(self) -> None:
        """Release every arena at the service (best effort: it may be gone) and unlink the segments; leases still
        alive keep their mappings until their arrays go."""
        with self._lock:
            slots, self._slots, self._closed = self._slots, [], True
        for slot in slots:
            self._let_go(slot)

    # -- inside the lock ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the MemoryClient is closed; expected calls only before close()")

    def _add(self, size: int) -> _Slot:
        idle = [s for s in self._slots if s.arena.live == 0]
        for slot in idle:  # nobody leases them (no thread is inside a lease: that holds this lock): let them go
            self._slots.remove(slot)
            self._let_go(slot)
        if len(self._slots) >= self.max_arenas:
            held = sum(s.arena.size for s in self._slots)
            raise ResourceExhausted(
                f"all {len(self._slots)} shared-memory arenas of this client ({held} bytes) are leased by live "
                f"fetch results or arena_array buffers, and a lease of {size} bytes needs another; expected at most "
                f"max_arenas={self.max_arenas}: let some results go, or open the client with a larger arena_bytes")
        slot = _Slot(Arena(size, sealed=self._sealed))
        self._slots.append(slot)
        return slot

    def _ensure_registered(self, slot: _Slot) -> str:
        if slot.arena_id is not None:
            return slot.arena_id
        arena_id = self._register(slot.arena)
        self._seq += 1
        slot.arena_id, slot.seq = arena_id, self._seq
        return arena_id

    def _let_go(self, slot: _Slot) -> None:
        if slot.arena_id is not None:
            try:
                self._release(slot.arena_id)
            except MemFlowError:
                pass  # the service may be gone; the segment is ours to unlink either way
        slot.arena.close()
