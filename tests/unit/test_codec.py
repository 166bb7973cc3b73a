"""Payload codec: raw is bit-exact for every KV dtype, fp8 keeps the error bound its docstring states, and
corrupt bytes (body, scales, header) surface as DataLoss, never as wrong tensors or a foreign exception.

Hypothesis draws layers as raw bit patterns, so NaN payloads, infinities, -0, subnormals and the extremes of
each dtype all occur; the bank-level tests run the same promises through a real LMDB in a tmp dir.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import damage_layer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from memory_service import DataLoss, KeySpace, KVLayout, LocalMemory, NewEntry, StreamSpec
from memory_service.store.codec import FP8_MAX, Header, body_bytes, decode_into, encode
from memory_service.types import KV_DTYPES, kv_numpy_dtype

BITS = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.uint32, "float8_e4m3fn": np.uint8}
# Rounding of the decoder's float32 result to the output dtype: relative half-ulp, absolute half-subnormal.
OUT_ROUNDING = {
    "float32": (2.0**-24, 2.0**-150),
    "float16": (2.0**-11, 2.0**-25),
    "bfloat16": (2.0**-8, 2.0**-134),
    "float8_e4m3fn": (2.0**-4, 2.0**-10),
}
SHAPES = st.tuples(st.just(2), st.integers(1, 6), st.integers(1, 3), st.integers(1, 8))  # [2, T, H, D]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layers(draw, dtype: str, finite: bool = False) -> np.ndarray:
    """One layer `[2, T, H, D]` of `dtype` from arbitrary bits; `finite` zeroes NaN/inf (the bank refuses them)."""
    bits = draw(hnp.arrays(BITS[dtype], draw(SHAPES)))
    x = bits.view(kv_numpy_dtype(dtype))
    if finite:
        x = np.where(np.isfinite(x.astype(np.float32)), x, np.zeros((), x.dtype)).astype(x.dtype)
    return x


def bits_of(x: np.ndarray) -> np.ndarray:
    return x.view(BITS[x.dtype.name])


def round_trip(x: np.ndarray, dtype: str, codec: str, verify: bool = True) -> np.ndarray:
    """Encode, pack the header to bytes and back (as LMDB stores it), decode into a fresh array."""
    header, body = encode(x, dtype, codec)
    stored = Header.unpack(header.pack())
    assert stored == header
    out = np.empty(x.shape, kv_numpy_dtype(dtype))
    decode_into(stored, bytes(np.ascontiguousarray(body).view(np.uint8)), out, verify, "test layer")
    return out


@pytest.mark.parametrize("dtype", KV_DTYPES)
@FAST
@given(data=st.data())
def test_raw_round_trip_is_bit_exact(dtype, data):
    x = data.draw(layers(dtype))
    out = round_trip(x, dtype, "raw")
    assert out.dtype == x.dtype and np.array_equal(bits_of(out), bits_of(x))  # NaN payloads and -0 included


def fp8_bound(x: np.ndarray, dtype: str) -> np.ndarray:
    """store/codec.py's stated bound per element, plus output rounding and float32 arithmetic slack."""
    x64 = np.abs(x.astype(np.float64))
    amax = x64.max(axis=1, keepdims=True)  # per channel (K/V x head x head_dim), over tokens
    s = np.maximum(amax / FP8_MAX, 2.0**-126)
    first = 2.0**-4 * x64 + 2.0**-10 * s
    rel, absolute = OUT_ROUNDING[dtype]
    return first + rel * (x64 + first) + absolute + 2.0**-20 * (x64 + s)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@FAST
