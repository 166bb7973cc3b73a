"""The node directory a client reads: which service nodes of a cluster are alive, from etcd.

Owns `MemoryClient("etcd://HOST:PORT[,HOST:PORT...]")`: instead of a fixed list of node addresses, the client reads
the addresses the nodes announce under their leases (`<prefix>nodes/<node_id>`, cluster/etcd.py), at first use and
again whenever every node it knows has failed a call, so nodes started after the client (a replaced GPU node) are
found. Promises: `addresses()` is the announced addresses, sorted by node id (a node whose lease lapsed is not among
them); an etcd that does not answer is Unavailable naming every member tried, and never a partial answer.
"""

from __future__ import annotations

import json
from typing import Sequence

from memory_service import errors

ETCD_SCHEME = "etcd://"
TIMEOUT_S = 2.0  # per member: the directory is read on the way to a call, not in the background


def is_directory(target: object) -> bool:
    """Whether a MemoryClient target names etcd members rather than service nodes."""
    return isinstance(target, str) and target.strip().startswith(ETCD_SCHEME)


class EtcdDirectory:
    def __init__(self, endpoints: str, prefix: str = "memflow/") -> None:
        try:
            import etcd3gw
            from etcd3gw import exceptions as gw_errors
        except ImportError:  # pragma: no cover - the cluster extra brings it
            raise errors.FailedPrecondition("an etcd:// target needs etcd3gw: pip install 'memflow[cluster]'") from None
        from memory_service.cluster.etcd import parse_endpoints

        self._etcd3gw, self._errors = etcd3gw, gw_errors
        self.targets = parse_endpoints(endpoints)
        self.prefix = prefix
        self.where = ",".join(f"{host}:{port}" for _, host, port in self.targets)

    def addresses(self) -> list[str]:
        """The live nodes' announced addresses, by node id."""
        import requests

        failures: list[str] = []
        for protocol, host, port in self.targets:
            client = self._etcd3gw.client(host=host, port=port, protocol=protocol, timeout=TIMEOUT_S, api_path="/v3/")
            try:
                rows = client.get_prefix(self.prefix + "nodes/")
            except (self._errors.Etcd3Exception, requests.RequestException, ValueError) as exc:
                failures.append(f"{host}:{port}: {type(exc).__name__}")
                continue
            return _announced(rows)
        raise errors.Unavailable(f"no etcd member of {self.where} answered for the cluster's nodes "
                                 f"({'; '.join(failures)}); expected a reachable etcd of a MemFlow cluster")


def _announced(rows: Sequence[tuple]) -> list[str]:
    found = []
    for value, meta in rows:
        try:
            address = json.loads(value).get("address", "")
        except (ValueError, AttributeError):
            continue  # not a node record of ours: skipped, never a wrong address
        if address:
            found.append((meta.get("key", b""), address))
    return [address for _, address in sorted(found)]
