"""`MooncakeTier`: cluster mode's hot tier for K/V bytes, one client of a Mooncake Store cluster.

Mooncake Store (`mooncake.store.MooncakeDistributedStore`) is a cluster-wide DRAM pool: a master places objects on
the segments that store nodes contribute, and clients move bytes to and from them over TCP or RDMA. Here it sits
between a node's local LMDB cache and S3 (DESIGN.md "Beyond one machine"); it is a cache, never the record.

Owns: the client's setup, its I/O threads, and the translation of Mooncake's status codes into hit / miss /
error (what is registered with the transfer engine, for good or for one call, is cluster/mooncake_memory.py's).
Promises:
- `put` writes objects through (each is the concatenation of its parts) from where their parts lie, and returns
  how many were stored; it never raises for a Mooncake failure (no space -200, an unreachable master -900, a dead
  node -800, ...): those are counted and logged at most once a minute, and S3 stays the durable tier. A put
  replaces what the key held: the wheel's multi-buffer put on an existing key answers 0 but keeps the old value
  (checked on 0.3.13.post1), so a one-part object is written with `batch_upsert_from` and a multi-part one after
  a forced `batch_remove` of its key (one master RPC, ~0.3 ms here); the caller's keys are immutable names, so a
  re-put leaves the same bytes, but a damaged or reused object must not survive it;
- `get_many` reads many objects in one batch call, each scattered over its parts (e.g. a payload layer's header
  into a small buffer and its body straight into the fetch buffer), and answers per object True only when the
  whole object, exactly as long as its parts together, landed there; anything else (a miss -704, an eviction, a
  size mismatch -600 / -800, a dead node -800, a restarted master -900 / -704, an exception) is False and never
  raises: the caller reads S3. On False, the parts may hold partial bytes. `get_into(key, out)` is one of those.
  One call for all the layers of a read, not one per layer: the wheel's transfer wait polls a core while it
  waits, and each call adds a master RPC, so per-object calls cost about twice the CPU per GB (measured here).
- an unreachable master costs one call, not every call: each would wait ~4.3 s for it (-900), so the first
  failure makes put / get_into / remove bypass the tier (put 0, get_into False, counted as `bypassed`) until a
  background probe reaches the master again (every PROBE_EVERY_S).
- zero-copy both ways, and no Python `bytes` of K/V: the transfer engine reads a put's parts and writes a get's
  bytes where the caller's buffers lie (nothing staged; over TCP nothing registered, over RDMA what no buffer
  registered for good covers is registered for the call: see mooncake_memory.py). The wheel's `put_parts` /
  `upsert_parts` would copy through `local_buffer_size` (and fail, -600, past it), so they are not used;
- thread-safe; puts and gets run on the tier's I/O threads (see READER_NICE), and `close` waits for those in flight.

Retention: `pin=True` is Mooncake's hard pin (`ReplicateConfig.with_hard_pin`): never evicted, so pinned data
fills segments to 100% and then every put fails with -200 until the caller removes what left its recent window.
Unpinned objects are evicted by the master at its high-water mark; eviction runs after a put finds the pool full,
so that one put can fail (-200) too: counted, never raised.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np

from memory_service.cluster.mooncake_memory import Registrations, flat
from memory_service.errors import FailedPrecondition, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

OBJECT_NOT_FOUND = -704  # Mooncake's ErrorCode for a key the master does not know (never put, evicted, lost)
RPC_FAIL = -900  # the master did not answer; each further call would wait ~4.3 s for it again
PROBE_EVERY_S = 1.0  # while the master is unreachable, a background thread asks it this often
_PROBE_KEY = "memflow/probe"
LOG_EVERY_S = 60.0  # failures are logged at most this often (each is counted)
_LATENCIES_KEPT = 4096  # the last N get latencies behind p50/p99
_PROBE_TIMEOUT_S = 2.0
# The wheel waits for a transfer by polling its status in a loop (its build has no event-driven completion), so a
# get keeps a core busy for as long as the bytes take. Gets run on READERS threads of their own at nice +19: the
# poller then yields the core to the threads that move the bytes (this client's transfer engine, the store node,
# the rest of the service). On the 2-core machine: 0.6-0.9 instead of 0.8-1.4 CPU s per GB in this process, and
# 0.43-0.77 instead of 0.31-0.45 of loopback TCP, in 4 of 4 interleaved pairs (and 2 of 4 in a noisier run).
# Puts wait the same way and run there too (they are the hot tier's background work: write-through, promotion).
READERS, READER_NICE = 4, 19


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(master: str, metadata: str) -> None:
    """Raise Unavailable unless the master's RPC port accepts a connection and the metadata server answers HTTP.

    Checked first because `setup` against an absent master retries for ~90 s before it gives up."""
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"Mooncake master {master!r} is not host:port")
    try:
        socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise Unavailable(
            f"Mooncake master {master} refused a connection ({e}): check that mooncake_master runs with "
            f"--rpc_address / --rpc_port matching it and that this node can reach it"
        ) from None
    try:
        urllib.request.urlopen(f"{metadata}?key=memflow-probe", timeout=_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass  # 404 for an unknown key: the server is up
    except (OSError, ValueError) as e:
        raise Unavailable(
            f"Mooncake metadata server {metadata} did not answer ({e}): check mooncake_master's "
            f"--enable_http_metadata_server=true and --http_metadata_server_host / _port"
        ) from None


def _lower_priority() -> None:
    """In a reader thread: nice it (Linux keeps a nice value per thread; elsewhere this would nice the process)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READER_NICE)


