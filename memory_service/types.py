"""Values that cross module lines: small frozen dataclasses, never dicts.

Owns the public data model (DESIGN.md "Data model"): what a stream is (`StreamSpec`), what a caller
writes (`NewEntry`), what the bank keeps per entry (`EntryMeta`), and what comes back from queries,
fetches and stats. Constructors check only what a value can check alone (types, signs, and every size
against the limits of memory_service/limits.py, so no spec the bank cannot build gets past a constructor);
checks that need a stream (dims, shapes of keys and K/V) happen in the bank, which owns the stream.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from memory_service import limits
from memory_service.errors import InvalidArgument

METRICS = ("ip", "cosine", "l2")
INDEX_KINDS = ("flat", "hnsw", "ivfpq", "ivfsq", "two_stage")
KEY_DTYPES = ("float32", "float16")
KV_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")
STORAGE_CODECS = ("raw", "fp8")
DEGRADE_STEPS = ("fp8", "keys_only")
COMBINE_MODES = ("per_layer", "mean")


@dataclass(frozen=True)
class KeySpace:
    """One retrieval key space of a stream.

    `per_layer=True` means every entry carries one vector per layer (`[layers, dim]`), as MemFlow's NAM
    keys do; queries then rank each layer on its own (or by the mean score, see `combine`).
    `index` picks the search structure: "flat" (exact, default), "hnsw", "ivfpq", "ivfsq" (per-layer
    only: per layer an IVF over 4-bit codes in RAM, then an exact rerank of each layer's candidates from
    the stored keys), or "two_stage" (per-layer only: an HNSW pass over each entry's mean-over-layers
    vector, then an exact per-layer rerank of the candidates). `dtype="float16"` halves key memory and
    disk at a small score error.
    """

    dim: int
    metric: str = "ip"
    per_layer: bool = False
    index: str = "flat"
    dtype: str = "float32"
    layers: Optional[int] = None  # per-layer spaces only; defaults to the stream's KV layers

    def __post_init__(self) -> None:
        _bounded("key space dim", self.dim, limits.MAX_KEY_DIM, "MAX_KEY_DIM")
        if self.layers is not None:
            _bounded("KeySpace.layers", self.layers, limits.MAX_LAYERS, "MAX_LAYERS")
        if not isinstance(self.per_layer, bool):
            raise InvalidArgument(f"KeySpace.per_layer must be a bool, got {self.per_layer!r}")
        _one_of("metric", self.metric, METRICS)
        _one_of("index", self.index, INDEX_KINDS)
        _one_of("key dtype", self.dtype, KEY_DTYPES)
        if self.index == "two_stage" and not self.per_layer:
            raise InvalidArgument("index 'two_stage' needs per_layer=True; use 'hnsw' for one vector per entry")
        if self.index == "ivfsq" and not self.per_layer:
            raise InvalidArgument("index 'ivfsq' needs per_layer=True (its approximate scores are reranked per layer "
                                  "from the stored keys); use 'ivfpq' for one vector per entry")


@dataclass(frozen=True)
class KVLayout:
    """Shape of one entry's payload: `[layers, 2, tokens_per_frame, heads, head_dim]` (2 = K, V)."""

    layers: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name, limit in (("layers", "MAX_LAYERS"), ("heads", "MAX_HEADS"), ("head_dim", "MAX_HEAD_DIM"),
                            ("tokens_per_frame", "MAX_TOKENS_PER_FRAME")):
            _bounded(f"KVLayout.{name}", getattr(self, name), getattr(limits, limit), limit)
        _one_of("KV dtype", self.dtype, KV_DTYPES)
        if self.entry_bytes > limits.MAX_KV_BYTES_PER_ENTRY:
            raise InvalidArgument(
                f"KVLayout {list(self.shape)} {self.dtype} is {self.entry_bytes} bytes of K/V per entry; expected at "
                f"most {limits.MAX_KV_BYTES_PER_ENTRY} (MAX_KV_BYTES_PER_ENTRY, memory_service/limits.py)"
            )

    @property
    def layer_shape(self) -> tuple[int, int, int, int]:
        return (2, self.tokens_per_frame, self.heads, self.head_dim)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, *self.layer_shape)

    @property
    def layer_bytes(self) -> int:
        # Python ints (math.prod), never numpy's: an int64 product wraps around for an absurd layout
        return math.prod(self.layer_shape) * np.dtype(kv_numpy_dtype(self.dtype)).itemsize

    @property
    def entry_bytes(self) -> int:
        return self.layers * self.layer_bytes


