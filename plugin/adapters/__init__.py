"""Adapters: one module per generator family's KV-cache layout (base.py holds the protocol).

`plugin.adapters.diffusers_wan` (diffusers' WanTransformer3DModel) is imported by name, not here: it needs the
optional `wan` extra (diffusers).
"""

from plugin.adapters.base import CacheLayout, GeneratorAdapter
from plugin.adapters.self_forcing import SelfForcingAdapter, allocate_cache

__all__ = ["CacheLayout", "GeneratorAdapter", "SelfForcingAdapter", "allocate_cache"]
