"""MemoryClient: the public memory protocol over gRPC (the same methods, results and exceptions as LocalMemory).

Owns the client half of the wire contract. Promises:
- every call carries a deadline (`timeout`, default 30 s); idempotent calls (query, fetch, stats, list,
  pin, register) are retried on UNAVAILABLE with backoff, writes never are;
- a failed call raises the same MemFlowError class LocalMemory would, with the service's message
  (status codes are mapped back in `_error`, the one place);
- it survives service restarts: the channel reconnects within about a second on loopback (reconnect backoff
  100 ms growing to at most 1 s, so a dead service sees at most about one connection attempt a second), and
  the shared-memory plane registers its same arenas again when the service says it lost them
  (ArenaNotRegistered); a fetch sized by a layout the stream no longer has (StaleLayout) reloads it and retries;
- one client may be used from many threads: the stubs are thread-safe and the arenas are an ArenaPool (one
  lock; nothing is closed while a lease or a call holds it);
- connecting warms up what the first calls would otherwise pay for (the channel's connection, the K/V dtype
  table, the layouts of existing streams), so a caller with a tight deadline gets memory from its first call;
- it speaks only the wire contract (memory_service.wire: the generated code and convert.py, where every
  message is built and read), never the server's modules;
- K/V bytes take the same-host shared-memory plane when the target is on this host and the service can map
  the client's arena, otherwise the gRPC streaming plane. `plane="auto"` chooses and logs the choice once;
  `plane="shm"` fails with FailedPrecondition when shared memory cannot work (never a silent slow path);
- fetch over shm returns arrays that view the arena directly (zero copy); their bytes stay reserved until
  the last array over them is garbage-collected. `arena_array()` hands out arena-backed buffers so a put
  of K/V built there skips the client-side copy;
- `target` may name several nodes of a cluster ("h1:p1,h2:p2" or a sequence of addresses): the constructor then
  returns a `routing.RoutedClient`, a MemoryClient that holds one single-node MemoryClient per node and sends
  each stream's calls to its owner (routing.py says what is routed, what is retried and what never is). One
  address builds exactly the single-node client, at no new cost per call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional, overload, Sequence, TypeVar, Union

import grpc
import numpy as np

from memory_service.arena_pool import ArenaPool, ArenaUsage
from memory_service.config import is_loopback
from memory_service.cluster.directory import is_directory
from memory_service.errors import (
    ArenaNotRegistered, FailedPrecondition, InvalidArgument, MemFlowError, NotFound, PermissionDenied,
    ResourceExhausted, StaleLayout, Unauthenticated, Unavailable, DeadlineExceeded,
)
from memory_service.local_channel import LocalChannel, Unreachable
from memory_service.protocol import Ids, Memory, Resident, Vectors
from memory_service.query_fetch import FetchPlan, normalize_resident
from memory_service.shm import Arena
from memory_service.types import (
    BankStats, EntryMeta, FetchResult, NewEntry, PruneResult, QueryFetchResult, QueryResult, StreamSpec, StreamStats,
    kv_numpy_dtype,
)
from memory_service.validate import check_batch, check_id_list
from memory_service import stream_plane
from memory_service.wire import convert

log = logging.getLogger("memflow.client")
PLANES = ("auto", "shm", "stream")
T = TypeVar("T")
# gRPC's defaults wait 1 s, then 1.6x longer after each failed connection attempt (up to 2 minutes): a client
# whose service restarted got memory back only 12.7 s after the new one listened. These keep the first retry
# quick and the steady state at one attempt a second. The connect timeout (grpc.min_reconnect_backoff_ms,
# 20 s) is left alone: a remote service behind TLS needs it.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
SHM_RETRIES = 2  # reruns of a shared-memory call after ArenaNotRegistered / StaleLayout (a restart, a new layout)
# After a shared-memory call's deadline passed on gRPC, its lease stays reserved this long: the service may still be
# copying into it (a 0.1 s plugin deadline against a ~0.1 s fetch of 3 Wan frames), and a lease handed out again
# under that copy would give the next fetch another call's bytes. On the local socket the client waits for the
# late answer itself (local_channel.py).
LATE_COPY_S = 10.0
WARM_UP_S = 2.0  # at most this long spent warming up at connect (the service may be down; calls will say so)


class MemoryClient(Memory):
    """A connection to a memory service at `target` ("host:port"). Use as a context manager.

    Several addresses ("h1:p1,h2:p2" or a sequence) build a routing.RoutedClient instead (see the module doc);
    `failover_timeout_s` is how long its calls look for a node that serves them (unused with one address).

    `token`: bearer token (default: $MEMFLOW_TOKEN). `tls`: None (plaintext), True (system roots), or a CA
    certificate (path or PEM bytes). `plane`: "auto", "shm" or "stream". `arena_bytes`: initial size of the
    shared-memory arena (it grows for larger calls); `max_arenas`: how many arenas it may hold at once.
    """

    def __new__(cls, target: Union[str, Sequence[str]], *args: Any, **kwargs: Any) -> "MemoryClient":
        if cls is MemoryClient and (is_directory(target) or len(parse_targets(target)) > 1):
            from memory_service.routing import RoutedClient  # routing builds on this module
            return super().__new__(RoutedClient)  # Python then runs RoutedClient.__init__ with the same arguments
        return super().__new__(cls)

    def __init__(self, target: Union[str, Sequence[str]], token: Optional[str] = None,
                 tls: Union[None, bool, str, bytes] = None, *, timeout: float = 30.0, plane: str = "auto",
                 arena_bytes: int = 256 << 20, max_message_bytes: int = 64 << 20, retries: int = 3,
                 tls_server_name: Optional[str] = None, max_arenas: int = 16,
                 failover_timeout_s: float = 30.0) -> None:
        if plane not in PLANES:
            raise InvalidArgument(f"plane is {plane!r}, expected one of {PLANES}")
        (target,) = parse_targets(target)  # __new__ sent several to RoutedClient
        self.target = target
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.max_message_bytes = int(max_message_bytes)
        token = token if token is not None else os.environ.get("MEMFLOW_TOKEN")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = open_channel(target, tls, max_message_bytes, tls_server_name)
        calls = convert.Calls(self._channel)  # Put and Fetch move K/V chunks pre-framed (wire/framing.py)
        self._stub, self._put, self._fetch, self._query_fetch = calls.stub, calls.put, calls.fetch, calls.query_fetch
        self._query_fetch_one = calls.query_fetch_one  # QueryFetch on the SHM plane: one message (convert.Calls)
        self._fetch_one = calls.fetch_one  # Fetch on the SHM plane, likewise
        self.arena_bytes = int(arena_bytes)
        self._local = LocalChannel(self.max_message_bytes)  # the service's local socket, once an arena names it
        self._local_said = False
        self._pool = ArenaPool(self._register_arena, self._release_arena, self.arena_bytes, max_arenas)
        self._buffers = stream_plane.Buffers()  # the streaming plane's answers, reused once the caller drops them
        self._specs: dict[str, StreamSpec] = {}  # K/V layouts this client knows, by stream name
        self._specs_lock = threading.Lock()
        self._closed = False
        self._warm_up_channel()
        self.plane = self._choose_plane(plane)
        self._warm_up_calls()

    # -- plumbing -----------------------------------------------------------------------------------
    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._pool.close()
        self._local.close()
        self._buffers.clear()
        self._channel.close()

    def _rpc(self, method: Callable[..., Any], request: Any, *, idempotent: bool = False,
             timeout: Optional[float] = None) -> Any:
        """Call `method` with deadline and token; map a status back to our exception class."""
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    time.sleep(min(1.0, 0.05 * 2 ** attempt))
                    continue
                raise _error(exc) from None
            except ValueError as exc:
                if not self._closed:
                    raise
                # grpc refuses calls on a closed channel with a bare ValueError (close() from another thread)
                raise FailedPrecondition(f"the MemoryClient to {self.target} is closed ({exc}); expected calls "
                                         "only before close()") from None

    def _call(self, method: str, grpc_call: Callable[..., Any], request: Any, *, idempotent: bool = False,
              timeout: Optional[float] = None, hold: object = None) -> Any:
        """A call of the SHM plane's (convert.LOCAL_METHODS): by the service's local socket once it named one, else
        - or when the socket cannot take it, or an idempotent call found it closed - by gRPC (`grpc_call`)."""
        try:
            if self._local.name:
                try:
                    answer = self._local.call(method, request, timeout or self.timeout, self._metadata, hold)
                    if not self._local_said:
                        self._local_said = True
                        log.info("memflow: calls to %s by its local socket %s", self.target, self._local.name)
                    return answer
                except Unreachable as exc:
                    log.info("memflow: the local socket of %s did not take %s (%s); by gRPC", self.target, method,
                             exc)
                except Unavailable:
                    if not idempotent:
                        raise
            try:
                return self._rpc(grpc_call, iter((request,)) if method == "Put" else request, idempotent=idempotent,
                                 timeout=timeout)
            except DeadlineExceeded:
                if hold is not None:  # gRPC never says when the service's copy into the lease ends: keep it a while
                    late = threading.Timer(LATE_COPY_S, _forget, args=(hold,))
                    late.daemon = True  # a process that exits does not wait for it
                    late.start()
                raise
        finally:
            hold = None  # a failed call's traceback keeps this frame: it must not keep the lease too

    def _warm_up_channel(self) -> None:
        """Connect now (the first call would pay for it), waiting at most WARM_UP_S; a dead service ends it at once."""
        connected(self._channel, min(self.timeout, WARM_UP_S))

    def _warm_up_calls(self) -> None:
        """The K/V dtype table (ml_dtypes takes 0.5-0.9 s to import) and the layouts a shm fetch needs, now."""
        kv_numpy_dtype("bfloat16")
        try:
            self._learn(self._rpc(self._stub.ListStreams, convert.list_streams_request(),
                                  timeout=min(self.timeout, WARM_UP_S)))
        except MemFlowError as exc:  # down, or a token that the next real call will be refused for, clearly
            log.debug("memflow: warm-up of %s skipped: %s", self.target, exc)

    def _choose_plane(self, plane: str) -> str:
        if plane == "stream":
            chosen = "stream"
        elif plane == "auto" and not _same_host(self.target):
            chosen = "stream"
        else:
            try:
                self._pool.open()
                chosen = "shm"
            except MemFlowError as exc:
                if plane == "shm" and isinstance(exc, (Unauthenticated, PermissionDenied)):
                    raise  # a bad token, not a missing shared memory: say so, as every other call would
                if plane == "shm":
                    raise FailedPrecondition(f"shared-memory data plane requested but unavailable: {exc}") from None
                log.warning("memflow: shared memory unavailable to %s (%s); using the gRPC stream plane",
                            self.target, exc)
                chosen = "stream"
        log.info("memflow: %s data plane to %s", chosen, self.target)
        return chosen

    def _register_arena(self, arena: Arena) -> str:
        request = convert.register_arena_request(arena.name, arena.size, arena.nonce)
        reply = self._rpc(self._stub.RegisterArena, request, idempotent=True)
        self._local.advertised(reply.local_socket)
        return str(reply.arena_id)

    def _release_arena(self, arena_id: str) -> None:
        self._rpc(self._stub.ReleaseArena, convert.release_arena_request(arena_id), timeout=2.0)

    def arena_usage(self) -> ArenaUsage:
        """The shared-memory arenas this client holds now: how many, their bytes, live leases, registrations."""
        return self._pool.usage()

    def _shm_call(self, fn: Callable[[], T]) -> T:
        """Run a data-plane call; rerun it when the service lost our arenas (restart) or the stream's layout
        changed - `fn` itself says which and fixes what it knew (see _fetch_shm, _put_shm)."""
        for attempt in range(SHM_RETRIES + 1):
            try:
                return fn()
            except (ArenaNotRegistered, StaleLayout):
                if attempt == SHM_RETRIES:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def arena_array(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A zeroed-or-stale array in the shared-memory arena (shm plane) or in ordinary memory (stream plane).

        K/V written into it and passed to `put` skips the client-side copy on the shm plane.
        """
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if self.plane != "shm":
            return np.empty(shape, dtype)
        _, _, region = self._pool.lease(nbytes)
        return np.frombuffer(region, dtype).reshape(shape)  # type: ignore[call-overload]  # ArenaPool.lease: a buffer

    # -- streams ------------------------------------------------------------------------------------
    def create_stream(self, spec: StreamSpec) -> None:
        if not isinstance(spec, StreamSpec):
            raise InvalidArgument(f"create_stream takes a StreamSpec, got {type(spec).__name__}")
        self._forget(spec.name)
        self._rpc(self._stub.CreateStream, convert.create_stream_request(spec))
        with self._specs_lock:
            self._specs[spec.name] = spec  # the layout the stream has now: a shm fetch sizes its lease by it

    def drop_stream(self, name: str) -> None:
        self._forget(name)
        self._rpc(self._stub.DropStream, convert.drop_stream_request(name))

    def list_streams(self) -> list[StreamSpec]:
        return self._learn(self._rpc(self._stub.ListStreams, convert.list_streams_request(), idempotent=True))

    def _learn(self, resp: Any) -> list[StreamSpec]:
        specs = convert.specs_from_pb(resp)
        with self._specs_lock:
            self._specs.update((s.name, s) for s in specs)
        return specs

    def _forget(self, name: str) -> None:
        with self._specs_lock:
            self._specs.pop(name, None)

    # -- put ----------------------------------------------------------------------------------------
    def put(self, stream: str, entries: Sequence[NewEntry]) -> list[int]:
        entries = check_batch(entries)  # the spec-free rules, before encoding; the service's bank checks the rest
        kvs = [np.asarray(e.kv) for e in entries if e.kv is not None]
        shm = bool(kvs) and self.plane == "shm"
        keys: list[np.ndarray] = []  # the keys travel as bytes beside the K/V (arena or chunks), not in the message
        header = convert.put_header(stream, entries, keys, convert.SHM_PLANE if shm else convert.STREAM_PLANE)
        if header.ByteSize() > self.max_message_bytes - 1024:
            raise ResourceExhausted(f"put header (entry metadata and keys) is {header.ByteSize()} bytes; the message "
                                    f"limit is {self.max_message_bytes}: put fewer entries per call")
        if shm:
            return self._shm_call(lambda: self._put_shm(header, kvs, keys))
        return self._put_stream(header, [*kvs, *keys])

    def _put_shm(self, header: Any, kvs: list[np.ndarray], keys: list[np.ndarray]) -> list[int]:
        total = sum(a.nbytes for a in kvs)
        region, arena_id = None, None
        try:
            placed = self._pool.locate(kvs)  # K/V built in arena_array buffers: no copy (the arrays hold the lease)
            if placed is not None:
                slot, offset = placed
                if header.keys_in_arena:  # the keys need no range of their own in that arena: they go inline
                    convert.keys_inline(header, keys)
                keys_offset = 0
            else:
                key_bytes = sum(a.nbytes for a in keys) if header.keys_in_arena else 0
                slot, offset, region = self._pool.lease(total + key_bytes)
                flat = np.frombuffer(region, np.uint8, count=total + key_bytes)  # type: ignore[call-overload]
                pos = 0
                for a in [*kvs, *(keys if key_bytes else ())]:  # K/V, then the keys from offset + total
                    flat[pos:pos + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                    pos += a.nbytes
                keys_offset = offset + total if key_bytes else 0
            arena_id = self._pool.arena_id(slot)
            request = convert.put_shm(header, arena_id, offset, keys_offset)
            return convert.ids_from_put(self._call("Put", self._put, request, hold=(region, kvs)))
        except ArenaNotRegistered:
            self._pool.lost(arena_id)
            raise
        finally:
            # the service copied the bytes into its store, or failed: the lease goes now, even while a failed
            # call's exception (whose traceback holds this frame) is kept by the caller
            region = flat = None

    def _put_stream(self, header: Any, kvs: list[np.ndarray]) -> list[int]:
        return convert.ids_from_put(self._rpc(self._put, stream_plane.put_requests(convert.put_stream(header), kvs)))

    # -- query / fetch ------------------------------------------------------------------------------
    def query(self, stream: str, space: str, vectors: Vectors, k: int, *, combine: str = "per_layer",
              exclude_frames: Optional[tuple[int, int]] = None, pinned_only: bool = False,
              time_range: Optional[tuple[float, float]] = None, timeout: Optional[float] = None) -> QueryResult:
        request = _query_pb(stream, space, vectors, k, combine, exclude_frames, pinned_only, time_range)
        return convert.result_from_pb(self._call("Query", self._stub.Query, request, idempotent=True, timeout=timeout))

    def fetch(self, stream: str, ids: Ids, layers: Optional[Sequence[int]] = None, *,
              timeout: Optional[float] = None) -> FetchResult:
        if layers is not None and len(layers) == 0:  # on the wire, no layers means all of them
            raise InvalidArgument("layers [] invalid; expected None (all layers) or distinct layer indexes")
        request = convert.fetch_request(stream, _ids(ids), [int(x) for x in layers or ()])
        if self.plane == "shm":
            return self._shm_call(lambda: self._fetch_shm(request, timeout))
        return self._fetch_stream(request, timeout)

    def _fetch_shm(self, request: Any, timeout: Optional[float]) -> FetchResult:
        spec = self._spec(request.stream)
        if spec.kv is None:  # let the service say why
            return self._fetch_stream(request, timeout)
        n_layers = len(request.layers) or spec.kv.layers
        nbytes = max(1, len(request.ids) * n_layers * spec.kv.layer_bytes)
        region, arena_id = None, None
        try:
            slot, offset, region = self._pool.lease(nbytes)
            arena_id = self._pool.arena_id(slot)
            convert.fetch_shm(request, arena_id, offset, nbytes)
            header = self._call("Fetch", self._fetch_one, request, idempotent=True, timeout=timeout, hold=region).header
            kv = np.frombuffer(region, kv_numpy_dtype(header.dtype),  # type: ignore[call-overload]  # a buffer
                               count=int(np.prod(header.shape)))
            return FetchResult(ids=tuple(header.ids), layers=tuple(header.layers), kv=kv.reshape(tuple(header.shape)))
        except ArenaNotRegistered:
            self._pool.lost(arena_id)
            raise
        except StaleLayout:
            self._forget(request.stream)  # the stream was created anew: learn its layout again
            raise
        finally:
            region = kv = None  # a returned result's array holds the lease; a failed fetch's exception must not

    def _fetch_stream(self, request: Any, timeout: Optional[float]) -> FetchResult:
        responses = self._fetch(request, timeout=timeout or self.timeout, metadata=self._metadata)
        header = self._fetch_header(responses)
        kv = stream_plane.gather_array(responses, self._buffers.take, kv_numpy_dtype(header.dtype),
                                       tuple(header.shape), int(header.nbytes), _error)
        return FetchResult(ids=tuple(header.ids), layers=tuple(header.layers), kv=kv)

    def query_fetch(self, stream: str, space: str, vectors: Vectors, k: int, *, fetch_k: Optional[int] = None,
                    include: Ids = (), resident: Resident = (), layers: Optional[Sequence[int]] = None,
                    combine: str = "per_layer", exclude_frames: Optional[tuple[int, int]] = None,
                    pinned_only: bool = False, time_range: Optional[tuple[float, float]] = None,
                    timeout: Optional[float] = None) -> QueryFetchResult:
        if layers is not None and len(layers) == 0:  # on the wire, no layers means all of them
            raise InvalidArgument(f"layers {list(layers)} invalid; expected None (all layers) or distinct layer "
                                  "indexes")
        query = _query_pb(stream, space, vectors, k, combine, exclude_frames, pinned_only, time_range)
        rows = normalize_resident(resident)
        request = convert.query_fetch_request(query, fetch_k, [int(i) for i in check_id_list(include, "include")], rows,
                                              [int(x) for x in layers or ()])
        if self.plane == "shm":
            return self._shm_call(lambda: self._query_fetch_shm(request, timeout))
        return self._query_fetch_stream(request, timeout)

    def _query_fetch_shm(self, request: Any, timeout: Optional[float]) -> QueryFetchResult:
        stream = request.query.stream
        spec = self._spec(stream)
        if spec.kv is None:  # let the service say why
            return self._query_fetch_stream(request, timeout)
        args = convert.query_fetch_args_from_pb(request)
        try:  # the lease is sized by the most any ranking can make the service fetch; it checks the arguments
            bound = FetchPlan(spec, max(0, int(request.query.k)), **args).max_rows()
        except InvalidArgument:
            return self._query_fetch_stream(request, timeout)  # the service's own message, and nothing to lease
        nbytes = max(1, bound * spec.kv.layer_bytes)
        region, arena_id = None, None
        try:
            slot, offset, region = self._pool.lease(nbytes)
            arena_id = self._pool.arena_id(slot)
            convert.query_fetch_shm(request, arena_id, offset, nbytes)
            reply = self._call("QueryFetch", self._query_fetch_one, request, idempotent=True, timeout=timeout,
                               hold=region)
            result, groups, _ = convert.query_fetch_header_from_pb(reply)
            fetched, pos = [], 0
            for g in groups:
                kv = np.frombuffer(region, kv_numpy_dtype(g.dtype),  # type: ignore[call-overload]  # a buffer
                                   count=int(np.prod(g.shape)), offset=pos)
                fetched.append(FetchResult(ids=tuple(g.ids), layers=tuple(g.layers), kv=kv.reshape(tuple(g.shape))))
                pos += int(g.nbytes)
            return QueryFetchResult(query=result, fetched=tuple(fetched))
        except ArenaNotRegistered:
            self._pool.lost(arena_id)
            raise
        except StaleLayout:
            self._forget(stream)
            raise
        finally:
            region = kv = None  # a returned result's arrays hold the lease; a failed call's exception must not

    def _query_fetch_stream(self, request: Any, timeout: Optional[float]) -> QueryFetchResult:
        responses = self._query_fetch(request, timeout=timeout or self.timeout, metadata=self._metadata)
        result, groups, total = convert.query_fetch_header_from_pb(self._first(responses))
        flat = self._buffers.take(total)
        stream_plane.gather(responses, flat, "query_fetch", _error)
        fetched, pos = [], 0
        for g in groups:
            n = int(g.nbytes)
            kv = flat[pos:pos + n].view(kv_numpy_dtype(g.dtype)).reshape(tuple(g.shape))
            fetched.append(FetchResult(ids=tuple(g.ids), layers=tuple(g.layers), kv=kv))
            pos += n
        return QueryFetchResult(query=result, fetched=tuple(fetched))

    @staticmethod
    def _first(responses: Iterator[Any]) -> Any:
        try:
            return next(responses)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    @staticmethod
    def _fetch_header(responses: Iterator[Any]) -> Any:
        try:
            first = next(responses)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return first.header

    def _spec(self, stream: str) -> StreamSpec:
        """The layout a shm fetch sizes its lease by: the one this client created or last listed; a stream it has
        never seen (another client made it) is looked up once. A stale one is answered StaleLayout, and forgotten."""
        with self._specs_lock:
            spec = self._specs.get(stream)
        if spec is None:
            known = self.list_streams()
            spec = next((s for s in known if s.name == stream), None)
            if spec is None:
                raise NotFound(f"stream {stream!r} not found; existing streams: {sorted(s.name for s in known)[:10]}")
        return spec

    # -- the rest -----------------------------------------------------------------------------------
    def delete(self, stream: str, ids: Ids) -> int:
        return int(self._rpc(self._stub.Delete, convert.delete_request(stream, _ids(ids))).deleted)

    def pin(self, stream: str, ids: Ids, pinned: bool = True) -> None:
        self._rpc(self._stub.Pin, convert.pin_request(stream, _ids(ids), pinned), idempotent=True)

    def prune(self, stream: str) -> PruneResult:
        return convert.prune_from_pb(self._rpc(self._stub.Prune, convert.prune_request(stream)))

    @overload
    def stats(self, stream: None = None) -> BankStats: ...

    @overload
    def stats(self, stream: str) -> StreamStats: ...

    def stats(self, stream: Optional[str] = None) -> Union[StreamStats, BankStats]:
        if stream == "":  # on the wire, an empty name asks for the whole bank
            raise NotFound("stream '' not found; expected a stream name, or None for the whole bank")
        return convert.stats_from_pb(self._rpc(self._stub.Stats, convert.stats_request(stream), idempotent=True),
                                     stream)

    def entries(self, stream: str) -> list[EntryMeta]:
        return convert.metas_from_pb(self._rpc(self._stub.ListEntries, convert.list_entries_request(stream),
                                               idempotent=True))


def parse_targets(target: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """The node addresses `target` names: "host:port", "h1:p1,h2:p2" (spaces around commas allowed) or a
    sequence of such strings; order kept, repeats dropped. InvalidArgument when it names none."""
    if isinstance(target, str):
        parts = [target]
    elif isinstance(target, Sequence) and all(isinstance(t, str) for t in target):
        parts = list(target)
    else:
        raise InvalidArgument(f"target is {target!r}; expected \"host:port\", \"h1:p1,h2:p2\" or a sequence of "
                              "\"host:port\" strings")
    found = [a.strip() for p in parts for a in p.split(",")]
    if not found or "" in found:
        raise InvalidArgument(f"target {target!r} names an empty address; expected \"host:port\" items separated "
                              "by commas")
    return tuple(dict.fromkeys(found))


def open_channel(target: str, tls: Union[None, bool, str, bytes], max_message_bytes: int,
                 tls_server_name: Optional[str] = None) -> grpc.Channel:
    """The channel of one node connection: message limits, reconnect backoff, plaintext or TLS (`tls` as in
    MemoryClient)."""
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes), *RECONNECT_OPTIONS]
    if not tls:
        return grpc.insecure_channel(target, options=options)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    roots = None
    if isinstance(tls, bytes):
        roots = tls
    elif isinstance(tls, (str, os.PathLike)):
        with open(tls, "rb") as f:
            roots = f.read()
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)


