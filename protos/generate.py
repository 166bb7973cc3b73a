"""Generate (or check) the Python code for protos/memflow/v1/memory.proto.

`python protos/generate.py` writes memory_service/service/gen/memory_pb2{,_grpc}.py (+ .pyi);
`python protos/generate.py --check` exits 1 when the checked-in code differs from what the .proto gives.
The generated gRPC module imports `memflow.v1.memory_pb2`; it is rewritten to the package-relative import so
the service needs no top-level `memflow` package. Needs grpcio-tools (the test extra).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = "memflow/v1/memory.proto"
OUT = ROOT / "memory_service" / "service" / "gen"
FILES = ("memory_pb2.py", "memory_pb2.pyi", "memory_pb2_grpc.py")


def generate() -> dict[str, str]:
    """Run protoc into a temp dir; return {file name: text}."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", str(ROOT / "protos" / PROTO),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out = {}
        for name in FILES:
            text = (pathlib.Path(tmp) / "memflow" / "v1" / name).read_text()
            out[name] = text.replace("from memflow.v1 import memory_pb2", "from memory_service.service.gen import memory_pb2")
        return out


def stale() -> list[str]:
    """Names of generated files that are missing or differ from a fresh generation."""
    fresh = generate()
    return [n for n, text in fresh.items() if not (OUT / n).exists() or (OUT / n).read_text() != text]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in code is stale")
    args = parser.parse_args()
    if args.check:
        bad = stale()
        if bad:
            print(f"stale generated code: {bad}; run `make proto`", file=sys.stderr)
            return 1
        print("generated code is current")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in generate().items():
        (OUT / name).write_text(text)
    (OUT / "__init__.py").write_text('"""Generated from protos/memflow/v1/memory.proto by `make proto`; do not edit."""\n')
    print(f"wrote {', '.join(FILES)} to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
