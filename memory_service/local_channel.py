"""LocalChannel: MemoryClient's half of the local socket (service/local_server.py; proto "the local socket").

Owns the connections to the socket a service advertised in RegisterArenaResponse.local_socket: a small pool,
one call at a time on each (a client used from several threads opens one per concurrent call), dropped in a
forked child. Promises:
- `call(method, request, timeout, metadata)` returns the method's response message, or raises the MemFlowError
  the service answered (the class gRPC's status would map to: convert.error_from);
- Unreachable when the call was never run: nothing advertised, the connect failed, the connection was closed
  before the call went out, or the service had no room for another connection. The caller then makes the same
  call by gRPC. A name that failed is forgotten until a RegisterArena answer names one again (a restarted
  service names a new one), so a client never sends its token to a socket the service did not just name;
- after the call went out: DeadlineExceeded when no answer came within `timeout` (that connection is dropped:
  its answer may still come), Unavailable when the connection closed before the answer (the service died or
  stopped: the call may or may not have run, as with gRPC's UNAVAILABLE).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Optional, Sequence

from memory_service.errors import DeadlineExceeded, Unavailable
from memory_service.wire import convert, local

IDLE_CONNECTIONS = 8  # connections kept open between calls; more concurrent calls open (and close) their own


class Unreachable(Exception):
    """The local socket did not take the call; nothing of it ran (make it by gRPC)."""


class LocalChannel:
    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._name = ""
        self._pid = os.getpid()
        self._closed = False

    @property
    def name(self) -> str:
        """The socket calls go to ("" while none: gRPC then takes them)."""
        return self._name

    def advertised(self, name: str) -> None:
        """What the service's latest RegisterArena answer named ("" for none)."""
        self._switch(str(name), None)

    def _switch(self, name: str, only_if: Optional[str]) -> None:
        with self._lock:
            if only_if is not None and self._name != only_if:
                return
            if name != self._name:
                dropped, self._idle = self._idle, []
                self._name = name
            else:
                dropped = []
        for sock in dropped:
            sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._switch("", None)

    def call(self, method: str, request: Any, timeout: float, metadata: Sequence[tuple[str, str]],
             hold: object = None) -> Any:
        """`hold`: what must outlive the service's work on the call (the arena lease it writes into). After a
        deadline the service may still be copying into it, so a late answer is awaited on another thread, which
        keeps `hold` until it comes (or the connection ends): the lease is never handed out again under a copy."""
        frame = convert.local_call(method, request, timeout, metadata)
        taken, name = self._take()
        sock: Optional[socket.socket] = taken
        try:
            taken.settimeout(timeout)
            try:
                local.send(taken, frame)
            except OSError as exc:
                if not _refused(taken):  # full: the service said so and closed; the name stays good
                    self._switch("", only_if=name)
                raise Unreachable(f"the local socket {name} closed before {method} went out ({exc})") from None
            try:
                data = local.receive(taken, self.max_frame_bytes)
            except socket.timeout:
                threading.Thread(target=_await_late, args=(taken, hold), name="memflow-local-late", daemon=True).start()
                sock = None  # the thread closes it
                raise DeadlineExceeded(f"{method} got no answer within {timeout:g} s on the local socket "
                                       f"{name}") from None
            except (OSError, ConnectionError, local.FrameTooLarge) as exc:
                data, why = None, str(exc)
            else:
                why = "at a frame boundary"
            if data is None:
                self._switch("", only_if=name)
                raise Unavailable(f"the local socket {name} closed before {method}'s answer ({why}): the service "
                                  "stopped or restarted; the call may or may not have run")
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        finally:
            hold = None  # a failed call's traceback keeps this frame: only a late answer's thread keeps the lease
        try:
            answer = convert.local_answer_from_wire(method, data)
        except convert.LocalRefused as exc:
            taken.close()
            raise Unreachable(str(exc)) from None
        except BaseException:
            self._give(taken, name)  # a refusal of this call: the connection goes on
            raise
        self._give(taken, name)
        return answer

    def _take(self) -> tuple[socket.socket, str]:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: its parent's connections are the parent's
                self._idle, self._pid = [], os.getpid()
            name = self._name
            if self._closed or not name:
                raise Unreachable("no local socket: the service named none, or its last one failed")
            if self._idle:
                return self._idle.pop(), name
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(local.address(name))
        except OSError as exc:
            sock.close()
            self._switch("", only_if=name)
            raise Unreachable(f"cannot connect to the local socket {name} ({exc})") from None
        return sock, name

    def _give(self, sock: socket.socket, name: str) -> None:
        with self._lock:
            if not self._closed and name == self._name and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(sock)
                return
        sock.close()


def _refused(sock: socket.socket) -> bool:
    """Whether what the service sent before closing `sock` is a refusal of the connection (convert.LocalRefused)."""
    try:
        data = local.receive(sock, 1 << 16)
        if data is not None:
            convert.local_answer_from_wire("Query", data)
    except convert.LocalRefused:
        return True
    except Exception:  # noqa: BLE001 - anything else: not a refusal
        pass
    return False


def _await_late(sock: socket.socket, hold: object, wait_s: float = 300.0) -> None:
    """Read (and drop) the answer of a call past its deadline, holding `hold` until the service is done with it."""
    try:
        sock.settimeout(wait_s)
        local.receive(sock, local.MAX_FRAME)
    except (OSError, ConnectionError):
        pass
    finally:
        sock.close()
        del hold
