"""Frozen, strict configuration: defaults < JSON file < MEMFLOW_* environment < explicit overrides.

Owns every tunable of the bank (`BankConfig`) and the server (`ServiceConfig`). An unknown key in any
source is an error that names the key and the known ones, so a typo never silently keeps a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from memory_service.errors import InvalidArgument

GiB = 1 << 30


@dataclass(frozen=True)
class IndexParams:
    """Search-structure parameters shared by every stream of a bank."""

    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    hnsw_rebuild_tombstone_ratio: float = 0.25  # rebuild an HNSW graph once this share is deleted
    ivf_nlist: int = 0  # 0: chosen from the size at training time (sqrt(n), within [16, 4096])
    ivf_nprobe: int = 32
    ivf_pq_m: int = 0  # 0: dim / 4 sub-quantizers (capped to a divisor of dim)
    ivf_refine: int = 8  # exact rerank of k * refine candidates (PQ, ivfsq)
    ivf_sq_bits: int = 4  # ivfsq code bits per dimension: 4 (dim / 2 bytes a key) or 8 (dim bytes, a closer score)
    ivf_train_min: int = 2048  # below this many vectors an IVF space answers exactly
    # ivfsq with at least 256 lists: > 0 gives its centroids an IVF of their own (sqrt(nlist) groups), and a query
    # and an add scan this many groups' centroids instead of all of them. Fewer centroids scanned can miss lists a
    # full scan finds: for a small ivf_nprobe (2 of 316 lists, 4 groups of 18: recall unchanged on bank_growth's
    # keys), never for a wide one. 0 (default) scans every centroid. Fixed when a space trains.
    ivf_quantizer_nprobe: int = 0
    two_stage_candidates: int = 256  # first-pass candidates (at least 16 * k)
    use_gpu: bool = True  # use faiss-gpu for flat search when a GPU is present
    # faiss's OpenMP threads in each thread that searches or adds. 1: large per-layer searches already run on a
    # thread pool, and OpenMP's spin-waits make a 50-vector search 20x slower on a busy 2-core machine (0.24 vs
    # 0.011 ms). 0 keeps faiss's default.
    faiss_threads: int = 1
    # Large exact float32 ip/cosine per-layer spaces keep an int8 copy of their keys (+25% key RAM) and answer from
    # it with a proven-exact rescore, reading a quarter of the bytes; any query it cannot prove takes the full scan.
    flat_int8_prefilter: bool = True

    def __post_init__(self) -> None:
        if self.ivf_sq_bits not in (4, 8):  # here, not when an index trains: that happens inside a put
            raise InvalidArgument(f"config index.ivf_sq_bits is {self.ivf_sq_bits}; expected 4 or 8")
        if self.ivf_quantizer_nprobe < 0:
            raise InvalidArgument(f"config index.ivf_quantizer_nprobe is {self.ivf_quantizer_nprobe}; expected 0 (scan "
                                  "every centroid) or a positive number of centroid groups")


@dataclass(frozen=True)
class BankConfig:
    map_size: int = 1 * GiB  # initial LMDB map; grows by doubling on demand
    max_map_size: int = 1 << 40  # hard ceiling; past it a put is RESOURCE_EXHAUSTED
    max_batch: int = 4096  # entries per put
    durable: bool = True  # fsync every commit; False keeps commits atomic but may lose the last ones on power loss
    max_k: int = 1024
    verify_checksums: bool = True  # payload checksums checked on the first read of each layer after open
    verify_every_read: bool = False  # ... or on every read
    snapshot_on_close: bool = True
    # disk held back (a file of real blocks, at most 1/16 of the filesystem) so that deletes, drops and prunes
    # still commit on a full disk; 0 turns it off
    reserve_bytes: int = 8 << 20
    hit_flush_interval_s: float = 5.0  # retrieval statistics are persisted at most this stale
    index: IndexParams = field(default_factory=IndexParams)


@dataclass(frozen=True)
class TenantQuotas:
    """What one tenant (the tenant of an auth token) may hold at once; None lifts a limit. Past a limit a call is
    RESOURCE_EXHAUSTED and other tenants are untouched. A service without auth has one caller, the operator (the
    anonymous tenant): these do not bind it, only the service-wide limits and the bank's own do."""

    max_arenas: Optional[int] = 32  # shm arenas registered at once (a client holds one or two)
    max_arena_bytes: Optional[int] = 64 * GiB  # their total size
    max_streams: Optional[int] = 1024
    max_stored_bytes: Optional[int] = 256 * GiB  # payload + key bytes over all the tenant's streams

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 0:
                raise InvalidArgument(f"config quotas.{f.name} is {value}; expected a count >= 0, or null for no limit")


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster mode (memory_service/cluster/); off while `etcd` is empty. S3 credentials come from the usual AWS
    environment and config files, never from here."""

    etcd: str = ""  # etcd endpoints, "etcd://host:port[,host:port...]" (or http:// URLs)
    s3_endpoint: str = ""  # the S3-compatible object store's URL
    s3_bucket: str = ""
    node_id: str = ""  # unique per node, stable across its restarts
    advertise: str = ""  # host:port that clients and the other nodes reach this node at (default host:port)
    lease_ttl_s: float = 5.0  # a dead node's streams move after about this long
    etcd_timeout_s: float = 5.0  # one etcd call, all members tried; past an election (~2 s), so writes ride it out
    local_cache_bytes: Optional[int] = None  # payload bytes kept in the local LMDB; None: no bound
    prefix: str = "memflow/"  # etcd key prefix (several clusters may share one etcd)
    checkpoint_records: int = 512  # a stream's log is checkpointed after this many records (or its live entries)
    # the hot tier for K/V bytes (Mooncake Store), off while mooncake_master is empty
    mooncake_master: str = ""  # host:port of mooncake_master
    mooncake_metadata: str = ""  # its metadata server, e.g. http://host:port/metadata
    mooncake_protocol: str = "tcp"  # tcp | rdma
    mooncake_replicas: int = 1
    mooncake_segment_bytes: int = 0  # memory this node adds to the pool (0: store nodes provide it)
    mooncake_pinned_entries: int = 3  # per stream, the newest entries kept hard-pinned in the pool (never evicted)
    mooncake_promote_queue_bytes: int = 256 << 20  # S3 reads waiting to be promoted into the pool; past it: dropped

    @property
    def enabled(self) -> bool:
        return bool(self.etcd)

    def endpoints(self) -> list[str]:
        """etcd://a:1,b:2 -> [http://a:1, http://b:2] (etcd's client URLs)."""
        out = []
        for part in (p.strip() for p in self.etcd.split(",")):
            if part.startswith("etcd://"):
                part = "http://" + part[len("etcd://"):]
            elif part and "://" not in part:
                part = "http://" + part
            if part:
                out.append(part)
        return out

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        missing = [flag for flag, value in (("--s3-endpoint", self.s3_endpoint), ("--s3-bucket", self.s3_bucket),
                                            ("--node-id", self.node_id)) if not value]
        if missing:
            raise InvalidArgument(f"cluster mode (--cluster {self.etcd}) also needs {', '.join(missing)}")
        if self.lease_ttl_s < 1:
            raise InvalidArgument(f"config cluster.lease_ttl_s is {self.lease_ttl_s}; expected >= 1 (etcd's unit)")
        if bool(self.mooncake_master) != bool(self.mooncake_metadata):
            raise InvalidArgument("the Mooncake hot tier needs both --mooncake-master and --mooncake-metadata")
        if self.mooncake_protocol not in ("tcp", "rdma"):
            raise InvalidArgument(f"config cluster.mooncake_protocol is {self.mooncake_protocol!r}; "
                                  "expected tcp or rdma")
        if self.mooncake_promote_queue_bytes < 0:
            raise InvalidArgument(f"config cluster.mooncake_promote_queue_bytes is "
                                  f"{self.mooncake_promote_queue_bytes}; expected >= 0 (0: no promotion)")
        if self.local_cache_bytes is not None and self.local_cache_bytes < 0:
            raise InvalidArgument(f"config cluster.local_cache_bytes is {self.local_cache_bytes}; expected >= 0")
        if self.checkpoint_records < 1:
            raise InvalidArgument(f"config cluster.checkpoint_records is {self.checkpoint_records}; expected >= 1")


