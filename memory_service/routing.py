"""RoutedClient: the memory protocol over several service nodes (cluster mode), each stream's calls sent to its owner.

`MemoryClient("h1:p1,h2:p2")` (or a sequence of addresses) returns one; so does `MemoryClient("etcd://h:p,...")`,
whose node list is what the nodes announce in etcd (cluster/directory.py), read at first and again each time every
node it knows has failed a call. It owns the choice of node per call and
nothing else: each node is reached through its own single-node MemoryClient (channel, arenas, plane choice,
retries of idempotent calls on that node), made on first use, once the node is seen to accept connections.

What is routed:
- stream-scoped calls (create_stream, drop_stream, put, query, fetch, query_fetch, delete, pin, prune,
  stats(stream), entries) go to the node believed to own the stream: the one that last served it, else the
  node that last answered anything (at first, the first address);
- list_streams and stats() (the whole bank) go to any node that answers.

What is resent, and where (every call, until `failover_timeout_s` has passed since it began; then the last
error is raised, a NotOwner as Unavailable: no node served the stream in time, which is an outage to retry
later, and the message says that the call was not executed):
- NotOwner with an owner's address: the call did not execute; it is sent to that owner (added to the node list
  when new) and the stream is remembered there - at most MAX_HOPS times a call, so two nodes that disagree
  cannot bounce it forever; after that it goes round the nodes in turn;
- NotOwner with owner "" (no node owns the stream yet: its old owner's lease is expiring), or a node that
  cannot be reached (its channel does not connect, so the call was never sent): the next node in turn, with a
  backoff that grows each time every node has been tried;
- UNAVAILABLE from a call that was sent: a read (query, fetch, query_fetch, stats, entries, list_streams) is
  resent to the next node, as it changes nothing;

What is never resent: a write (create_stream, drop_stream, put, delete, pin, prune) that got UNAVAILABLE
after it was sent - its node may have executed it before it died - raises Unavailable; the caller decides
(for a put: query for its frames before putting again). A write is sent only once its node's channel is
connected, so a node that is merely down never makes a write ambiguous. DEADLINE_EXCEEDED is raised (the
caller's deadline is spent), and the next call starts at another node: a paused owner is not asked again first.
Every other error is raised at once.

The shared-memory data plane works per node: fetch results view the serving node's arena. `arena_array()`
returns ordinary memory (as on the stream plane): an arena belongs to one node's registration and a stream's
owner can change between building K/V and putting it, so the owner's node connection copies it into its own
arena at put, the same cost as a put of any array. `arena_usage()` sums the node connections' arenas.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional, overload, Sequence, TypeVar, Union

import grpc
import numpy as np

from memory_service.arena_pool import ArenaUsage
from memory_service.cluster.directory import EtcdDirectory, is_directory
from memory_service.client import connected, MemoryClient, open_channel, parse_targets, WARM_UP_S
from memory_service.errors import (
    DeadlineExceeded, FailedPrecondition, InvalidArgument, MemFlowError, NotOwner, Unavailable,
)
from memory_service.protocol import Ids, Resident, Vectors
from memory_service.types import (
    BankStats, EntryMeta, FetchResult, NewEntry, PruneResult, QueryFetchResult, QueryResult, StreamSpec, StreamStats,
)

log = logging.getLogger("memflow.routing")
T = TypeVar("T")
MAX_HOPS = 4  # owner redirects followed per call
BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)  # pause after each round of every node failing; the last one repeats
_C = grpc.ChannelConnectivity
SETTLED = (_C.READY, _C.IDLE, _C.TRANSIENT_FAILURE, _C.SHUTDOWN)


class _Node:
    """One node's MemoryClient and the connectivity its channel last reported, watched by one subscription for
    the connection's life and without try_to_connect: each subscription that asks to connect while grpc's
    poller runs makes it check the channel once more, and a close in that moment makes its thread throw."""

    def __init__(self, client: MemoryClient) -> None:
        self.client = client
        self._state: Optional[grpc.ChannelConnectivity] = None
        self._changed = threading.Condition()
        client._channel.subscribe(self._on_state, try_to_connect=False)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            self._state = state
            self._changed.notify_all()

    def sendable(self, wait: float) -> bool:
        """Whether a call sent now goes out on a live connection, finding out for at most `wait` s. A channel
        whose node went away reports IDLE, as does one merely unused: IDLE is resolved by connecting now."""
        with self._changed:
            self._changed.wait_for(lambda: self._state in SETTLED, timeout=wait)
            state = self._state
        if state == _C.IDLE:
            return connected(self.client._channel, wait)
        return state == _C.READY

    def close(self) -> None:
        self.client._channel.unsubscribe(self._on_state)
        self.client.close()


class RoutedClient(MemoryClient):
    """A MemoryClient over several nodes (see the module doc). Built by `MemoryClient(target, ...)` when `target`
    names more than one address; every keyword of MemoryClient applies to each node's connection.

    `failover_timeout_s`: how long one call keeps looking for a node that serves it (default 30 s).
    """

    def __init__(self, target: Union[str, Sequence[str]], token: Optional[str] = None,
                 tls: Union[None, bool, str, bytes] = None, *, failover_timeout_s: float = 30.0,
                 etcd_prefix: str = "memflow/", **node_options: Any) -> None:
        # no super().__init__(): this client holds node connections, not a channel of its own
        self._directory = EtcdDirectory(str(target).strip(), etcd_prefix) if is_directory(target) else None
        if self._directory is not None:
            self.addresses: list[str] = self._directory.addresses()
            if not self.addresses:
                raise Unavailable(f"no MemFlow node is announced in etcd at {self._directory.where} under "
                                  f"{etcd_prefix}nodes/; expected a running cluster (or another etcd_prefix)")
            self.target = str(target).strip()
        else:
            self.addresses = list(parse_targets(target))  # grows with owners learnt from NotOwner
            self.target = ",".join(self.addresses)
        self.failover_timeout_s = float(failover_timeout_s)
        if self.failover_timeout_s <= 0:
            raise InvalidArgument(f"failover_timeout_s is {failover_timeout_s}; expected a positive number of seconds")
        self.plane = str(node_options.get("plane", "auto"))  # asked for; each node connection chooses its own
        self.timeout = float(node_options.get("timeout", 30.0))
        self._token, self._tls, self._node_options = token, tls, node_options
        self._nodes: dict[str, _Node] = {}  # address -> its connection, once it connected
        self._owners: dict[str, str] = {}  # stream -> the address that last served it
        self._preferred = self.addresses[0]  # the node that last answered anything
        self._lock = threading.Lock()  # guards the four above (calls run outside it)
        self._closed = False

    # -- plumbing -----------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._closed = True
            nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            node.close()

    def nodes(self) -> dict[str, MemoryClient]:
        """The node connections made so far, by address (e.g. to see each one's `plane`)."""
        with self._lock:
            return {address: node.client for address, node in self._nodes.items()}

    def owner_of(self, stream: str) -> Optional[str]:
        """The address this client believes owns `stream` (the node that last served it), or None."""
        with self._lock:
            return self._owners.get(stream)

    def _node(self, address: str, deadline: Optional[float] = None) -> _Node:
        """The connection to `address`, made now if there is none: Unavailable (nothing sent) when the node does
        not accept connections, so a down node costs a connection attempt, not an arena and a warm-up."""
        with self._lock:
            self._check_open()
            node = self._nodes.get(address)
        if node is not None:
            return node
        probe = open_channel(address, self._tls, int(self._node_options.get("max_message_bytes", 64 << 20)),
                             self._node_options.get("tls_server_name"))
        try:
            left = self.failover_timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
            if not connected(probe, min(WARM_UP_S, left)):  # never past the call's own deadline
                raise Unavailable(f"node {address} cannot be reached (no connection); nothing was sent to it")
        finally:
            probe.close()
        made = _Node(MemoryClient(address, self._token, self._tls, **self._node_options))
        with self._lock:
            kept = None if self._closed else self._nodes.setdefault(address, made)  # another thread's, if first
        if kept is not made:
            made.close()
        if kept is None:
            self._check_open()  # closed meanwhile: raises
        return kept  # type: ignore[return-value]  # not None: _check_open raised

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"the MemoryClient to {self.target} is closed; expected calls only before close()")

    def _reach(self, address: str, write: bool, deadline: float) -> MemoryClient:
        """The connection a call to `address` goes through; Unavailable means nothing was sent. A write waits
        for its channel to be connected, so that an UNAVAILABLE after sending is the only ambiguous one."""
        node = self._node(address, deadline)
        if write and not node.sendable(min(WARM_UP_S, max(0.0, deadline - time.monotonic()))):
            raise Unavailable(f"node {address} cannot be reached (no connection); nothing was sent to it")
        return node.client

    def _next(self, address: str) -> str:
        with self._lock:
            i = self.addresses.index(address) if address in self.addresses else -1
            return self.addresses[(i + 1) % len(self.addresses)]

    def _rediscover(self) -> None:
        """With an etcd target: the nodes alive now replace those known (nodes gone lost their leases; nodes new
        since are found). An etcd that does not answer leaves the list as it was."""
        if self._directory is None:
            return
        try:
            alive = self._directory.addresses()
        except Unavailable as exc:
            log.warning("memflow: could not read the cluster's nodes from etcd: %s", exc)
            return
        with self._lock:
            if alive and alive != self.addresses:
                log.info("memflow: the cluster's nodes are now %s (from etcd)", ", ".join(alive))
                self.addresses = alive

    def _learn_owner(self, owner: str) -> str:
        with self._lock:
            if owner not in self.addresses:
                self.addresses.append(owner)
                log.info("memflow: learnt of node %s (an owner named by another node)", owner)
        return owner

    def _served(self, stream: Optional[str], address: str) -> None:
        with self._lock:
            self._preferred = address
            if stream is not None:
                self._owners[stream] = address

    def _suspect(self, stream: Optional[str], address: str) -> None:
        """`address` ran a call past its deadline: forget it as the stream's owner and as the preferred node, so
        that the next call asks another node (which serves it, or names the owner now)."""
        with self._lock:
            if stream is not None and self._owners.get(stream) == address:
                del self._owners[stream]
            if self._preferred == address:
                i = self.addresses.index(address) if address in self.addresses else -1
                self._preferred = self.addresses[(i + 1) % len(self.addresses)]

    def _route(self, stream: Optional[str], call: Callable[[MemoryClient], T], *, write: bool) -> T:
        """Run `call` on the node that serves `stream` (any node when None), following the module doc's rules."""
        deadline = time.monotonic() + self.failover_timeout_s
        with self._lock:
            address = self._owners.get(stream, self._preferred) if stream is not None else self._preferred
        hops = misses = 0
        while True:
            try:
                node = self._reach(address, write, deadline)
            except Unavailable as exc:  # nothing was sent
                last: MemFlowError = exc
            else:
                try:
                    result = call(node)
                except NotOwner as exc:  # not executed: the node refused it
                    last = exc
                    if exc.owner and exc.owner != address and hops < MAX_HOPS:
                        hops += 1
                        address = self._learn_owner(exc.owner)
                        continue
                except Unavailable as exc:
                    if write:
                        raise  # sent, and its node may have executed it before failing: never resent
                    last = exc
                except DeadlineExceeded:
                    self._suspect(stream, address)  # hung (paused?): the caller's deadline is spent, the next call
                    raise  # starts elsewhere
                else:
                    self._served(stream, address)
                    return result
            misses += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if isinstance(last, NotOwner):
                    raise Unavailable(f"no node served stream {stream!r} within {self.failover_timeout_s:g} s "
                                      f"(failover_timeout_s); the call was not executed; the last answer: "
                                      f"{last}") from last
                raise last
            with self._lock:
                count = len(self.addresses)
            if misses % count == 0:  # every node failed once more: pause before the next round
                time.sleep(min(remaining, BACKOFF_S[min(misses // count, len(BACKOFF_S)) - 1]))
                self._rediscover()
            address = self._next(address)

    # -- the protocol ------------------------------------------------------------------------------
    def arena_array(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """Ordinary memory (see the module doc: put copies it into the owner's arena)."""
        return np.empty(shape, np.dtype(dtype))

    def arena_usage(self) -> ArenaUsage:
        """The node connections' shared-memory arenas, summed."""
        usages = [node.arena_usage() for node in self.nodes().values()]
        return ArenaUsage(arenas=sum(u.arenas for u in usages), bytes=sum(u.bytes for u in usages),
                          leased=sum(u.leased for u in usages), registered=sum(u.registered for u in usages))

    def create_stream(self, spec: StreamSpec) -> None:
        if not isinstance(spec, StreamSpec):
            raise InvalidArgument(f"create_stream takes a StreamSpec, got {type(spec).__name__}")
        self._route(spec.name, lambda n: n.create_stream(spec), write=True)

    def drop_stream(self, name: str) -> None:
        self._route(name, lambda n: n.drop_stream(name), write=True)
        with self._lock:
            self._owners.pop(name, None)

    def list_streams(self) -> list[StreamSpec]:
        return self._route(None, lambda n: n.list_streams(), write=False)

    def put(self, stream: str, entries: Sequence[NewEntry]) -> list[int]:
        return self._route(stream, lambda n: n.put(stream, entries), write=True)

    def query(self, stream: str, space: str, vectors: Vectors, k: int, *, combine: str = "per_layer",
              exclude_frames: Optional[tuple[int, int]] = None, pinned_only: bool = False,
              time_range: Optional[tuple[float, float]] = None, timeout: Optional[float] = None) -> QueryResult:
        return self._route(stream, lambda n: n.query(stream, space, vectors, k, combine=combine,
                                                     exclude_frames=exclude_frames, pinned_only=pinned_only,
                                                     time_range=time_range, timeout=timeout), write=False)

    def fetch(self, stream: str, ids: Ids, layers: Optional[Sequence[int]] = None, *,
              timeout: Optional[float] = None) -> FetchResult:
        return self._route(stream, lambda n: n.fetch(stream, ids, layers, timeout=timeout), write=False)

    def query_fetch(self, stream: str, space: str, vectors: Vectors, k: int, *, fetch_k: Optional[int] = None,
                    include: Ids = (), resident: Resident = (), layers: Optional[Sequence[int]] = None,
                    combine: str = "per_layer", exclude_frames: Optional[tuple[int, int]] = None,
                    pinned_only: bool = False, time_range: Optional[tuple[float, float]] = None,
                    timeout: Optional[float] = None) -> QueryFetchResult:
        return self._route(stream, lambda n: n.query_fetch(
            stream, space, vectors, k, fetch_k=fetch_k, include=include, resident=resident, layers=layers,
            combine=combine, exclude_frames=exclude_frames, pinned_only=pinned_only, time_range=time_range,
            timeout=timeout), write=False)

    def delete(self, stream: str, ids: Ids) -> int:
        return self._route(stream, lambda n: n.delete(stream, ids), write=True)

    def pin(self, stream: str, ids: Ids, pinned: bool = True) -> None:
        self._route(stream, lambda n: n.pin(stream, ids, pinned), write=True)

    def prune(self, stream: str) -> PruneResult:
        return self._route(stream, lambda n: n.prune(stream), write=True)

    @overload
    def stats(self, stream: None = None) -> BankStats: ...

    @overload
    def stats(self, stream: str) -> StreamStats: ...

    def stats(self, stream: Optional[str] = None) -> Union[StreamStats, BankStats]:
        return self._route(stream, lambda n: n.stats(stream), write=False)

    def entries(self, stream: str) -> list[EntryMeta]:
        return self._route(stream, lambda n: n.entries(stream), write=False)
