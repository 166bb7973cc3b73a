"""Input checks for put, query and ids: every rule and every message in one place.

Owns the promise that bad input is refused before anything changes: each check raises InvalidArgument
(or ResourceExhausted for size limits) saying what was received and what was expected, and returns the
inputs converted to the exact arrays the bank stores (float32 keys, C-contiguous KV). Two kinds:
- spec-free checks (`check_batch`, `as_vectors`, `check_id_list`): what any value of its type must be; the
  bank runs them and so does MemoryClient before it encodes a call, with the same messages;
- spec checks (`check_entries`, `check_query`, `check_kv_layout`, ...): against a stream's spec; only the bank
  (and the servicer, which sizes a Put's K/V stream by `check_kv_layout` before its bytes arrive) runs them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.types import COMBINE_MODES, NewEntry, StreamSpec


def as_vectors(vectors: Any, what: str) -> np.ndarray:
    """Spec-free: keys or a query as an array of numbers (bool, str and object arrays would invent numbers)."""
    try:
        arr = np.asarray(vectors)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not an array: {exc}") from None
    if arr.dtype.kind not in "fiu":
        raise InvalidArgument(f"{what} has dtype {arr.dtype}, expected float32")
    return arr


def check_vectors(spec: StreamSpec, space: str, vectors: Any, what: str) -> np.ndarray:
    """Keys or a query for `space`: `[dim]`, or `[layers, dim]` for a per-layer space; float32, finite."""
    if space not in spec.key_spaces:
        raise InvalidArgument(
            f"stream {spec.name!r} has no key space {space!r}; its key spaces are {sorted(spec.key_spaces)}"
        )
    ks = spec.key_spaces[space]
    expected = (spec.layers_of(space), ks.dim) if ks.per_layer else (ks.dim,)
    arr = as_vectors(vectors, f"{what} for key space {space!r}")
    if tuple(arr.shape) != expected:
        raise InvalidArgument(
            f"{what} for key space {space!r} has shape {list(arr.shape)}, stream {spec.name!r} expects "
            f"{list(expected)}" + (" (layers, dim)" if ks.per_layer else " (dim)")
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise InvalidArgument(f"{what} for key space {space!r} contains NaN or inf; expected finite values")
    if ks.metric == "cosine" and np.any(np.linalg.norm(arr, axis=-1) == 0):
        raise InvalidArgument(f"{what} for cosine key space {space!r} has a zero vector; cosine needs non-zero")
    return arr


def check_kv_layout(spec: StreamSpec, dtype: str, shape, what: str) -> None:
    """The K/V's dtype name and shape against the stream's layout (no data needed: the wire checks this first)."""
    if spec.kv is None:
        raise InvalidArgument(f"{what} carries kv but stream {spec.name!r} is keys-only (no KVLayout)")
    if not dtype:  # the wire's NewEntry.kv_dtype, required with has_kv
        raise InvalidArgument(f"{what} has K/V but no kv_dtype; stream {spec.name!r} expects kv_dtype "
                              f"{spec.kv.dtype!r} and kv_shape {list(spec.kv.shape)} with has_kv")
    if dtype != spec.kv.dtype:
        raise InvalidArgument(f"{what} kv has dtype {dtype}, stream {spec.name!r} expects {spec.kv.dtype}")
    if tuple(shape) != spec.kv.shape:
        raise InvalidArgument(
            f"{what} kv has shape {list(shape)}, stream {spec.name!r} expects {list(spec.kv.shape)} "
            "(layers, 2, tokens, heads, head_dim)"
        )


def check_kv(spec: StreamSpec, kv, what: str) -> Optional[np.ndarray]:
    if kv is None:
        return None
    arr = np.asarray(kv)
    check_kv_layout(spec, str(arr.dtype), arr.shape, what)
    if not _all_finite(arr):
        raise InvalidArgument(f"{what} kv contains NaN or inf; expected finite values")
    return np.ascontiguousarray(arr)


# A 16-bit float is NaN or inf exactly when its exponent bits are all ones: testing the bits is ~6x faster than
# widening to float32 (a 30-layer 2-token bf16 entry: 14 vs 91 us), which was 10% of a put in-process.
_EXPONENT_BITS = {"bfloat16": 0x7F80, "float16": 0x7C00}


def _all_finite(arr: np.ndarray, block: int = 1 << 22) -> bool:
    """NaN/inf check in blocks, so a 300 MB bf16 payload never needs a 600 MB float32 copy."""
    flat = arr.reshape(-1)
    mask = _EXPONENT_BITS.get(arr.dtype.name)
    for start in range(0, flat.size, block):
        part = flat[start:start + block]
        if mask is not None:
            if part.size and int((part.view(np.uint16) & mask).max()) == mask:
                return False
        elif not np.isfinite(part.astype(np.float32, copy=False)).all():
            return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_batch(entries: Any) -> list[NewEntry]:
    """Spec-free: a put's entries as a list of NewEntry (one NewEntry is a batch of one) whose fields have their
    types and ranges; keys and K/V are checked against the stream's spec by `check_entries`."""
    if isinstance(entries, NewEntry):
        entries = [entries]
    if not isinstance(entries, (list, tuple)):
        raise InvalidArgument(f"put takes a list of NewEntry, got {type(entries).__name__}")
    for n, e in enumerate(entries):
        what = f"entry {n}"
        if not isinstance(e, NewEntry):
            raise InvalidArgument(f"{what} is a {type(e).__name__}, expected NewEntry")
        for field in ("frame_index", "chunk_index"):
            value = getattr(e, field)
            if not _is_int(value) or value < 0:
                raise InvalidArgument(f"{what} {field} is {value!r}, expected an int >= 0")
        if e.rope_position is not None and (not isinstance(e.rope_position, (int, np.integer)) or e.rope_position < 0):
            raise InvalidArgument(f"{what} rope_position is {e.rope_position!r}, expected None (unrotated) or an "
                                  "int >= 0")
        if not isinstance(e.prompt, str):
            raise InvalidArgument(f"{what} prompt is a {type(e.prompt).__name__}, expected str")
        try:
            finite = bool(np.isfinite(float(e.importance)))
        except (TypeError, ValueError, OverflowError):
            finite = False
        if not finite:
            raise InvalidArgument(f"{what} importance is {e.importance!r}, expected a finite number")
    return list(entries)


