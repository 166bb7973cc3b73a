"""Packing the streaming plane's K/V into kv_chunk messages that fill the chunk size.

A fetch's bytes are a sequence of records (one layer of one entry), read from the store one at a time; the wire
(protos/memflow/v1/memory.proto, FetchResponse.kv_chunk) carries them as "the next bytes", in chunks of at most
CHUNK_BYTES, with no meaning in where one chunk ends. Sending a message per record cost about 0.2-0.5 ms each on
loopback (a 2 MB fetch of 150 small records took 28 ms); so the packer fills messages across records:
- a record's bytes that fill whole chunks go out framed straight from the store's memory map (one copy);
- what is left of a record (its tail, or a whole small record) is kept (copied) and the next record tops it up to
  a full chunk; only those kept bytes are copied twice, and only tails under half a chunk are kept, so at most a
  third of a large record's bytes are (a Wan2.1 layer of 9.58 MB: its 1.2 MB tail);
- the last message holds whatever is left.
Every message is at most `chunk_bytes` of K/V, so with its framing it fits a stock client's 4 MiB limit.
`Packer.record(view)` is called inside the store's read view (it copies what it keeps); the messages it returns,
and `Packer.finish()`'s, are yielded in order, after the view is closed.
"""

from __future__ import annotations

from typing import Callable, Optional

from memory_service.wire.framing import chunk_to_wire, chunks_to_wire


class Packer:
    """Cuts a stream of records into framed kv_chunk messages of `chunk_bytes` (the last one shorter)."""

    def __init__(self, chunk_bytes: int, counted: Optional[Callable[[int], None]] = None) -> None:
        self.chunk = int(chunk_bytes)
        self.counted = counted  # told each record's size as it is read (metrics)
        self._held: list[bytes] = []  # kept bytes, in order, less than a chunk in all
        self._size = 0

    def record(self, view: memoryview) -> list[bytes]:
        """The messages that `view` (one record, valid only during this call) completes, in order."""
        n = len(view)
        if self.counted is not None:
            self.counted(n)
        out: list[bytes] = []
        pos = 0
        if self._held:
            take = min(n, self.chunk - self._size)
            self._held.append(bytes(view[:take]))
            self._size += take
            pos = take
            if self._size < self.chunk:
                return out  # the whole record fitted in what is kept
            out.append(chunks_to_wire(self._held))
            self._held, self._size = [], 0
        while n - pos >= self.chunk:
            out.append(chunk_to_wire(view[pos:pos + self.chunk]))
            pos += self.chunk
        rest = n - pos
        if rest * 2 >= self.chunk:  # a large tail goes as it is: copying it twice would cost more than a message
            out.append(chunk_to_wire(view[pos:]))
        elif rest:
            self._held.append(bytes(view[pos:]))
            self._size = rest
        return out

    def finish(self) -> list[bytes]:
        """The last message: what is still kept (none when nothing is)."""
        if not self._held:
            return []
        out = [chunks_to_wire(self._held)]
        self._held, self._size = [], 0
        return out
