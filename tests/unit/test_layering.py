"""Who may import what: the client speaks only the wire contract (memory_service/wire/), never the server
package (memory_service/service/); wire/convert.py is the one module that imports the generated message
classes. Checked on the real import graph (a fresh interpreter) and on the source's import statements."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = {"memory_service.wire.gen.memory_pb2", "memory_service.wire.gen.memory_pb2_grpc"}


def test_the_client_loads_no_module_of_the_server_package():
    code = ("import sys, memory_service.client; "
            "print(sorted(m for m in sys.modules if m.startswith('memory_service.service')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout.strip()
    assert out == "[]", f"importing MemoryClient loaded server modules: {out}"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_only_convert_imports_the_generated_message_classes():
    importers = sorted(
        str(p.relative_to(REPO)) for top in ("memory_service", "plugin") for p in (REPO / top).rglob("*.py")
        if "gen" not in p.relative_to(REPO).parts and _imports(p) & GENERATED
    )
    assert importers == ["memory_service/wire/convert.py"]