@dataclass(frozen=True)
class ServiceConfig:
    data_dir: str = "./memflow-data"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: Optional[int] = None
    auth_token_file: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    insecure: bool = False
    max_message_bytes: int = 64 << 20
    workers: int = 16
    # shm arenas registered at once, service-wide (each holds one file descriptor); with auth, raised to
    # tenants x quotas.max_arenas so that no tenant's arenas can crowd out another's
    max_arenas: int = 256
    # per-stream gauges on /metrics, labelled with stream names (every tenant's, and /metrics asks for no
    # token): off unless the operator opts in; the totals are always there
    metrics_stream_labels: bool = False
    # the local socket (service/local_server.py): "auto" (Linux: a fresh name in the abstract namespace), "off",
    # or a name: "@name" (abstract) or a filesystem path
    local_socket: str = "auto"
    quotas: TenantQuotas = field(default_factory=TenantQuotas)
    bank: BankConfig = field(default_factory=BankConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        name = self.local_socket
        if not isinstance(name, str) or not name or name == "@" or "\0" in name or \
                len(name.encode()) > 107:
            raise InvalidArgument(f"config local_socket is {name!r}; expected \"auto\", \"off\", \"@name\" (Linux's "
                                  "abstract namespace) or a socket path of at most 107 bytes")


def build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Construct dataclass `cls` from a mapping, recursing into nested config dataclasses."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidArgument(f"unknown config key(s) {unknown} in {where}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise InvalidArgument(f"config key {where}.{name} must be a mapping, got {value!r}")
            kwargs[name] = build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, default, f"{where}.{name}", f.type)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str, annotation: Any) -> Any:
    optional = "Optional" in str(annotation)
    if value is None and optional:
        return None
    target = type(default) if default is not None else (int if "int" in str(annotation) else str)
    if isinstance(value, str) and target is not str:
        text = value.strip().lower()
        try:
            if target is bool:
                if text in ("1", "true", "yes", "on"):
                    return True
                if text in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            return target(float(text)) if target is int else target(text)
        except ValueError:
            raise InvalidArgument(f"config {where}: cannot read {value!r} as {target.__name__}") from None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise InvalidArgument(f"config {where} must be {target.__name__}, got {value!r}")
    return value


def load_service_config(
    path: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> ServiceConfig:
    """Merge defaults, a JSON file, MEMFLOW_* env vars and overrides (CLI flags), in that order.

    Env names: MEMFLOW_PORT, MEMFLOW_BANK__MAP_SIZE, MEMFLOW_BANK__INDEX__HNSW_M ('__' nests).
    """
    merged: dict[str, Any] = {}
    if path:
        try:
            merged = _deep_merge(merged, json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"cannot read config file {path}: {exc}") from None
    env = os.environ if environ is None else environ
    for key, value in env.items():
        if key.startswith("MEMFLOW_") and key not in _NOT_CONFIG_ENV:
            parts = key[len("MEMFLOW_"):].lower().split("__")
            merged = _deep_merge(merged, _nest(parts, value))
    merged = _deep_merge(merged, {k: v for k, v in (overrides or {}).items() if v is not None})
    return build(ServiceConfig, merged, "config")


_NOT_CONFIG_ENV = {"MEMFLOW_TOKEN", "MEMFLOW_TARGET"}


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (the default bind; the shm plane's test)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
