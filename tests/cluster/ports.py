"""Free loopback ports for the servers the cluster tests start (etcd, weed, Mooncake, service nodes)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct free 127.0.0.1 ports (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
