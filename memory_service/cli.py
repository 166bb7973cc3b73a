"""`memflow-service`: serve | inspect.

Owns the command line of DESIGN.md ("Public surface"). `serve` opens the bank in --data-dir and serves it over
gRPC until SIGTERM/SIGINT (then drains and closes cleanly); `inspect` prints every stream of a data directory
with its counts, budget and policy as JSON lines. Flags override MEMFLOW_* environment variables, which
override a --config JSON file, which overrides the defaults (memory_service/config.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from typing import Optional, Sequence

from memory_service.errors import MemFlowError


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, and any `extra=` fields."""

    _PLAIN = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in self._PLAIN})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _inspect(args: argparse.Namespace) -> int:
    from memory_service.config import BankConfig
    from memory_service.local import LocalMemory

    # Read-only: takes no writer lock and writes nothing, so it may run beside a live service.
    with LocalMemory(args.data_dir, BankConfig(snapshot_on_close=False), read_only=True) as memory:
        stats = memory.stats()
        for s in stats.streams:
            print(json.dumps({"stream": s.name, **dataclasses.asdict(s)}, default=str))
        unavailable = memory.bank.unavailable_streams()
        for u in unavailable:  # records on disk the bank cannot open: named, with why, never a hang or a crash
            print(json.dumps({"stream": u.name, "unavailable": True, "reason": u.reason}))
        print(json.dumps({"streams": len(stats.streams), "unavailable_streams": len(unavailable),
                          "entries": stats.entries,
                          "payload_bytes": stats.payload_bytes, "disk_bytes": stats.disk_bytes,
                          "map_size": stats.map_size}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from memory_service.config import load_service_config
    from memory_service.service.server import MemoryServer

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    overrides = {k: getattr(args, k) for k in ("data_dir", "host", "port", "metrics_port", "auth_token_file",
                                               "tls_cert", "tls_key", "workers", "local_socket")}
    if args.insecure:
        overrides["insecure"] = True
    cluster = {k: getattr(args, a) for k, a in (("etcd", "cluster"), ("s3_endpoint", "s3_endpoint"),
                                                ("s3_bucket", "s3_bucket"), ("node_id", "node_id"),
                                                ("advertise", "advertise"), ("local_cache_bytes", "local_cache_bytes"),
                                                ("lease_ttl_s", "lease_ttl_s"), ("mooncake_master", "mooncake_master"),
                                                ("mooncake_metadata", "mooncake_metadata"),
                                                ("mooncake_protocol", "mooncake_protocol"),
                                                ("mooncake_replicas", "mooncake_replicas"),
                                                ("mooncake_segment_bytes", "mooncake_segment_bytes"))
               if getattr(args, a) is not None}
    if cluster:
        overrides["cluster"] = cluster
    config = load_service_config(args.config, overrides=overrides)
    t0 = time.perf_counter()
    server = MemoryServer(config)  # refuses a data directory another process holds (store/dirlock.py)
    try:
        server.start()
    except BaseException:
        server.close_unstarted()  # the bank closes cleanly and its directory lock is released
        raise
    stats = server.bank.stats()
    print(f"memflow-service: serving {config.data_dir} on {server.address} "
          f"({'TLS' if config.tls_cert else 'plaintext'}, {'token auth' if server.auth else 'no auth'}; "
          f"{len(stats.streams)} streams, {stats.entries} entries, opened in {time.perf_counter() - t0:.2f} s)"
          + (f"; metrics on http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""),
          flush=True)
    server.serve_forever()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memflow-service", description="MemFlow memory service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a data directory over gRPC")
    serve.add_argument("--data-dir", default=None, help="bank directory (default ./memflow-data)")
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (default 50051; 0 = any free port)")
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    serve.add_argument("--auth-token-file", default=None, help="bearer tokens, one 'tenant:token' per line")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    serve.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without auth")
    serve.add_argument("--workers", type=int, default=None, help="request threads (default 16)")
    serve.add_argument("--local-socket", default=None, metavar="auto|off|@NAME|PATH",
                       help="where same-host clients of the shared-memory plane may call without gRPC: auto (the "
                            "default: a fresh name in Linux's abstract namespace), off, @NAME or a socket path")
    serve.add_argument("--cluster", default=None, metavar="etcd://HOST:PORT[,...]",
                       help="cluster mode: etcd endpoints for stream ownership (needs --s3-endpoint, --s3-bucket, "
                            "--node-id; S3 credentials from the usual AWS environment)")
    serve.add_argument("--s3-endpoint", default=None, help="cluster mode: the S3-compatible store's URL")
    serve.add_argument("--s3-bucket", default=None, help="cluster mode: the bucket of the durable tier")
    serve.add_argument("--node-id", default=None, help="cluster mode: this node's unique, stable id")
    serve.add_argument("--advertise", default=None,
                       help="cluster mode: host:port clients reach this node at (default --host:--port)")
    serve.add_argument("--local-cache-bytes", type=int, default=None,
                       help="cluster mode: payload bytes kept in the local LMDB (default: no bound; the rest is read "
                            "through from S3)")
    serve.add_argument("--lease-ttl-s", type=float, default=None,
                       help="cluster mode: etcd lease of this node; its streams move about this long after it dies "
                            "(default 5)")
    serve.add_argument("--mooncake-master", default=None, metavar="HOST:PORT",
                       help="cluster mode: Mooncake Store master, the hot tier for K/V between the local cache and S3")
    serve.add_argument("--mooncake-metadata", default=None, metavar="URL",
                       help="cluster mode: Mooncake's metadata server (with --mooncake-master)")
    serve.add_argument("--mooncake-protocol", default=None, choices=["tcp", "rdma"], help="default tcp")
    serve.add_argument("--mooncake-replicas", type=int, default=None, help="replicas per object (default 1)")
    serve.add_argument("--mooncake-segment-bytes", type=int, default=None,
                       help="memory this node adds to the Mooncake pool (default 0: store nodes provide it)")
    serve.add_argument("--config", default=None, help="JSON config file (see memory_service/config.py)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)
    inspect = sub.add_parser("inspect", help="print the streams of a data directory as JSON lines")
    inspect.add_argument("--data-dir", default="./memflow-data")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MemFlowError as exc:
        print(f"memflow-service: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
