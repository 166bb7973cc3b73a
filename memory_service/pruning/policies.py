"""Pruning policies: a policy chooses, the bank evicts.

Owns the eviction order of every policy. A policy is a pure function of a `PruneView` (entry metadata,
the current time as an argument, and for `redundancy` one compact key per entry): no I/O, no clock.
It returns `expired` ids (must go now, whatever the budget: TTL) and an `order` of preferred victims;
the bank evicts `expired`, then walks `order` until the stream is within budget - and, once it must evict
for the budget at all, `batch_fraction` x max_entries further (default 1%; redundancy 5%), so the O(n)
ranking and the index removals run once per that many puts instead of on every put at budget. The bank
never shows a policy a pinned entry or an entry written by the same put, so no policy can evict those.

Expressions (`parse_policy`): `name` or `name(param=value, ...)`, composed with `,then:` - e.g.
`ttl(seconds=3600),then:redundancy`: expired entries first, then the most redundant. When every part's
order is used up and the stream is still over budget, the bank falls back to oldest-first (FIFO).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.pruning.neighbours import NeighbourView
from memory_service.types import EntryMeta


BATCH_FRACTION = 0.01  # of max_entries evicted beyond the budget at once; 0 evicts exactly to the budget


@dataclass(frozen=True)
class PruneView:
    entries: tuple[EntryMeta, ...]  # evictable candidates only
    now: float
    need: int  # how many victims the bank needs at least (0: only expiry is asked for)
    vectors: Optional[np.ndarray] = None  # [n, d] unit-norm compact keys aligned with `entries`
    # each entry's nearest other entry, aligned with `entries` (kept current by the stream: no O(n^2 d) scan)
    neighbours: Optional[NeighbourView] = None


@dataclass(frozen=True)
class Choice:
    expired: tuple[int, ...] = ()
    order: tuple[int, ...] = ()


class PruningPolicy(Protocol):
    name: str
    needs_vectors: bool

    def choose(self, view: PruneView) -> Choice: ...


def _check_batch(policy) -> None:
    if not 0.0 <= policy.batch_fraction < 1.0:
        raise InvalidArgument(f"{policy.name} batch_fraction must be in [0, 1), got {policy.batch_fraction}")


def _ids(entries: Sequence[EntryMeta]) -> np.ndarray:
    return np.fromiter((e.entry_id for e in entries), np.int64, len(entries))


def _by(ids: np.ndarray, values: np.ndarray) -> tuple[int, ...]:
    """`ids` ordered by `values` (ascending), ties by id: one C sort, no Python key per entry."""
    return tuple(ids[np.lexsort((ids, values))].tolist())


def _column(entries: Sequence[EntryMeta], field: str) -> np.ndarray:
    return np.fromiter((getattr(e, field) for e in entries), np.float64, len(entries))


def _since(entries: Sequence[EntryMeta]) -> np.ndarray:
    """Last retrieval time, or creation time for never-retrieved entries."""
    return np.fromiter((e.created if e.last_hit is None else e.last_hit for e in entries), np.float64, len(entries))


@dataclass(frozen=True)
class FIFO:
    """Oldest entry first."""

    batch_fraction: float = BATCH_FRACTION
    name = "fifo"
    needs_vectors = False

    def __post_init__(self) -> None:
        _check_batch(self)

    def choose(self, view: PruneView) -> Choice:
        ids = _ids(view.entries)
        return Choice(order=_by(ids, ids))


@dataclass(frozen=True)
class LRU:
    """Least recently retrieved first; never-retrieved entries count from their creation."""

    batch_fraction: float = BATCH_FRACTION
    name = "lru"
    needs_vectors = False

    def __post_init__(self) -> None:
        _check_batch(self)

    def choose(self, view: PruneView) -> Choice:
        return Choice(order=_by(_ids(view.entries), _since(view.entries)))


@dataclass(frozen=True)
class LFU:
    """Least frequently retrieved first; each hit's weight halves every `half_life_s` seconds."""

    half_life_s: float = 600.0
    batch_fraction: float = BATCH_FRACTION
    name = "lfu"
    needs_vectors = False

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise InvalidArgument(f"lfu half_life_s must be > 0, got {self.half_life_s}")
        _check_batch(self)

    def choose(self, view: PruneView) -> Choice:
        age = np.maximum(0.0, view.now - _since(view.entries))
        decayed = _column(view.entries, "lfu") * np.exp2(-age / self.half_life_s)
        return Choice(order=_by(_ids(view.entries), decayed))


@dataclass(frozen=True)
class TTL:
    """Entries older than `seconds` are evicted whatever the budget; it ranks nothing else."""

    seconds: float = 3600.0
    name = "ttl"
    needs_vectors = False

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise InvalidArgument(f"ttl seconds must be > 0, got {self.seconds}")

    def choose(self, view: PruneView) -> Choice:
        created = _column(view.entries, "created")
        old = view.now - created >= self.seconds
        return Choice(expired=_by(_ids(view.entries)[old], created[old]))


