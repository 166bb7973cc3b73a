"""MemFlow plugin: runs inside the generator process; talks to memory only through the public protocol.

`MemFlowPlugin(memory, config, adapter)` with `before_chunk(...)` / `after_chunk(...)` is the only object a
generator touches (hook.py; `MemFlowBatch`, batch.py, fans it out over a batch, one stream per sample);
`plugin.reference_model` is the reference generator. Never imports faiss or lmdb.
"""

from plugin.adapters import CacheLayout, GeneratorAdapter, SelfForcingAdapter, allocate_cache
from plugin.attention import NO_MEMORY, ChunkMemory, cache_attention
from plugin.batch import MemFlowBatch
from plugin.config import MemFlowConfig
from plugin.hook import ChunkReport, MemFlowPlugin, PluginStats, StreamConflict

__all__ = [
    "CacheLayout", "ChunkMemory", "ChunkReport", "GeneratorAdapter", "MemFlowBatch", "MemFlowConfig", "MemFlowPlugin",
    "NO_MEMORY",
    "PluginStats", "SelfForcingAdapter", "StreamConflict", "allocate_cache", "cache_attention",
]
