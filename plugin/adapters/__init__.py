"""Adapters: one module per generator family's KV-cache layout (base.py holds the protocol)."""

from plugin.adapters.base import CacheLayout, GeneratorAdapter
from plugin.adapters.self_forcing import SelfForcingAdapter, allocate_cache

__all__ = ["CacheLayout", "GeneratorAdapter", "SelfForcingAdapter", "allocate_cache"]
