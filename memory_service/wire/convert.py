"""The one module that builds and reads protobuf messages: values <-> messages, errors <-> status codes.

Owns the wire encoding of the public data model (protos/memflow/v1/memory.proto) for both halves: the
requests MemoryClient sends and reads back, the responses MemoryServicer builds, the Put stream it reads,
the server's method handlers and the client's call objects; the service's name (SERVICE_NAME) is spelled
here once. It lives in wire/, not service/, so that the client imports nothing of the server. Promises:
- every `*_from_pb` either returns a valid value or raises InvalidArgument naming the field, what was
  received and what was expected (a malformed message never reaches the bank half-read); an enum value the
  proto does not name is refused (`enum_from_pb`), never taken for the default;
- `status_of(exc)` + `trailers_of(exc)` (server) and `error_from(code, message, trailers)` (client) are
  inverse: a MemFlowError crosses the wire as its status code (and, for errors.REFINED_ERRORS, its reason in
  trailing metadata) and comes back as the same class with the same message. errors.NotOwner also carries
  the owning node's address ("host:port", or "" while no node owns the stream) as the trailing metadata entry
  `memflow-owner` (OWNER_KEY), so a routing client knows where to resend; a client that does not know the
  reason still gets FailedPrecondition and the message.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence

import grpc
import numpy as np

from memory_service import errors
from memory_service.validate import as_vectors
from memory_service.wire.framing import CHUNK_BYTES as CHUNK_BYTES  # re-exported: the one chunk size
from memory_service.wire.framing import chunk_from_wire, to_wire
from memory_service.wire.framing import chunk_to_wire as chunk_to_wire
from memory_service.wire.gen import memory_pb2 as pb
from memory_service.wire.gen import memory_pb2_grpc as pb_grpc
from memory_service.types import (
    BankStats, Budget, EntryMeta, KeySpace, KVLayout, NewEntry, PruneResult, QueryResult, QueryTrace, StreamSpec,
    StreamStats, kv_numpy_dtype,
)

TENSOR_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "int64")
MAX_TENSOR_DIMS = 8

# ---- errors -----------------------------------------------------------------------------------------------

_CODES = {cls.code: getattr(grpc.StatusCode, cls.code) for cls in errors.ALL_ERRORS}
_CLASSES = {code: cls for cls in errors.ALL_ERRORS for code in [getattr(grpc.StatusCode, cls.code)]}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception travels as (INTERNAL for anything that is not a MemFlowError)."""
    if isinstance(exc, errors.MemFlowError):
        return _CODES.get(exc.code, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.INTERNAL


ERROR_REASON_KEY = "memflow-error-reason"  # trailing metadata: the `reason` of a refined error class
OWNER_KEY = "memflow-owner"  # trailing metadata of NotOwner: the owning node's "host:port" ("" while none owns it)
_REFINED = {cls.reason: cls for cls in errors.REFINED_ERRORS}


def trailers_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that travels with the status of `exc`: its reason, for a refined error class, and for
    NotOwner the owner's address (sent even when "": the client then knows no node owns the stream yet)."""
    reason = exc.reason if isinstance(exc, errors.MemFlowError) else ""
    if reason not in _REFINED:
        return ()
    if isinstance(exc, errors.NotOwner):
        return ((ERROR_REASON_KEY, reason), (OWNER_KEY, str(exc.owner)))
    return ((ERROR_REASON_KEY, reason),)


def error_from(code: grpc.StatusCode, message: str, trailers=()) -> Exception:
    """The exception a status code (and the call's trailing metadata) stands for; codes outside the hierarchy
    become a plain MemFlowError, and a reason this client does not know leaves the status code's class."""
    cls = _CLASSES.get(code)
    if cls is None:
        err = errors.MemFlowError(f"{code.name}: {message}")
        err.code = code.name
        return err
    found = {key: value for key, value in trailers or () if key in (ERROR_REASON_KEY, OWNER_KEY)}
    refined = _REFINED.get(found.get(ERROR_REASON_KEY, ""))
    if refined is None or not issubclass(refined, cls):
        return cls(message)
    if refined is errors.NotOwner:
        return errors.NotOwner(message, owner=found.get(OWNER_KEY, ""))
    return refined(message)


# ---- enums ------------------------------------------------------------------------------------------------
# proto3 enums are open: a message carries any int32 in an enum field and the generated code keeps it. A value
# the contract does not name is refused, never read as the default (DataPlane 9 was served as STREAM).

def enum_from_pb(value: int, field: str) -> int:
    """`value` of the enum field `field` ("PutHeader.plane"), or InvalidArgument naming the allowed values."""
    message, name = field.split(".")
    enum = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[name].enum_type
    if enum.values_by_number.get(int(value)) is None:
        allowed = ", ".join(f"{v.name} ({v.number})" for v in enum.values)
        raise errors.InvalidArgument(f"{field} is {int(value)}, which is not a {enum.name}; expected one of {allowed}")
    return int(value)


# ---- K/V chunks on the streaming plane (framing.py frames them) -------------------------------------------

def put_request_from_wire(data: bytes):
    """Request deserializer of Put: a memoryview for a chunk, a PutRequest otherwise."""
    chunk = chunk_from_wire(data)
    return chunk if chunk is not None else pb.PutRequest.FromString(data)


def query_fetch_response_from_wire(data: bytes):
    """Response deserializer of QueryFetch: a memoryview for a chunk, a QueryFetchResponse otherwise."""
    chunk = chunk_from_wire(data)
    return chunk if chunk is not None else pb.QueryFetchResponse.FromString(data)


def fetch_response_from_wire(data: bytes):
    """Response deserializer of Fetch: a memoryview for a chunk, a FetchResponse otherwise."""
    chunk = chunk_from_wire(data)
    return chunk if chunk is not None else pb.FetchResponse.FromString(data)


# ---- tensors ----------------------------------------------------------------------------------------------

def dtype_of(name: str) -> np.dtype:
    if name == "int64":
        return np.dtype("<i8")
    return kv_numpy_dtype(name)


def tensor_to_pb(arr: np.ndarray, name: Optional[str] = None) -> pb.Tensor:
    arr = np.ascontiguousarray(arr)
    dtype = name or ("int64" if arr.dtype.kind in "iu" else str(arr.dtype))
    if dtype == "int64":
        arr = arr.astype("<i8", copy=False)
    return pb.Tensor(dtype=dtype, shape=list(arr.shape), data=arr.reshape(-1).view(np.uint8).tobytes())


VECTOR_DTYPE = "float32"  # the one dtype of keys and query vectors on the wire, whatever a key space stores


def vectors_from_pb(t: pb.Tensor, what: str) -> np.ndarray:
    """Keys (NewEntry.keys) or a query (QueryRequest.vectors): a float32 Tensor, as the proto documents. Another
    dtype is refused, never cast: float16 or int64 numbers were once accepted and ranked as if they were float32."""
    _check_vector_dtype(t, what)
    return tensor_from_pb(t, what)


def _check_vector_dtype(t: pb.Tensor, what: str) -> None:
    if t.dtype != VECTOR_DTYPE:
        raise errors.InvalidArgument(f"{what} has dtype {t.dtype!r}; expected {VECTOR_DTYPE!r} (keys and query "
                                     "vectors travel as float32 whatever the key space stores)")


def tensor_from_pb(t: pb.Tensor, what: str) -> np.ndarray:
    """A read-only array over the message's bytes, after checking dtype, shape and length."""
    shape, dtype, want = _tensor_layout(t, what)
    if len(t.data) != want:
        raise errors.InvalidArgument(f"{what} carries {len(t.data)} bytes; dtype {t.dtype} shape {list(shape)} "
                                     f"needs {want}")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def _tensor_layout(t: pb.Tensor, what: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes) a Tensor declares, checked: a known dtype, a shape an array can have."""
    if t.dtype not in TENSOR_DTYPES:
        raise errors.InvalidArgument(f"{what} has dtype {t.dtype!r}; expected one of {TENSOR_DTYPES}")
    shape = tuple(int(d) for d in t.shape)
    if len(shape) > MAX_TENSOR_DIMS or any(d < 0 for d in shape):
        raise errors.InvalidArgument(f"{what} has shape {list(shape)}; expected at most {MAX_TENSOR_DIMS} "
                                     "non-negative dims")
    dtype = dtype_of(t.dtype)
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize >= 2**63:  # numpy refuses even an empty one
        raise errors.InvalidArgument(f"{what} has shape {list(shape)}, which no array can have; expected a shape "
                                     "that matches its bytes")
    return shape, dtype, math.prod(shape) * dtype.itemsize  # Python ints: a huge shape must not wrap to a small size


# ---- streams ----------------------------------------------------------------------------------------------

def spec_to_pb(spec: StreamSpec) -> pb.StreamSpec:
    msg = pb.StreamSpec(
        name=spec.name, policy=spec.policy, storage=spec.storage, degrade=list(spec.degrade),
        budget=pb.Budget(max_entries=spec.budget.max_entries or 0, max_bytes=spec.budget.max_bytes or 0),
    )
    for name, ks in spec.key_spaces.items():
        msg.key_spaces[name].CopyFrom(pb.KeySpace(dim=ks.dim, metric=ks.metric, per_layer=ks.per_layer,
                                                  index=ks.index, dtype=ks.dtype, layers=ks.layers or 0))
    if spec.kv is not None:
        kv = spec.kv
        msg.kv.CopyFrom(pb.KVLayout(layers=kv.layers, heads=kv.heads, head_dim=kv.head_dim,
                                    tokens_per_frame=kv.tokens_per_frame, dtype=kv.dtype))
    return msg


def spec_from_pb(msg: pb.StreamSpec) -> StreamSpec:
    """Empty strings and zeros take the documented defaults; the dataclasses check everything else."""
    spaces = {
        name: KeySpace(dim=int(ks.dim), metric=ks.metric or "ip", per_layer=ks.per_layer, index=ks.index or "flat",
                       dtype=ks.dtype or "float32", layers=int(ks.layers) or None)
        for name, ks in msg.key_spaces.items()
    }
    kv = None
    if msg.HasField("kv"):
        kv = KVLayout(layers=int(msg.kv.layers), heads=int(msg.kv.heads), head_dim=int(msg.kv.head_dim),
                      tokens_per_frame=int(msg.kv.tokens_per_frame), dtype=msg.kv.dtype or "bfloat16")
    budget = Budget(max_entries=int(msg.budget.max_entries) or None, max_bytes=int(msg.budget.max_bytes) or None)
    return StreamSpec(name=msg.name, key_spaces=spaces, kv=kv, budget=budget, policy=msg.policy or "fifo",
                      storage=msg.storage or "raw", degrade=tuple(msg.degrade))


def renamed(spec: StreamSpec, name: str) -> StreamSpec:
    return StreamSpec(name=name, key_spaces=spec.key_spaces, kv=spec.kv, budget=spec.budget, policy=spec.policy,
                      storage=spec.storage, degrade=spec.degrade)


# ---- put --------------------------------------------------------------------------------------------------

def float_vectors(vectors: Any, what: str) -> np.ndarray:
    """Keys or a query as float32 for the wire, refusing what the bank refuses (validate.as_vectors)."""
    return as_vectors(vectors, what).astype(np.float32, copy=False)  # a view when float32: the wire copies it


def entry_to_pb(e: NewEntry, n: int = 0, apart: Optional[list[np.ndarray]] = None) -> pb.NewEntry:
    """One entry's metadata and keys (its K/V bytes travel apart); `e` has passed validate.check_batch. With
    `apart`, the key Tensors carry no data: their arrays are appended to it instead, in the order of the spaces'
    names (PutHeader.keys_in_arena / keys_in_chunks)."""
    try:
        msg = pb.NewEntry(
            frame_index=int(e.frame_index), chunk_index=int(e.chunk_index), prompt=e.prompt, has_kv=e.kv is not None,
            pinned=bool(e.pinned), has_rope_position=e.rope_position is not None,
            rope_position=0 if e.rope_position is None else int(e.rope_position), importance=float(e.importance),
        )
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. an index past int64
        raise errors.InvalidArgument(f"entry {n} cannot be encoded: {exc}") from None
    if e.kv is not None:
        kv = np.asarray(e.kv)
        msg.kv_dtype, msg.kv_shape[:] = str(kv.dtype), list(kv.shape)
    for space, vec in sorted((e.keys or {}).items()):
        arr = float_vectors(vec, f"entry {n} keys for key space {space!r}")
        if apart is None:
            msg.keys[space].CopyFrom(tensor_to_pb(arr, VECTOR_DTYPE))
        else:
            msg.keys[space].CopyFrom(pb.Tensor(dtype=VECTOR_DTYPE, shape=list(arr.shape)))
            apart.append(arr)
    return msg


def keys_apart(header: pb.PutHeader) -> tuple[list[tuple[int, str, tuple[int, ...]]], int]:
    """The keys a PutHeader with keys_in_arena (or keys_in_chunks) places apart from the message, in their order
    there - (entry, space, shape) each, checked (float32, a shape, no data in the message) - and their bytes."""
    if header.keys_in_arena and header.keys_in_chunks:
        raise errors.InvalidArgument("PutHeader sets both keys_in_arena and keys_in_chunks; expected at most one "
                                     "(keys_in_arena on the SHM plane, keys_in_chunks on the STREAM plane)")
    if header.keys_in_arena and header.plane != SHM_PLANE:
        raise errors.InvalidArgument("PutHeader.keys_in_arena is set on the STREAM plane; expected it only with "
                                     "plane SHM (the keys' bytes in the arena), or keys_in_chunks")
    if header.keys_in_chunks and header.plane == SHM_PLANE:  # UNSPECIFIED is STREAM
        raise errors.InvalidArgument("PutHeader.keys_in_chunks is set on the SHM plane; expected it only with "
                                     "plane STREAM (the keys' bytes after the K/V chunks), or keys_in_arena")
    field = "keys_in_arena" if header.keys_in_arena else "keys_in_chunks"
    where = "lie in the arena from keys_offset" if header.keys_in_arena else "follow the K/V in the kv_chunks"
    placed, total = [], 0
    for i, e in enumerate(header.entries):
        for space in sorted(e.keys):
            t, what = e.keys[space], f"entry {i} NewEntry.keys[{space!r}]"
            _check_vector_dtype(t, what)
            if t.data:
                raise errors.InvalidArgument(f"{what} carries {len(t.data)} bytes of data; with PutHeader.{field} "
                                             f"key Tensors carry none (their bytes {where})")
            shape, _, size = _tensor_layout(t, what)
            placed.append((i, space, shape))
            total += size
    return placed, total


def keys_from_bytes(placed: Sequence[tuple[int, str, tuple[int, ...]]], raw: np.ndarray, entries: int,
                    copy: bool = True) -> list[dict[str, np.ndarray]]:
    """Each entry's keys from `raw` (their bytes, laid out as `placed` says). From an arena they are copied once
    (`copy`), so what a client writes into its arena later cannot change keys already checked."""
    owned = np.array(raw.reshape(-1).view(np.uint8)) if copy else raw.reshape(-1).view(np.uint8)
    keys: list[dict[str, np.ndarray]] = [{} for _ in range(entries)]
    pos = 0
    for i, space, shape in placed:
        n = math.prod(shape)
        keys[i][space] = np.frombuffer(owned, np.float32, count=n, offset=pos).reshape(shape)
        pos += n * 4
    return keys


def entries_from_pb(msgs: Sequence[pb.NewEntry], kv: Optional[np.ndarray],
                    apart: Optional[Sequence[dict[str, np.ndarray]]] = None) -> list[NewEntry]:
    """`kv` holds the K/V of the entries with has_kv, in order (`[n_kv, layers, 2, T, H, D]`); `apart`, when
    given, each entry's keys (keys_from_bytes) instead of the messages' Tensors."""
    out, n = [], 0
    for i, m in enumerate(msgs):
        keys = apart[i] if apart is not None else {
            space: vectors_from_pb(t, f"entry {i} NewEntry.keys[{space!r}]") for space, t in m.keys.items()}
        entry_kv = None
        if m.has_kv:
            entry_kv = kv[n]  # type: ignore[index]
            n += 1
        out.append(NewEntry(
            frame_index=int(m.frame_index), chunk_index=int(m.chunk_index), prompt=m.prompt, keys=keys, kv=entry_kv,
            pinned=m.pinned, rope_position=int(m.rope_position) if m.has_rope_position else None,
            importance=m.importance,
        ))
    return out


# ---- query ------------------------------------------------------------------------------------------------

def query_to_pb(stream: str, space: str, vectors, k: int, combine: str, exclude_frames, pinned_only: bool,
                time_range) -> pb.QueryRequest:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise errors.InvalidArgument(f"k is {k!r}, expected an int >= 1")
    vectors = float_vectors(vectors, f"query for key space {space!r}")
    msg = pb.QueryRequest(stream=stream, space=space, vectors=tensor_to_pb(vectors, "float32"), k=int(k),
                          combine=combine, pinned_only=pinned_only)
    if exclude_frames is not None:
        msg.has_exclude_frames, msg.exclude_lo, msg.exclude_hi = True, int(exclude_frames[0]), int(exclude_frames[1])
    if time_range is not None:
        msg.has_time_range, msg.time_lo, msg.time_hi = True, float(time_range[0]), float(time_range[1])
    return msg


def query_args_from_pb(msg: pb.QueryRequest) -> dict:
    return dict(
        vectors=vectors_from_pb(msg.vectors, "QueryRequest.vectors"), k=int(msg.k), combine=msg.combine or "per_layer",
        exclude_frames=(int(msg.exclude_lo), int(msg.exclude_hi)) if msg.has_exclude_frames else None,
        pinned_only=msg.pinned_only, time_range=(msg.time_lo, msg.time_hi) if msg.has_time_range else None,
    )


def result_to_pb(r: QueryResult) -> pb.QueryResponse:
    return pb.QueryResponse(
        ids=tensor_to_pb(r.ids, "int64"), scores=tensor_to_pb(r.scores.astype(np.float32), "float32"),
        frames=tensor_to_pb(r.frames, "int64"), scanned=int(r.trace.scanned),
        steps=[pb.TraceStep(name=n, ms=ms) for n, ms in r.trace.steps],
    )


def result_from_pb(msg: pb.QueryResponse) -> QueryResult:
    return QueryResult(
        ids=tensor_from_pb(msg.ids, "ids").astype(np.int64), scores=tensor_from_pb(msg.scores, "scores").copy(),
        frames=tensor_from_pb(msg.frames, "frames").astype(np.int64),
        trace=QueryTrace(int(msg.scanned), tuple((s.name, s.ms) for s in msg.steps)),
    )


# ---- metadata and stats ----------------------------------------------------------------------------------

def meta_to_pb(m: EntryMeta) -> pb.EntryMeta:
    return pb.EntryMeta(
        entry_id=m.entry_id, frame_index=m.frame_index, chunk_index=m.chunk_index, prompt=m.prompt, created=m.created,
        pinned=m.pinned, has_rope_position=m.rope_position is not None, rope_position=m.rope_position or 0,
        hit_count=m.hit_count, has_last_hit=m.last_hit is not None, last_hit=m.last_hit or 0.0,
        importance=m.importance, lfu=m.lfu, nbytes=m.nbytes, codec=m.codec,
    )


def meta_from_pb(m: pb.EntryMeta) -> EntryMeta:
    return EntryMeta(
        entry_id=int(m.entry_id), frame_index=int(m.frame_index), chunk_index=int(m.chunk_index), prompt=m.prompt,
        created=m.created, pinned=m.pinned, rope_position=int(m.rope_position) if m.has_rope_position else None,
        hit_count=int(m.hit_count), last_hit=m.last_hit if m.has_last_hit else None, importance=m.importance,
        lfu=m.lfu, nbytes=int(m.nbytes), codec=m.codec,
    )


def stream_stats_to_pb(s: StreamStats, name: str) -> pb.StreamStats:
    return pb.StreamStats(
        name=name, entries=s.entries, pinned=s.pinned, payload_bytes=s.payload_bytes, key_bytes=s.key_bytes,
        next_entry_id=s.next_entry_id, evicted_total=s.evicted_total, degraded_total=s.degraded_total,
        budget=pb.Budget(max_entries=s.budget.max_entries or 0, max_bytes=s.budget.max_bytes or 0), policy=s.policy,
    )


def stream_stats_from_pb(m: pb.StreamStats) -> StreamStats:
    return StreamStats(
        name=m.name, entries=int(m.entries), pinned=int(m.pinned), payload_bytes=int(m.payload_bytes),
        key_bytes=int(m.key_bytes), next_entry_id=int(m.next_entry_id), evicted_total=int(m.evicted_total),
        degraded_total=int(m.degraded_total),
        budget=Budget(max_entries=int(m.budget.max_entries) or None, max_bytes=int(m.budget.max_bytes) or None),
        policy=m.policy,
    )


def bank_stats_from_pb(m: pb.StatsResponse) -> BankStats:
    return BankStats(streams=tuple(stream_stats_from_pb(s) for s in m.streams), entries=int(m.entries),
                     payload_bytes=int(m.payload_bytes), map_size=int(m.map_size), disk_bytes=int(m.disk_bytes))


def prune_to_pb(r: PruneResult) -> pb.PruneResponse:
    return pb.PruneResponse(evicted=list(r.evicted), degraded=list(r.degraded), reason=r.reason)


def prune_from_pb(m: pb.PruneResponse) -> PruneResult:
    return PruneResult(evicted=tuple(int(i) for i in m.evicted), degraded=tuple(int(i) for i in m.degraded),
                       reason=m.reason)


def ids_from_pb(ids: Sequence[int]) -> np.ndarray:
    return np.array(list(ids), np.int64)


# ---- the service and its calls ----------------------------------------------------------------------------
# The service's name, spelled once: the proto's own descriptor says it ("memflow.v1.MemoryService").

SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]
SERVICE_NAME = SERVICE.full_name
SHM_PLANE = pb.DATA_PLANE_SHM
STREAM_PLANE = pb.DATA_PLANE_STREAM


# Invocation metadata by which a client asks for a one-message answer (Fetch and QueryFetch on the SHM plane) to
# be sent as a unary one: the message and the status in one batch (service/interceptors.py). Optional: without it
# the same bytes arrive as a server-streaming answer.
ONE_ANSWER = "memflow-answer"


def method_path(method: str) -> str:
    """The HTTP/2 path of a MemoryService method ("/memflow.v1.MemoryService/Put"); "" gives the prefix."""
    return f"/{SERVICE_NAME}/{method}"


def method_handlers(servicer: Any) -> grpc.GenericRpcHandler:
    """The server's handlers for every method of the proto; Put's requests and Fetch's responses carry K/V chunks
    pre-framed (framing.py) instead of through message objects."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler}
    handlers = {}
    for m in SERVICE.methods:
        request = getattr(pb, m.input_type.name)
        deserialize = put_request_from_wire if m.name == "Put" else request.FromString
        make = kinds[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=deserialize,
                                response_serializer=to_wire)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class Calls:
    """The client's callables on one channel: the generated stub, and Put, Fetch and QueryFetch with pre-framed
    chunks."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = pb_grpc.MemoryServiceStub(channel)
        self.put = channel.stream_unary(method_path("Put"), request_serializer=to_wire,
                                        response_deserializer=pb.PutResponse.FromString)
        self.fetch = channel.unary_stream(method_path("Fetch"), request_serializer=pb.FetchRequest.SerializeToString,
                                          response_deserializer=fetch_response_from_wire)
        self.query_fetch = channel.unary_stream(method_path("QueryFetch"),
                                                request_serializer=pb.QueryFetchRequest.SerializeToString,
                                                response_deserializer=query_fetch_response_from_wire)
        # On the SHM plane a QueryFetch answers exactly one message (the proto says so), which a unary call reads: on
        # the wire a server-streaming answer of one message is a unary one, and Python's streaming calls start a
        # polling thread per call when none is running (1.5-2 ms of a 3 ms call, measured on loopback).
        # The call asks the service to answer it as a unary call too (ONE_ANSWER).
        self.query_fetch_one = _one_answer(channel.unary_unary(
            method_path("QueryFetch"), request_serializer=pb.QueryFetchRequest.SerializeToString,
            response_deserializer=pb.QueryFetchResponse.FromString))
        # Fetch on the SHM plane, likewise: its header is the answer's one message (1.7 -> ~1 ms a call)
        self.fetch_one = _one_answer(channel.unary_unary(
            method_path("Fetch"), request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=pb.FetchResponse.FromString))


def _one_answer(call: Callable[..., Any]) -> Callable[..., Any]:
    def one(request: Any, *, timeout: Optional[float] = None, metadata: Sequence[tuple[str, str]] = ()) -> Any:
        return call(request, timeout=timeout, metadata=(*metadata, (ONE_ANSWER, "unary")))

    return one


# ---- the local socket (wire/local.py frames these; proto "the local socket") ----------------------------------

LOCAL_METHODS = ("Query", "Fetch", "QueryFetch", "Put")
# trailer of a LocalAnswer whose call was never run because the socket had no room for its connection: the
# caller makes it by gRPC instead (a stock client sees UNAVAILABLE and the message)
LOCAL_REFUSED_KEY = "memflow-local-refused"


class LocalRefused(Exception):
    """The local socket refused the connection before running any call on it (LOCAL_REFUSED_KEY)."""
_LOCAL_TYPES = {m.name: (getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
                for m in SERVICE.methods if m.name in LOCAL_METHODS}


def local_call(method: str, request: Any, timeout: Optional[float], metadata: Sequence[tuple[str, str]]) -> bytes:
    """A LocalCall's bytes: `request` (a message of `method`), the deadline, and the caller's authorization."""
    auth = next((value for key, value in metadata if key == "authorization"), "")
    return pb.LocalCall(method=method, request=request.SerializeToString(), timeout_s=timeout or 0.0,
                        authorization=auth).SerializeToString()


def local_call_from_wire(data: bytes) -> tuple[str, Any, Optional[float], tuple[tuple[str, str], ...]]:
    """(method, its request message, timeout in seconds or None, the call's metadata) of a LocalCall's bytes;
    InvalidArgument when they are not one, or name a method the local socket does not take."""
    try:
        call = pb.LocalCall.FromString(data)
    except Exception as exc:  # noqa: BLE001 - DecodeError and what a malformed length does inside protobuf
        raise errors.InvalidArgument(f"local socket frame is not a memflow.v1.LocalCall ({type(exc).__name__}: {exc})"
                                     "; expected the message of protos/memflow/v1/memory.proto") from None
    types = _LOCAL_TYPES.get(call.method)
    if types is None:
        raise errors.InvalidArgument(f"LocalCall.method is {call.method!r}; the local socket takes "
                                     f"{', '.join(LOCAL_METHODS)} (every other method: gRPC)")
    try:
        request = types[0].FromString(call.request)
    except Exception as exc:  # noqa: BLE001
        raise errors.InvalidArgument(f"{call.method} request is not a valid memflow.v1 message "
                                     f"({type(exc).__name__}: {exc}); expected the protobuf message of "
                                     "protos/memflow/v1/memory.proto") from None
    if not math.isfinite(call.timeout_s) or call.timeout_s < 0:
        raise errors.InvalidArgument(f"LocalCall.timeout_s is {call.timeout_s}; expected seconds >= 0 (0: none)")
    metadata = (("authorization", call.authorization),) if call.authorization else ()
    return call.method, request, call.timeout_s or None, metadata


def local_answer(response: Any) -> bytes:
    return pb.LocalAnswer(response=response.SerializeToString()).SerializeToString()


def local_failure(code: grpc.StatusCode, message: str, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A LocalAnswer's bytes for a failed call: what gRPC would have sent as its status and trailing metadata."""
    return pb.LocalAnswer(code=code.value[0], message=message, trailers=dict(trailers)).SerializeToString()


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def local_answer_from_wire(method: str, data: bytes) -> Any:
    """The response message of `method` in a LocalAnswer's bytes, or raises the error it carries (error_from)."""
    answer = pb.LocalAnswer.FromString(data)
    if LOCAL_REFUSED_KEY in answer.trailers:
        raise LocalRefused(answer.message)
    if answer.code:
        code = _STATUS_BY_VALUE.get(answer.code, grpc.StatusCode.UNKNOWN)
        raise error_from(code, answer.message, tuple(answer.trailers.items()))
    return _LOCAL_TYPES[method][1].FromString(answer.response)


# ---- requests (the client builds them) ------------------------------------------------------------------------

def create_stream_request(spec: StreamSpec) -> pb.CreateStreamRequest:
    return pb.CreateStreamRequest(spec=spec_to_pb(spec))


def drop_stream_request(name: str) -> pb.DropStreamRequest:
    return pb.DropStreamRequest(stream=name)


def list_streams_request() -> pb.ListStreamsRequest:
    return pb.ListStreamsRequest()


def specs_from_pb(resp: pb.ListStreamsResponse) -> list[StreamSpec]:
    return [spec_from_pb(s) for s in resp.streams]


def put_header(stream: str, entries: Sequence[NewEntry], apart: Optional[list[np.ndarray]] = None,
               plane: int = pb.DATA_PLANE_SHM) -> pb.PutHeader:
    """With `apart`, the keys' arrays go there, not into the message: PutHeader.keys_in_arena for the SHM
    `plane`, keys_in_chunks for STREAM."""
    header = pb.PutHeader(stream=stream, entries=[entry_to_pb(e, n, apart) for n, e in enumerate(entries)])
    if apart is not None:
        header.keys_in_arena, header.keys_in_chunks = plane == pb.DATA_PLANE_SHM, plane != pb.DATA_PLANE_SHM
    return header


def put_shm(header: pb.PutHeader, arena_id: str, offset: int, keys_offset: int = 0) -> pb.PutRequest:
    """The one message of a shared-memory Put: the header, naming where its K/V bytes (and, with keys_in_arena,
    its keys' bytes) lie in the arena."""
    header.plane, header.arena_id, header.arena_offset, header.keys_offset = SHM_PLANE, arena_id, offset, keys_offset
    return pb.PutRequest(header=header)


def keys_inline(header: pb.PutHeader, keys: Sequence[np.ndarray]) -> None:
    """A header built with keys apart (put_header) carrying them in its Tensors after all."""
    tensors = [e.keys[space] for e in header.entries for space in sorted(e.keys)]
    for t, arr in zip(tensors, keys):
        t.data = arr.reshape(-1).view(np.uint8).tobytes()
    header.keys_in_arena = False


def put_stream(header: pb.PutHeader) -> pb.PutRequest:
    """The first message of a streaming-plane Put; framing.chunk_to_wire frames the K/V chunks that follow."""
    return pb.PutRequest(header=header)


def ids_from_put(resp: pb.PutResponse) -> list[int]:
    return list(resp.ids)


def fetch_request(stream: str, ids: Sequence[int], layers: Sequence[int]) -> pb.FetchRequest:
    return pb.FetchRequest(stream=stream, ids=ids, layers=layers)


def fetch_shm(request: pb.FetchRequest, arena_id: str, offset: int, nbytes: int) -> pb.FetchRequest:
    """`request` asking for its K/V to be written into the caller's arena at `offset` (`nbytes` reserved there)."""
    request.plane, request.arena_id, request.arena_offset, request.arena_bytes = SHM_PLANE, arena_id, offset, nbytes
    return request


def query_fetch_request(query: pb.QueryRequest, fetch_k: Optional[int], include: Sequence[int],
                        resident: Sequence[Sequence[int]], layers: Sequence[int]) -> pb.QueryFetchRequest:
    """`resident`: query_fetch.normalize_resident's form (none, one list for every layer, or one per layer)."""
    if fetch_k is not None and (not isinstance(fetch_k, (int, np.integer)) or isinstance(fetch_k, bool)):
        raise errors.InvalidArgument(f"fetch_k is {fetch_k!r}; expected None (every hit: k) or an int in "
                                     f"[0, k={query.k}]")
    return pb.QueryFetchRequest(query=query, has_fetch_k=fetch_k is not None, fetch_k=int(fetch_k or 0),
                                include=include, resident=[pb.IdList(ids=r) for r in resident], layers=layers)


def query_fetch_shm(request: pb.QueryFetchRequest, arena_id: str, offset: int, nbytes: int) -> pb.QueryFetchRequest:
    """`request` asking for its K/V to be written into the caller's arena at `offset` (`nbytes` reserved there)."""
    request.plane, request.arena_id, request.arena_offset, request.arena_bytes = SHM_PLANE, arena_id, offset, nbytes
    return request


def query_fetch_header_from_pb(msg: Any) -> tuple[QueryResult, list[pb.FetchHeader], int]:
    """(the ranking, the groups' headers, the bytes that follow) of a QueryFetch's first message."""
    if isinstance(msg, memoryview) or msg.WhichOneof("part") != "header":
        raise errors.MemFlowError("QueryFetch stream did not start with a header; expected a QueryFetchHeader")
    return result_from_pb(msg.header.result), list(msg.header.groups), int(msg.header.nbytes)


def delete_request(stream: str, ids: Sequence[int]) -> pb.DeleteRequest:
    return pb.DeleteRequest(stream=stream, ids=ids)


def pin_request(stream: str, ids: Sequence[int], pinned: bool) -> pb.PinRequest:
    return pb.PinRequest(stream=stream, ids=ids, pinned=pinned)


def prune_request(stream: str) -> pb.PruneRequest:
    return pb.PruneRequest(stream=stream)


def stats_request(stream: Optional[str]) -> pb.StatsRequest:
    return pb.StatsRequest(stream=stream or "")  # on the wire, an empty name asks for the whole bank


def stats_from_pb(resp: pb.StatsResponse, stream: Optional[str]) -> StreamStats | BankStats:
    return stream_stats_from_pb(resp.streams[0]) if stream else bank_stats_from_pb(resp)


def list_entries_request(stream: str) -> pb.ListEntriesRequest:
    return pb.ListEntriesRequest(stream=stream)


def metas_from_pb(resp: pb.ListEntriesResponse) -> list[EntryMeta]:
    return [meta_from_pb(m) for m in resp.entries]


def register_arena_request(shm_name: str, size: int, nonce: bytes) -> pb.RegisterArenaRequest:
    return pb.RegisterArenaRequest(shm_name=shm_name, size=size, nonce=nonce)


def release_arena_request(arena_id: str) -> pb.ReleaseArenaRequest:
    return pb.ReleaseArenaRequest(arena_id=arena_id)


# ---- responses (the servicer builds them) ----------------------------------------------------------------------

def empty_response(method: str) -> Any:
    """The empty response of CreateStream, DropStream, Pin or ReleaseArena."""
    return getattr(pb, f"{method}Response")()


def list_streams_response(specs: Sequence[StreamSpec]) -> pb.ListStreamsResponse:
    return pb.ListStreamsResponse(streams=[spec_to_pb(s) for s in specs])


def put_response(ids: Sequence[int]) -> pb.PutResponse:
    return pb.PutResponse(ids=ids)


def fetch_header(ids: Sequence[int], layers: Sequence[int], dtype: str, shape: Sequence[int],
                 nbytes: int) -> pb.FetchResponse:
    return pb.FetchResponse(header=pb.FetchHeader(ids=ids, layers=layers, dtype=dtype, shape=list(shape),
                                                  nbytes=nbytes))


def query_fetch_args_from_pb(msg: pb.QueryFetchRequest) -> dict:
    """The fetch half of a QueryFetch (query_fetch.FetchPlan checks it); the query half is query_args_from_pb's."""
    return dict(fetch_k=int(msg.fetch_k) if msg.has_fetch_k else None, include=ids_from_pb(msg.include),
                resident=[list(r.ids) for r in msg.resident], layers=list(msg.layers) or None)


def query_fetch_header(result: QueryResult, groups: Sequence[pb.FetchResponse], nbytes: int) -> pb.QueryFetchResponse:
    """The first message of a QueryFetch: the ranking, and each group's header (from `fetch_header`)."""
    return pb.QueryFetchResponse(header=pb.QueryFetchHeader(result=result_to_pb(result),
                                                            groups=[g.header for g in groups], nbytes=nbytes))


def delete_response(deleted: int) -> pb.DeleteResponse:
    return pb.DeleteResponse(deleted=deleted)


def stats_response(streams: Sequence[tuple[StreamStats, str]], entries: int, payload_bytes: int,
                   map_size: int = 0, disk_bytes: int = 0) -> pb.StatsResponse:
    """`streams`: each stream's stats with the name the caller knows it by."""
    return pb.StatsResponse(streams=[stream_stats_to_pb(s, name) for s, name in streams], entries=entries,
                            payload_bytes=payload_bytes, map_size=map_size, disk_bytes=disk_bytes)


def list_entries_response(metas: Sequence[EntryMeta]) -> pb.ListEntriesResponse:
    return pb.ListEntriesResponse(entries=[meta_to_pb(m) for m in metas])


def register_arena_response(arena_id: str, local_socket: str = "") -> pb.RegisterArenaResponse:
    return pb.RegisterArenaResponse(arena_id=arena_id, local_socket=local_socket)


# ---- the Put stream (the servicer reads it) --------------------------------------------------------------------

def put_header_of(first: Any) -> pb.PutHeader:
    """The header a Put stream must start with (`first` is its first message, or None for an empty stream)."""
    if first is None or isinstance(first, memoryview) or first.WhichOneof("part") != "header":
        raise errors.InvalidArgument("Put stream must start with a PutHeader message")
    return first.header


def gather_chunks(requests: Iterator[Any], total: int,
                  take: Callable[[int], np.ndarray] = lambda n: np.empty(n, np.uint8)) -> np.ndarray:
    """Concatenate a Put's streaming-plane chunks into one buffer of exactly `total` bytes (from `take`)."""
    buf = take(total)
    got = 0
    for msg in requests:  # memoryviews (framed chunks, see put_request_from_wire) or PutRequests
        if not isinstance(msg, memoryview):
            if msg.WhichOneof("part") != "kv_chunk":
                raise errors.InvalidArgument("Put stream has a second header; expected only kv_chunk messages after it")
            msg = memoryview(msg.kv_chunk)
        if got + len(msg) > total:
            raise errors.InvalidArgument(f"Put K/V bytes exceed the {total} bytes its entries need")
        buf[got:got + len(msg)] = np.frombuffer(msg, np.uint8)
        got += len(msg)
    if got != total:
        raise errors.InvalidArgument(f"Put K/V stream ended after {got} bytes; its entries need {total}")
    return buf


def expect_end(requests: Iterator[Any]) -> None:
    """A Put whose K/V bytes come from an arena, or that has none: nothing may follow its header."""
    for _ in requests:
        raise errors.InvalidArgument("Put carries K/V chunks but none are expected (SHM plane, or no entry has_kv "
                                     "and no keys_in_chunks)")
