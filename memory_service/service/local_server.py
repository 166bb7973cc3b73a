"""The local socket: the SHM plane's calls without gRPC, for clients on the service's host.

Owns a Unix stream socket (Linux's abstract namespace by default; its name goes to clients in
RegisterArenaResponse.local_socket) that takes Query, Fetch, QueryFetch and Put as LocalCall frames
(wire/local.py, convert.local_*) and answers each with a LocalAnswer. Why: Python gRPC costs about 0.5 ms a
call on each side of this machine's loopback (a health check: 0.46 ms p50), a socket round trip about 0.07 ms,
and on the SHM plane a chunk's memory work is one or two calls whose payload already moved through the arena.

Promises:
- the same code answers: each call runs the servicer's own method (auth by the call's authorization, tenant
  checks, arenas, quotas, deadlines), and its failure is the status the gRPC port would send
  (ServiceInterceptor.status: code, message, trailing metadata), counted in the same metrics;
- the drain covers it (ServiceInterceptor.local_call): a call that arrives while the server drains is
  UNAVAILABLE, and MemoryServer.stop closes the bank only once no local call runs;
- a hostile same-host peer cannot hurt the service: frames over the message limit are refused before their
  bytes are read (RESOURCE_EXHAUSTED, then the connection closes), a malformed frame is INVALID_ARGUMENT,
  connections past `max_connections` are told UNAVAILABLE with trailer memflow-local-refused (no call ran:
  MemoryClient makes it by gRPC) and closed, and a peer that stops reading or writing holds only its own
  connection's thread;
- no socket, no harm: a client that cannot connect uses gRPC for the same calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import stat
import sys
import threading
import time
from typing import Any, Optional

from memory_service.errors import InvalidArgument, MemFlowError, ResourceExhausted, Unavailable
from memory_service.service.interceptors import ServiceInterceptor, one_answer
from memory_service.service.servicer import MemoryServicer
from memory_service.wire import convert, local

log = logging.getLogger("memflow.service")


class _Context:
    """What the servicer asks of a call's context: its metadata and the time left before its deadline."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], timeout: Optional[float]) -> None:
        self._metadata = metadata
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> Optional[float]:
        return None if self._deadline is None else self._deadline - time.monotonic()


class LocalServer:
    """Listens on `name` ("@x": abstract, else a path) and answers each connection on its own thread."""

    def __init__(self, servicer: MemoryServicer, interceptor: ServiceInterceptor, name: str,
                 max_frame_bytes: int, max_connections: int = 64) -> None:
        self.servicer = servicer
        self.interceptor = interceptor
        self.name = name
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self._handlers = {
            "Query": servicer.Query,
            "Fetch": one_answer("Fetch", servicer.Fetch),
            "QueryFetch": one_answer("QueryFetch", servicer.QueryFetch),
            "Put": lambda request, context: servicer.Put(iter((request,)), context),
        }
        self._listener: Optional[socket.socket] = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Listen; OSError (EADDRINUSE: another process listens on the name) when it cannot."""
        if not self.name.startswith("@"):
            _clear_stale(self.name)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(local.address(self.name))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        listener.settimeout(0.5)  # accept() wakes to see close(): closing a socket does not wake a blocked accept
        self._listener = listener
        threading.Thread(target=self._accept, name="memflow-local-accept", daemon=True).start()

    def close(self) -> None:
        """Stop listening and end every connection (their threads exit at their next read)."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, set()
        if self._listener is not None:
            _shut(self._listener)
            if not self.name.startswith("@"):
                with contextlib.suppress(OSError):
                    os.unlink(self.name)
        for conn in connections:
            _shut(conn)

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed
            conn.settimeout(None)
            with self._lock:
                refused = self._closed or len(self._connections) >= self.max_connections
                if not refused:
                    self._connections.add(conn)
            if refused:
                self._refuse(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="memflow-local", daemon=True).start()

    def _refuse(self, conn: socket.socket) -> None:
        exc = Unavailable(f"the memory service's local socket has its {self.max_connections} connections open; "
                          "make this call by gRPC (it did not run)")
        code, message, _ = self.interceptor.status("local", exc)
        try:
            conn.settimeout(1.0)
            local.send(conn, convert.local_failure(code, message, ((convert.LOCAL_REFUSED_KEY, "connections"),)))
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    frame = local.receive(conn, self.max_frame_bytes)
                except local.FrameTooLarge as exc:
                    self._answer_error(conn, "local", ResourceExhausted(
                        f"{exc}: the service's message limit (max_message_bytes) is {self.max_frame_bytes}; "
                        "send smaller calls, or this one by gRPC"))
                    return  # its bytes were never read: the connection cannot go on
                if frame is None:
                    return
                self._call(conn, frame)
        except (OSError, ConnectionError):
            return  # the peer went away (or close() shut the socket)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _call(self, conn: socket.socket, frame: bytes) -> None:
        try:
            method, request, timeout, metadata = convert.local_call_from_wire(frame)
        except InvalidArgument as exc:
            self._answer_error(conn, "local", exc)
            return
        with self.interceptor.local_call(method):
            try:
                context = _Context(metadata, timeout)
                self.interceptor.admit(context)
                response: Any = self._handlers[method](request, context)
                answer = convert.local_answer(response)
            except Exception as exc:  # noqa: BLE001 - every failure is answered as its status, as gRPC's would be
                code, message, trailers = self.interceptor.status(method, exc)
                answer = convert.local_failure(code, message, trailers)
            local.send(conn, answer)

    def _answer_error(self, conn: socket.socket, method: str, exc: MemFlowError) -> None:
        code, message, trailers = self.interceptor.status(method, exc)
        local.send(conn, convert.local_failure(code, message, trailers))


def socket_name(setting: str) -> Optional[str]:
    """The name to listen on for config.local_socket ("auto": a fresh abstract name on Linux, none elsewhere)."""
    if setting == "off":
        return None
    if setting == "auto":
        return f"@memflow-{os.getpid()}-{secrets.token_hex(6)}" if sys.platform.startswith("linux") else None
    return setting


def _clear_stale(path: str) -> None:
    """Remove a socket file no process listens on (a service killed before it could); leave anything else."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # not a socket: bind says EADDRINUSE, and the operator's file stays
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
