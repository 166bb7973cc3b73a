"""The streaming plane's packer (memory_service/service/packing.py): records in, kv_chunk messages out.

Whatever the record sizes, the messages carry exactly the records' bytes in order, none over the chunk size
(with its framing, under a stock client's 4 MiB), small records share messages instead of one each, and large
ones go in even pieces of the target size.
"""

from __future__ import annotations

import numpy as np
import pytest

from memory_service.service.packing import Packer
from memory_service.wire.framing import CHUNK_BYTES, chunk_from_wire

CHUNK = 1000


def pack(sizes: list[int], chunk: int = CHUNK, target=None) -> tuple[bytes, list[bytes], list[int]]:
    rng = np.random.default_rng(len(sizes))
    records = [rng.integers(0, 256, n, np.uint8).tobytes() for n in sizes]
    counted: list[int] = []
    packer = Packer(chunk, counted.append, target)
    messages = [m for r in records for m in packer.record(memoryview(r))] + packer.finish()
    return b"".join(records), messages, counted


@pytest.mark.parametrize("sizes", [
    [12] * 300,  # tiny records (2-token payloads): many to a message
    [2500, 2500, 2500],  # records of several chunks
    [2700, 10, 2700],  # a small record between large ones
    [1000, 1000],  # exactly a chunk each
    [999, 1, 1001, 0, 499, 501, 1],  # edges
    [],
])
def test_messages_carry_the_records_in_order_and_fit_the_chunk(sizes):
    data, messages, counted = pack(sizes)
    chunks = [chunk_from_wire(m) for m in messages]
    assert all(c is not None for c in chunks)  # each a lone kv_chunk message as any protobuf library writes it
    assert b"".join(bytes(c) for c in chunks) == data
    assert all(0 < len(c) <= CHUNK for c in chunks)
    assert counted == sizes


def test_small_records_share_messages():
    _, messages, _ = pack([12] * 300)  # 3600 bytes: 4 messages, not 300
    assert len(messages) == 4


def test_large_records_go_in_even_pieces_of_the_target():
    data, messages, _ = pack([50, 2500, 50], target=1000)  # kept, then 3 even pieces of the large one, then kept
    assert [len(chunk_from_wire(m)) for m in messages] == [50, 834, 834, 832, 50]


@pytest.mark.parametrize("target", [None, 1 << 20])
def test_the_default_chunk_fits_a_stock_client(target):
    _, messages, _ = pack([9_584_640, 9_584_640], CHUNK_BYTES, target)  # two Wan2.1 layers
    assert max(len(m) for m in messages) < 4 << 20
