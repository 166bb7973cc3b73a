"""Eviction: from a stream's budget and policy to a committed plan, in three steps.

`plan_for` asks the policy (pure) and the planner (pure) what to degrade and evict; `apply` writes that plan
inside the caller's LMDB write transaction (so a put and its evictions commit together); `mirror` repeats
the committed plan in memory (indexes, entry table, counters). Nothing in memory changes before the commit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from memory_service.pruning import TTL, Composite, PruneView
from memory_service.pruning.planner import Plan, fp8_bytes, over_budget, plan
from memory_service.store.codec import Header, body_bytes, decode_into, encode
from memory_service.store.lmdb_store import Writer, dumps, entry_key, payload_key
from memory_service.stream import Stream, meta_json, stats_json
from memory_service.types import EntryMeta, kv_numpy_dtype


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

def apply(w: Writer, s: Stream, p: Plan, next_id: int, verify: bool) -> dict[int, EntryMeta]:
    """Inside a write txn: degrade, evict, persist dirty statistics and the stream record."""
    degraded: dict[int, EntryMeta] = {}
    for eid, step in p.degrade:
        meta = s.entries[eid]
        layers = s.spec.kv.layers if s.spec.kv else 0
        if step == "keys_only":
            for layer in range(layers):
                w.delete("phead", payload_key(s.sid, eid, layer))
                w.delete("pbody", payload_key(s.sid, eid, layer))
            degraded[eid] = dataclasses.replace(meta, nbytes=0, codec="none")
        else:
            out = np.empty(s.spec.kv.layer_shape, kv_numpy_dtype(s.spec.kv.dtype))
            total = 0
            for layer in range(layers):
                key = payload_key(s.sid, eid, layer)
                decode_into(Header.unpack(bytes(w.get("phead", key))), bytes(w.get("pbody", key)), out,
                            verify, f"entry {eid} layer {layer}")
                header, body = encode(out, s.spec.kv.dtype, "fp8")
                w.put_payload(s.sid, eid, layer, header, body)
                total += body_bytes(header)
            degraded[eid] = dataclasses.replace(meta, nbytes=total, codec="fp8")
        w.put("entries", entry_key(s.sid, eid), dumps(meta_json(degraded[eid])))
    for eid in p.evict:
        w.delete_entry(s.sid, eid, len(s.space_names), s.spec.kv.layers if s.spec.kv else 0)
    for eid in s.dirty - set(p.evict):
        if eid in s.entries:
            w.put("stats", entry_key(s.sid, eid), dumps(stats_json(s.entries[eid])))
    record = s.record()
    record.update(next_id=next_id, version=s.version + 1, evicted_total=s.evicted_total + len(p.evict),
                  degraded_total=s.degraded_total + len(p.degrade))
    w.put("streams", s.spec.name.encode(), dumps(record))
    return degraded

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