@dataclass(frozen=True)
class Budget:
    """Per-stream limits; None means unbounded. Pinned entries count but are never evicted."""

    max_entries: Optional[int] = None
    max_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        for name, limit in (("max_entries", "MAX_BUDGET_ENTRIES"), ("max_bytes", "MAX_BUDGET_BYTES")):
            value = getattr(self, name)
            if value is not None:
                _bounded(f"Budget.{name}", value, getattr(limits, limit), limit, " or None (unbounded)")


@dataclass(frozen=True)
class StreamSpec:
    """A stream (one video or world) and its bank's shape, budget and pruning policy.

    `policy` is a policy expression (see `memory_service.pruning.parse_policy`), e.g. "lru",
    "lfu(half_life_s=600)", "ttl(seconds=3600),then:redundancy". `storage="fp8"` stores payloads as
    float8 e4m3 with per-channel scales. `degrade` lists steps applied to the policy's victims before
    eviction when the byte budget is exceeded ("fp8": quantize the payload; "keys_only": drop it).
    """

    name: str
    key_spaces: Mapping[str, KeySpace]
    kv: Optional[KVLayout] = None
    budget: Budget = field(default_factory=Budget)
    policy: str = "fifo"
    storage: str = "raw"
    degrade: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        cap = limits.MAX_STREAM_NAME_CHARS
        if not isinstance(self.name, str) or not self.name or len(self.name) > cap or "\x00" in self.name:
            shown = self.name if not isinstance(self.name, str) or len(self.name) <= cap else self.name[:40] + "..."
            raise InvalidArgument(f"stream name is {shown!r}"
                                  + (f" ({len(self.name)} characters)" if isinstance(self.name, str) else "")
                                  + f"; expected 1-{cap} characters without NUL (MAX_STREAM_NAME_CHARS)")
        if not isinstance(self.key_spaces, Mapping) or not self.key_spaces:
            raise InvalidArgument(f"stream {self.name!r} needs at least one key space, got none")
        if len(self.key_spaces) > limits.MAX_KEY_SPACES:
            raise InvalidArgument(f"stream {self.name!r} has {len(self.key_spaces)} key spaces; expected at most "
                                  f"{limits.MAX_KEY_SPACES} (MAX_KEY_SPACES, memory_service/limits.py)")
        if self.kv is not None and not isinstance(self.kv, KVLayout):
            raise InvalidArgument(f"stream {self.name!r} kv must be a KVLayout or None, got {type(self.kv).__name__}")
        if not isinstance(self.budget, Budget):
            raise InvalidArgument(f"stream {self.name!r} budget must be a Budget, got {type(self.budget).__name__}")
        key_values = indexes = 0
        for space_name, space in self.key_spaces.items():
            if (not isinstance(space_name, str) or not space_name or len(space_name) > limits.MAX_KEY_SPACE_NAME_CHARS
                    or "\x00" in space_name):
                raise InvalidArgument(f"key space name is {str(space_name)[:40]!r}; expected 1-"
                                      f"{limits.MAX_KEY_SPACE_NAME_CHARS} characters without NUL "
                                      "(MAX_KEY_SPACE_NAME_CHARS)")
            if not isinstance(space, KeySpace):
                raise InvalidArgument(f"key space {space_name!r} must be a KeySpace, got {type(space).__name__}")
            if space.per_layer and space.layers is None and self.kv is None:
                raise InvalidArgument(
                    f"per-layer key space {space_name!r} needs KeySpace.layers when the stream has no KV layout"
                )
            layers = 1
            if space.per_layer:
                layers = space.layers if space.layers is not None else self.kv.layers  # type: ignore[union-attr]
            key_values += layers * space.dim
            indexes += layers if space.per_layer and space.index != "two_stage" else 1
        if key_values > limits.MAX_KEY_VALUES_PER_ENTRY:
            raise InvalidArgument(
                f"stream {self.name!r} has {key_values} key values per entry (layers x dim over its key spaces); "
                f"expected at most {limits.MAX_KEY_VALUES_PER_ENTRY} (MAX_KEY_VALUES_PER_ENTRY, "
                "memory_service/limits.py)"
            )
        if indexes > limits.MAX_INDEXES_PER_STREAM:
            raise InvalidArgument(
                f"stream {self.name!r} needs {indexes} search indexes (one per layer of each per-layer key space, one "
                f"per other space); expected at most {limits.MAX_INDEXES_PER_STREAM} (MAX_INDEXES_PER_STREAM, "
                "memory_service/limits.py)"
            )
        if not isinstance(self.policy, str) or len(self.policy) > limits.MAX_POLICY_CHARS:
            raise InvalidArgument(f"stream {self.name!r} policy is {str(self.policy)[:40]!r}"
                                  + (f"... ({len(self.policy)} characters)" if isinstance(self.policy, str) else "")
                                  + f"; expected a policy expression of at most {limits.MAX_POLICY_CHARS} characters "
                                  "(MAX_POLICY_CHARS, memory_service/limits.py)")
        _one_of("storage", self.storage, STORAGE_CODECS)
        if not isinstance(self.degrade, (list, tuple)) or len(self.degrade) > limits.MAX_DEGRADE_STEPS:
            raise InvalidArgument(f"stream {self.name!r} degrade is {self.degrade!r:.80}; expected a list of at most "
                                  f"{limits.MAX_DEGRADE_STEPS} steps (MAX_DEGRADE_STEPS, memory_service/limits.py)")
        for step in self.degrade:
            _one_of("degrade step", step, DEGRADE_STEPS)
        object.__setattr__(self, "key_spaces", dict(self.key_spaces))
        object.__setattr__(self, "degrade", tuple(self.degrade))

    def layers_of(self, space: str) -> int:
        """Number of key vectors per entry in `space` (1 for a single-vector space)."""
        ks = self.key_spaces[space]
        if not ks.per_layer:
            return 1
        return ks.layers if ks.layers is not None else self.kv.layers  # type: ignore[union-attr]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict) -> "StreamSpec":
        return StreamSpec(
            name=data["name"],
            key_spaces={k: KeySpace(**v) for k, v in data["key_spaces"].items()},
            kv=KVLayout(**data["kv"]) if data.get("kv") else None,
            budget=Budget(**data.get("budget", {})),
            policy=data.get("policy", "fifo"),
            storage=data.get("storage", "raw"),
            degrade=tuple(data.get("degrade", ())),
        )