def connected(channel: grpc.Channel, wait: float) -> bool:
    """Try to connect `channel`; True once it is READY, False when it fails (TRANSIENT_FAILURE: a dead service
    ends the wait at once) or `wait` s pass."""
    settled = threading.Event()
    last: list[grpc.ChannelConnectivity] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        last.append(state)
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        settled.wait(max(0.0, wait))
    finally:
        channel.unsubscribe(watch)
    return bool(last) and last[-1] == grpc.ChannelConnectivity.READY


def _error(exc: grpc.RpcError) -> Exception:
    """The MemFlowError a failed call stands for: its status code, message and reason (convert.error_from)."""
    try:
        trailers = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a call that never reached the wire may have none to give
        trailers = ()
    return convert.error_from(exc.code(), exc.details() or "", trailers)


def _forget(hold: object) -> None:
    """What a timer calls once a late copy's wait is over (dropping its argument frees the lease)."""


def _ids(ids: Ids) -> list[int]:
    """The spec-free rule (validate.check_id_list) before encoding; an empty list is the service's to refuse."""
    return [int(i) for i in check_id_list(ids)]


def _same_host(target: str) -> bool:
    """Whether `target` names this machine: a unix socket, or a loopback host ("[::1]:p", "127.0.0.1:p",
    "localhost:p")."""
    if target.startswith("unix:"):
        return True
    host = target.rsplit(":", 1)[0] if ":" in target else target
    return is_loopback(host.strip("[]"))


def _query_pb(stream, space, vectors, k, combine, exclude_frames, pinned_only, time_range):
    """The QueryRequest of a query or query_fetch; arguments the wire cannot carry are InvalidArgument."""
    try:
        return convert.query_to_pb(stream, space, vectors, k, combine, exclude_frames, pinned_only, time_range)
    except InvalidArgument:
        raise
    except (TypeError, ValueError, IndexError) as exc:
        raise InvalidArgument(f"query arguments cannot be encoded: {exc}") from None
