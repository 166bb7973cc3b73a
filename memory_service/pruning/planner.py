"""Turn a policy's choice into an eviction plan that fits a stream's budget.

Owns the budget arithmetic. Given the stream's entries, what a put would add and the policy's `Choice`,
it returns which entries to degrade (and how) and which to evict, in order, or raises ResourceExhausted
when even evicting every candidate cannot fit (pinned entries and the put's own entries are never
candidates). Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from memory_service.errors import ResourceExhausted
from memory_service.pruning.policies import Choice
from memory_service.types import Budget, EntryMeta


@dataclass(frozen=True)
class Plan:
    evict: tuple[int, ...] = ()
    degrade: tuple[tuple[int, str], ...] = ()  # (entry id, step)
    reason: str = ""


def over_budget(budget: Budget, entries: int, nbytes: int) -> tuple[int, int]:
    over_e = entries - budget.max_entries if budget.max_entries is not None else 0
    over_b = nbytes - budget.max_bytes if budget.max_bytes is not None else 0
    return max(0, over_e), max(0, over_b)


def plan(
    stream: str,
    budget: Budget,
    stored_entries: int,
    stored_bytes: int,
    candidates: Sequence[EntryMeta],
    add_entries: int,
    add_bytes: int,
    choice: Choice,
    degrade_steps: Sequence[str],
    degraded_bytes,  # (EntryMeta, step) -> payload bytes after that step
    slack: int = 0,
    slack_bytes: int = 0,
) -> Plan:
    count = stored_entries + add_entries
    nbytes = stored_bytes + add_bytes
    by_id = {m.entry_id: m for m in candidates}
    evict: list[int] = []
    gone: set[int] = set()
    reasons: list[str] = []

    def drop(eid: int) -> None:
        nonlocal count, nbytes
        evict.append(eid)
        gone.add(eid)
        count -= 1
        nbytes -= by_id[eid].nbytes

    for eid in choice.expired:
        if eid in by_id and eid not in gone:
            drop(eid)
    if evict:
        reasons.append(f"{len(evict)} expired")
    order = [i for i in choice.order if i in by_id] + sorted(by_id)  # oldest-first fallback
    over_e, over_b = over_budget(budget, count, nbytes)
    target_e = over_e + (slack if over_e else 0)
    for eid in order:
        if target_e <= 0:
            break
        if eid not in gone:
            drop(eid)
            target_e -= 1
    # bytes: degrade, then evict; once over, shed `slack_bytes` more. Keys-only entries free no payload bytes.
    _, over_b = over_budget(budget, count, nbytes)
    shed = over_b + (slack_bytes if over_b else 0)
    degraded: dict[int, str] = {}  # entry id -> step, in decision order
    for step in degrade_steps:
        for eid in order:
            if shed <= 0:
                break
            meta = by_id[eid]
            if eid in gone or eid in degraded or meta.codec == "none" or (step == "fp8" and meta.codec != "raw"):
                continue
            after = degraded_bytes(meta, step)
            if after < meta.nbytes:
                degraded[eid] = step
                nbytes -= meta.nbytes - after
                shed -= meta.nbytes - after
                by_id[eid] = _with_bytes(meta, after)
    if degraded:
        reasons.append(f"{len(degraded)} degraded")
    for eid in order:
        if shed <= 0:
            break
        if eid not in gone and by_id[eid].nbytes > 0:
            shed -= by_id[eid].nbytes
            drop(eid)
            degraded.pop(eid, None)
    degrade = list(degraded.items())
    over_e, over_b = over_budget(budget, count, nbytes)
    if over_e or over_b:
        pinned = stored_entries - len(candidates)
        raise ResourceExhausted(
            f"stream {stream!r} budget (max_entries={budget.max_entries}, max_bytes={budget.max_bytes}) cannot "
            f"hold this put of {add_entries} entries ({add_bytes} payload bytes): {pinned} entries are pinned and "
            f"never evicted; expected a put that fits after evicting every unpinned entry"
        )
    if len(evict) > len(choice.expired):
        reasons.append(f"{len(evict) - len(choice.expired)} evicted for budget")
    return Plan(tuple(evict), tuple(degrade), ", ".join(reasons))


def _with_bytes(meta: EntryMeta, nbytes: int) -> EntryMeta:
    return dataclasses.replace(meta, nbytes=nbytes)


def fp8_bytes(layer_elems: int, layer_channels: int, layers: int) -> int:
    """Payload bytes of an entry stored as fp8: one byte per element plus float32 per-channel scales."""
    return layers * (layer_elems + 4 * layer_channels)