def check_entries(spec: StreamSpec, entries: Sequence[NewEntry], max_batch: int) -> list:
    """Validate a whole put before anything is written; returns [(entry, keys, kv)]."""
    entries = check_batch(entries)
    if not entries:
        raise InvalidArgument(f"put to stream {spec.name!r} got an empty batch; expected 1 to {max_batch} entries")
    if len(entries) > max_batch:
        raise InvalidArgument(f"put to stream {spec.name!r} got {len(entries)} entries; at most {max_batch} per call")
    out = []
    for n, e in enumerate(entries):
        what = f"entry {n}"
        missing = sorted(set(spec.key_spaces) - set(e.keys or {}))
        if missing:
            raise InvalidArgument(f"{what} has no keys for key space(s) {missing}; every entry needs all of "
                                  f"{sorted(spec.key_spaces)}")
        keys = {space: check_vectors(spec, space, e.keys[space], f"{what} keys") for space in e.keys}
        out.append((e, keys, check_kv(spec, e.kv, what)))
    return out


def check_query(spec: StreamSpec, space: str, vectors, k: int, combine: str, max_k: int,
                exclude_frames, time_range) -> np.ndarray:
    if not _is_int(k) or not 1 <= k <= max_k:
        raise InvalidArgument(f"k is {k!r}, expected an int in [1, {max_k}]")
    if combine not in COMBINE_MODES:
        raise InvalidArgument(f"combine is {combine!r}, expected one of {COMBINE_MODES}")
    for name, rng in (("exclude_frames", exclude_frames), ("time_range", time_range)):
        if rng is not None and (len(rng) != 2 or not rng[0] <= rng[1]):
            raise InvalidArgument(f"{name} is {rng!r}, expected (lo, hi) with lo <= hi")
    return check_vectors(spec, space, vectors, "query")


def check_id_list(ids: Any, what: str = "ids") -> np.ndarray:
    """Spec-free: ids as a 1-d int64 array (empty allowed here; `check_ids` refuses it)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidArgument(f"{what} must be a 1-d list of ints, got {arr.dtype} with shape {list(arr.shape)}")
    return arr.astype(np.int64)


def check_ids(ids: Any, what: str = "ids") -> np.ndarray:
    arr = check_id_list(ids, what)
    if arr.size == 0:
        raise InvalidArgument(f"{what} is empty; expected at least one entry id")
    return arr.astype(np.int64)
