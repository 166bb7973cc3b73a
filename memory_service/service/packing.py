"""Packing the streaming plane's K/V into kv_chunk messages of about one target size.

A fetch's bytes are a sequence of records (one layer of one entry), read from the store one at a time; the wire
(protos/memflow/v1/memory.proto, FetchResponse.kv_chunk) carries them as "the next bytes", in chunks of at most
CHUNK_BYTES, with no meaning in where one chunk ends. So the packer chooses the messages:
- small records (under a quarter of `target`) are kept (copied) and sent together once they reach `target`: a
  message per record cost about 0.2-0.5 ms on loopback (a 2 MB fetch of 150 12 KiB records took 28 ms);
- larger records go in even pieces of at most `target`, framed straight from the store's memory map (one copy),
  after whatever was kept; the last message holds whatever is left.
The target (the servicer's PACK_TARGET, 1 MiB) is smaller than the chunk limit on purpose: messages of about
1 MiB keep sender and receiver working in parallel, where 4 MiB ones make each wait for the other (measured).
Every message is at most `chunk_bytes` of K/V, so with its framing it fits a stock client's 4 MiB limit.
`Packer.record(view)` is called inside the store's read view (it copies what it keeps); the messages it returns,
and `Packer.finish()`'s, are yielded in order, after the view is closed.
"""

from __future__ import annotations

from typing import Callable, Optional

from memory_service.wire.framing import chunk_to_wire, chunks_to_wire


class Packer:
    """Cuts a stream of records into framed kv_chunk messages of about `target` bytes, none over `chunk_bytes`."""

    def __init__(self, chunk_bytes: int, counted: Optional[Callable[[int], None]] = None,
                 target: Optional[int] = None) -> None:
        self.chunk = int(chunk_bytes)
        self.target = min(self.chunk, int(target or self.chunk))
        self.counted = counted  # told each record's size as it is read (metrics)
        self._held: list[bytes] = []  # kept small records, in order, less than `target` in all (or one record)
        self._size = 0

    def record(self, view: memoryview) -> list[bytes]:
        """The messages that `view` (one record, valid only during this call) completes, in order."""
        n = len(view)
        if self.counted is not None:
            self.counted(n)
        out: list[bytes] = []
        if not n:
            return out
        if n < self.target // 4:  # small: kept, and sent with the records after it once they reach the target
            if self._size + n > self.chunk:
                out += self.finish()
            self._held.append(bytes(view))
            self._size += n
            if self._size >= self.target:
                out += self.finish()
            return out
        out += self.finish()  # large: what is kept goes first, then the record in pieces straight from the map
        pieces = -(-n // self.target)
        step = -(-n // pieces)  # even pieces: a record just over the target goes as two halves, not one and a sliver
        out += [chunk_to_wire(view[pos:pos + step]) for pos in range(0, n, step)]
        return out

    def finish(self) -> list[bytes]:
        """The last message: what is still kept (none when nothing is)."""
        if not self._held:
            return []
        out = [chunks_to_wire(self._held)]
        self._held, self._size = [], 0
        return out
