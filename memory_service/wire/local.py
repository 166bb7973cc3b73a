"""Framing of the local socket (proto: "the local socket"): bytes only, no message classes.

Owns how a LocalCall or LocalAnswer travels on a Unix stream socket - a 4-byte little-endian length, then the
message's bytes - and how RegisterArenaResponse.local_socket names the socket ("@name": Linux's abstract
namespace; anything else: a filesystem path). Both halves use it: the service (service/local_server.py) and
MemoryClient (local_channel.py). convert.py builds and reads the messages themselves.
"""

from __future__ import annotations

import socket
import struct
from typing import Optional, Union

_LENGTH = struct.Struct("<I")
MAX_FRAME = (1 << 32) - 1  # what the length prefix can say


class FrameTooLarge(Exception):
    """A frame's length prefix says more bytes than the receiver takes (its message limit)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"local socket frame of {size} bytes is over the limit of {limit}")
        self.size, self.limit = size, limit


def address(name: str) -> Union[str, bytes]:
    """The address `socket.connect` / `bind` takes for an advertised name ("@x" -> b"\\0x", else the path)."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def send(sock: socket.socket, payload: bytes) -> None:
    """One frame: its length and its bytes, in one send."""
    if len(payload) > MAX_FRAME:
        raise FrameTooLarge(len(payload), MAX_FRAME)
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def receive(sock: socket.socket, limit: int) -> Optional[bytes]:
    """The next frame's bytes; None when the peer closed the connection between frames. A connection that ends
    inside a frame is ConnectionError; a length over `limit` is FrameTooLarge (its bytes are not read)."""
    head = _read(sock, _LENGTH.size, at_boundary=True)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > limit:
        raise FrameTooLarge(size, limit)
    body = _read(sock, size, at_boundary=False)
    assert body is not None, "only a read at a frame boundary may end the connection cleanly"
    return body


def _read(sock: socket.socket, n: int, at_boundary: bool) -> Optional[bytes]:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0 and at_boundary:
                return None
            raise ConnectionError(f"local socket closed inside a frame ({got} of {n} bytes read)")
        got += k
    return bytes(buf)
