"""LocalMemory: the public memory protocol over an in-process MemoryBank.

Owns nothing but the delegation: `LocalMemory` and `MemoryClient` (gRPC) implement one protocol
(protocol.Memory: the same methods with the same arguments, results and exceptions), and one congruence test
suite runs against both.
"""

from __future__ import annotations

from typing import Any, Optional, overload, Sequence, Union

from memory_service.bank import MemoryBank
from memory_service.config import BankConfig
from memory_service.protocol import Ids, Memory, Resident, Vectors
from memory_service.types import (
    BankStats, EntryMeta, FetchResult, NewEntry, PruneResult, QueryFetchResult, QueryResult, StreamSpec, StreamStats,
)


class LocalMemory(Memory):
    """An in-process memory bank in `data_dir` (created if missing). Use as a context manager.

    It is the directory's one writer while open: a second writer (a `memflow-service serve`, another
    LocalMemory, in this process or another) raises Unavailable naming the holder's PID. `read_only=True`
    opens beside a running writer instead: no lock, nothing written, and every mutating call raises
    PermissionDenied.
    """

    def __init__(self, data_dir: str, config: Optional[BankConfig] = None, *, read_only: bool = False,
                 **bank_kwargs: Any) -> None:
        self.bank = MemoryBank(data_dir, config, read_only=read_only, **bank_kwargs)

    def __enter__(self) -> "LocalMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.bank.close()

    def create_stream(self, spec: StreamSpec) -> None:
        self.bank.create_stream(spec)

    def drop_stream(self, name: str) -> None:
        self.bank.drop_stream(name)

    def list_streams(self) -> list[StreamSpec]:
        return self.bank.list_streams()

    def put(self, stream: str, entries: Sequence[NewEntry]) -> list[int]:
        return self.bank.put(stream, entries)

    def query(self, stream: str, space: str, vectors: Vectors, k: int, *, combine: str = "per_layer",
              exclude_frames: Optional[tuple[int, int]] = None, pinned_only: bool = False,
              time_range: Optional[tuple[float, float]] = None, timeout: Optional[float] = None) -> QueryResult:
        # `timeout`: an in-process call has nothing to wait on (protocol.py)
        return self.bank.query(stream, space, vectors, k, combine=combine, exclude_frames=exclude_frames,
                               pinned_only=pinned_only, time_range=time_range)

    def fetch(self, stream: str, ids: Ids, layers: Optional[Sequence[int]] = None, *,
              timeout: Optional[float] = None) -> FetchResult:
        return self.bank.fetch(stream, ids, layers)

    def query_fetch(self, stream: str, space: str, vectors: Vectors, k: int, *, fetch_k: Optional[int] = None,
                    include: Ids = (), resident: Resident = (), layers: Optional[Sequence[int]] = None,
                    combine: str = "per_layer", exclude_frames: Optional[tuple[int, int]] = None,
                    pinned_only: bool = False, time_range: Optional[tuple[float, float]] = None,
                    timeout: Optional[float] = None) -> QueryFetchResult:
        return self.bank.query_fetch(stream, space, vectors, k, fetch_k=fetch_k, include=include, resident=resident,
                                     layers=layers, combine=combine, exclude_frames=exclude_frames,
                                     pinned_only=pinned_only, time_range=time_range)

    def delete(self, stream: str, ids: Ids) -> int:
        return self.bank.delete(stream, ids)

    def pin(self, stream: str, ids: Ids, pinned: bool = True) -> None:
        self.bank.pin(stream, ids, pinned)

    def prune(self, stream: str) -> PruneResult:
        return self.bank.prune(stream)

    @overload
    def stats(self, stream: None = None) -> BankStats: ...

    @overload
    def stats(self, stream: str) -> StreamStats: ...

    def stats(self, stream: Optional[str] = None) -> Union[StreamStats, BankStats]:
        return self.bank.stats(stream)

    def entries(self, stream: str) -> list[EntryMeta]:
        return self.bank.entries(stream)
