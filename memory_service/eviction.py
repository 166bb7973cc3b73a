"""Eviction: from a stream's budget and policy to a committed plan, in three steps.

`plan_for` asks the policy (pure) and the planner (pure) what to degrade and evict; `apply` commits that plan
through the store, in one commit with the put it makes room for (so a put and its evictions commit together);
`mirror` repeats the committed plan in memory (indexes, entry table, counters). Nothing in memory changes
before the commit.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from memory_service.pruning import TTL, Composite, PruneView
from memory_service.pruning.planner import Plan, fp8_bytes, over_budget, plan
from memory_service.store.base import Commit, NewEntries, TensorStore
from memory_service.stream import Stream
from memory_service.types import EntryMeta


def parts(policy) -> tuple:
    return policy.parts if isinstance(policy, Composite) else (policy,)


def plan_for(s: Stream, add_entries: int, add_bytes: int, now: float) -> Plan:
    budget = s.spec.budget
    over_e, over_b = over_budget(budget, len(s.entries) + add_entries, s.payload_bytes + add_bytes)
    ttl = min((p.seconds for p in parts(s.policy) if isinstance(p, TTL)), default=None)
    expiring = ttl is not None and len(s.entries) > 0 and bool(np.any(now - s.columns()[2] >= ttl))
    if not (over_e or over_b or expiring):
        return Plan()
    candidates = [m for m in s.entries.values() if not m.pinned]
    fraction = max([getattr(p, "batch_fraction", 0.0) for p in parts(s.policy)])
    slack = int(fraction * budget.max_entries) if budget.max_entries is not None else 0
    slack_bytes = int(fraction * budget.max_bytes) if budget.max_bytes is not None else 0
    per_entry = max(1.0, s.payload_bytes / max(1, len(s.entries)))
    need = over_e + slack + (math.ceil((over_b + slack_bytes) / per_entry) if over_b else 0)
    vectors = np.stack([s.compact[m.entry_id] for m in candidates]) if s.policy.needs_vectors and candidates else None
    choice = s.policy.choose(PruneView(tuple(candidates), now, need, vectors))
    return plan(s.spec.name, budget, len(s.entries), s.payload_bytes, candidates, add_entries, add_bytes, choice,
                s.spec.degrade, _degraded_bytes(s), slack, slack_bytes)


def _degraded_bytes(s: Stream):
    def after(meta: EntryMeta, step: str) -> int:
        if step == "keys_only" or s.spec.kv is None:
            return 0
        kv = s.spec.kv
        return fp8_bytes(2 * kv.tokens_per_frame * kv.heads * kv.head_dim, 2 * kv.heads * kv.head_dim, kv.layers)

    return after


def commit_for(s: Stream, p: Plan, next_id: int, verify: bool, put: Optional[NewEntries] = None) -> Commit:
    """What commits with a plan (and with the put it makes room for): degrades, evictions, the statistics not yet
    persisted, and the stream record after it."""
    evicted = set(p.evict)
    record = s.record()
    record.update(next_id=next_id, version=s.version + 1, evicted_total=s.evicted_total + len(p.evict),
                  degraded_total=s.degraded_total + len(p.degrade))
    return Commit(record=record, put=put, degrade=tuple((s.entries[eid], step) for eid, step in p.degrade),
                  evict=p.evict, stats=tuple(s.entries[e] for e in s.dirty if e not in evicted and e in s.entries),
                  verify=verify)


def apply(store: TensorStore, s: Stream, p: Plan, next_id: int, verify: bool,
          put: Optional[NewEntries] = None) -> dict[int, EntryMeta]:
    """Commit a plan (with `put`, in the same commit); returns the degraded entries' new metadata. Nothing in memory
    changes here: `mirror` does that after the commit."""
    return store.commit(s.layout, commit_for(s, p, next_id, verify, put))


def mirror(s: Stream, p: Plan, degraded: dict[int, EntryMeta], next_id: int) -> None:
    """After the commit: mirror it in memory."""
    s.entries.update(degraded)
    for eid in (*degraded, *p.evict):
        s.verified.pop(eid, None)  # rewritten or gone: its payload must be verified afresh
    if p.evict:
        victims = np.array(p.evict, np.int64)
        for space in s.space_names:
            s.spaces[space].remove(victims)
        for eid in p.evict:
            s.entries.pop(eid, None)
            s.compact.pop(eid, None)
    s.next_id = next_id
    s.version += 1
    s.evicted_total += len(p.evict)
    s.degraded_total += len(p.degrade)
    s.dirty.clear()
    s.columns_removed(p.evict)
