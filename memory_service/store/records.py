"""Records: how stream records, entry metadata and retrieval statistics are encoded in a store.

Owns the persistent schema of everything that is not a tensor: compact JSON, an entry's immutable metadata
apart from its statistics (statistics change on every query hit and are rewritten alone). Every store
implementation encodes with these, so a record written by one reads the same through another.
"""

from __future__ import annotations

import json
import operator
from typing import Any, Optional

from memory_service.types import EntryMeta

STATS_FIELDS = ("hit_count", "last_hit", "importance", "lfu")
_META_SKIP = ("entry_id", *STATS_FIELDS)
_STATS = operator.itemgetter(*STATS_FIELDS)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def loads(buf: bytes | memoryview) -> Any:
    return json.loads(bytes(buf))


def meta_json(meta: EntryMeta) -> dict:
    """The immutable part of an entry's metadata, as stored."""
    return {k: v for k, v in vars(meta).items() if k not in _META_SKIP}  # every field is a scalar: no deep copy


def stats_json(meta: EntryMeta) -> dict:
    """The retrieval statistics, read in one step: the bank updates a hit's in place, in one dict update, while
    a flush reads them outside the stream's lock."""
    return dict(zip(STATS_FIELDS, _STATS(vars(meta))))


def entry_from(eid: int, meta: bytes | memoryview, stats: Optional[bytes | memoryview]) -> EntryMeta:
    fields = loads(meta)
    if stats is not None:
        fields.update(loads(stats))
    return EntryMeta(entry_id=eid, **fields)
