"""A put's encoding shortcuts say exactly what the general paths say: `encode_layers` against `encode` of each
layer, `back_to_back` against a join, the cached raw header against struct packing, and the bit test for NaN/inf
in 16-bit floats against widening to float32."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from memory_service.store.codec import _HEADER, CODECS, Header, encode, encode_layers
from memory_service.store.lmdb_env import as_bytes, back_to_back
from memory_service.types import KV_DTYPES, kv_numpy_dtype
from memory_service.validate import _all_finite


def _kv(dtype: str, layers: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((layers, 2, 3, 4, 8)).astype(np.float32).astype(kv_numpy_dtype(dtype))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_encode_layers_is_encode_of_each_layer(dtype, codec):
    kv = _kv(dtype)
    got, want = encode_layers(kv, dtype, codec), [encode(layer, dtype, codec) for layer in kv]
    assert [h for h, _ in got] == [h for h, _ in want]
    assert [h.pack() for h, _ in got] == [h.pack() for h, _ in want]
    assert all(bytes(as_bytes(a)) == bytes(as_bytes(b)) for (_, a), (_, b) in zip(got, want))
    if codec == "raw":  # a group of layers is stored as one slice of `whole`: the bodies' bytes back to back
        assert bytes(as_bytes(got.whole[1:4])) == b"".join(bytes(as_bytes(b)) for _, b in want[1:4])
        fortran = np.asfortranarray(kv)  # not C-contiguous: `whole` is a C-contiguous copy, the same bytes
        assert bytes(as_bytes(encode_layers(fortran, dtype, codec).whole)) == bytes(as_bytes(kv))
    else:
        assert got.whole is None


def test_raw_header_pack_matches_struct_packing():
    h = Header("raw", "bfloat16", (2, 3, 4, 8), 0xDEADBEEF12345678)
    assert h.pack() == _HEADER.pack(0, KV_DTYPES.index("bfloat16"), 4, 0, 2, 3, 4, 8, 0xDEADBEEF12345678)
    assert Header.unpack(h.pack()) == h


def test_back_to_back_views_a_raw_entry_and_joins_anything_else():
    kv = _kv("bfloat16")
    bodies = [body for _, body in encode_layers(kv, "bfloat16", "raw")]
    whole = back_to_back(bodies[1:4])
    assert isinstance(whole, memoryview) and bytes(whole) == b"".join(bytes(as_bytes(b)) for b in bodies[1:4])
    kv[2] = 0  # a view: it reads the entry's own memory
    assert bytes(whole) == b"".join(bytes(as_bytes(b)) for b in bodies[1:4])
    shuffled = [bodies[2], bodies[1]]
    assert bytes(back_to_back(shuffled)) == bytes(as_bytes(bodies[2])) + bytes(as_bytes(bodies[1]))
    apart = [np.ascontiguousarray(b) for b in (bodies[0], bodies[0])]  # the same bytes twice, no overlap
    assert bytes(back_to_back(apart)) == 2 * bytes(as_bytes(bodies[0]))
    strided = kv[:, :, :, :, ::2]  # not C-contiguous: joined
    assert bytes(back_to_back([strided[0]])) == bytes(as_bytes(np.ascontiguousarray(strided[0])))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, ml_dtypes.float8_e4m3fn])
def test_all_finite_finds_every_nan_and_inf(dtype):
    x = np.random.default_rng(1).standard_normal(3000).astype(np.float32).astype(dtype)
    x[5], x[6] = np.finfo(dtype).max, -np.finfo(dtype).max
    assert _all_finite(x) and _all_finite(x[:0])
    for bad in (np.nan, np.inf, -np.inf):
        for at in (0, 1234, 2999):
            y = x.copy()
            y[at] = bad
            assert _all_finite(y) == bool(np.isfinite(y.astype(np.float32)).all()) and not _all_finite(y)
            assert not _all_finite(y, block=7)  # found in whichever block it falls
