"""Tensor stores: the `TensorStore` protocol (base.py) and its LMDB implementation (lmdb_store.py).

Only this package knows how a bank is laid out on disk; everything above it speaks `TensorStore`'s verbs.
"""

from memory_service.store.base import (
    Commit, Contents, NewEntries, StoredStream, StoreView, StreamLayout, TensorStore,
)
from memory_service.store.lmdb_store import LMDBStore, LMDBView

__all__ = ["Commit", "Contents", "LMDBStore", "LMDBView", "NewEntries", "StoreView", "StoredStream",
           "StreamLayout", "TensorStore"]
