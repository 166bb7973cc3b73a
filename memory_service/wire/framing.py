"""K/V chunk framing on the streaming plane: bytes only, no message classes.

Owns the one chunk size of the streaming plane (CHUNK_BYTES, both directions: Fetch from the service, Put from
MemoryClient) and the byte layout of a lone `kv_chunk` message. Promises: every framed chunk is a message that
fits a stock gRPC client's default 4 MiB receive limit, and its bytes are exactly what any protobuf library
writes and reads for `{kv_chunk: bytes}` (convert.py parses everything else).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

# PutRequest and FetchResponse carry K/V bytes as field 2 (`kv_chunk`) of a oneof. A message holding only that
# field is, on the wire, the tag byte 0x12, a varint length and the bytes. Framing and unframing it here, instead
# of through message objects, saves two full copies per direction (measured by benchmarks/transport.py).

_CHUNK_TAG = b"\x12"  # field 2, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# The one chunk size of the streaming plane, both directions (Fetch from the service, Put from MemoryClient). Stock
# gRPC clients (grpc-js, Go, Java, C++, Python) refuse a received message over 4 MiB unless told otherwise, and
# the limit counts the whole serialized message: tag, length and bytes. A chunk of 4 MiB - 4 KiB leaves room for
# that framing (5 bytes) and keeps every chunk page-aligned in the buffers it is cut from.
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
CHUNK_BYTES = DEFAULT_MAX_MESSAGE_BYTES - (4 << 10)


def chunk_to_wire(chunk: Any) -> bytes:
    """The serialized `{kv_chunk: chunk}` message, copying `chunk` (any buffer) exactly once."""
    return b"".join((_CHUNK_TAG, _varint(len(chunk)), chunk))


def chunks_to_wire(parts: Sequence[Any]) -> bytes:
    """One serialized `{kv_chunk: the parts back to back}` message (their total at most CHUNK_BYTES), copying each
    part once: small records travel several to a message instead of one message each."""
    return b"".join((_CHUNK_TAG, _varint(sum(len(p) for p in parts)), *parts))


def chunk_from_wire(data: bytes) -> Optional[memoryview]:
    """A zero-copy memoryview of the chunk when `data` is a lone kv_chunk message, else None."""
    if data[:1] != _CHUNK_TAG:
        return None
    length, shift, pos = 0, 0, 1
    while pos < len(data) and pos < 11:
        byte = data[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return memoryview(data)[pos:] if pos + length == len(data) else None
        shift += 7
    return None


def to_wire(message: Any) -> bytes:
    """Serializer that passes already-framed chunks (bytes) through."""
    return message if isinstance(message, bytes) else message.SerializeToString()