class MooncakeTier:
    """One node's client of the Mooncake hot tier; see the module doc for what each method promises."""

    def __init__(self, master: str, metadata: str, *, local_hostname: str = "127.0.0.1",
                 segment_bytes: int = 0, local_buffer_bytes: int = 64 << 20, protocol: str = "tcp",
                 replicas: int = 1, register_calls: bool | None = None) -> None:
        """`register_calls`: whether a call registers the caller's buffers it moves bytes from or into, for that
        call (default: only over RDMA, where the NIC needs it; over TCP the engine reads and writes any address)."""
        if protocol not in ("tcp", "rdma") or replicas < 1 or segment_bytes < 0:
            raise InvalidArgument(
                f"protocol {protocol!r}, replicas {replicas}, segment_bytes {segment_bytes}: expected tcp | rdma, "
                "replicas >= 1, segment_bytes >= 0"
            )
        # Mooncake logs every connection and setup step at INFO on stderr; read once, when the library loads
        os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as e:
            raise FailedPrecondition(
                f"the Mooncake hot tier needs `mooncake.store` ({e}): install the system's libibverbs1 and "
                "pip's mooncake-transfer-engine-non-cuda (or the CUDA wheel on GPU nodes)"
            ) from None
        self.master, self.metadata = master, metadata
        if _is_loopback(local_hostname):
            # The transfer engine otherwise binds its RPC listener to the first non-loopback interface and
            # advertises that (seen: "listening on <eth0's address>"), which a loopback-only deployment (one
            # machine, tests) neither needs nor may be able to reach. Only for loopback: a real node's engine
            # must advertise the address its peers reach it at.
            os.environ["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
        _probe(master, metadata)
        self._store = MooncakeDistributedStore()
        rc = self._store.setup(local_hostname, metadata, segment_bytes, local_buffer_bytes, protocol, "", master)
        if rc != 0:
            self._store.close()
            raise Unavailable(
                f"Mooncake setup against master {master} (metadata {metadata}) failed with {rc}: check that the "
                f"master runs, that {local_hostname!r} is an address the store nodes can reach, and protocol {protocol}"
            )
        self._config = ReplicateConfig()
        self._config.replica_num = replicas
        self._pinned = ReplicateConfig()
        self._pinned.replica_num = replicas
        self._pinned.with_hard_pin = True
        self._memory = Registrations(self._store, protocol == "rdma" if register_calls is None else register_calls)
        self._stats_lock = threading.Lock()
        self._closed = False
        self._counts: collections.Counter[str] = collections.Counter()
        self._hit_ms: collections.deque[float] = collections.deque(maxlen=_LATENCIES_KEPT)
        self._miss_ms: collections.deque[float] = collections.deque(maxlen=_LATENCIES_KEPT)
        self._last_logged: dict[str, float] = {}
        self.last_error = 0  # the last non-miss status code seen (tests, diagnostics)
        self._down = threading.Event()  # set while the master is unreachable: calls bypass the tier
        self._prober: threading.Thread | None = None
        self._io = concurrent.futures.ThreadPoolExecutor(READERS, "mooncake-io", initializer=_lower_priority)
        self._close_lock = threading.Lock()

    # -- registered memory (cluster/mooncake_memory.py) --------------------------------------------------------
    def register(self, buffer: memoryview | np.ndarray) -> None:
        """Register caller memory for good (e.g. a shared-memory arena): over RDMA, puts from it and reads into it
        then register nothing per call. The caller keeps the memory alive and in place until `unregister` or
        `close`."""
        self._memory.register(buffer)

    def unregister(self, buffer: memoryview | np.ndarray) -> None:
        self._memory.unregister(buffer)

    def _on_io_thread(self, fn, *args):
        """fn(*args) on one of the I/O threads (niced: see READER_NICE); after close, a RuntimeError."""
        with self._close_lock:  # no submit after close shut the pool down
            if self._closed:
                raise RuntimeError("the Mooncake client is closed")
            future = self._io.submit(fn, *args)
        return future.result()

    # -- failures -----------------------------------------------------------------------------------------------
    def _failed(self, what: str, detail: object) -> None:
        """Count one failure of `what` and log it unless one was logged in the last LOG_EVERY_S."""
        now = time.monotonic()
        with self._stats_lock:
            self._counts["errors"] += 1
            if isinstance(detail, int):
                self.last_error = detail
                if detail == RPC_FAIL:
                    self._master_unreachable()
            last = self._last_logged.get(what)
            if last is not None and now - last < LOG_EVERY_S:
                return
            self._last_logged[what] = now
        log.warning("Mooncake %s at %s failed (%s); the hot tier is a cache: S3 serves it (logged at most once a "
                    "minute, %d errors so far)", what, self.master, detail, self._counts["errors"])

    def _master_unreachable(self) -> None:
        """Bypass the tier until a background probe reaches the master again (called under _stats_lock).

        With the master down every call waits ~4.3 s before it fails (-900), and a fetch must not pay that per
        object before it reads S3; so one failure opens the circuit and only the probe thread waits."""
        if self._down.is_set() or self._closed:
            return
        self._down.set()
        self._prober = threading.Thread(target=self._probe, name="mooncake-probe", daemon=True)
        self._prober.start()

    def _probe(self) -> None:
        while not self._closed:
            time.sleep(PROBE_EVERY_S)
            try:
                answer = self._store.is_exist(_PROBE_KEY)  # an RPC to the master (health_check is local only)
            except Exception:  # noqa: BLE001 - still unreachable
                answer = RPC_FAIL
            if answer in (0, 1):
                self._down.clear()
                log.warning("Mooncake master %s answers again: the hot tier is back in use", self.master)
                return

    def _bypassed(self) -> bool:
        if not self._down.is_set():
            return False
        with self._stats_lock:
            self._counts["bypassed"] += 1
        return True

    # -- put ----------------------------------------------------------------------------------------------------
    def put(self, items: Sequence[tuple[str, Sequence[memoryview | np.ndarray]]], *, pin: bool = False) -> int:
        """Write each (key, parts) through; the number of objects stored. Never raises for Mooncake failures."""
        return sum(self.put_each(items, pin=pin))

    def put_each(self, items: Sequence[tuple[str, Sequence[memoryview | np.ndarray]]], *,
                 pin: bool = False) -> list[bool]:
        """`put`, answering per item whether it is stored (a caller retries only what failed)."""
        stored = [False] * len(items)
        if self._closed or not items or self._bypassed():
            return stored
        # (position in items, key, its non-empty parts as flat uint8 views)
        single: list[tuple[int, str, list[np.ndarray]]] = []
        multi: list[tuple[int, str, list[np.ndarray]]] = []
        try:
            for i, (key, parts) in enumerate(items):
                flats = [f for f in map(flat, parts) if f.nbytes]
                if flats:
                    (single if len(flats) == 1 else multi).append((i, key, flats))
                    continue
                with self._stats_lock:
                    self._counts["skipped"] += 1
                    first = self._counts["skipped"] == 1
                if first:
                    log.warning("Mooncake hot tier: object %r is empty: not cached (said once)", key)
            if single or multi:
                self._on_io_thread(self._put, single, multi, self._pinned if pin else self._config, stored)
        except Exception as e:  # noqa: BLE001 - any failure of the cache is a miss later, never the caller's error
            self._failed("put", repr(e))
        return stored

    def _put(self, single: list, multi: list, config, stored: list[bool]) -> None:
        """On an I/O thread: one-part objects upserted, multi-part ones removed then put, all from where their
        parts lie (see the module doc); marks `stored`."""
        with self._memory.for_call([f for _, _, fs in single + multi for f in fs]):
            if single:
                codes = self._store.batch_upsert_from(
                    [k for _, k, _ in single], [fs[0].ctypes.data for _, _, fs in single],
                    [fs[0].nbytes for _, _, fs in single], config)
                self._settle(single, codes, stored)
            if multi and not self._down.is_set():  # after a -900 above, another call would wait for the master again
                removed = self._store.batch_remove([k for _, k, _ in multi], True)
                fresh = []
                for item, code in zip(multi, removed):
                    if code in (0, OBJECT_NOT_FOUND):
                        fresh.append(item)
                    else:  # the key may keep other bytes: not written (a put would answer 0 and change nothing)
                        self._failed("put", code)
                if fresh and not self._down.is_set():
                    codes = self._store.batch_put_from_multi_buffers(
                        [k for _, k, _ in fresh], [[f.ctypes.data for f in fs] for _, _, fs in fresh],
                        [[f.nbytes for f in fs] for _, _, fs in fresh], config)
                    self._settle(fresh, codes, stored)

    def _settle(self, batch: list, codes: Sequence[int], stored: list[bool]) -> None:
        for (i, _, flats), code in zip(batch, codes):
            if code == 0:
                stored[i] = True
                with self._stats_lock:
                    self._counts["puts"] += 1
                    self._counts["bytes_in"] += sum(f.nbytes for f in flats)
            else:
                self._failed("put", code)

    # -- get ----------------------------------------------------------------------------------------------------
    def get_into(self, key: str, out: memoryview | np.ndarray) -> bool:
        """True only when the whole object, exactly len(out) bytes, is now in `out`. Never raises."""
        return self.get_many([(key, [out])])[0]

    def get_many(self, items: Sequence[tuple[str, Sequence[memoryview | np.ndarray]]]) -> list[bool]:
        """Read each (key, parts) object scattered over its parts, in order, in one batch call; per item True only
        when the object is exactly as long as its parts together and all of it landed there. Never raises.

        The bytes land where the parts lie (no staging, no copy); the call runs on one of the tier's I/O threads
        (see READER_NICE)."""
        started = time.perf_counter()
        hits, sizes = [False] * len(items), [0] * len(items)
        try:
            bufs = [[flat(p) for p in parts] for _, parts in items]
            sizes = [sum(f.nbytes for f in fs) for fs in bufs]
            if not self._closed:  # after close: a miss, as every call then
                hits = self._on_io_thread(self._get_many, [k for k, _ in items], bufs, sizes)
        except Exception as e:  # noqa: BLE001 - a broken cache read falls through to S3
            self._failed("get", repr(e))
        ms = (time.perf_counter() - started) * 1e3
        with self._stats_lock:
            for hit, n in zip(hits, sizes):
                self._counts["hits" if hit else "misses"] += 1
                (self._hit_ms if hit else self._miss_ms).append(ms)
                if hit:
                    self._counts["bytes_out"] += n
        return hits

    def _get_many(self, keys: list[str], bufs: list[list[np.ndarray]], sizes: list[int]) -> list[bool]:
        wanted = [i for i, n in enumerate(sizes) if n > 0]
        if self._closed or not wanted or self._bypassed():
            return [False] * len(keys)
        for i in wanted:
            for f in bufs[i]:
                if f.nbytes and not f.flags.writeable:
                    raise InvalidArgument(f"get {keys[i]!r}: a part is read-only; expected writable buffers")
        parts = [[f for f in bufs[i] if f.nbytes] for i in wanted]
        with self._memory.for_call([f for fs in parts for f in fs]):
            codes = self._store.batch_get_into_multi_buffers(
                [keys[i] for i in wanted], [[f.ctypes.data for f in fs] for fs in parts],
                [[f.nbytes for f in fs] for fs in parts])
        hits = [False] * len(keys)
        for i, code in zip(wanted, codes):
            if code == sizes[i]:
                hits[i] = True
            elif code != OBJECT_NOT_FOUND:
                # -600: the object is longer than the parts; -800 (shorter, or a dead node); >= 0: a short read
                self._failed("get", code)
        return hits

    # -- the rest -----------------------------------------------------------------------------------------------
    def remove(self, keys: Sequence[str]) -> None:
        """Drop keys from the pool, best effort: forced (a read's lease blocks a plain remove for ~10 s)."""
        if self._closed or not keys or self._bypassed():
            return
        try:
            codes = self._store.batch_remove(list(keys), True)
        except Exception as e:  # noqa: BLE001 - best effort
            self._failed("remove", repr(e))
            return
        for code in codes:
            if code not in (0, OBJECT_NOT_FOUND):
                self._failed("remove", code)

    def stats(self) -> dict:
        """Counters since start and get latency percentiles (ms) of hits and of misses."""
        with self._stats_lock:
            names = ("hits", "misses", "errors", "puts", "skipped", "bypassed", "bytes_in", "bytes_out")
            out: dict[str, int | float | bool] = {name: self._counts[name] for name in names}
            out["master_unreachable"] = self._down.is_set()
            hit_ms, miss_ms = list(self._hit_ms), list(self._miss_ms)
        for name, values in (("get", hit_ms), ("miss", miss_ms)):
            out[f"{name}_p50_ms"] = float(np.percentile(values, 50)) if values else 0.0
            out[f"{name}_p99_ms"] = float(np.percentile(values, 99)) if values else 0.0
        return out

    def close(self) -> None:
        """Unregister buffers and close the client; later calls miss (puts store nothing). Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        prober = self._prober
        self._io.shutdown(wait=True)  # a put or get in flight ends before the client goes
        if prober is not None:
            prober.join(timeout=2 * PROBE_EVERY_S + 5.0)  # it may be inside a ~4.3 s RPC to the master
        self._memory.close()
        try:
            self._store.close()
        except Exception as e:  # noqa: BLE001 - closing anyway
            log.warning("closing the Mooncake client for %s: %r", self.master, e)

    def __enter__(self) -> MooncakeTier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
