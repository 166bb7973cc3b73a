"""The service's side of the shared-memory data plane: registered client arenas, bounds-checked views.

Owns the promise that a request naming an arena can only touch bytes inside that arena, only for the tenant
that registered it, and only after the service proved it maps the very segment the client wrote (the nonce
at offset 0). Segments are attached without ownership (memory_service.shm.attach).
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from memory_service.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from memory_service.shm import NONCE_BYTES, attach


@dataclass
class _Registered:
    tenant: str
    segment: shared_memory.SharedMemory
    size: int


class ArenaRegistry:
    def __init__(self, max_arenas: int = 256) -> None:
        self._arenas: dict[str, _Registered] = {}
        self._lock = threading.Lock()
        self.max_arenas = max_arenas

    def register(self, tenant: str, shm_name: str, size: int, nonce: bytes) -> str:
        if not shm_name or "/" in shm_name.lstrip("/"):
            raise InvalidArgument(f"shm_name {shm_name!r} is not a shared-memory segment name")
        if len(nonce) != NONCE_BYTES:
            raise InvalidArgument(f"arena nonce has {len(nonce)} bytes, expected {NONCE_BYTES}")
        seg = attach(shm_name)
        if seg.size < size or bytes(seg.buf[:NONCE_BYTES]) != nonce:
            seg.close()
            raise FailedPrecondition(
                f"shared-memory segment {shm_name!r} seen by the service does not match the client's (size "
                f"{seg.size} vs {size} or nonce differs): client and service are not on the same host; use the "
                "stream data plane"
            )
        with self._lock:
            if len(self._arenas) >= self.max_arenas:
                seg.close()
                raise ResourceExhausted(f"the service holds {self.max_arenas} arenas already; release some first")
            arena_id = secrets.token_hex(8)
            self._arenas[arena_id] = _Registered(tenant, seg, int(size))
        return arena_id

    def view(self, tenant: str, arena_id: str, offset: int, nbytes: int) -> np.ndarray:
        """A writable uint8 view of `nbytes` at `offset` of a registered arena."""
        with self._lock:
            reg = self._arenas.get(arena_id)
        if reg is None or reg.tenant != tenant:
            raise FailedPrecondition(f"arena {arena_id!r} is not registered (released, or the service restarted); "
                                     "register the arena again")
        if offset < NONCE_BYTES or offset + nbytes > reg.size:
            raise InvalidArgument(f"arena range [{offset}, {offset + nbytes}) is outside arena {arena_id!r} "
                                  f"([{NONCE_BYTES}, {reg.size}))")
        return np.frombuffer(reg.segment.buf, np.uint8, count=nbytes, offset=offset)

    def release(self, tenant: str, arena_id: str) -> None:
        with self._lock:
            reg = self._arenas.get(arena_id)
            if reg is None or reg.tenant != tenant:
                raise NotFound(f"arena {arena_id!r} is not registered")
            del self._arenas[arena_id]
        _close(reg.segment)

    def close(self) -> None:
        with self._lock:
            regs, self._arenas = list(self._arenas.values()), {}
        for reg in regs:
            _close(reg.segment)


def _close(seg: shared_memory.SharedMemory) -> None:
    try:
        seg.close()
    except BufferError:  # a request still holds a view; the mapping ends with it
        pass
