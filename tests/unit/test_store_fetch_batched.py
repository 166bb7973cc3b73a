"""A fetch's batched read path (LMDBView.read_payloads / read_layer compare stored headers as bytes): damage
to a stored header or body is still DataLoss naming the layer, on both paths (the shm plane's read_payloads and
the streaming plane's read_layer), with verification on and off; fp8 layers still decode; a read of several
entries returns each in the order asked for."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import damage_layer

from memory_service import KeySpace, KVLayout, LocalMemory, NewEntry, StreamSpec
from memory_service.config import BankConfig
from memory_service.errors import DataLoss
from memory_service.types import KV_DTYPES, kv_numpy_dtype

SHAPE = (3, 2, 4, 2, 8)  # [L, 2, T, H, D]


def entries(n: int = 4) -> list[NewEntry]:
    rng = np.random.default_rng(3)
    return [NewEntry(i, i, "p", {"e": rng.standard_normal(8).astype(np.float32)},
                     rng.standard_normal(SHAPE).astype(kv_numpy_dtype("bfloat16"))) for i in range(n)]


def bank(tmp_path, verify: bool = True, storage: str = "raw") -> LocalMemory:
    m = LocalMemory(str(tmp_path), BankConfig(verify_checksums=verify))
    if "s" not in [s.name for s in m.list_streams()]:
        kv = KVLayout(layers=3, heads=2, head_dim=8, tokens_per_frame=4, dtype="bfloat16")
        m.create_stream(StreamSpec("s", {"e": KeySpace(8)}, kv=kv, storage=storage))
    return m


def both_paths(m: LocalMemory, ids) -> list[np.ndarray]:
    """The K/V of `ids` through read_payloads (fetch) and through read_layer (the streaming plane's iter_fetch)."""
    direct = m.fetch("s", ids).kv
    streamed = b"".join(bytes(c) for c in m.bank.iter_fetch("s", ids, None, 1 << 20, bytes))
    return [direct, np.frombuffer(streamed, direct.dtype).reshape(direct.shape)]


@pytest.mark.parametrize("storage", ["raw", "fp8"])
def test_several_entries_in_the_order_asked(tmp_path, storage):
    es = entries()
    with bank(tmp_path, storage=storage) as m:
        ids = m.put("s", es)
        for got in both_paths(m, ids[::-1]):
            want = np.stack([e.kv for e in es[::-1]])
            if storage == "raw":
                assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
            else:
                assert np.allclose(got.astype(np.float32), want.astype(np.float32), rtol=0.07, atol=0.01)


def _flip(offset: int, value=None):
    def fn(raw: bytearray) -> bytes:
        raw[offset] = raw[offset] ^ 0x10 if value is None else value
        return bytes(raw)
    return fn


DAMAGE = [
    ("phead", "other dtype", _flip(1, KV_DTYPES.index("float16"))),  # same itemsize: only the header says it
    ("phead", "other codec", _flip(0, 1)),
    ("phead", "shape", _flip(8, 5)),
    ("phead", "truncated", lambda raw: bytes(raw[:10])),
    ("pbody", "truncated", lambda raw: bytes(raw[:-2])),
    ("pbody", "one bit", _flip(-1)),  # caught by the checksum only
    ("phead", "checksum", _flip(-1)),
]


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("db,name,damage", DAMAGE, ids=[f"{d[0]}-{d[1]}" for d in DAMAGE])
def test_damage_is_data_loss_on_both_paths(tmp_path, layer_group, verify, db, name, damage):
    if not verify and name in ("one bit", "checksum"):
        pytest.skip("an unverified read does not look at the checksum")
    with bank(tmp_path) as m:
        ids = m.put("s", entries())
        damage_layer(m.bank, "s", ids[1], 2, db, damage)
    # a cut record of a group no longer splits into its layers: the first layer read from it names the damage
    where = f"entry {ids[1]} layer {2 if layer_group == 'per_layer' or name != 'truncated' else ''}"
    with bank(tmp_path, verify) as m:  # reopened: nothing verified yet
        with pytest.raises(DataLoss, match=where):
            m.fetch("s", [ids[0], ids[1]])
        with pytest.raises(DataLoss, match=where):
            list(m.bank.iter_fetch("s", [ids[1]], None, 1 << 20, bytes))
        with pytest.raises(DataLoss):  # a second read fails again: what failed was never marked verified
            m.fetch("s", [ids[1]])
        assert all(got.shape[0] == 1 for got in both_paths(m, [ids[3]]))  # the other entries still read
