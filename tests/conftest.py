"""Shared fixtures: small MemFlow-shaped streams and deterministic entries.

Real components only: every bank lives in a pytest tmp dir on disk (real LMDB, real faiss).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from memory_service import Budget, KeySpace, KVLayout, NewEntry, StreamSpec

LAYERS, DIM, EMB = 4, 32, 16
KV = KVLayout(layers=LAYERS, heads=2, head_dim=8, tokens_per_frame=5, dtype="bfloat16")


def make_spec(name: str = "cam0", budget: Budget = Budget(), policy: str = "fifo", **kw) -> StreamSpec:
    spaces = kw.pop("key_spaces", None) or {
        "nam": KeySpace(DIM, per_layer=True),
        "emb": KeySpace(EMB, metric="cosine"),
    }
    return StreamSpec(name, spaces, kv=kw.pop("kv", KV), budget=budget, policy=policy, **kw)


def make_entry(seed: int, frame: int | None = None, pinned: bool = False, kv: bool = True) -> NewEntry:
    """Entry `seed`, regenerable bit for bit from its seed."""
    rng = np.random.default_rng(seed)
    return NewEntry(
        frame_index=seed if frame is None else frame,
        chunk_index=(seed if frame is None else frame) // 3,
        prompt=f"scene {seed % 5}",
        keys={
            "nam": rng.standard_normal((LAYERS, DIM)).astype(np.float32),
            "emb": rng.standard_normal(EMB).astype(np.float32),
        },
        kv=rng.standard_normal(KV.shape).astype(ml_dtypes.bfloat16) if kv else None,
        pinned=pinned,
    )


class Clock:
    """A settable clock for TTL/LRU tests (the bank takes time as an argument, never reads it itself)."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["grouped", "per_layer"])
def layer_group(request, monkeypatch) -> str:
    """Streams made in the test store their payload layers grouped (the default for small layers) or one layer a
    record (the layout of large layers, and of every stream made before groups)."""
    if request.param == "per_layer":
        from memory_service import stream

        monkeypatch.setattr(stream, "LAYER_GROUP_BYTES", 0)
    return request.param


def damage_layer(bank, name: str, eid: int, layer: int, db: str, damage) -> None:
    """Rewrite one layer's stored header (db "phead") or body ("pbody") as `damage(bytearray)` returns it, inside
    the record of the layer group that holds it (white-box: the LMDB layout of memory_service/store/lmdb_store.py)."""
    from memory_service.store.codec import split_group
    from memory_service.store.lmdb_store import payload_key

    layout = bank._streams[name].layout
    start = layer - layer % layout.layer_group
    count = min(layout.layer_group, layout.layers - start)
    key = payload_key(layout.sid, eid, start)

    def fn(w) -> None:
        head, body = bytes(w.get("phead", key)), bytes(w.get("pbody", key))
        parts = [[bytes(h), bytes(b)] for h, b in split_group(head, body, count, "test")]
        part = parts[layer - start]
        part[0 if db == "phead" else 1] = bytes(damage(bytearray(part[0 if db == "phead" else 1])))
        w.put("phead", key, b"".join(h for h, _ in parts))
        w.put("pbody", key, b"".join(b for _, b in parts))

    bank.store.write(fn)
