"""Payload codec: how one layer's K/V (`[2, tokens, heads, head_dim]`) is laid out on disk.

A payload record is two values: a small header (codec, logical dtype, shape, xxh3-64 checksum, and for
fp8 the per-channel scales) and the body bytes. Keeping the body apart lets a raw body go from the
caller's array into LMDB, and from LMDB's memory map into the result array, with one memcpy each way.

fp8 (e4m3fn, max 448) scales each channel (K/V x head x head_dim) by its max |x| over tokens / 448, never
below float32's smallest normal 2**-126 (a subnormal or zero scale would lose its own precision, and x / s
would overflow fp8 into NaN).
Error bound, for every element x with channel scale s = max(amax / 448, 2**-126) (asserted in tests):
    |x - decode(encode(x))| <= 2**-4 * |x| + 2**-10 * s       (then the output dtype's own rounding)
The first term is e4m3's half-ulp for normal values (3 mantissa bits), the second its subnormal spacing.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from memory_service.errors import DataLoss, InvalidArgument
from memory_service.types import KV_DTYPES, kv_numpy_dtype

CODECS = ("raw", "fp8")
FP8_MAX = 448.0
_HEADER = struct.Struct("<BBBB4IQ")  # codec, dtype, ndim, pad, shape[4], checksum
HEADER_BYTES = _HEADER.size  # a header without fp8 scales (every raw one)


@dataclass(frozen=True)
class Header:
    codec: str
    dtype: str  # the logical dtype the payload decodes to
    shape: tuple[int, ...]
    checksum: int
    scales: bytes = b""  # fp8 only: float32 [2, 1, heads, head_dim]

    def pack(self) -> bytes:
        if self.codec == "raw":  # every raw layer of a stream: the cached prefix, then its checksum
            return raw_prefix(self.dtype, tuple(self.shape)) + self.checksum.to_bytes(8, "little")
        return _fixed(self.codec, self.dtype, self.shape, self.checksum) + self.scales

    @staticmethod
    def unpack(buf: bytes | memoryview, what: str = "payload") -> "Header":
        try:
            codec, dtype, ndim, _, d0, d1, d2, d3, checksum = _HEADER.unpack_from(buf, 0)
            return Header(CODECS[codec], KV_DTYPES[dtype], (d0, d1, d2, d3)[:ndim], checksum,
                          bytes(buf[_HEADER.size:]))
        except (struct.error, IndexError) as exc:
            raise DataLoss(f"{what} header is corrupt ({len(buf)} bytes): {exc}") from None


def _fixed(codec: str, dtype: str, shape: tuple, checksum: int) -> bytes:
    """A header's fixed part (HEADER_BYTES): everything but fp8 scales."""
    dims = list(shape) + [0] * (4 - len(shape))
    return _HEADER.pack(CODECS.index(codec), KV_DTYPES.index(dtype), len(shape), 0, *dims, checksum)


def checksum(*buffers: bytes | memoryview | np.ndarray) -> int:
    if len(buffers) == 1:
        return xxhash.xxh3_64_intdigest(buffers[0])  # the same digest, without a hasher object
    h = xxhash.xxh3_64()
    for b in buffers:
        h.update(b)
    return h.intdigest()


def encode(layer: np.ndarray, dtype: str, codec: str) -> tuple[Header, np.ndarray]:
    """Encode one layer `[2, T, H, D]` of logical `dtype`; returns the header and a C-contiguous body."""
    if codec == "raw":
        body = np.ascontiguousarray(layer)
        return Header("raw", dtype, body.shape, checksum(body)), body
    if codec == "fp8":
        x = layer.astype(np.float32)  # [2, T, H, D]
        # Finite magnitudes only: the bank refuses non-finite K/V, but a store-level caller may pass them, and a
        # NaN or inf must not poison its whole channel's scale (it decodes as NaN; its neighbours keep the bound).
        mag = np.abs(x)
        amax = np.max(np.where(np.isfinite(mag), mag, 0), axis=1, keepdims=True)  # [2, 1, H, D]
        scales = np.maximum(amax / FP8_MAX, np.finfo(np.float32).tiny).astype(np.float32)  # [2, 1, H, D]
        with np.errstate(invalid="ignore"):  # a signalling NaN stays a NaN; it is not an error of the encoder
            body = np.ascontiguousarray((x / scales).astype(kv_numpy_dtype("float8_e4m3fn")))
        sbytes = scales.tobytes()
        return Header("fp8", dtype, body.shape, checksum(body, sbytes), sbytes), body
    raise InvalidArgument(f"unknown payload codec {codec!r}; expected one of {CODECS}")


