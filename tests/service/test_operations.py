"""What an operator sees: grpc.health.v1, server reflection, Prometheus /metrics, and a current generated proto.

All against a live server: health must say SERVING while serving and NOT_SERVING once a stop begins;
reflection must list (and describe) memflow.v1.MemoryService; /metrics must count what the calls did.
"""

from __future__ import annotations

import importlib.util
import queue
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool

from svc_util import DIM, KV, LAYERS, REPO, SMALL_ARENA, make_entry, make_spec, scrape, write_tokens

from memory_service import NotFound
from memory_service.client import MemoryClient

SERVICE = "memflow.v1.MemoryService"


def test_health_serving_then_not_serving_on_stop(make_server, tmp_path):
    # behind token auth, so this also shows health needs no token (load balancers probe it anonymously)
    srv = make_server(auth_token_file=write_tokens(tmp_path / "tokens", ["t:" + "x" * 20]))
    channel = grpc.insecure_channel(srv.address)
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == serving
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    seen: "queue.Queue" = queue.Queue()
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)

    def follow() -> None:
        try:
            for msg in watch:
                seen.put(msg.status)
        except grpc.RpcError as exc:
            seen.put(exc.code())

    threading.Thread(target=follow, daemon=True).start()
    assert seen.get(timeout=10) == serving
    stopper = threading.Thread(target=srv.stop, args=(1.0,))  # the watch holds the stop for its grace
    stopper.start()
    assert seen.get(timeout=10) == health_pb2.HealthCheckResponse.NOT_SERVING
    stopper.join(30)
    assert not stopper.is_alive()
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_reflection_lists_and_describes_the_service(server):
    channel = grpc.insecure_channel(server.address)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    # a generic client (grpcurl-style) can build the whole contract from reflection alone
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE)
    methods = {m.name for m in service.methods}
    assert {"CreateStream", "Put", "Query", "Fetch", "Delete", "Pin", "Prune", "Stats", "RegisterArena"} <= methods
    put = service.methods_by_name["Put"]
    assert put.client_streaming and not put.server_streaming and service.methods_by_name["Fetch"].server_streaming
    assert pool.FindMessageTypeByName("memflow.v1.Tensor").fields_by_name["shape"].is_repeated
    channel.close()


def test_metrics_count_requests_bytes_and_entries(make_server):
    srv = make_server(metrics_port=0, metrics_stream_labels=True)  # per-stream gauges are opt-in
    assert srv.metrics_port
    per_entry = LAYERS * KV.layer_bytes
    with MemoryClient(srv.address, plane="shm", arena_bytes=SMALL_ARENA) as shm, \
            MemoryClient(srv.address, plane="stream") as stream:
        shm.create_stream(make_spec())
        shm.put("cam0", [make_entry(i) for i in range(3)])
        stream.put("cam0", [make_entry(i) for i in range(3, 5)])
        for _ in range(4):
            stream.query("cam0", "nam", np.ones((LAYERS, DIM)), 2)
        shm.fetch("cam0", [0, 1], layers=[0])
        stream.fetch("cam0", [0, 1, 2, 3, 4])
        with pytest.raises(NotFound):
            stream.query("ghost", "nam", np.ones((LAYERS, DIM)), 2)
    m = scrape(srv.metrics_port)
    assert m[("memflow_request_seconds_count", (("method", "Query"),))] == 5
    assert m[("memflow_request_seconds_count", (("method", "Put"),))] == 2
    assert m[("memflow_request_seconds_sum", (("method", "Query"),))] > 0
    assert m[("memflow_request_seconds_bucket", (("le", "+Inf"), ("method", "Query")))] == 5
    assert m[("memflow_requests_in_flight", (("method", "Query"),))] == 0
    moved = {labels: v for (name, labels), v in m.items() if name == "memflow_data_plane_bytes_total"}
    assert moved[(("direction", "put"), ("plane", "shm"))] == 3 * per_entry
    assert moved[(("direction", "put"), ("plane", "stream"))] == 2 * per_entry
    assert moved[(("direction", "fetch"), ("plane", "shm"))] == 2 * KV.layer_bytes
    assert moved[(("direction", "fetch"), ("plane", "stream"))] == 5 * per_entry
    assert m[("memflow_request_errors_total", (("code", "NOT_FOUND"), ("method", "Query")))] == 1
    assert m[("memflow_stream_entries", (("stream", "cam0"),))] == 5
    assert m[("memflow_stream_payload_bytes", (("stream", "cam0"),))] == 5 * per_entry
    assert (m[("memflow_streams", ())], m[("memflow_entries", ())]) == (1, 5)
    assert m[("memflow_payload_bytes", ())] == 5 * per_entry


def test_generated_proto_code_is_current():
    spec = importlib.util.spec_from_file_location("memflow_protos_generate", REPO / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.stale() == []
