"""FetchPlan: which (entry, layer) K/V a `query_fetch` returns beside its ranking, decided in one place.

Owns the one rule that both homes of the protocol apply - MemoryBank.query_fetch (LocalMemory) and the service's
QueryFetch (servicer.py, which moves the same bytes over its data planes) - so they fetch exactly the same pairs,
grouped and ordered the same way. The rule, for each fetched layer l (`layers`, default all, ascending):
  candidates(l) = `include` (in order), then the first `fetch_k` hits of l's row of the ranking (row l of a per-layer
                  result, the one row otherwise) that are not in `include`, skipping -1 padding and repeats;
  fetched(l)    = candidates(l) minus what the caller holds in layer l (`resident`).
Entries are taken in order of first appearance (layer by layer, candidates in order); each entry's fetched layers
ascend; entries with the same fetched layers form one group (a FetchResult), groups in order of their first entry.
That is the order the plugin's LoadPlan uses (plugin/kv_slots.py), so a plugin that plans what the ranking selects
finds each of its groups whole in the answer. Every argument is checked before the bank is touched.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.types import StreamSpec
from memory_service.validate import check_id_list

Groups = tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
"""(entry ids, layers) of each group, in order."""


def normalize_resident(resident: Any) -> list[list[int]]:
    """`resident` as the wire carries it: [] (nothing held), [ids] (held in every fetched layer), or one id list per
    fetched layer. A flat list of ints is the second form; anything else is InvalidArgument."""
    if resident is None:
        return []
    if isinstance(resident, np.ndarray) and resident.ndim == 1:
        return [check_id_list(resident, "resident").tolist()]
    try:
        rows = list(resident)
    except TypeError:
        raise InvalidArgument(f"resident is {resident!r}; expected entry ids held in every layer, or one list of "
                              "ids per fetched layer") from None
    if not rows:
        return []
    if all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in rows):
        return [[int(r) for r in rows]]
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, (int, np.integer, str, bytes)):
            raise InvalidArgument(f"resident mixes ids and id lists (item {i} is {r!r}); expected entry ids held in "
                                  "every layer, or one list of ids per fetched layer")
        out.append(check_id_list(np.asarray(r, np.int64) if len(r) == 0 else r, f"resident[{i}]").tolist())
    return out


class FetchPlan:
    """The checked fetch arguments of one query_fetch on stream `spec`; `groups(ids)` applies them to a ranking."""

    def __init__(self, spec: StreamSpec, k: int, layers: Optional[Sequence[int]], fetch_k: Optional[int],
                 include: Any, resident: Any) -> None:
        if spec.kv is None:
            raise InvalidArgument(f"stream {spec.name!r} is keys-only: it has no KV payloads to fetch")
        total = spec.kv.layers
        if layers is None:
            self.layers = list(range(total))
        else:
            self.layers = [int(x) for x in layers]
            bad = [x for x in self.layers if not 0 <= x < total]
            if not self.layers or bad or len(set(self.layers)) != len(self.layers):
                raise InvalidArgument(f"layers {list(layers)} invalid; expected distinct ints in [0, {total})")
            self.layers.sort()
        if fetch_k is not None and (not isinstance(fetch_k, (int, np.integer)) or isinstance(fetch_k, bool)
                                    or not 0 <= fetch_k <= k):
            raise InvalidArgument(f"fetch_k is {fetch_k!r}; expected None (every hit: k) or an int in [0, k={k}]")
        self.fetch_k = k if fetch_k is None else int(fetch_k)
        self.include = list(dict.fromkeys(check_id_list(include, "include").tolist()))
        rows = normalize_resident(resident)
        if len(rows) not in (0, 1, len(self.layers)):
            raise InvalidArgument(f"resident has {len(rows)} id lists; expected none, one (held in every fetched "
                                  f"layer) or one per fetched layer ({len(self.layers)})")
        held = [set(r) for r in rows]
        self.held = held * len(self.layers) if len(held) == 1 else held or [set() for _ in self.layers]

    def groups(self, ids: np.ndarray) -> Groups:
        """The (entry ids, layers) groups to fetch for a ranking `ids` (`[rows, k]` or `[k]`)."""
        table = np.asarray(ids)
        if table.ndim == 2 and table.shape[0] != 1 and table.shape[0] <= self.layers[-1]:
            raise InvalidArgument(f"the ranking has {table.shape[0]} rows; fetching layers {self.layers} needs one "
                                  "per layer (or one for all)")
        need: dict[int, list[int]] = {}
        include = set(self.include)
        for j, layer in enumerate(self.layers):
            row = table if table.ndim == 1 else table[layer if table.shape[0] > 1 else 0]
            hits = [e for e in dict.fromkeys(int(x) for x in row) if e >= 0 and e not in include][:self.fetch_k]
            for e in (*self.include, *hits):
                if e not in self.held[j]:
                    need.setdefault(e, []).append(layer)
        by_layers: dict[tuple[int, ...], list[int]] = {}
        for e, layers in need.items():
            by_layers.setdefault(tuple(layers), []).append(e)
        return tuple((tuple(group), layers) for layers, group in by_layers.items())

    def max_rows(self) -> int:
        """An upper bound of the (entry, layer) pairs any ranking can make this plan fetch (a shm lease's size)."""
        return len(self.layers) * (len(self.include) + self.fetch_k)