class EncodedLayers(list):
    """`encode_layers`' result, (header, body) per layer. `whole`: for raw layers, the C-contiguous `[L, 2, T, H, D]`
    array whose rows the bodies are, so a group of layers is stored as one slice of it (None for fp8)."""

    def __init__(self, layers: list[tuple[Header, np.ndarray]], whole: np.ndarray | None = None) -> None:
        super().__init__(layers)
        self.whole = whole


def encode_layers(kv: np.ndarray, dtype: str, codec: str) -> EncodedLayers:
    """Every layer of one entry's K/V `[L, 2, T, H, D]`, over one C-contiguous copy of `kv` (none if it is one
    already). Raw layers are its rows, each with its header (what `encode` gives, without its per-layer calls: at
    30 layers they were a tenth of a put's own work in-process)."""
    kv = np.ascontiguousarray(kv)
    if codec != "raw":
        return EncodedLayers([encode(layer, dtype, codec) for layer in kv])
    shape = tuple(kv.shape[1:])
    return EncodedLayers([(Header("raw", dtype, shape, checksum(layer)), layer) for layer in kv], kv)


def decode_into(header: Header, body: memoryview | bytes, out: np.ndarray, verify: bool, what: str) -> None:
    """Decode a stored layer into `out` (`[2, T, H, D]`, the logical dtype): one copy for raw bodies."""
    check(header, body, out.shape, out.dtype, verify, what)
    if header.codec == "raw":
        src = np.frombuffer(body, dtype=kv_numpy_dtype(header.dtype)).reshape(header.shape)
        np.copyto(out, src)
    elif header.codec == "fp8":
        q = np.frombuffer(body, dtype=kv_numpy_dtype("float8_e4m3fn")).reshape(header.shape)
        scales = np.frombuffer(header.scales, dtype=np.float32).reshape(header.shape[0], 1, *header.shape[2:])
        np.copyto(out, (q.astype(np.float32) * scales).astype(out.dtype))
    else:  # pragma: no cover - Header.unpack only yields known codecs
        raise DataLoss(f"{what} has unknown codec {header.codec!r}")


def body_bytes(header: Header) -> int:
    itemsize = 1 if header.codec == "fp8" else kv_numpy_dtype(header.dtype).itemsize
    return math.prod(header.shape) * itemsize + len(header.scales)


@functools.lru_cache(maxsize=256)
def raw_prefix(dtype: str, shape: tuple) -> bytes:
    """The bytes every raw header of a layer of logical `dtype` and `shape` starts with (all but its checksum): a
    stored header equal to it, HEADER_BYTES long, with a body of the layer's size, passes every check of `check`
    but the checksum (the batched fast path of a fetch compares bytes instead of unpacking each header)."""
    return _fixed("raw", dtype, tuple(shape), 0)[:HEADER_BYTES - 8]


def stored_checksum(head: bytes | memoryview) -> int:
    """The checksum field of a packed header (the last 8 bytes of a raw one)."""
    return int.from_bytes(head[HEADER_BYTES - 8:HEADER_BYTES], "little")


def header_scale_bytes(head: bytes | memoryview) -> int:
    """How many fp8 scale bytes follow the fixed part of the packed header at the start of `head` (0 for raw, or
    for a header too damaged to say)."""
    try:
        codec, _, ndim, _, d0, _, d2, d3, _ = _HEADER.unpack_from(head, 0)
    except struct.error:
        return 0
    return 4 * d0 * d2 * d3 if codec < len(CODECS) and CODECS[codec] == "fp8" and ndim == 4 else 0


