"""MemoryServer: a MemoryBank served over gRPC, with health, reflection, auth, TLS, metrics and clean shutdown.

Owns the server's life cycle. Promises:
- it listens on 127.0.0.1 by default; bound to any other address without a token file it refuses to start
  unless `insecure=True`;
- `grpc.health.v1` reports SERVING for "" and "memflow.v1.MemoryService" while it serves; server reflection
  lists the service;
- `stop()` drains: health turns NOT_SERVING, new calls get UNAVAILABLE, calls in flight get `grace` seconds
  to finish, then the bank is closed cleanly (statistics flushed, snapshots written, LMDB closed);
- `serve_forever()` does that on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memory_service.bank import MemoryBank
from memory_service.config import ServiceConfig, is_loopback
from memory_service.errors import InvalidArgument
from memory_service.service.auth import Authenticator
from memory_service.service import convert
from memory_service.service.gen import memory_pb2
from memory_service.service.interceptors import ServiceInterceptor
from memory_service.service.metrics import Metrics
from memory_service.service.servicer import MemoryServicer

log = logging.getLogger("memflow.service")
SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name


def service_handlers(servicer) -> grpc.GenericRpcHandler:
    """The MemoryService method handlers, built from the proto's descriptor; Put and Fetch move K/V chunks
    pre-framed (convert.chunk_to_wire) instead of through message objects."""
    service = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"]
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler}
    handlers = {}
    for m in service.methods:
        request = getattr(memory_pb2, m.input_type.name)
        deserialize = convert.put_request_from_wire if m.name == "Put" else request.FromString
        make = kinds[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=deserialize,
                                response_serializer=convert.to_wire)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


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
        self.bank = bank or MemoryBank(config.data_dir, config.bank)
        self.metrics = Metrics(self.bank.stats, stream_labels=config.metrics_stream_labels)
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
        self.server.add_generic_rpc_handlers((service_handlers(self.servicer),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> int:
        """Bind and start; returns the port (config.port 0 picks a free one)."""
        where = f"{self.config.host}:{self.config.port}" if ":" not in self.config.host else \
            f"[{self.config.host}]:{self.config.port}"
        if self.config.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(self.config.tls_key).read_bytes(),
                                                  Path(self.config.tls_cert).read_bytes())])
            self.port = self.server.add_secure_port(where, creds)
        else:
            self.port = self.server.add_insecure_port(where)
        if not self.port:
            raise InvalidArgument(f"cannot listen on {where}: address in use or not available")
        self.server.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.host)
        self.bank.start_pruner()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"address": self.address, "tls": bool(self.config.tls_cert),
                                   "auth": self.auth is not None, "data_dir": self.config.data_dir,
                                   "metrics_port": self.metrics_port})
        return self.port

    def stop(self, grace: float = 10.0) -> None:
        """Drain and close; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        # Lame duck first: health says NOT_SERVING and the interceptor answers every new call UNAVAILABLE (a
        # clean, retryable refusal; a call racing grpc's own shutdown would get CANCELLED or hang instead),
        # while the calls in flight get `grace` seconds to finish. Then grpc stops and cancels what is left.
        self.interceptor.draining.set()
        self.health.enter_graceful_shutdown()
        self.interceptor.wait_idle(timeout=max(0.0, grace))
        self.server.stop(0).wait()
        # grpc has cancelled what was left, but handler threads may still be inside the bank (a cancelled
        # fetch finishing its copy): closing LMDB under them would unmap memory they are reading.
        if not self.interceptor.wait_idle(timeout=60.0):
            log.error("calls still running 60 s after stop; leaving the bank open", extra={"address": self.address})
            return
        self.servicer.arenas.close()
        self.metrics.close()
        self.bank.close()
        log.info("stopped", extra={"address": self.address})

    def serve_forever(self, grace: float = 10.0) -> None:
        """Block until SIGTERM/SIGINT (main thread) or `stop()`; then drain and close."""
        done = threading.Event()

        def on_signal(signum, _frame) -> None:
            log.info("signal received, draining", extra={"signal": signal.Signals(signum).name})
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not done.wait(0.5) and not self._stopped.is_set():
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop(grace)
