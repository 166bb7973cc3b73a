"""A cluster of real `memflow-service serve --cluster ...` processes on 127.0.0.1, for tests and benchmarks.

Each node is its own process (tests/service/svc_util.start_serve) over the test run's etcd members and weed,
with a short lease (LEASE_TTL_S) so failovers take seconds, and a key prefix and bucket of its own per cluster
so clusters of different tests never see each other. Nodes are stopped by PID (SIGKILL), restarted on the same
data directory with the same node id.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import etcd3gw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from svc_util import ServeProc, start_serve  # noqa: E402

from memory_service.cluster.node import ClusterBank  # noqa: E402
from memory_service.config import BankConfig, ClusterConfig  # noqa: E402

LEASE_TTL_S = 2


def in_process_configs(etcd_endpoints: list[str], s3_endpoint: str, name: str) -> Callable[..., ClusterConfig]:
    """`make(node_id, **ClusterConfig fields)`: the configs of in-process nodes (ClusterBank) of one cluster, with
    a bucket and key prefix of their own (`memflow-<name>-<tag>`) and the short test lease."""
    tag = f"memflow-{name}-{uuid.uuid4().hex[:8]}"

    def make(node: str, **kw) -> ClusterConfig:
        return ClusterConfig(etcd=",".join(etcd_endpoints), s3_endpoint=s3_endpoint, s3_bucket=tag, node_id=node,
                             lease_ttl_s=LEASE_TTL_S, prefix=f"{tag}/", **kw)

    return make


def in_process_bank(base: Path, make: Callable[..., ClusterConfig], node: str, **kw) -> ClusterBank:
    """A ClusterBank for node `node` under `base`/`node`, its config from `make` (in_process_configs)."""
    return ClusterBank(str(base / node), BankConfig(), make(node, **kw))


class Cluster:
    def __init__(self, base: Path, etcd_endpoints: list[str], s3_endpoint: str, n: int = 3,
                 env: Optional[dict[str, str]] = None) -> None:
        self.base, self.etcd, self.s3 = base, etcd_endpoints, s3_endpoint
        tag = uuid.uuid4().hex[:8]
        self.prefix, self.bucket = f"memflow-test-{tag}/", f"memflow-test-{tag}"
        self.env = {"MEMFLOW_CLUSTER__LEASE_TTL_S": str(LEASE_TTL_S), "MEMFLOW_CLUSTER__PREFIX": self.prefix,
                    "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "memflow-test"),
                    "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "memflow-test"),
                    **(env or {})}
        self.nodes: list[Optional[ServeProc]] = [None] * n
        for i in range(n):
            self.start(i)

    def args(self, i: int) -> list[str]:
        hosts = ",".join(e.split("://", 1)[-1] for e in self.etcd)
        return ["--cluster", f"etcd://{hosts}", "--s3-endpoint", self.s3, "--s3-bucket", self.bucket,
                "--node-id", f"n{i}"]

    def start(self, i: int, env: Optional[dict[str, str]] = None) -> ServeProc:
        data = self.base / f"node{i}"
        data.mkdir(parents=True, exist_ok=True)
        assigns = [f"{k}={v}" for k, v in {**self.env, **(env or {})}.items()]
        self.nodes[i] = start_serve(str(data), *self.args(i), prefix=["env", *assigns], log_dir=str(self.base))
        return self.nodes[i]

    @property
    def targets(self) -> list[str]:
        return [n.target for n in self.nodes if n is not None and n.proc.poll() is None]

    def target(self, i: int) -> str:
        node = self.nodes[i]
        assert node is not None
        return node.target

    def owner(self, stream: str, timeout: float = 10.0) -> int:
        """The index of the node that owns `stream` now, read from etcd (waits while nobody does)."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.etcd:
                host, port = e.split("://")[-1].rsplit(":", 1)
                client = etcd3gw.client(host=host, port=int(port), timeout=2)
                try:
                    got = client.get(f"{self.prefix}owners/{stream}")
                    break
                except Exception:  # noqa: BLE001 - a member the test killed: ask the next
                    continue
            else:
                got = []
            if got:
                node = got[0].decode() if isinstance(got[0], bytes) else str(got[0])
                return int(node.lstrip("n"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no node owns stream {stream!r} after {timeout} s")
            time.sleep(0.1)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[i]
        if node is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                node.proc.wait(30)

    def stderr(self) -> str:
        return "\n".join(f"--- node {i} ---\n{n.stderr()[-3000:]}" for i, n in enumerate(self.nodes) if n is not None)

    def stop(self) -> None:
        for i, node in enumerate(self.nodes):
            if node is not None:
                if node.proc.poll() is None:
                    node.proc.send_signal(signal.SIGCONT)
                node.kill()
