"""Per-tenant quotas on what a tenant keeps in the bank: streams and stored bytes (arenas: service/arenas.py).

Owns the promise that one tenant past its quota gets RESOURCE_EXHAUSTED and no other tenant notices. Usage is
read from the bank (`MemoryBank.usage`, never a lock a put holds); puts of one tenant that run at the same time
reserve their bytes here first, so together they cannot pass the quota either. The anonymous tenant of a
service without auth (the operator) has no quota: the bank's own limits bind it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Iterator

from memory_service.bank import MemoryBank
from memory_service.config import TenantQuotas
from memory_service.errors import ResourceExhausted
from memory_service.service.auth import SEP


class TenantLedger:
    def __init__(self, bank: MemoryBank, quotas: TenantQuotas) -> None:
        self.bank = bank
        self.quotas = quotas
        self._lock = threading.Lock()
        self._creating: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._reserved: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def creating_stream(self, tenant: str) -> Iterator[None]:
        """Hold while creating one stream of `tenant`: refused past quotas.max_streams (creates of one tenant
        are serialized so that two at once cannot both take the last place)."""
        limit = self.quotas.max_streams
        if not tenant or limit is None:
            yield
            return
        with self._lock:
            gate = self._creating[tenant]
        with gate:
            streams, _ = self.bank.usage(tenant + SEP)
            if streams >= limit:
                raise ResourceExhausted(f"tenant {tenant!r} has {streams} streams, its quota is {limit} "
                                        "(quotas.max_streams); drop some first")
            yield

    @contextlib.contextmanager
    def storing(self, tenant: str, nbytes: int) -> Iterator[None]:
        """Hold while a put of about `nbytes` (payload + keys) of `tenant` runs: refused past
        quotas.max_stored_bytes."""
        limit = self.quotas.max_stored_bytes
        if not tenant or limit is None:
            yield
            return
        with self._lock:
            _, used = self.bank.usage(tenant + SEP)
            pending = self._reserved[tenant]
            if used + pending + nbytes > limit:
                raise ResourceExhausted(
                    f"tenant {tenant!r} stores {used} bytes" + (f" (+{pending} in puts under way)" if pending else "")
                    + f"; this put of {nbytes} more would pass its quota of {limit} (quotas.max_stored_bytes); "
                    "delete or drop something first"
                )
            self._reserved[tenant] += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._reserved[tenant] -= nbytes
                if not self._reserved[tenant]:
                    del self._reserved[tenant]