@dataclass(frozen=True)
class Importance:
    """Lowest accumulated retrieval score (plus the importance given at put) first."""

    batch_fraction: float = BATCH_FRACTION
    name = "importance"
    needs_vectors = False

    def __post_init__(self) -> None:
        _check_batch(self)

    def choose(self, view: PruneView) -> Choice:
        return Choice(order=_by(_ids(view.entries), _column(view.entries, "importance")))


@dataclass(frozen=True)
class Redundancy:
    """Evict entries most similar to a surviving neighbour, so the bank stays diverse and old scenes live.

    Similarity is cosine between compact keys (the bank passes each entry's mean-over-layers key). Of a
    near-duplicate pair the older entry goes; its neighbour is then kept for this pass, so a pair is never
    wiped out together. The scan is O(n^2 d) unless the view brings each entry's nearest neighbour (the bank's
    streams keep them current); `batch_fraction` makes the bank evict a few percent below the budget at once,
    so a ranking runs once per that many puts instead of on every put.
    """

    batch_fraction: float = 0.05
    name = "redundancy"
    needs_vectors = True

    def __post_init__(self) -> None:
        _check_batch(self)

    def choose(self, view: PruneView) -> Choice:
        n = len(view.entries)
        if n < 2 or view.vectors is None or view.need <= 0:
            return Choice()
        ids = np.array([e.entry_id for e in view.entries], np.int64)
        if view.neighbours is not None and np.array_equal(view.neighbours.ids, ids):
            nn_sim, nn_idx = view.neighbours.sim, np.maximum(view.neighbours.nn, 0)
        else:
            nn_sim, nn_idx = _nearest(np.asarray(view.vectors, np.float32))
        evicted: list[int] = []  # positions, in eviction order
        gone: set[int] = set()
        kept: set[int] = set()
        for i in np.lexsort((ids, -nn_sim)):  # most redundant first, older first on ties
            pair = sorted((int(i), int(nn_idx[i])), key=lambda p: ids[p])  # older first
            for victim in pair:
                other = pair[1] if victim == pair[0] else pair[0]
                if victim not in kept and victim not in gone and other not in gone:
                    evicted.append(victim)
                    gone.add(victim)
                    kept.add(other)
                    break
            if len(evicted) >= view.need:
                break
        order = [int(ids[p]) for p in evicted]
        return Choice(order=tuple(order))


def _nearest(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cosine to the nearest other row [n], its position [n]) of unit-norm rows `x` [n, d]."""
    n = len(x)
    nn_sim = np.full(n, -np.inf, np.float32)
    nn_idx = np.zeros(n, np.int64)
    for start in range(0, n, 2048):  # blocked so memory stays O(2048 * n)
        sims = x[start:start + 2048] @ x.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf
        nn_idx[start:start + 2048] = np.argmax(sims, axis=1)
        nn_sim[start:start + 2048] = sims[rows, nn_idx[start:start + 2048]]
    return nn_sim, nn_idx


@dataclass(frozen=True)
class Composite:
    parts: tuple
    name = "composite"

    @property
    def needs_vectors(self) -> bool:  # type: ignore[override]
        return any(p.needs_vectors for p in self.parts)

    def choose(self, view: PruneView) -> Choice:
        expired: dict[int, None] = {}
        order: dict[int, None] = {}
        for part in self.parts:
            c = part.choose(view)
            expired.update(dict.fromkeys(c.expired))
            order.update(dict.fromkeys(i for i in c.order if i not in expired))
        return Choice(expired=tuple(expired), order=tuple(order))


POLICIES = {cls.name: cls for cls in (FIFO, LRU, LFU, TTL, Importance, Redundancy)}
_PART = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


def parse_policy(text: str) -> PruningPolicy:
    """Parse a policy expression; unknown names or parameters raise InvalidArgument naming the known ones."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(f"policy must be a non-empty expression like 'lru', got {text!r}")
    parts = [_parse_part(p, text) for p in text.split(",then:")]
    return parts[0] if len(parts) == 1 else Composite(tuple(parts))


def _parse_part(part: str, whole: str):
    m = _PART.match(part)
    if not m or m.group(1) not in POLICIES:
        raise InvalidArgument(
            f"unknown pruning policy {part.strip()!r} in {whole!r}; expected one of {sorted(POLICIES)}, "
            "optionally with (param=value) and composed with ',then:'"
        )
    cls = POLICIES[m.group(1)]
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (s.strip() for s in (m.group(2) or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise InvalidArgument(f"policy {cls.name!r} has no parameter {item!r}; known: {sorted(known) or 'none'}")
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise InvalidArgument(f"policy parameter {key} must be a number, got {value.strip()!r}") from None
    return cls(**kwargs)
