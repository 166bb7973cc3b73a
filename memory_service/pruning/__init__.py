"""Pruning policies (pure) and their parser; see policies.py."""

from memory_service.pruning.policies import (
    FIFO, LFU, LRU, POLICIES, TTL, Choice, Composite, Importance, PruneView, PruningPolicy, Redundancy, parse_policy,
)

__all__ = [
    "FIFO", "LFU", "LRU", "POLICIES", "TTL", "Choice", "Composite", "Importance", "PruneView", "PruningPolicy",
    "Redundancy", "parse_policy",
]
