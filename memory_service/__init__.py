"""MemFlow memory service: a durable, prunable memory bank of video-frame KV for streaming generators.

The public surface (DESIGN.md): `LocalMemory` (in-process) and `MemoryClient` (gRPC) implement one
protocol, `Memory` (protocol.py); the values below cross it. This package never imports torch.
"""

from memory_service.errors import (
    AlreadyExists, DataLoss, DeadlineExceeded, FailedPrecondition, InvalidArgument, MemFlowError, NotFound,
    PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable,
)
from memory_service.local import LocalMemory
from memory_service.protocol import Memory
from memory_service.types import (
    BankStats, Budget, EntryMeta, FetchResult, KeySpace, KVLayout, NewEntry, PruneResult, QueryFetchResult,
    QueryResult, QueryTrace, StreamSpec, StreamStats,
)

__all__ = [
    "AlreadyExists", "BankStats", "Budget", "DataLoss", "DeadlineExceeded", "EntryMeta", "FailedPrecondition",
    "FetchResult", "InvalidArgument", "KVLayout", "KeySpace", "LocalMemory", "MemFlowError", "Memory", "MemoryClient",
    "NewEntry", "NotFound",
    "PermissionDenied", "PruneResult", "QueryFetchResult", "QueryResult", "QueryTrace", "ResourceExhausted",
    "StreamSpec", "StreamStats", "Unauthenticated", "Unavailable",
]


def __getattr__(name: str):
    if name == "MemoryClient":  # the gRPC client loads protobuf code only when asked for
        from memory_service.client import MemoryClient

        return MemoryClient
    raise AttributeError(f"module 'memory_service' has no attribute {name!r}")
