"""Eviction: from a stream's budget and policy to a committed plan, in three steps.

`plan_for` asks the policy (pure) and the planner (pure) what to degrade and evict; `apply` commits that plan
through the store, in one commit with the put it makes room for (so a put and its evictions commit together);
`mirror` repeats the committed plan in memory (indexes, entry table, counters). Nothing in memory changes
before the commit. Retrieval statistics never ride in these commits (the bank flushes them on their own,
off the put path); a commit that removes entries holds the stream's `stats_lock` from `apply` to `mirror`,
so a flush in flight never writes statistics of an entry whose records it has just removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from memory_service.pruning import TTL, Composite, PruneView
from memory_service.pruning.planner import Plan, fp8_bytes, over_budget, plan
from memory_service.store.base import Commit, NewEntries, TensorStore
from memory_service.stream import Stream
from memory_service.types import Budget, EntryMeta


def parts(policy) -> tuple:
    return policy.parts if isinstance(policy, Composite) else (policy,)


@dataclass(frozen=True)
class Pending:
    """What a plan is decided from: a snapshot of the stream taken under its lock (frozen metadata, compact keys),
    so the policy's ranking can run outside it."""

    view: PruneView
    budget: Budget
    stored_entries: int
    stored_bytes: int
    add_entries: int
    add_bytes: int
    slack: int
    slack_bytes: int
    over: bool  # over `budget`: the policy ranks victims; otherwise only expiry is asked for (TTL parts alone)


def slack_of(s: Stream) -> tuple[int, int]:
    """(entries, bytes) a policy evicts past the budget once it must evict at all (its batch_fraction)."""
    budget = s.spec.budget
    fraction = max([getattr(p, "batch_fraction", 0.0) for p in parts(s.policy)])
    return (int(fraction * budget.max_entries) if budget.max_entries is not None else 0,
            int(fraction * budget.max_bytes) if budget.max_bytes is not None else 0)


def ttl_of(s: Stream) -> Optional[float]:
    return min((p.seconds for p in parts(s.policy) if isinstance(p, TTL)), default=None)


def _expiring(s: Stream, now: float) -> bool:
    ttl = ttl_of(s)
    return ttl is not None and len(s.entries) > 0 and bool(np.any(now - s.columns()[2] >= ttl))


