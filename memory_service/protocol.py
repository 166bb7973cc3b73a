"""Memory: the public memory protocol, declared once.

Owns the one signature of the public surface (DESIGN.md): `LocalMemory` (in-process, local.py) and
`MemoryClient` (gRPC, client.py) both subclass it, so a type checker holds each to it, and
tests/service/test_congruence.py checks at run time that their signatures are this one. The plugin types its
`memory` with it. Promises, for every implementation: the same arguments and defaults, the same results
(the frozen dataclasses of types.py) and the same MemFlowError classes with the same messages; `put` is
all-or-nothing per call, and a failed call leaves the bank as it was.

`timeout` (query, fetch) is the caller's deadline in seconds for that one call (None: the implementation's
default). MemoryClient sends it as the call's gRPC deadline; LocalMemory runs in the caller's thread with
nothing to wait on, and accepts it so that code written against the protocol runs on either.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union, overload, runtime_checkable

import numpy as np
import numpy.typing as npt

from memory_service.types import (
    BankStats, EntryMeta, FetchResult, NewEntry, PruneResult, QueryFetchResult, QueryResult, StreamSpec, StreamStats,
)

Ids = Union[Sequence[int], np.ndarray]
"""Entry ids: a 1-d sequence of ints (or an integer array)."""

Vectors = npt.ArrayLike
"""Query vectors: `[dim]`, or `[layers, dim]` for a per-layer key space (float32 on the wire)."""

Resident = Union[Ids, Sequence[Ids]]
"""What a caller holds (query_fetch): entry ids held in every fetched layer, or one id list per fetched layer."""

METHODS = ("create_stream", "drop_stream", "list_streams", "put", "query", "fetch", "query_fetch", "delete", "pin",
           "prune", "stats", "entries", "close")
"""The protocol's calls besides the context manager (the congruence test compares their signatures)."""


@runtime_checkable
class Memory(Protocol):
    """A memory bank of streams: the calls `LocalMemory` and `MemoryClient` share. Use as a context manager."""

    def __enter__(self) -> Memory: ...

    def __exit__(self, *exc: object) -> None: ...

    def close(self) -> None:
        """Release what the implementation holds (the bank's files, the channel); later calls fail."""
        ...

    # -- streams ------------------------------------------------------------------------------------
    def create_stream(self, spec: StreamSpec) -> None:
        """Create a stream (AlreadyExists when the name is taken)."""
        ...

    def drop_stream(self, name: str) -> None:
        """Drop a stream and everything in it (NotFound when there is none)."""
        ...

    def list_streams(self) -> list[StreamSpec]:
        """The specs of every stream the caller owns."""
        ...

    # -- entries ------------------------------------------------------------------------------------
    def put(self, stream: str, entries: Sequence[NewEntry]) -> list[int]:
        """Store 1 to max_batch entries in one write; returns their ids (all-or-nothing)."""
        ...

    def query(self, stream: str, space: str, vectors: Vectors, k: int, *, combine: str = "per_layer",
              exclude_frames: Optional[tuple[int, int]] = None, pinned_only: bool = False,
              time_range: Optional[tuple[float, float]] = None, timeout: Optional[float] = None) -> QueryResult:
        """The top `k` entries of `space` for `vectors`, per layer or combined (`combine="mean"`)."""
        ...

    def fetch(self, stream: str, ids: Ids, layers: Optional[Sequence[int]] = None, *,
              timeout: Optional[float] = None) -> FetchResult:
        """K/V of `ids` (in that order) for `layers` (None: all of them)."""
        ...

    def query_fetch(self, stream: str, space: str, vectors: Vectors, k: int, *, fetch_k: Optional[int] = None,
                    include: Ids = (), resident: Resident = (), layers: Optional[Sequence[int]] = None,
                    combine: str = "per_layer", exclude_frames: Optional[tuple[int, int]] = None,
                    pinned_only: bool = False, time_range: Optional[tuple[float, float]] = None,
                    timeout: Optional[float] = None) -> QueryFetchResult:
        """`query`, and the K/V of its hits the caller does not hold, in one round trip (one RPC for MemoryClient,
        on its data plane). Per fetched layer (`layers`, None: all): `include` (fetched whatever the ranking), then
        the first `fetch_k` (None: k) other hits of that layer's row, minus `resident`; grouped by layer set
        (memory_service/query_fetch.py states the rule). The same as `query` then `fetch` of those pairs."""
        ...

    def delete(self, stream: str, ids: Ids) -> int:
        """Delete `ids` (all of them or, when one is missing, none); returns how many distinct ids went."""
        ...

    def pin(self, stream: str, ids: Ids, pinned: bool = True) -> None:
        """Pin (or unpin) entries: a pinned entry is never evicted."""
        ...

    def prune(self, stream: str) -> PruneResult:
        """Apply the stream's budget and policy now."""
        ...

    @overload
    def stats(self, stream: None = None) -> BankStats: ...

    @overload
    def stats(self, stream: str) -> StreamStats: ...

    def stats(self, stream: Optional[str] = None) -> Union[StreamStats, BankStats]:
        """One stream's StreamStats, or (None) the BankStats of every stream the caller owns."""
        ...

    def entries(self, stream: str) -> list[EntryMeta]:
        """The metadata of every entry of a stream, by entry id."""
        ...
