"""Tensor stores: the `TensorStore` protocol and its LMDB implementation."""

from typing import Protocol

from memory_service.store.lmdb_store import LMDBStore, Reader, Writer


class TensorStore(Protocol):
    """What the bank needs from durable storage: atomic write transactions and zero-copy readers."""

    path: str

    def write(self, fn): ...
    def reader(self): ...
    def map_size(self) -> int: ...
    def disk_bytes(self) -> int: ...
    def close(self) -> None: ...


__all__ = ["LMDBStore", "Reader", "TensorStore", "Writer"]
