"""README.md's Python examples run as a new user would paste them: each block in order, in a fresh working
directory, against a real server where the block talks to one. A block that needs what this machine lacks (a
real Wan checkpoint on a GPU, a three-node cluster) is compiled, so its syntax and imports stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def block(start: str) -> str:
    found = [b for b in BLOCKS if b.startswith(start)]
    assert len(found) == 1, f"README has {len(found)} python blocks starting {start!r}; expected one"
    return found[0]


def run(code: str, namespace: dict) -> None:
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example code


def test_every_python_block_in_the_readme_is_one_of_those_checked_here():
    assert len(BLOCKS) == 6, f"README has {len(BLOCKS)} python blocks; this test knows 6: add the new one here"
    for code in BLOCKS:
        compile(code, str(README), "exec")


def test_the_bank_and_the_service_examples_run(tmp_path, monkeypatch, server, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    run(block("import ml_dtypes, numpy as np"), ns)  # LocalMemory("./memflow-data"), in the cwd
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("(30, 2)") and out[1].startswith("(") and out[1].endswith(" 4"), out
    # the same calls over gRPC: the README's default address is make run's; here the test's server
    service = block("from memory_service import MemoryClient\n\nwith MemoryClient(\"127.0.0.1:50051\")")
    run(service.replace("127.0.0.1:50051", server.address), ns)
    hits, kv = ns["hits"], ns["kv"]
    assert hits.ids.shape == (30, 2) and kv.shape == (len(hits.unique_ids()), 30, 2, 16, 12, 128)


def test_the_plugin_example_runs_on_the_reference_model(tmp_path):
    from memory_service import LocalMemory

    with LocalMemory(str(tmp_path / "bank")) as memory:
        ns = {"memory": memory, "prompts": ["a cat on a red sofa"] * 2 + ["a dog in the park"] * 2}
        run(block("from plugin import MemFlowConfig, MemFlowPlugin, SelfForcingAdapter"), ns)
        assert memory.stats("story-1").entries > 0, "the plugin recorded no frame"


def test_the_diffusers_wan_example_runs_on_a_tiny_config(capsys):
    pytest.importorskip("diffusers")
    run(block("import tempfile"), {})
    printed = capsys.readouterr().out
    assert re.search(r"^[1-9]\d* frames loaded; \(\d+, \d+\) memory frames per layer", printed, re.M), printed