@given(data=st.data())
def test_fp8_error_bound(dtype, data):
    x = data.draw(layers(dtype, finite=True))
    out = round_trip(x, dtype, "fp8")
    assert out.dtype == x.dtype
    err = np.abs(x.astype(np.float64) - out.astype(np.float64))
    bound = fp8_bound(x, dtype)
    bad = ~(err <= bound)  # NaN in the output counts as a violation
    assert not bad.any(), f"{bad.sum()} elements past the bound, e.g. x={x[bad][:3]} decoded {out[bad][:3]}"
    header, body = encode(x, dtype, "fp8")
    assert body.dtype == ml_dtypes.float8_e4m3fn and body_bytes(header) == x.size + 4 * x.size // x.shape[1]


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_fp8_is_exact_on_zero_and_keeps_the_channel_max(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 16, 2, 8)) * 3).astype(kv_numpy_dtype(dtype))
    x[1, :, 0, 0] = 0  # an all-zero channel must not divide by zero
    out = round_trip(x, dtype, "fp8").astype(np.float64)
    assert (out[1, :, 0, 0] == 0).all()
    ref = x.astype(np.float64)
    peak = np.abs(ref).argmax(axis=1)  # the channel max maps to 448 exactly: only output rounding remains
    got = np.take_along_axis(out, peak[:, None], 1)
    want = np.take_along_axis(ref, peak[:, None], 1)
    assert np.allclose(got, want, rtol=OUT_ROUNDING[dtype][0] + 2.0**-20, atol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_fp8_non_finite_elements_spoil_only_themselves(dtype):
    """A store-level caller may pass NaN/inf (the bank refuses them): they decode as NaN, and every other element
    of their channel keeps the bound its finite values give."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 2, 4)).astype(kv_numpy_dtype(dtype))
    bad = np.zeros(x.shape, bool)
    bad[0, 1, 0, 0] = bad[1, 2, 1, 3] = bad[0, 5, 1, 1] = True
    x[bad] = np.array([np.nan, np.inf, -np.inf]).astype(x.dtype)
    with np.errstate(all="raise"):
        out = round_trip(x, dtype, "fp8")
    assert np.isnan(out[bad].astype(np.float32)).all()
    clean = np.where(bad, 0, x).astype(x.dtype)
    err = np.abs(clean.astype(np.float64) - out.astype(np.float64))
    assert (err[~bad] <= fp8_bound(clean, dtype)[~bad]).all()


# -- corruption ----------------------------------------------------------------------------------

def encoded(codec: str, dtype: str = "bfloat16"):
    x = np.random.default_rng(1).standard_normal((2, 4, 2, 8)).astype(kv_numpy_dtype(dtype))
    header, body = encode(x, dtype, codec)
    return x, header, bytearray(np.ascontiguousarray(body).view(np.uint8).tobytes())


@pytest.mark.parametrize("codec", ["raw", "fp8"])
@pytest.mark.parametrize("byte", [0, 17, -1])
def test_flipped_body_bit_is_data_loss(codec, byte):
    x, header, body = encoded(codec)
    body[byte] ^= 0x04
    with pytest.raises(DataLoss, match="checksum mismatch in stream 'a' entry 3 layer 1"):
        decode_into(header, bytes(body), np.empty(x.shape, x.dtype), True, "stream 'a' entry 3 layer 1")


def test_flipped_fp8_scale_is_data_loss():
    x, header, body = encoded("fp8")
    raw = bytearray(header.pack())
    raw[-1] ^= 0x01  # the last byte of the last per-channel scale
    with pytest.raises(DataLoss, match="checksum mismatch"):
        decode_into(Header.unpack(bytes(raw)), bytes(body), np.empty(x.shape, x.dtype), True, "layer")


def _field(raw: bytearray, offset: int, value: int) -> bytes:
    out = bytearray(raw)
    out[offset] = value
    return bytes(out)


HEADER_CORRUPTIONS = [
    ("truncated", lambda raw: bytes(raw[:10])),
    ("empty", lambda raw: b""),
    ("unknown codec", lambda raw: _field(raw, 0, 9)),
    ("unknown dtype", lambda raw: _field(raw, 1, 200)),
    ("other dtype", lambda raw: _field(raw, 1, KV_DTYPES.index("float16"))),  # same itemsize as bfloat16
    ("other codec", lambda raw: _field(raw, 0, 1 - raw[0])),  # raw <-> fp8
    ("ndim", lambda raw: _field(raw, 2, 3)),
    ("shape", lambda raw: _field(raw, 8, 5)),  # the token count
    ("checksum", lambda raw: _field(raw, 24, raw[24] ^ 0xFF)),
    ("scales cut", lambda raw: bytes(raw[:-6])),
]


@pytest.mark.parametrize("codec", ["raw", "fp8"])
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("name,corrupt", HEADER_CORRUPTIONS, ids=[c[0] for c in HEADER_CORRUPTIONS])
def test_corrupt_header_is_data_loss(codec, verify, name, corrupt):
    x, header, body = encoded(codec)
    raw = bytearray(header.pack())
    if name == "scales cut" and codec == "raw":
        pytest.skip("raw headers carry no scales")
    if name == "checksum" and not verify:
        pytest.skip("an unverified read does not look at the checksum")

    def read() -> None:
        decode_into(Header.unpack(corrupt(raw)), bytes(body), np.empty(x.shape, x.dtype), verify, "layer 0")

    with pytest.raises(DataLoss):
        read()


def test_truncated_body_is_data_loss_without_verification():
    x, header, body = encoded("raw")
    with pytest.raises(DataLoss):
        decode_into(header, bytes(body[:-2]), np.empty(x.shape, x.dtype), False, "layer 0")


# -- through a real LMDB -------------------------------------------------------------------------

def spec(dtype: str, storage: str) -> StreamSpec:
    kv = KVLayout(layers=3, heads=2, head_dim=8, tokens_per_frame=16, dtype=dtype)
    return StreamSpec("s", {"e": KeySpace(8)}, kv=kv, storage=storage)


def entries(dtype: str, n: int = 4) -> list[NewEntry]:
    rng = np.random.default_rng(7)
    shape = (3, 2, 16, 2, 8)
    return [NewEntry(i, i, "p", {"e": rng.standard_normal(8).astype(np.float32)},
                     (rng.standard_normal(shape) * 2).astype(kv_numpy_dtype(dtype))) for i in range(n)]


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("storage", ["raw", "fp8"])
def test_bank_round_trip_per_dtype(tmp_path, dtype, storage):
    es = entries(dtype)
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(spec(dtype, storage))
        ids = m.put("s", es)
    with LocalMemory(str(tmp_path)) as m:  # reopened: what comes back was read from disk
        got = m.fetch("s", ids[::-1], layers=[2, 0]).kv
    want = np.stack([e.kv[[2, 0]] for e in es[::-1]])
    assert got.dtype == want.dtype
    if storage == "raw":
        assert np.array_equal(bits_of(got), bits_of(want))
    else:
        for g, w in zip(got.reshape(-1, 2, 16, 2, 8), want.reshape(-1, 2, 16, 2, 8)):
            assert (np.abs(g.astype(np.float64) - w.astype(np.float64)) <= fp8_bound(w, dtype)).all()


@pytest.mark.parametrize("db", ["pbody", "phead"])
def test_corruption_on_disk_is_data_loss_and_contained(tmp_path, layer_group, db):
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(spec("bfloat16", "raw"))
        ids = m.put("s", entries("bfloat16"))

        def corrupt(value: bytearray) -> bytearray:
            value[-1] ^= 0x10  # pbody: one KV bit; phead: one bit of the checksum field
            return value

        damage_layer(m.bank, "s", ids[1], 2, db, corrupt)
        with pytest.raises(DataLoss, match=f"stream 's' entry {ids[1]} layer 2"):
            m.fetch("s", [ids[0], ids[1]])
        assert m.fetch("s", [ids[1]], layers=[0, 1]).kv.shape[1] == 2  # the other layers still read
        assert np.array_equal(m.fetch("s", [ids[3]]).kv[0], entries("bfloat16")[3].kv)

