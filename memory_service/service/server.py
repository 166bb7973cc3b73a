"""MemoryServer: a MemoryBank served over gRPC, with health, reflection, auth, TLS, metrics and clean shutdown.

Owns the server's life cycle. Promises:
- it listens on 127.0.0.1 by default; bound to any other address without a token file it refuses to start
  unless `insecure=True`;
- `grpc.health.v1` reports SERVING for "" and "memflow.v1.MemoryService" while it serves; server reflection
  (grpc.reflection.v1 and v1alpha, service/reflection.py) lists the service and serves the .proto's comments;
- `start()` that cannot listen (port in use, an address not of this machine) raises Unavailable saying which
  address and why, before anything is served;
- `stop()` drains: health turns NOT_SERVING, new calls get UNAVAILABLE, calls in flight get `grace` seconds
  to finish and every finished call gets its answer (a committed put is answered OK, never cut off); when the
  grace runs out, calls still waiting on their client are refused UNAVAILABLE or cancelled before they
  reach the bank, calls inside the bank run to their end and are answered; then the bank is closed cleanly
  (statistics flushed, snapshots written, LMDB closed, the data directory's lock released);
- `serve_forever()` does that on SIGTERM or SIGINT; a second signal during the drain ends the grace at once,
  and the bank is still closed.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memory_service.bank import MemoryBank
from memory_service.config import ServiceConfig, is_loopback
from memory_service.errors import InvalidArgument, Unavailable
from memory_service.service.auth import Authenticator
from memory_service.service import reflection
from memory_service.wire import convert
from memory_service.service.interceptors import ServiceInterceptor
from memory_service.service.local_server import LocalServer, socket_name
from memory_service.service.metrics import Metrics
from memory_service.service.servicer import MemoryServicer

log = logging.getLogger("memflow.service")
_FLUSH_S = 1.0
SERVICE_NAME = convert.SERVICE_NAME


class MemoryServer:
    def __init__(self, config: ServiceConfig, bank: Optional[MemoryBank] = None) -> None:
        self.config = config
        self.auth = Authenticator.from_file(config.auth_token_file)
        if not is_loopback(config.host) and self.auth is None and not config.insecure:
            raise InvalidArgument(
                f"refusing to serve on {config.host} without authentication: pass --auth-token-file, or "
                "--insecure to accept unauthenticated clients from the network, or bind 127.0.0.1"
            )
        if bool(config.tls_cert) != bool(config.tls_key):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key; got only one")
        made_here = bank is None  # then this server closes it, also when the rest of __init__ fails
        if bank is None and config.cluster.enabled:
            from memory_service.cluster.node import ClusterBank  # etcd3gw and boto3: only in cluster mode

            bank = ClusterBank(config.data_dir, config.bank, config.cluster)
        self.bank = bank or MemoryBank(config.data_dir, config.bank)
        try:
            self._build(config)
        except BaseException:
            if made_here:  # nothing else will close it: its directory lock (and in cluster mode its lease) go now
                self.bank.close()
            raise

    def _build(self, config: ServiceConfig) -> None:
        self.metrics = Metrics(self.bank.stats, stream_labels=config.metrics_stream_labels,
                               tier_stats=getattr(self.bank, "tier_stats", None),  # cluster mode's tiers
                               promotion_stats=getattr(self.bank, "promotion_stats", None))
        self.interceptor = ServiceInterceptor(self.auth, self.metrics)
        self.servicer = MemoryServicer(self.bank, self.auth, self.metrics, quotas=config.quotas,
                                       max_arenas=config.max_arenas)
        limit = config.max_message_bytes
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="memflow-rpc"),
            interceptors=[self.interceptor],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)],
        )
        self.server.add_generic_rpc_handlers((convert.method_handlers(self.servicer),))
        self.local: Optional[LocalServer] = None  # the local socket, once started
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable(self.server, (SERVICE_NAME, health.SERVICE_NAME))  # v1 and v1alpha, with the comments
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self._stopped = threading.Event()
        self._hurry = False  # set by a second signal (a plain flag: signal handlers must not take locks)

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> int:
        """Bind and start; returns the port (config.port 0 picks a free one)."""
        where = f"{self.config.host}:{self.config.port}" if ":" not in self.config.host else \
            f"[{self.config.host}]:{self.config.port}"
        for what, port, flags in (("gRPC", self.config.port, "--port"), ("metrics", self.config.metrics_port,
                                                                         "--metrics-port")):
            problem = None if port is None else _bind_problem(what, self.config.host, port, flags)
            if problem:
                raise Unavailable(problem)
        try:
            if self.config.tls_cert and self.config.tls_key:  # both or neither (checked in __init__)
                creds = grpc.ssl_server_credentials([(Path(self.config.tls_key).read_bytes(),
                                                      Path(self.config.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(where, creds)
            else:
                self.port = self.server.add_insecure_port(where)
        except RuntimeError:  # grpc >= 1.5x raises "Failed to bind to address ..." instead of returning 0
            self.port = 0
        if not self.port:  # free a moment ago: lost a race for it
            raise Unavailable(f"cannot listen for gRPC on {where}: grpc could not bind it (see its log above); "
                              "pick another --port")
        self.server.start()
        self._start_local()
        if self.config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.host)
            except OSError:
                self.server.stop(0)
                if self.local is not None:
                    self.local.close()
                raise Unavailable(_bind_problem("metrics", self.config.host, self.config.metrics_port, "--metrics-port")
                                  or f"cannot serve metrics on port {self.config.metrics_port}") from None
        announce = getattr(self.bank, "announce", None)  # cluster mode: join the membership, now reachable
        if announce is not None:
            announce(self.config.cluster.advertise or self.address)
        self.bank.start_pruner()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"address": self.address, "tls": bool(self.config.tls_cert),
                                   "auth": self.auth is not None, "data_dir": self.config.data_dir,
                                   "metrics_port": self.metrics_port, "local_socket": self.servicer.local_socket})
        return self.port

    def _start_local(self) -> None:
        """The local socket (service/local_server.py), advertised to clients in RegisterArena's answers. "auto" that
        cannot listen leaves clients on gRPC (logged); a name the operator chose must listen, or start fails."""
        name = socket_name(self.config.local_socket)
        if name is None:
            return
        local = LocalServer(self.servicer, self.interceptor, name, self.config.max_message_bytes)
        try:
            local.start()
        except OSError as exc:
            if self.config.local_socket == "auto":
                log.warning("no local socket; same-host clients call by gRPC",
                            extra={"local_socket": name, "error": str(exc)})
                return
            self.server.stop(0)
            raise Unavailable(f"cannot listen on the local socket {name}: {exc.strerror or exc}; pick another "
                              "--local-socket, or --local-socket off") from None
        self.local = local
        self.servicer.local_socket = name

    def stop(self, grace: float = 10.0) -> None:
        """Drain and close; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        # Lame duck first: health says NOT_SERVING and the interceptor answers every new call UNAVAILABLE (a
        # clean, retryable refusal; a call racing grpc's own shutdown would get CANCELLED or hang instead),
        # while the calls in flight get `grace` seconds to finish - and to have their answers sent: grpc's
        # stop cancels a call whose handler returned but whose status is not on the wire yet, and a client
        # would take a committed put for a failed one.
        self.interceptor.draining.set()
        self.health.enter_graceful_shutdown()
        if not self.interceptor.wait_answered(max(0.0, grace), give_up=lambda: self._hurry):
            # Grace over: request streams still open end in UNAVAILABLE at their next message, so no new
            # write starts; what is inside the bank now runs to its end and is answered. Then only calls that
            # wait on their clients are open, and cancelling them writes nothing.
            log.warning("drain grace over, cutting off calls still waiting on their clients",
                        extra={"address": self.address, "second_signal": self._hurry})
            self.interceptor.cut.set()
            if not self.interceptor.wait_only_clients(timeout=60.0):
                log.error("calls still inside the bank 60 s after the grace; stopping anyway",
                          extra={"address": self.address})
        # A short grace for grpc itself: a call it took in but had not yet handed to a handler thread gets
        # the interceptor's UNAVAILABLE instead of a CANCELLED. What is left after it (a health Watch, a client
        # that stopped sending after the cut) is cancelled; none of it can write.
        self.server.stop(0.0 if self._hurry else _FLUSH_S).wait()
        # grpc has cancelled what was left, but handler threads may still be inside the bank (a cancelled
        # fetch finishing its copy): closing LMDB under them would unmap memory they are reading.
        if not self.interceptor.wait_idle(timeout=60.0):
            log.error("calls still running 60 s after stop; leaving the bank open", extra={"address": self.address})
            return
        if self.local is not None:
            self.local.close()
        self.servicer.arenas.close()
        self.metrics.close()
        self.bank.close()
        log.info("stopped", extra={"address": self.address})

    def close_unstarted(self) -> None:
        """Release what __init__ took (the bank and its directory lock) when start() failed."""
        self._stopped.set()
        self.servicer.arenas.close()
        self.metrics.close()
        self.bank.close()

    def serve_forever(self, grace: float = 10.0) -> None:
        """Block until SIGTERM/SIGINT (main thread) or `stop()`; then drain and close.

        The handlers stay installed through the drain: a second signal ends the grace at once (calls inside
        the bank still finish, the bank is still closed); only SIGKILL skips the close.
        """
        signals: list[int] = []

        def on_signal(signum, _frame) -> None:
            signals.append(signum)  # no logging, no locks here: the main thread may hold any of them
            if len(signals) > 1:
                self._hurry = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not signals and not self._stopped.is_set():
                time.sleep(0.2)
            if signals:
                log.info("signal received, draining", extra={"signal": signal.Signals(signals[0]).name,
                                                            "grace_s": grace})
            self.stop(grace)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _bind_problem(what: str, host: str, port: int, flags: str) -> Optional[str]:
    """None if `host:port` can be bound here; else one line: which address, why (the OS's own answer), what to do.

    Bind only, on each address the host resolves to, the way grpc binds (SO_REUSEADDR): nothing is sent
    anywhere, and asking first keeps grpc's own multi-line error log out of a refusal that should be one line.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen for {what} on {where}: the host does not resolve ({exc.strerror}); pass an IP " \
               "address of this machine to --host"
    first: Optional[OSError] = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
                probe.bind(address)
            return None
        except OSError as exc:
            first = first or exc
    assert first is not None
    if first.errno == errno.EADDRINUSE:
        reason, hint = "the port is already in use", f"stop the process listening there or pick another {flags}"
    elif first.errno == errno.EADDRNOTAVAIL:
        reason, hint = "the address is not one of this machine's", \
            "bind an address of this machine (--host 127.0.0.1 for local clients only, 0.0.0.0 for every interface)"
    elif first.errno in (errno.EACCES, errno.EPERM):
        reason, hint = "permission denied (ports below 1024 need privileges)", f"pick another {flags}"
    else:
        reason, hint = first.strerror or str(first), f"check {flags}"
    return f"cannot listen for {what} on {where}: {reason}; {hint}"
