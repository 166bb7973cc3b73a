"""`memflow-service`: serve | inspect.

Owns the command line of DESIGN.md ("Public surface"). `serve` opens the bank in --data-dir and serves it;
`inspect` prints every stream of a data directory with its counts, budget and policy as JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

from memory_service.errors import MemFlowError


def _inspect(args: argparse.Namespace) -> int:
    from memory_service.local import LocalMemory

    with LocalMemory(args.data_dir) as memory:
        stats = memory.stats()
        for s in stats.streams:
            print(json.dumps({"stream": s.name, **dataclasses.asdict(s)}, default=str))
        print(json.dumps({"streams": len(stats.streams), "entries": stats.entries,
                          "payload_bytes": stats.payload_bytes, "disk_bytes": stats.disk_bytes,
                          "map_size": stats.map_size}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from memory_service.local import LocalMemory

    # Until the gRPC server lands this opens the embedded bank and reports it.
    with LocalMemory(args.data_dir) as memory:
        stats = memory.stats()
        print(f"memflow: embedded bank at {args.data_dir}: {len(stats.streams)} streams, {stats.entries} entries")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memflow-service", description="MemFlow memory service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a data directory over gRPC")
    serve.add_argument("--data-dir", default="./memflow-data")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
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
