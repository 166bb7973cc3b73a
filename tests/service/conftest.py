"""Fixtures of the service tests: a real MemoryServer on a free port, the three backends, a serve subprocess.

`memory` is parametrized over LocalMemory (in-process), MemoryClient on the shared-memory plane and
MemoryClient on the gRPC stream plane: a test written against it proves the three give the same answers.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from svc_util import ROOT_CONFTEST, SMALL_ARENA, start_serve  # noqa: E402

from memory_service import LocalMemory  # noqa: E402
from memory_service.client import MemoryClient  # noqa: E402
from memory_service.config import ServiceConfig  # noqa: E402
from memory_service.service.server import MemoryServer  # noqa: E402

# Every conftest.py under tests/ is imported as module "conftest" and the last one loaded owns that name in
# sys.modules; modules collected after this one (tests/unit) do `from conftest import make_spec`, so the root
# conftest's helpers are re-exported here unchanged.
globals().update({k: v for k, v in vars(ROOT_CONFTEST).items()
                  if not k.startswith("_") and k not in globals() and not hasattr(v, "_fixture_function")
                  and type(v).__name__ != "FixtureFunctionDefinition"})

BACKENDS = ("local", "shm", "stream")


@pytest.fixture
def make_server(tmp_path):
    """`make_server(**ServiceConfig fields)`: a started MemoryServer over a fresh bank on a free port."""
    started = []

    def make(**kw):
        kw.setdefault("data_dir", str(tmp_path / f"served{len(started)}"))
        srv = MemoryServer(ServiceConfig(port=0, **kw))
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop(0)


@pytest.fixture
def server(make_server):
    """A MemoryServer serving a fresh bank in a tmp dir on 127.0.0.1, any free port; stopped after the test."""
    return make_server()


def open_backend(kind: str, tmp_path, server=None):
    if kind == "local":
        return LocalMemory(str(tmp_path / "local"))
    return MemoryClient(server.address, plane=kind, arena_bytes=SMALL_ARENA)


@pytest.fixture(params=BACKENDS)
def memory(request, tmp_path):
    """LocalMemory, MemoryClient(plane="shm") or MemoryClient(plane="stream") over an empty bank."""
    srv = None if request.param == "local" else request.getfixturevalue("server")
    with open_backend(request.param, tmp_path, srv) as m:
        if request.param != "local":
            assert m.plane == request.param
        yield m


@pytest.fixture
def backends(tmp_path, make_server):
    """All three backends at once, each over its own empty bank (each client has its own server)."""
    opened = {kind: open_backend(kind, tmp_path, None if kind == "local" else make_server()) for kind in BACKENDS}
    yield opened
    for m in opened.values():
        m.close()


@pytest.fixture
def serve(tmp_path):
    """Start `memflow-service serve` subprocesses (`serve(data_dir, *flags)`); all are killed at the end."""
    procs = []

    def start(data_dir=None, *args, **kw):
        p = start_serve(str(data_dir or tmp_path / "bank"), *args, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
