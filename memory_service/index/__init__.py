"""Search structures: `VectorIndex` implementations and the per-key-space wrapper the bank uses."""

from memory_service.index.vector_index import FlatIndex, HNSWIndex, IVFPQIndex, VectorIndex, make_index

__all__ = ["FlatIndex", "HNSWIndex", "IVFPQIndex", "VectorIndex", "make_index"]
