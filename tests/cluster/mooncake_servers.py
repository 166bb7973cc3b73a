"""Real Mooncake Store processes for the cluster tests: one master and n store nodes on 127.0.0.1, stopped by PID.

`MooncakeCluster(base_dir, stores=2)` starts `mooncake_master` with the flags issue 14 checked on these machines
(free ports, `--client_ttl=2` so a killed store node is expired in ~2 s) and `stores` store nodes
(`mooncake_client`, each contributing a small `segment_bytes` DRAM segment over TCP), and waits until the master's
metrics say every segment is mounted. `.master` is "127.0.0.1:P", `.metadata` "http://127.0.0.1:PM/metadata";
`.kill_store(i)` is SIGKILL, `.restart_store(i)` starts that node again (empty: a store node keeps nothing),
`.kill_master()` is SIGKILL, `.restart_master()` kills it and starts a new one on the same ports (no HA: every key
is lost, and the store nodes re-mount their segments on their own), `.stop()` kills them all.

Every process runs with MC_TCP_BIND_ADDRESS=127.0.0.1: without it the transfer engine advertises a non-loopback
interface, which other processes here may not reach. The binaries come from PyPI's
mooncake-transfer-engine-non-cuda (which needs the system's libibverbs1 even for TCP), next to the interpreter or
on PATH; without them, or when `import mooncake.store` fails, the tests skip.

A module of its own, imported by name (`from mooncake_servers import mooncake`), not a conftest.py (see
tiny_disk.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ports import free_ports

READY_WITHIN_S = 30.0
SEGMENT_BYTES = 128 << 20  # per store node: small (these machines share 24 GB), yet room for a 64 MB object
_INSTALL = "`make test` installs them (apt libibverbs1, pip mooncake-transfer-engine-non-cuda)"


# the clients in the test process log at INFO to stderr unless told before the library loads (MooncakeTier says
# the same when it is the first to load it); the processes below keep INFO in their own logs, for log_tail
os.environ.setdefault("MC_LOG_LEVEL", "WARNING")


def mooncake_binaries() -> tuple[str, str]:
    """(mooncake_master, mooncake_client), beside the interpreter or on PATH; skips the test when either is absent
    or the Python module cannot load (libibverbs.so.1 missing)."""
    found = []
    for name in ("mooncake_master", "mooncake_client"):
        beside = os.path.join(os.path.dirname(sys.executable), name)
        path = beside if os.access(beside, os.X_OK) else shutil.which(name)
        if path is None:
            pytest.skip(f"no {name} beside the interpreter or on PATH: {_INSTALL}")
        found.append(path)
    try:
        import mooncake.store  # noqa: F401 - only whether it loads
    except ImportError as e:
        pytest.skip(f"`import mooncake.store` fails ({e}): {_INSTALL}")
    return found[0], found[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, so a crashed run leaves no DRAM pool
    (Linux ties this to the thread that started it: start them from the test's own thread)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)


class MooncakeCluster:
    """A master and `stores` store nodes on loopback; see the module doc."""

    def __init__(self, base_dir: str | os.PathLike, stores: int = 2, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.master_binary, self.client_binary = mooncake_binaries()
        self.base = Path(base_dir)
        self.base.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.rpc_port, self.metadata_port, self.metrics_port, *self.store_ports = free_ports(3 + stores)
        self.master = f"127.0.0.1:{self.rpc_port}"
        self.metadata = f"http://127.0.0.1:{self.metadata_port}/metadata"
        self.env = {**os.environ, "MC_TCP_BIND_ADDRESS": "127.0.0.1", "MC_LOG_LEVEL": "INFO"}
        self.master_proc: subprocess.Popen | None = None
        self.store_procs: list[subprocess.Popen | None] = [None] * stores
        try:
            self._spawn_master()
            for i in range(stores):
                self._spawn_store(i)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    # -- processes ----------------------------------------------------------------------------------------------
    def _popen(self, argv: list[str], log_name: str) -> subprocess.Popen:
        with open(self.base / log_name, "ab") as log:
            return subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to pytest must not reach it: the fixture stops it
                preexec_fn=_die_with_parent,
            )  # fmt: skip

    def _spawn_master(self) -> None:
        self.master_proc = self._popen([
            self.master_binary, "--rpc_address=127.0.0.1", f"--rpc_port={self.rpc_port}",
            "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
            f"--http_metadata_server_port={self.metadata_port}", "--metrics_host=127.0.0.1",
            f"--metrics_port={self.metrics_port}", "--rpc_thread_num=2", "--client_ttl=2",
        ], "master.log")  # fmt: skip

    def _spawn_store(self, i: int) -> None:
        self.store_procs[i] = self._popen([
            self.client_binary, "--host=127.0.0.1", f"--port={self.store_ports[i]}",
            f"--global_segment_size={self.segment_bytes // (1 << 20)}MB", f"--master_server_address={self.master}",
            f"--metadata_server={self.metadata}", "--protocol=tcp",
        ], f"store{i}.log")  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """The master's unlabelled gauges and counters (Prometheus text), e.g. master_total_capacity_bytes."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2.0) as r:
            text = r.read().decode(errors="replace")
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if line and not line.startswith("#") and "{" not in name:
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def running_stores(self) -> int:
        return sum(p is not None and p.poll() is None for p in self.store_procs)

    def wait_ready(self, timeout_s: float = READY_WITHIN_S) -> None:
        """Until the master answers and its mounted capacity is exactly that of the running store nodes (so a
        killed node's segment has been expired too)."""
        want = self.running_stores() * self.segment_bytes
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            for name, proc in [("master", self.master_proc), *((f"store{i}", p) for i, p in enumerate(self.store_procs))]:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"mooncake {name} exited with {proc.returncode}:\n{self.log_tail()}")
            try:
                capacity = self.metrics().get("master_total_capacity_bytes", -1)
                if capacity == want:
                    return
                last = f"capacity {capacity:.0f} of {want} bytes mounted"
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise RuntimeError(f"mooncake at {self.master} not ready in {timeout_s:.0f} s ({last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        parts = []
        for path in sorted(self.base.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-n:]
            parts += [f"{path.name}: {line}" for line in lines]
        return "\n".join(parts)

    @staticmethod
    def _kill(proc: subprocess.Popen | None) -> None:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=30)

    def kill_store(self, i: int) -> None:
        """SIGKILL store node i (its segment and every replica on it are gone)."""
        self._kill(self.store_procs[i])
        self.store_procs[i] = None

    def restart_store(self, i: int) -> None:
        """Start store node i again (an empty segment) and wait until the master counts it."""
        self.kill_store(i)
        self._spawn_store(i)
        self.wait_ready()

    def kill_master(self) -> None:
        """SIGKILL the master (no HA: its keys are gone); `restart_master` brings one back."""
        self._kill(self.master_proc)
        self.master_proc = None

    def restart_master(self) -> None:
        """SIGKILL the master and start a new one on the same ports; wait until the store nodes have re-mounted."""
        self.kill_master()
        self._spawn_master()
        self.wait_ready()

    def stop(self) -> None:
        for i in range(len(self.store_procs)):
            self.kill_store(i)
        self.kill_master()


@pytest.fixture(scope="session")
def mooncake(tmp_path_factory):
    """One master + 2 store nodes for the whole run; a test that kills or restarts one brings it back."""
    cluster = MooncakeCluster(tmp_path_factory.mktemp("mooncake"), stores=2)
    try:
        yield cluster
    finally:
        cluster.stop()