def split_group(head: bytes | memoryview, body: bytes | memoryview, count: int,
                what: str) -> list[tuple[memoryview, memoryview]]:
    """The (header, body) of each of `count` layers stored as one record (lmdb_store's layer groups): their packed
    headers back to back in `head`, their bodies back to back in `body`, each as long as its header says. DataLoss
    if the bytes do not split into exactly that."""
    hv, bv = memoryview(head).cast("B"), memoryview(body).cast("B")
    out, h, b = [], 0, 0
    for i in range(count):
        try:
            codec, dtype, ndim, _, *dims, _ = _HEADER.unpack_from(hv, h)
            itemsize = 1 if CODECS[codec] == "fp8" else kv_numpy_dtype(KV_DTYPES[dtype]).itemsize
        except (struct.error, IndexError) as exc:
            raise DataLoss(f"{what}: header {i} of {count} is corrupt ({len(hv)} header bytes): {exc}") from None
        hn = HEADER_BYTES + header_scale_bytes(hv[h:h + HEADER_BYTES])
        n = math.prod(dims[:ndim]) * itemsize
        out.append((hv[h:h + hn], bv[b:b + n]))
        h, b = h + hn, b + n
    if h != len(hv) or b != len(bv):
        raise DataLoss(f"{what}: a record of {count} layers has {len(hv)} header and {len(bv)} body bytes; its "
                       f"headers account for {h} and {b}")
    return out


def check(header: Header, body: memoryview | bytes, shape: tuple, dtype: np.dtype, verify: bool, what: str) -> None:
    """Everything decoding relies on (and, with `verify`, the checksum), without decoding: DataLoss if not."""
    out_shape, out_dtype = tuple(shape), np.dtype(dtype)
    if verify and checksum(body, header.scales) != header.checksum:
        raise DataLoss(f"checksum mismatch in {what}: stored bytes are corrupt")
    if out_shape != tuple(header.shape):
        raise DataLoss(f"{what} has stored shape {header.shape}, expected {out_shape}")
    # The checksum covers body and scales, not the header's fields: a flipped codec or dtype byte, or a cut
    # value, must still be DataLoss (with verification off too), never a ValueError or a silent cast.
    if kv_numpy_dtype(header.dtype) != out_dtype:
        raise DataLoss(f"{what} has stored dtype {header.dtype}, expected {out_dtype}")
    scale_bytes = 4 * header.shape[0] * math.prod(header.shape[2:]) if header.codec == "fp8" else 0
    if len(header.scales) != scale_bytes or len(body) + len(header.scales) != body_bytes(header):
        raise DataLoss(f"{what} has {len(body)} body and {len(header.scales)} scale bytes; its {header.codec} "
                       f"header of shape {header.shape} needs {body_bytes(header) - scale_bytes} and {scale_bytes}")


def check_raw(header: Header, body: memoryview | bytes, dtype: np.dtype, verify: bool, what: str) -> None:
    """A raw body whose bytes can be handed out as they are stored (the streaming plane); DataLoss if not."""
    if header.codec != "raw":
        raise DataLoss(f"{what} is stored as {header.codec!r}, expected raw")
    check(header, body, header.shape, dtype, verify, what)


def fetched_view(header: Header, body: memoryview | bytes, layer_shape: tuple, dtype: np.dtype, verify: bool,
                 what: str) -> memoryview:
    """One layer's bytes as a fetch returns them: a raw body as it is stored (no copy), another codec decoded."""
    if header.codec == "raw":
        check_raw(header, body, dtype, verify, what)
        return memoryview(body)
    tmp = np.empty(layer_shape, dtype)  # [2, T, H, D]
    decode_into(header, body, tmp, verify, what)
    return memoryview(tmp.reshape(-1).view(np.uint8))
