from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataPlane(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_PLANE_UNSPECIFIED: _ClassVar[DataPlane]
    DATA_PLANE_STREAM: _ClassVar[DataPlane]
    DATA_PLANE_SHM: _ClassVar[DataPlane]
DATA_PLANE_UNSPECIFIED: DataPlane
DATA_PLANE_STREAM: DataPlane
DATA_PLANE_SHM: DataPlane

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class KeySpace(_message.Message):
    __slots__ = ("dim", "metric", "per_layer", "index", "dtype", "layers")
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    dim: int
    metric: str
    per_layer: bool
    index: str
    dtype: str
    layers: int
    def __init__(self, dim: _Optional[int] = ..., metric: _Optional[str] = ..., per_layer: _Optional[bool] = ..., index: _Optional[str] = ..., dtype: _Optional[str] = ..., layers: _Optional[int] = ...) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("layers", "heads", "head_dim", "tokens_per_frame", "dtype")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    layers: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    dtype: str
    def __init__(self, layers: _Optional[int] = ..., heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., tokens_per_frame: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("max_entries", "max_bytes")
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_entries: int
    max_bytes: int
    def __init__(self, max_entries: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class StreamSpec(_message.Message):
    __slots__ = ("name", "key_spaces", "kv", "budget", "policy", "storage", "degrade")
    class KeySpacesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: KeySpace
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[KeySpace, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_SPACES_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    DEGRADE_FIELD_NUMBER: _ClassVar[int]
    name: str
    key_spaces: _containers.MessageMap[str, KeySpace]
    kv: KVLayout
    budget: Budget
    policy: str
    storage: str
    degrade: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., key_spaces: _Optional[_Mapping[str, KeySpace]] = ..., kv: _Optional[_Union[KVLayout, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., policy: _Optional[str] = ..., storage: _Optional[str] = ..., degrade: _Optional[_Iterable[str]] = ...) -> None: ...

class EntryMeta(_message.Message):
    __slots__ = ("entry_id", "frame_index", "chunk_index", "prompt", "created", "pinned", "has_rope_position", "rope_position", "hit_count", "has_last_hit", "last_hit", "importance", "lfu", "nbytes", "codec")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    HAS_ROPE_POSITION_FIELD_NUMBER: _ClassVar[int]
    ROPE_POSITION_FIELD_NUMBER: _ClassVar[int]
    HIT_COUNT_FIELD_NUMBER: _ClassVar[int]
    HAS_LAST_HIT_FIELD_NUMBER: _ClassVar[int]
    LAST_HIT_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    LFU_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    entry_id: int
    frame_index: int
    chunk_index: int
    prompt: str
    created: float
    pinned: bool
    has_rope_position: bool
    rope_position: int
    hit_count: int
    has_last_hit: bool
    last_hit: float
    importance: float
    lfu: float
    nbytes: int
    codec: str
    def __init__(self, entry_id: _Optional[int] = ..., frame_index: _Optional[int] = ..., chunk_index: _Optional[int] = ..., prompt: _Optional[str] = ..., created: _Optional[float] = ..., pinned: _Optional[bool] = ..., has_rope_position: _Optional[bool] = ..., rope_position: _Optional[int] = ..., hit_count: _Optional[int] = ..., has_last_hit: _Optional[bool] = ..., last_hit: _Optional[float] = ..., importance: _Optional[float] = ..., lfu: _Optional[float] = ..., nbytes: _Optional[int] = ..., codec: _Optional[str] = ...) -> None: ...

class StreamStats(_message.Message):
    __slots__ = ("name", "entries", "pinned", "payload_bytes", "key_bytes", "next_entry_id", "evicted_total", "degraded_total", "budget", "policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEXT_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    EVICTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    entries: int
    pinned: int
    payload_bytes: int
    key_bytes: int
    next_entry_id: int
    evicted_total: int
    degraded_total: int
    budget: Budget
    policy: str
    def __init__(self, name: _Optional[str] = ..., entries: _Optional[int] = ..., pinned: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., key_bytes: _Optional[int] = ..., next_entry_id: _Optional[int] = ..., evicted_total: _Optional[int] = ..., degraded_total: _Optional[int] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., policy: _Optional[str] = ...) -> None: ...

class CreateStreamRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: StreamSpec
    def __init__(self, spec: _Optional[_Union[StreamSpec, _Mapping]] = ...) -> None: ...

class CreateStreamResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DropStreamRequest(_message.Message):
    __slots__ = ("stream",)
    STREAM_FIELD_NUMBER: _ClassVar[int]
    stream: str
    def __init__(self, stream: _Optional[str] = ...) -> None: ...

class DropStreamResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStreamsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStreamsResponse(_message.Message):
    __slots__ = ("streams",)
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[StreamSpec]
    def __init__(self, streams: _Optional[_Iterable[_Union[StreamSpec, _Mapping]]] = ...) -> None: ...

class NewEntry(_message.Message):
    __slots__ = ("frame_index", "chunk_index", "prompt", "keys", "has_kv", "pinned", "has_rope_position", "rope_position", "importance", "kv_dtype", "kv_shape")
    class KeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    HAS_KV_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    HAS_ROPE_POSITION_FIELD_NUMBER: _ClassVar[int]
    ROPE_POSITION_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_SHAPE_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    chunk_index: int
    prompt: str
    keys: _containers.MessageMap[str, Tensor]
    has_kv: bool
    pinned: bool
    has_rope_position: bool
    rope_position: int
    importance: float
    kv_dtype: str
    kv_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, frame_index: _Optional[int] = ..., chunk_index: _Optional[int] = ..., prompt: _Optional[str] = ..., keys: _Optional[_Mapping[str, Tensor]] = ..., has_kv: _Optional[bool] = ..., pinned: _Optional[bool] = ..., has_rope_position: _Optional[bool] = ..., rope_position: _Optional[int] = ..., importance: _Optional[float] = ..., kv_dtype: _Optional[str] = ..., kv_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("stream", "entries", "plane", "arena_id", "arena_offset", "keys_in_arena", "keys_offset", "keys_in_chunks")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PLANE_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEYS_IN_ARENA_FIELD_NUMBER: _ClassVar[int]
    KEYS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEYS_IN_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    stream: str
    entries: _containers.RepeatedCompositeFieldContainer[NewEntry]
    plane: DataPlane
    arena_id: str
    arena_offset: int
    keys_in_arena: bool
    keys_offset: int
    keys_in_chunks: bool
    def __init__(self, stream: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[NewEntry, _Mapping]]] = ..., plane: _Optional[_Union[DataPlane, str]] = ..., arena_id: _Optional[str] = ..., arena_offset: _Optional[int] = ..., keys_in_arena: _Optional[bool] = ..., keys_offset: _Optional[int] = ..., keys_in_chunks: _Optional[bool] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "kv_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    kv_chunk: bytes
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., kv_chunk: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("stream", "space", "vectors", "k", "combine", "has_exclude_frames", "exclude_lo", "exclude_hi", "pinned_only", "has_time_range", "time_lo", "time_hi")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    HAS_EXCLUDE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_LO_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_HI_FIELD_NUMBER: _ClassVar[int]
    PINNED_ONLY_FIELD_NUMBER: _ClassVar[int]
    HAS_TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    TIME_LO_FIELD_NUMBER: _ClassVar[int]
    TIME_HI_FIELD_NUMBER: _ClassVar[int]
    stream: str
    space: str
    vectors: Tensor
    k: int
    combine: str
    has_exclude_frames: bool
    exclude_lo: int
    exclude_hi: int
    pinned_only: bool
    has_time_range: bool
    time_lo: float
    time_hi: float
    def __init__(self, stream: _Optional[str] = ..., space: _Optional[str] = ..., vectors: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., combine: _Optional[str] = ..., has_exclude_frames: _Optional[bool] = ..., exclude_lo: _Optional[int] = ..., exclude_hi: _Optional[int] = ..., pinned_only: _Optional[bool] = ..., has_time_range: _Optional[bool] = ..., time_lo: _Optional[float] = ..., time_hi: _Optional[float] = ...) -> None: ...

class TraceStep(_message.Message):
    __slots__ = ("name", "ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    ms: float
    def __init__(self, name: _Optional[str] = ..., ms: _Optional[float] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("ids", "scores", "frames", "scanned", "steps")
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SCANNED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    scores: Tensor
    frames: Tensor
    scanned: int
    steps: _containers.RepeatedCompositeFieldContainer[TraceStep]
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., frames: _Optional[_Union[Tensor, _Mapping]] = ..., scanned: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[TraceStep, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("stream", "ids", "layers", "plane", "arena_id", "arena_offset", "arena_bytes")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PLANE_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    stream: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    plane: DataPlane
    arena_id: str
    arena_offset: int
    arena_bytes: int
    def __init__(self, stream: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[int]] = ..., plane: _Optional[_Union[DataPlane, str]] = ..., arena_id: _Optional[str] = ..., arena_offset: _Optional[int] = ..., arena_bytes: _Optional[int] = ...) -> None: ...

class FetchHeader(_message.Message):
    __slots__ = ("ids", "layers", "dtype", "shape", "nbytes")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("header", "kv_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FetchHeader
    kv_chunk: bytes
    def __init__(self, header: _Optional[_Union[FetchHeader, _Mapping]] = ..., kv_chunk: _Optional[bytes] = ...) -> None: ...

class IdList(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class QueryFetchRequest(_message.Message):
    __slots__ = ("query", "has_fetch_k", "fetch_k", "include", "resident", "layers", "plane", "arena_id", "arena_offset", "arena_bytes")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    HAS_FETCH_K_FIELD_NUMBER: _ClassVar[int]
    FETCH_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PLANE_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    query: QueryRequest
    has_fetch_k: bool
    fetch_k: int
    include: _containers.RepeatedScalarFieldContainer[int]
    resident: _containers.RepeatedCompositeFieldContainer[IdList]
    layers: _containers.RepeatedScalarFieldContainer[int]
    plane: DataPlane
    arena_id: str
    arena_offset: int
    arena_bytes: int
    def __init__(self, query: _Optional[_Union[QueryRequest, _Mapping]] = ..., has_fetch_k: _Optional[bool] = ..., fetch_k: _Optional[int] = ..., include: _Optional[_Iterable[int]] = ..., resident: _Optional[_Iterable[_Union[IdList, _Mapping]]] = ..., layers: _Optional[_Iterable[int]] = ..., plane: _Optional[_Union[DataPlane, str]] = ..., arena_id: _Optional[str] = ..., arena_offset: _Optional[int] = ..., arena_bytes: _Optional[int] = ...) -> None: ...

class QueryFetchHeader(_message.Message):
    __slots__ = ("result", "groups", "nbytes")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    result: QueryResponse
    groups: _containers.RepeatedCompositeFieldContainer[FetchHeader]
    nbytes: int
    def __init__(self, result: _Optional[_Union[QueryResponse, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[FetchHeader, _Mapping]]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class QueryFetchResponse(_message.Message):
    __slots__ = ("header", "kv_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: QueryFetchHeader
    kv_chunk: bytes
    def __init__(self, header: _Optional[_Union[QueryFetchHeader, _Mapping]] = ..., kv_chunk: _Optional[bytes] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("stream", "ids")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    stream: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stream: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("stream", "ids", "pinned")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    stream: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    pinned: bool
    def __init__(self, stream: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ..., pinned: _Optional[bool] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PruneRequest(_message.Message):
    __slots__ = ("stream",)
    STREAM_FIELD_NUMBER: _ClassVar[int]
    stream: str
    def __init__(self, stream: _Optional[str] = ...) -> None: ...

class PruneResponse(_message.Message):
    __slots__ = ("evicted", "degraded", "reason")
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    evicted: _containers.RepeatedScalarFieldContainer[int]
    degraded: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, evicted: _Optional[_Iterable[int]] = ..., degraded: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("stream",)
    STREAM_FIELD_NUMBER: _ClassVar[int]
    stream: str
    def __init__(self, stream: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("streams", "entries", "payload_bytes", "map_size", "disk_bytes")
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[StreamStats]
    entries: int
    payload_bytes: int
    map_size: int
    disk_bytes: int
    def __init__(self, streams: _Optional[_Iterable[_Union[StreamStats, _Mapping]]] = ..., entries: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., map_size: _Optional[int] = ..., disk_bytes: _Optional[int] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("stream",)
    STREAM_FIELD_NUMBER: _ClassVar[int]
    stream: str
    def __init__(self, stream: _Optional[str] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[EntryMeta]
    def __init__(self, entries: _Optional[_Iterable[_Union[EntryMeta, _Mapping]]] = ...) -> None: ...

class RegisterArenaRequest(_message.Message):
    __slots__ = ("shm_name", "size", "nonce")
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    shm_name: str
    size: int
    nonce: bytes
    def __init__(self, shm_name: _Optional[str] = ..., size: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class RegisterArenaResponse(_message.Message):
    __slots__ = ("arena_id", "local_socket")
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    arena_id: str
    local_socket: str
    def __init__(self, arena_id: _Optional[str] = ..., local_socket: _Optional[str] = ...) -> None: ...

class ReleaseArenaRequest(_message.Message):
    __slots__ = ("arena_id",)
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    arena_id: str
    def __init__(self, arena_id: _Optional[str] = ...) -> None: ...

class ReleaseArenaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LocalCall(_message.Message):
    __slots__ = ("method", "request", "timeout_s", "authorization")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    method: str
    request: bytes
    timeout_s: float
    authorization: str
    def __init__(self, method: _Optional[str] = ..., request: _Optional[bytes] = ..., timeout_s: _Optional[float] = ..., authorization: _Optional[str] = ...) -> None: ...

class LocalAnswer(_message.Message):
    __slots__ = ("code", "response", "message", "trailers")
    class TrailersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRAILERS_FIELD_NUMBER: _ClassVar[int]
    code: int
    response: bytes
    message: str
    trailers: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., response: _Optional[bytes] = ..., message: _Optional[str] = ..., trailers: _Optional[_Mapping[str, str]] = ...) -> None: ...
