"""`memflow-service serve` that cannot listen says so in one line and exits 2, like every other refusal.

A port another process listens on, an address that is not this machine's (bind only: no packet is sent to
it), a metrics port in use: each is one line on stderr naming the address and what to do, no traceback, and
the data directory is released (its lock and LMDB closed) so the next start can take it.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from svc_util import REPO, serve_cmd

from memory_service import LocalMemory

NOT_HERE = "10.255.255.1"  # a private address no test machine has; binding it fails locally


def serve_fails(data_dir: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMFLOW_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(serve_cmd(data_dir, *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    with LocalMemory(data_dir):  # released: the lock is free, LMDB was closed
        pass
    return lines[0]


@pytest.fixture
def busy_port():
    """A port that a socket of this test listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def test_port_in_use(tmp_path, busy_port):
    line = serve_fails(str(tmp_path / "bank"), "--port", str(busy_port))
    assert f"127.0.0.1:{busy_port}" in line and "already in use" in line and "--port" in line, line


def test_metrics_port_in_use(tmp_path, busy_port):
    line = serve_fails(str(tmp_path / "bank"), "--metrics-port", str(busy_port))
    assert f"127.0.0.1:{busy_port}" in line and "metrics" in line and "already in use" in line, line


def _bindable(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(_bindable(NOT_HERE), reason=f"this machine can bind {NOT_HERE} (ip_nonlocal_bind or own address)")
def test_address_not_of_this_machine(tmp_path):
    line = serve_fails(str(tmp_path / "bank"), "--host", NOT_HERE, "--insecure")
    assert f"{NOT_HERE}:" in line and "not one of this machine's" in line, line
    assert "127.0.0.1" in line, line  # what to do instead


def test_a_server_that_fails_to_build_frees_its_data_directory(tmp_path):
    """A MemoryServer whose __init__ fails after opening its bank closes the bank: the directory's lock goes (a
    retry in the same process finds it free), and in cluster mode the node's lease would go with it."""
    from memory_service.config import ServiceConfig
    from memory_service.service.server import MemoryServer

    with pytest.raises(ValueError):
        MemoryServer(ServiceConfig(data_dir=str(tmp_path), port=0, workers=0))  # the thread pool refuses 0 workers
    with LocalMemory(str(tmp_path)) as m:  # not "in use by another process"
        assert m.list_streams() == []
