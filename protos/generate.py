"""Generate (or check) the Python code for protos/memflow/v1/memory.proto.

`python protos/generate.py` writes memory_service/wire/gen/memory_pb2{,_grpc}.py (+ .pyi) and
memory_descriptor.py; `python protos/generate.py --check` exits 1 when the checked-in code differs from what
the .proto gives. The generated gRPC module imports `memflow.v1.memory_pb2`; it is rewritten to the
package-relative import so the service needs no top-level `memflow` package. memory_descriptor.py holds the
.proto's FileDescriptorProto *with* its comments (protoc --include_source_info; the descriptor inside
memory_pb2.py has none): server reflection serves it, so grpcurl and other tools show the contract's comments.
Needs grpcio-tools (the test extra).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = "memflow/v1/memory.proto"
OUT = ROOT / "memory_service" / "wire" / "gen"
FILES = ("memory_pb2.py", "memory_pb2.pyi", "memory_pb2_grpc.py", "memory_descriptor.py")
DESCRIPTOR_MODULE = '''"""Generated from protos/memflow/v1/memory.proto by `make proto`; do not edit.

The serialized FileDescriptorProto of memflow/v1/memory.proto with source_code_info (its comments), which
server reflection serves (memory_service/service/reflection.py).
"""

FILE_DESCRIPTOR_PROTO = (
{lines}
)
'''


def descriptor_module(serialized: bytes) -> str:
    """memory_descriptor.py: `serialized` as a bytes literal, 64 bytes a line."""
    lines = "\n".join(f"    {serialized[i:i + 64]!r}" for i in range(0, len(serialized), 64))
    return DESCRIPTOR_MODULE.format(lines=lines)


def generate() -> dict[str, str]:
    """Run protoc into a temp dir; return {file name: text}."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", f"--descriptor_set_out={tmp}/descriptor.binpb", "--include_source_info",
            str(ROOT / "protos" / PROTO),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        from google.protobuf import descriptor_pb2

        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString((pathlib.Path(tmp) / "descriptor.binpb").read_bytes())
        [proto] = descriptor_set.file  # no imports: the set holds this one file
        out = {"memory_descriptor.py": descriptor_module(proto.SerializeToString(deterministic=True))}
        for name in FILES[:3]:
            text = (pathlib.Path(tmp) / "memflow" / "v1" / name).read_text()
            out[name] = text.replace("from memflow.v1 import memory_pb2", "from memory_service.wire.gen import memory_pb2")
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
