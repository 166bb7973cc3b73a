"""The service's side of the shared-memory data plane: registered client arenas, bounds-checked byte ranges.

Owns the promise that a request naming an arena can only touch bytes inside that arena, only for the tenant
that registered it, and only after the service proved it opened the very segment the client wrote (the nonce
at offset 0). The service never faults on a client's memory (memory_service.shm.ClientSegment): a segment
sealed against shrinking is mapped and copied with memcpy; any other is only read and written through its
descriptor, so a client that shrinks it under a request gets FailedPrecondition, never a SIGBUS that kills the
service. Each tenant holds at most its quota of arenas (count and bytes); the service-wide table is sized so
that tenants within their quotas always fit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from memory_service.errors import ArenaNotRegistered, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from memory_service.shm import NONCE_BYTES, ClientSegment, read_exact, write_all


@dataclass
class _Registered:
    tenant: str
    file: ClientSegment
    size: int


class ArenaRange:
    """`nbytes` at `offset` of one arena, for one request: `view` over a sealed segment's mapping, or (None) a
    descriptor of its own to read and write the bytes through."""

    def __init__(self, view: Optional[np.ndarray], fd: int, arena_id: str, offset: int, nbytes: int) -> None:
        self.view, self.fd, self.arena_id, self.offset, self.nbytes = view, fd, arena_id, offset, nbytes
        self.written = 0

    def _check_size(self) -> None:
        # A clear answer for a segment already shrunk; one shrunk after this check still cannot fault anything
        # (a read comes back short, a write extends the client's file).
        size = os.fstat(self.fd).st_size
        if size < self.offset + self.nbytes:
            raise FailedPrecondition(
                f"arena {self.arena_id!r} is {size} bytes now, smaller than the range asked "
                f"[{self.offset}, {self.offset + self.nbytes}): the client truncated its segment after registering it"
            )

    def read(self) -> np.ndarray:
        """The range as uint8: the mapping itself when sealed (zero copy), else a private copy."""
        if self.view is not None:
            return self.view
        self._check_size()
        return read_exact(self.fd, self.offset, self.nbytes, f"arena {self.arena_id!r}")

    def write(self, chunk: memoryview) -> int:
        """Append `chunk` to what this request wrote so far; refuses to write past the range."""
        if self.written == 0:
            self._check_size()
        if self.written + len(chunk) > self.nbytes:
            raise InvalidArgument(f"fetch wrote {self.written + len(chunk)} bytes into a range of {self.nbytes}")
        write_all(self.fd, self.offset + self.written, chunk, f"arena {self.arena_id!r}")
        self.written += len(chunk)
        return len(chunk)


class ArenaRegistry:
    def __init__(self, max_arenas: int = 256, tenant_arenas: Optional[int] = None,
                 tenant_bytes: Optional[int] = None) -> None:
        """`max_arenas` service-wide; `tenant_arenas` / `tenant_bytes` per named tenant (None: no limit; the
        anonymous tenant "" of a service without auth is bound by `max_arenas` only)."""
        self._arenas: dict[str, _Registered] = {}
        self._lock = threading.Lock()
        self.max_arenas = max_arenas
        self.tenant_arenas = tenant_arenas
        self.tenant_bytes = tenant_bytes

    def register(self, tenant: str, shm_name: str, size: int, nonce: bytes) -> str:
        if not shm_name or "/" in shm_name.lstrip("/"):
            raise InvalidArgument(f"shm_name {shm_name!r} is not a shared-memory segment name")
        if len(nonce) != NONCE_BYTES:
            raise InvalidArgument(f"arena nonce has {len(nonce)} bytes, expected {NONCE_BYTES}")
        if size < NONCE_BYTES:
            raise InvalidArgument(f"arena size {size} is below the {NONCE_BYTES} bytes of its nonce")
        seg = ClientSegment(shm_name)
        try:
            real = seg.size()
            seen = os.pread(seg.fd, NONCE_BYTES, 0) if real >= NONCE_BYTES else b""
        except OSError as exc:
            seg.close()
            raise InvalidArgument(f"shared-memory segment {shm_name!r} cannot be read: {exc}") from None
        if real < size or seen != nonce:
            seg.close()
            raise FailedPrecondition(
                f"shared-memory segment {shm_name!r} seen by the service does not match the client's (size "
                f"{real} vs {size} or nonce differs): client and service are not on the same host; use the "
                "stream data plane"
            )
        if seg.sealed:
            try:
                seg.map(size)
            except (OSError, ValueError, OverflowError) as exc:
                seg.close()
                raise InvalidArgument(f"shared-memory segment {shm_name!r} cannot be mapped: {exc}") from None
        with self._lock:
            try:
                try:
                    self._check_quota(tenant, size)
                except ResourceExhausted:
                    if not self._reap_orphans():
                        raise
                    self._check_quota(tenant, size)
            except ResourceExhausted:
                seg.close()
                raise
            arena_id = secrets.token_hex(8)
            self._arenas[arena_id] = _Registered(tenant, seg, int(size))
        return arena_id

    def _check_quota(self, tenant: str, size: int) -> None:
        """ResourceExhausted when one more arena of `size` bytes would pass a limit (call under the lock to be sure)."""
        if len(self._arenas) >= self.max_arenas:
            raise ResourceExhausted(f"the service holds {self.max_arenas} arenas already (its limit); release some "
                                    "first, or raise max_arenas")
        if not tenant:
            return
        mine = [r.size for r in list(self._arenas.values()) if r.tenant == tenant]
        if self.tenant_arenas is not None and len(mine) >= self.tenant_arenas:
            raise ResourceExhausted(f"tenant {tenant!r} holds {len(mine)} arenas, its quota is {self.tenant_arenas} "
                                    "(quotas.max_arenas); release some first")
        if self.tenant_bytes is not None and sum(mine) + size > self.tenant_bytes:
            raise ResourceExhausted(f"tenant {tenant!r} holds {sum(mine)} bytes of arenas; {size} more would pass its "
                                    f"quota of {self.tenant_bytes} (quotas.max_arena_bytes); release some first")

    def _reap_orphans(self) -> int:
        """Drop arenas whose clients died without releasing them (under the lock; only when a limit is reached,
        so that crashed clients do not use up their tenant's quota for good). Returns how many went."""
        gone = [(arena_id, reg) for arena_id, reg in self._arenas.items() if reg.file.orphaned()]
        for arena_id, reg in gone:
            del self._arenas[arena_id]
            reg.file.close()
        return len(gone)

    @contextlib.contextmanager
    def use(self, tenant: str, arena_id: str, offset: int, nbytes: int) -> Iterator[ArenaRange]:
        """`nbytes` at `offset` of a registered arena, for the length of one request."""
        with self._lock:
            reg = self._arenas.get(arena_id)
            if reg is None or reg.tenant != tenant:
                raise ArenaNotRegistered(f"arena {arena_id!r} is not registered (released, or the service "
                                         "restarted); register the arena again")
            if offset < NONCE_BYTES or offset + nbytes > reg.size:
                raise InvalidArgument(f"arena range [{offset}, {offset + nbytes}) is outside arena {arena_id!r} "
                                      f"([{NONCE_BYTES}, {reg.size}))")
            view = reg.file.view(offset, nbytes)  # keeps the mapping alive past a concurrent release
            # otherwise a descriptor of its own: a release during the request closes the registry's, not this one
            fd = -1 if view is not None else reg.file.dup()
        try:
            yield ArenaRange(view, fd, arena_id, offset, nbytes)
        finally:
            if fd >= 0:
                os.close(fd)

    def release(self, tenant: str, arena_id: str) -> None:
        with self._lock:
            reg = self._arenas.get(arena_id)
            if reg is None or reg.tenant != tenant:
                raise NotFound(f"arena {arena_id!r} is not registered")
            del self._arenas[arena_id]
        reg.file.close()

    def close(self) -> None:
        with self._lock:
            regs, self._arenas = list(self._arenas.values()), {}
        for reg in regs:
            reg.file.close()