@dataclass(frozen=True)
class NewEntry:
    """What a caller writes: one memory unit (by default one latent frame).

    `keys[space]` is `[dim]` or `[layers, dim]` float32; `kv` is `[layers, 2, tokens, heads, head_dim]`
    in the stream's KV dtype, or None for a keys-only entry. `rope_position` is the absolute frame
    position the cached keys were rotated at, or None when they are stored unrotated.
    """

    frame_index: int
    chunk_index: int
    prompt: str
    keys: Mapping[str, np.ndarray]
    kv: Optional[np.ndarray] = None
    pinned: bool = False
    rope_position: Optional[int] = None
    importance: float = 0.0


@dataclass(frozen=True)
class EntryMeta:
    """What the bank knows about one stored entry (pruning policies see only this)."""

    entry_id: int
    frame_index: int
    chunk_index: int
    prompt: str
    created: float
    pinned: bool = False
    rope_position: Optional[int] = None
    hit_count: int = 0
    last_hit: Optional[float] = None
    importance: float = 0.0
    lfu: float = 0.0  # decayed hit frequency, valid at `last_hit`
    nbytes: int = 0  # payload bytes as stored
    codec: str = "raw"  # "raw", "fp8", or "none" (keys only)


@dataclass(frozen=True)
class QueryTrace:
    """What a query did: entries scanned and milliseconds per step, in order."""

    scanned: int
    steps: tuple[tuple[str, float], ...]

    @property
    def total_ms(self) -> float:
        return sum(ms for _, ms in self.steps)