def low_water(s: Stream) -> Budget:
    """The budget less 1.5 x the slack: where background upkeep prunes a stream down to once it is past the budget
    less the slack (`due`), so a put finds a whole slack of room while the upkeep thread ranks and evicts."""
    budget, (slack, slack_bytes) = s.spec.budget, slack_of(s)
    return Budget(None if budget.max_entries is None else max(1, budget.max_entries - slack - slack // 2),
                  None if budget.max_bytes is None else max(1, budget.max_bytes - slack_bytes - slack_bytes // 2))


def due(s: Stream) -> bool:
    """Whether a put should ask background upkeep to prune: the stream is past its budget less the slack. Only where
    the slack is at least two entries (entries, or bytes at the stream's mean entry size): below that a batch saves
    nothing, and puts evict exactly as a bare LocalMemory's do (expiry is left to the periodic pass)."""
    budget, (slack, slack_bytes) = s.spec.budget, slack_of(s)
    if slack >= 2 and len(s.entries) > budget.max_entries - slack:
        return True
    per_entry = s.payload_bytes / max(1, len(s.entries))
    return slack_bytes >= 2 * max(1.0, per_entry) and s.payload_bytes > budget.max_bytes - slack_bytes


def prepare(s: Stream, add_entries: int, add_bytes: int, now: float, *, expire: bool = True,
            budget: Optional[Budget] = None, slack: Optional[tuple[int, int]] = None) -> Optional[Pending]:
    """Under the stream's lock: the snapshot a plan needs, or None when there is nothing to do (within `budget`,
    the stream's by default, and nothing expired or `expire` off)."""
    budget = s.spec.budget if budget is None else budget
    slack_e, slack_b = slack_of(s) if slack is None else slack
    over_e, over_b = over_budget(budget, len(s.entries) + add_entries, s.payload_bytes + add_bytes)
    if not (over_e or over_b or (expire and _expiring(s, now))):
        return None
    candidates = tuple(m for m in s.entries.values() if not m.pinned)
    per_entry = max(1.0, s.payload_bytes / max(1, len(s.entries)))
    need = over_e + slack_e + (math.ceil((over_b + slack_b) / per_entry) if over_b else 0)
    vectors, neighbours = None, None
    if s.policy.needs_vectors and candidates:
        nb = s.neighbours.snapshot() if s.neighbours is not None else None
        if nb is not None and np.array_equal(nb.ids, [m.entry_id for m in candidates]):
            vectors, neighbours = nb.vectors, nb  # kept current: no O(n^2 d) scan in the policy
        else:
            vectors = np.stack([s.compact[m.entry_id] for m in candidates])
    return Pending(PruneView(candidates, now, need, vectors, neighbours), budget, len(s.entries), s.payload_bytes, add_entries,
                   add_bytes, slack_e, slack_b, bool(over_e or over_b))


def decide(s: Stream, pending: Pending) -> Plan:
    """The policy's ranking and the planner over a snapshot: pure (reads only the stream's fixed spec), so it may
    run outside the stream's lock. Raises ResourceExhausted when the budget cannot be met (everything pinned)."""
    # within budget the planner takes expired entries only and never reads the ranking: skip it (redundancy's
    # is O(n^2 d), and a TTL stream is asked for expiry on every put)
    policy = s.policy if pending.over else Composite(tuple(p for p in parts(s.policy) if isinstance(p, TTL)))
    choice = policy.choose(pending.view)
    return plan(s.spec.name, pending.budget, pending.stored_entries, pending.stored_bytes, pending.view.entries,
                pending.add_entries, pending.add_bytes, choice, s.spec.degrade, _degraded_bytes(s), pending.slack,
                pending.slack_bytes)


def plan_for(s: Stream, add_entries: int, add_bytes: int, now: float, *, deferred: bool = False) -> Plan:
    """Under the stream's lock: what a put (or a prune, with nothing added) must evict and degrade. `deferred`:
    background upkeep keeps the stream pruned, so only what the budget itself demands is planned here (expired
    entries go with the upkeep thread's next pass)."""
    pending = prepare(s, add_entries, add_bytes, now, expire=not deferred)
    return Plan() if pending is None else decide(s, pending)


def still_valid(s: Stream, p: Plan, now: float) -> Plan:
    """Under the stream's lock: the part of a plan decided from an older snapshot that still applies - victims
    still present and unpinned, degrades of entries still in the codec they had; and once the stream is back
    within its low-water mark, only expired entries (a put evicted meanwhile, or deleted)."""
    ttl = ttl_of(s)
    low = low_water(s)
    needed = any(over_budget(low, len(s.entries), s.payload_bytes))

    def wanted(eid: int) -> bool:
        m = s.entries.get(eid)
        return m is not None and not m.pinned and (needed or (ttl is not None and now - m.created >= ttl))

    evict = tuple(e for e in p.evict if wanted(e))
    degrade = tuple((e, step) for e, step in p.degrade if needed and wanted(e) and s.entries[e].codec != "none"
                    and (step != "fp8" or s.entries[e].codec == "raw"))
    return Plan(evict, degrade, p.reason)


def _degraded_bytes(s: Stream):
    def after(meta: EntryMeta, step: str) -> int:
        if step == "keys_only" or s.spec.kv is None:
            return 0
        kv = s.spec.kv
        return fp8_bytes(2 * kv.tokens_per_frame * kv.heads * kv.head_dim, 2 * kv.heads * kv.head_dim, kv.layers)

    return after


def commit_for(s: Stream, p: Plan, next_id: int, verify: bool, put: Optional[NewEntries] = None,
               staged: Optional[Callable[[], None]] = None) -> Commit:
    """What commits with a plan (and with the put it makes room for): degrades, evictions and the stream record
    after it. No retrieval statistics: writing the ~dirty set here cost every put ~14 JSON records."""
    record = s.record()
    record.update(next_id=next_id, version=s.version + 1, evicted_total=s.evicted_total + len(p.evict),
                  degraded_total=s.degraded_total + len(p.degrade))
    return Commit(record=record, put=put, degrade=tuple((s.entries[eid], step) for eid, step in p.degrade),
                  evict=p.evict, verify=verify, staged=staged)


def apply(store: TensorStore, s: Stream, p: Plan, next_id: int, verify: bool,
          put: Optional[NewEntries] = None, staged: Optional[Callable[[], None]] = None) -> dict[int, EntryMeta]:
    """Commit a plan (with `put`, in the same commit); returns the degraded entries' new metadata. Nothing in memory
    changes here: `mirror` does that after the commit. `staged`: Commit.staged."""
    return store.commit(s.layout, commit_for(s, p, next_id, verify, put, staged))


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
        if s.neighbours is not None:
            s.neighbours.remove(p.evict)
    s.next_id = next_id
    s.version += 1
    s.evicted_total += len(p.evict)
    s.degraded_total += len(p.degrade)
    s.dirty.difference_update(p.evict)
    s.columns_removed(p.evict)
