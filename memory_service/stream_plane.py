"""The client half of the gRPC streaming plane: a Put's K/V out in pieces, a Fetch's or QueryFetch's K/V in.

Owns how MemoryClient cuts and gathers K/V bytes on the streaming plane (the service's half is
service/packing.py): a Put sends each entry's K/V in pieces of PUT_PIECE_BYTES framed as kv_chunk messages
(wire/framing.py), and an answer's kv_chunk messages are copied, in order, into one buffer of exactly the size
its header announced. Promises: a stream that sends a second header, more bytes than announced or fewer is a
MemFlowError saying how many bytes came; a failed call is the MemFlowError its status stands for.

The buffers answers are gathered into come from a `buffers.Buffers` recycler (one per client): a buffer whose
arrays the caller has all dropped is written again by a later answer of the same size, instead of a fresh
allocation whose every page the kernel must fault in and zero on first write. For 287.5 MB frames that zeroing
was about 40% of the client's CPU per fetch (perf: clear_page_erms under the gather's memmove) and most of its
variance.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np

from memory_service.buffers import RECYCLE_MIN_BYTES, RECYCLE_SLOTS, Buffers  # noqa: F401 - re-exported
from memory_service.errors import MemFlowError
from memory_service.wire.framing import chunk_to_wire

# Pieces of 1 MiB, not the 4 MiB the wire allows: smaller messages keep both ends busy (a 28.75 MB put over
# loopback took 126-176 ms in 1 MiB pieces against 185-228 ms in 4 MiB ones; the service answers in ~1 MiB too).
PUT_PIECE_BYTES = 1 << 20


def put_requests(first: Any, kvs: Sequence[np.ndarray]) -> Iterator[object]:
    """A streaming-plane Put: its header message, then every K/V array's bytes in framed pieces, in order."""
    yield first
    for a in kvs:
        flat = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        for start in range(0, flat.nbytes, PUT_PIECE_BYTES):
            yield chunk_to_wire(flat[start:start + PUT_PIECE_BYTES])


def gather(responses: Iterator[Any], out: np.ndarray, what: str,
           error: Callable[[grpc.RpcError], Exception]) -> None:
    """Copy the kv_chunk messages left in `responses` (memoryviews, as convert's deserializers give them) into
    `out` (uint8, exactly the bytes announced); `error` maps a failed call to its exception."""
    total, got = len(out), 0
    try:
        for chunk in responses:
            if not isinstance(chunk, memoryview) or got + len(chunk) > total:
                raise MemFlowError(f"{what} stream sent a second header or too many bytes; expected {total} bytes "
                                   "of K/V chunks")
            out[got:got + len(chunk)] = np.frombuffer(chunk, np.uint8)
            got += len(chunk)
    except grpc.RpcError as exc:
        raise error(exc) from None
    if got != total:
        raise MemFlowError(f"{what} stream ended after {got} of {total} bytes")


def gather_array(responses: Iterator[Any], take: Callable[[int], np.ndarray], dtype: np.dtype,
                 shape: tuple[int, ...], nbytes: int, error: Callable[[grpc.RpcError], Exception]) -> np.ndarray:
    """A Fetch answer's K/V: the header's `shape` of `dtype`, gathered into a buffer of `take(nbytes)` (a
    Buffers.take) after checking that the header's byte count is what that shape holds."""
    need = math.prod(shape) * dtype.itemsize if all(d >= 0 for d in shape) else None
    if need != nbytes:
        raise MemFlowError(f"fetch header says {nbytes} bytes for {need if need is not None else 'no'} bytes of "
                           f"{dtype.name}{list(shape)}")
    flat = take(nbytes)
    gather(responses, flat, "fetch", error)
    return flat.view(dtype).reshape(shape)