@dataclass(frozen=True)
class QueryResult:
    """Ranked hits. Per-layer queries: `ids`, `scores`, `frames` are `[layers, k]`; otherwise `[k]`.

    Slots with no hit (fewer than k eligible entries) hold id -1, score -inf and frame -1.
    """

    ids: np.ndarray
    scores: np.ndarray
    frames: np.ndarray
    trace: QueryTrace

    def unique_ids(self) -> list[int]:
        """Distinct hit ids in first-seen order (row-major), without the -1 padding."""
        seen: dict[int, None] = {}
        for i in self.ids.reshape(-1).tolist():
            if i >= 0:
                seen.setdefault(i, None)
        return list(seen)


@dataclass(frozen=True)
class FetchResult:
    """K/V of the asked ids: `kv` is `[n, len(layers), 2, tokens, heads, head_dim]` in the stream dtype."""

    ids: tuple[int, ...]
    layers: tuple[int, ...]
    kv: np.ndarray


@dataclass(frozen=True)
class QueryFetchResult:
    """One `query_fetch`: the ranking, and the K/V of the hits the caller did not hold, in one round trip.

    `fetched` groups the (entry, layer) pairs that were fetched by layer set: each FetchResult holds entries
    that were fetched for the same layers (`[n, len(layers), 2, tokens, heads, head_dim]`); groups in order of
    each entry's first appearance (query_fetch.plan_fetch says exactly which pairs, in which order).
    """

    query: QueryResult
    fetched: tuple[FetchResult, ...]

    def kv_of(self, entry_id: int, layer: int) -> Optional[np.ndarray]:
        """The `[2, tokens, heads, head_dim]` K/V of one fetched (entry, layer), or None when it was not fetched."""
        for group in self.fetched:
            if layer in group.layers and entry_id in group.ids:
                return group.kv[group.ids.index(entry_id), group.layers.index(layer)]
        return None


@dataclass(frozen=True)
class PruneResult:
    """What one prune pass did."""

    evicted: tuple[int, ...]
    degraded: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class StreamStats:
    name: str
    entries: int
    pinned: int
    payload_bytes: int
    key_bytes: int
    next_entry_id: int
    evicted_total: int
    degraded_total: int
    budget: Budget
    policy: str


@dataclass(frozen=True)
class BankStats:
    streams: tuple[StreamStats, ...]
    entries: int
    payload_bytes: int
    map_size: int
    disk_bytes: int


def kv_numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a KV dtype name (bfloat16 and float8 come from ml_dtypes). Called per layer on the
    fetch path: the table is built once."""
    try:
        return _kv_dtypes()[name]
    except KeyError:
        raise InvalidArgument(f"unknown KV dtype {name!r}; expected one of {KV_DTYPES}") from None


@functools.lru_cache(maxsize=1)
def _kv_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes  # imported on first use: the service pays its ~0.5 s once, not at import

    return {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
            "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


def _bounded(what: str, value: object, hi: int, limit: str, alternative: str = "") -> None:
    """`value` is an int (never a bool) in [1, hi]; the message names the limit and where it is defined."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
        raise InvalidArgument(f"{what} is {value!r}; expected an int in [1, {hi}]{alternative} "
                              f"({limit}, memory_service/limits.py)")


def _one_of(what: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidArgument(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
