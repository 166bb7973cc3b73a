"""MemFlowConfig: every tunable of the plugin, frozen and strict.

Owns the plugin's knobs and their rules. Promises: a config that constructs is consistent (k within
[k_min, k_max], a known scorer and policy, positive sizes), and `from_dict` refuses unknown keys by name, so
a typo never silently keeps a default. Defaults follow the MemFlow reference: 3 memory frames per layer
(2 chosen by NAM + the newest record), the first latent frame of every 3rd chunk recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

SCORERS = ("nam", "embedding", "recent")
ADAPTIVE_MODES = ("off", "threshold", "gap")
WRITE_POLICIES = ("drop_oldest", "block")
ON_EXISTING = ("reuse", "replace", "error")
KEY_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class MemFlowConfig:
    """Plugin configuration (see module docstring). Sizes count latent frames unless named otherwise."""

    enabled: bool = True
    stream: str = "memflow"  # the bank stream this generator reads and writes
    # the stream already exists: "reuse" it (the same video, resumed), "replace" (drop) it, or "error"; None (the
    # default) raises too, saying how to choose: a new plugin never silently continues another video's stream
    on_existing: Optional[str] = None
    # retrieval
    # "nam": per-layer text-key vs frame-key; "embedding": one vector per entry; "recent": the fixed strategy the
    # paper compares against - the k newest records, no query
    scorer: str = "nam"
    k: int = 3  # memory frames per layer, the newest record included
    keep_newest: int = 1  # newest non-resident records always kept (the reference keeps 1)
    adaptive_k: str = "off"  # "threshold" / "gap": choose k per chunk from the scores, within [k_min, k_max]
    k_min: int = 1
    k_max: int = 3
    adaptive_threshold: float = 0.1  # "threshold": keep scores >= top - threshold * |top|
    sma: bool = False  # sparse memory activation: per head, top-sma_k frames of sink + memory
    sma_k: int = 3
    # on by default: measured (benchmarks/overhead.py, tiny model, 1e3 banked frames, CPU) the generator waits
    # 1.75 -> 0.24 ms (LocalMemory) and 4.7 -> 0.20 ms (shm) per chunk; at Wan's shape the query + fetch it hides
    # are projected past the 0.1 s deadline without it (DESIGN.md; GPU measurement pending: benchmarks/gpu_check.sh).
    # A wrong guess of the next prompt costs one extra retrieval (counted), never a different result
    prefetch: bool = True  # overlap retrieval + host staging for chunk n+1 with chunk n
    # recording
    record_interval: int = 3  # record every record_interval-th chunk
    record_frame: int = 0  # which latent frame of the chunk (0 = first)
    key_dtype: str = "float32"  # NAM keys in the bank
    # bank stream created by the plugin
    max_entries: Optional[int] = None
    max_bytes: Optional[int] = None
    policy: str = "fifo"  # pruning policy expression (memory_service.pruning)
    # fail-open and write-back
    deadline_s: float = 0.1  # a memory read past this makes the chunk memory-free
    write_queue: int = 4  # pending writes (queued + in flight); host staging is preallocated for this many
    write_policy: str = "drop_oldest"  # full queue: drop the oldest queued write, or block (up to deadline_s)
    write_batch: int = 4  # entries per put
    # page-locked host memory this plugin may hold (CUDA): write-back staging, the two load-staging lanes and the
    # shared-memory arenas it registers; past it, copies use pageable memory (synchronous, same results)
    pinned_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        _one_of("scorer", self.scorer, SCORERS)
        _one_of("adaptive_k", self.adaptive_k, ADAPTIVE_MODES)
        _one_of("write_policy", self.write_policy, WRITE_POLICIES)
        if self.on_existing is not None:
            _one_of("on_existing", self.on_existing, ON_EXISTING)
        _one_of("key_dtype", self.key_dtype, KEY_DTYPES)
        for name in ("k", "k_min", "k_max", "sma_k", "record_interval", "write_queue", "write_batch"):
            _positive_int(name, getattr(self, name))
        for name in ("keep_newest", "record_frame"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MemFlowConfig.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.pinned_bytes, int) or isinstance(self.pinned_bytes, bool) or self.pinned_bytes < 0:
            raise ValueError(f"MemFlowConfig.pinned_bytes must be an int >= 0 bytes, got {self.pinned_bytes!r}")
        for name in ("max_entries", "max_bytes"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        if not isinstance(self.enabled, bool) or not isinstance(self.sma, bool) or not isinstance(self.prefetch, bool):
            raise ValueError("MemFlowConfig.enabled, .sma and .prefetch must be bools, got "
                             f"{self.enabled!r}, {self.sma!r}, {self.prefetch!r}")
        if not isinstance(self.stream, str) or not self.stream:
            raise ValueError(f"MemFlowConfig.stream must be a non-empty string, got {self.stream!r}")
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"MemFlowConfig.policy must be a policy expression such as 'fifo', got {self.policy!r}")
        if not (isinstance(self.deadline_s, (int, float)) and self.deadline_s > 0):
            raise ValueError(f"MemFlowConfig.deadline_s must be > 0 seconds, got {self.deadline_s!r}")
        if not (isinstance(self.adaptive_threshold, (int, float)) and self.adaptive_threshold >= 0):
            raise ValueError(f"MemFlowConfig.adaptive_threshold must be >= 0, got {self.adaptive_threshold!r}")
        if self.k_min > self.k_max:
            raise ValueError(f"MemFlowConfig.k_min ({self.k_min}) must be <= k_max ({self.k_max})")
        if self.adaptive_k == "off" and self.keep_newest > self.k:
            raise ValueError(f"MemFlowConfig.keep_newest ({self.keep_newest}) must be <= k ({self.k})")
        if self.adaptive_k != "off" and self.keep_newest > self.k_max:
            raise ValueError(f"MemFlowConfig.keep_newest ({self.keep_newest}) must be <= k_max ({self.k_max})")
        if self.record_frame >= 64:
            raise ValueError(f"MemFlowConfig.record_frame is {self.record_frame}, expected a frame of the chunk")

    @property
    def memory_frames(self) -> int:
        """Memory slots per layer the KV cache must reserve (0 when disabled: the cache is the bare model's)."""
        if not self.enabled:
            return 0
        return self.k_max if self.adaptive_k != "off" else self.k

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "MemFlowConfig":
        known = {f.name for f in dataclasses.fields(MemFlowConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MemFlowConfig key(s) {unknown}; known: {sorted(known)}")
        return MemFlowConfig(**dict(data))

    def replace(self, **changes: Any) -> "MemFlowConfig":
        return MemFlowConfig.from_dict({**dataclasses.asdict(self), **changes})


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"MemFlowConfig.{name} is {value!r}; expected one of {', '.join(allowed)}")


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MemFlowConfig.{name} must be an int >= 1, got {value!r}")
