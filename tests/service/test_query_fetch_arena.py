"""QueryFetch on the shared-memory plane checks the caller's arena before its query records any hit: a client
whose arena the service lost (a restart) gets ArenaNotRegistered, registers again and retries, and the failed
attempt must leave the bank exactly as it was (no hit counted twice). Real MemoryServer, real gRPC channel."""

from __future__ import annotations

import grpc
import numpy as np
from conftest import EMB, make_entry, make_spec

from memory_service.client import MemoryClient
from memory_service.wire import convert
from memory_service.wire.gen import memory_pb2_grpc as pb_grpc


def test_query_fetch_on_an_unknown_arena_fails_before_the_query_counts_hits(server):
    with MemoryClient(server.address, plane="stream") as m:
        m.create_stream(make_spec())
        m.put("cam0", [make_entry(i) for i in range(4)])
        query = convert.query_to_pb("cam0", "emb", np.ones(EMB, np.float32), 2, "per_layer", None, False, None)
        request = convert.query_fetch_shm(convert.query_fetch_request(query, None, [], [], []), "0" * 16, 64, 1 << 20)
        channel = grpc.insecure_channel(server.address)
        try:
            stub = pb_grpc.MemoryServiceStub(channel)
            try:
                list(stub.QueryFetch(request, timeout=30))
                raise AssertionError("QueryFetch on an arena nobody registered succeeded")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                assert "is not registered" in exc.details()
        finally:
            channel.close()
        assert [e.hit_count for e in m.entries("cam0")] == [0, 0, 0, 0]  # the failed call changed nothing
