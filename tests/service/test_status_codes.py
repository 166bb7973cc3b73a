"""Every status code of the contract, triggered for real against a live server.

Each case is checked twice: with the raw generated stub (the status code on the wire, and a message that
says what was wrong and what was expected) and through MemoryClient (the exception class it maps back to).
"""

from __future__ import annotations

import secrets
import socket

import grpc
import ml_dtypes
import numpy as np
import pytest

from svc_util import DIM, LAYERS, SMALL_ARENA, make_entry, make_spec, start_serve, write_tokens

from memory_service import (
    AlreadyExists, Budget, DeadlineExceeded, FailedPrecondition, InvalidArgument, KeySpace, KVLayout, NewEntry,
    NotFound, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable,
)
from memory_service.client import MemoryClient
from memory_service.wire import convert
from memory_service.wire.gen import memory_pb2 as pb
from memory_service.wire.gen import memory_pb2_grpc as pb_grpc
from memory_service.shm import NONCE_BYTES, Arena

ALICE = "alice:" + "a" * 24
READER = "alice:" + "r" * 24 + ":ro"


def stub_for(address: str):
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.MemoryServiceStub(channel)


@pytest.fixture
def stub(server):
    channel, stub = stub_for(server.address)
    yield stub
    channel.close()


@pytest.fixture
def client(server):
    with MemoryClient(server.address, plane="stream") as c:
        c.create_stream(make_spec(budget=Budget(max_entries=3)))
        c.put("cam0", [make_entry(i, pinned=True) for i in range(3)])
        yield c


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def query_pb(stream="cam0", space="nam", vectors=None, k=1) -> pb.QueryRequest:
    v = np.ones((LAYERS, DIM), np.float32) if vectors is None else vectors
    return pb.QueryRequest(stream=stream, space=space, vectors=convert.tensor_to_pb(v, "float32"), k=k)


def test_invalid_argument(client, stub):
    e = rpc_error(lambda: stub.Query(query_pb(vectors=np.ones(DIM, np.float32))))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has shape [32], stream 'cam0' expects [4, 32]" in e.details()
    e = rpc_error(lambda: stub.Query(pb.QueryRequest(stream="cam0", space="nam", k=1, vectors=pb.Tensor(
        dtype="float32", shape=[LAYERS, DIM], data=b"\0" * 10))))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "carries 10 bytes" in e.details() and "needs 512" in e.details()
    e = rpc_error(lambda: stub.CreateStream(pb.CreateStreamRequest(spec=pb.StreamSpec(
        name="x", key_spaces={"e": pb.KeySpace(dim=4, metric="hamming")}))))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown metric 'hamming'" in e.details()
    with pytest.raises(InvalidArgument, match=r"k is 0, expected an int in \[1, 1024\]"):
        client.query("cam0", "nam", np.ones((LAYERS, DIM)), 0)


def test_not_found(client, stub):
    e = rpc_error(lambda: stub.Query(query_pb(stream="ghost")))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "stream 'ghost' not found; existing streams: ['cam0']" in e.details()
    e = rpc_error(lambda: list(stub.Fetch(pb.FetchRequest(stream="cam0", ids=[0, 99]))))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "has no entries [99]" in e.details()
    with pytest.raises(NotFound, match="no entries"):
        client.delete("cam0", [1, 42])
    assert client.stats("cam0").entries == 3


def test_already_exists(client, stub):
    e = rpc_error(lambda: stub.CreateStream(pb.CreateStreamRequest(spec=convert.spec_to_pb(make_spec()))))
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "stream 'cam0' already exists" in e.details()
    with pytest.raises(AlreadyExists):
        client.create_stream(make_spec())


def test_resource_exhausted_budget_all_pinned(client, stub):
    header = pb.PutHeader(stream="cam0", entries=[convert.entry_to_pb(make_entry(7))])
    header.entries[0].has_kv = False  # keys only is enough to need a slot
    e = rpc_error(lambda: stub.Put(iter([pb.PutRequest(header=header)])))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "3 entries are pinned" in e.details()
    with pytest.raises(ResourceExhausted, match="pinned"):
        client.put("cam0", [make_entry(7)])
    assert [m.entry_id for m in client.entries("cam0")] == [0, 1, 2]


def test_resource_exhausted_message_too_large(make_server):
    srv = make_server(max_message_bytes=1 << 20)
    channel, stub = stub_for(srv.address)
    with channel, MemoryClient(srv.address, plane="stream") as c:
        c.create_stream(make_spec("wide", key_spaces={"e": KeySpace(1 << 19)}))
        big = np.ones(1 << 19, np.float32)  # 2 MiB of query vector
        e = rpc_error(lambda: stub.Query(query_pb("wide", "e", big)))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.details()
        assert "1048576" in e.details()
        with pytest.raises(ResourceExhausted, match="larger than max"):
            c.query("wide", "e", big, 1)
        # a stream-plane Put whose 4 MiB chunk exceeds the server's limit: refused, nothing stored
        kv = KVLayout(layers=1, heads=4, head_dim=64, tokens_per_frame=4096)
        c.create_stream(make_spec("big", kv=kv, key_spaces={"e": KeySpace(4)}))
        with pytest.raises(ResourceExhausted, match="larger than max"):
            c.put("big", [NewEntry(0, 0, "", {"e": np.ones(4)}, np.ones(kv.shape, ml_dtypes.bfloat16))])
        assert c.stats("big").entries == 0 and c.stats("big").next_entry_id == 0
    with MemoryClient(srv.address, plane="stream", max_message_bytes=1 << 16) as small:
        entries = [NewEntry(i, 0, "p" * 4000, {"e": np.ones(4)}) for i in range(20)]
        with pytest.raises(ResourceExhausted, match="put fewer entries per call"):
            small.put("big", entries)  # the client refuses a header over its own limit before sending


def test_unauthenticated_and_permission_denied(make_server, tmp_path):
    srv = make_server(auth_token_file=write_tokens(tmp_path / "tokens", [ALICE, READER]))
    channel, stub = stub_for(srv.address)
    with channel:
        e = rpc_error(lambda: stub.ListStreams(pb.ListStreamsRequest()))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "expected 'Bearer <token>'" in e.details()
        e = rpc_error(lambda: stub.ListStreams(pb.ListStreamsRequest(), metadata=(("authorization", "Bearer x" * 4),)))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "not valid" in e.details()
        good = (("authorization", "Bearer " + "a" * 24),)
        stub.CreateStream(pb.CreateStreamRequest(spec=convert.spec_to_pb(make_spec())), metadata=good)
        e = rpc_error(lambda: stub.Stats(pb.StatsRequest(stream="bob/cam0"), metadata=good))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "names tenant 'bob'" in e.details() and "tenant 'alice'" in e.details()
        ro = (("authorization", "Bearer " + "r" * 24),)
        e = rpc_error(lambda: stub.DropStream(pb.DropStreamRequest(stream="cam0"), metadata=ro))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "read-only" in e.details()
    with MemoryClient(srv.address, token="wrong-token-0123456789", plane="stream") as c:
        with pytest.raises(Unauthenticated):
            c.list_streams()
    with MemoryClient(srv.address, token="r" * 24, plane="stream") as c:
        with pytest.raises(PermissionDenied):
            c.drop_stream("cam0")
        assert [s.name for s in c.list_streams()] == ["cam0"]


@pytest.fixture
def big_stream(server):
    kv = KVLayout(layers=8, heads=4, head_dim=64, tokens_per_frame=256)  # 2 MiB per entry
    rng = np.random.default_rng(0)
    with MemoryClient(server.address, plane="stream") as c:
        c.create_stream(make_spec("big", kv=kv, key_spaces={"e": KeySpace(8)}))
        c.put("big", [NewEntry(i, 0, "", {"e": rng.standard_normal(8)}, np.full(kv.shape, i, ml_dtypes.bfloat16))
                      for i in range(12)])
    return server


@pytest.mark.parametrize("plane", ["stream", "shm"])
def test_deadline_exceeded(big_stream, plane):
    channel, stub = stub_for(big_stream.address)
    with channel:
        e = rpc_error(lambda: list(stub.Fetch(pb.FetchRequest(stream="big", ids=list(range(12))), timeout=1e-4)))
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in e.details().lower()
    with MemoryClient(big_stream.address, plane=plane, arena_bytes=64 << 20) as c:
        with pytest.raises(DeadlineExceeded):
            c.fetch("big", list(range(12)), timeout=1e-4)
        got = c.fetch("big", [11, 3]).kv  # the service is fine afterwards
        assert got[0].astype(np.float32).min() == 11 and got[1].astype(np.float32).max() == 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unavailable_nothing_listening():
    target = f"127.0.0.1:{free_port()}"
    channel, stub = stub_for(target)
    with channel:
        e = rpc_error(lambda: stub.Stats(pb.StatsRequest(), timeout=10))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
    with MemoryClient(target, plane="stream", retries=0, timeout=10) as c:
        with pytest.raises(Unavailable):
            c.stats()
        with pytest.raises(Unavailable):
            c.put("cam0", [make_entry(0)])
    with MemoryClient(target, plane="auto", retries=0, timeout=10) as c:  # auto: no arena possible -> stream
        assert c.plane == "stream"
        with pytest.raises(Unavailable):
            c.list_streams()


def test_unavailable_after_stop(make_server):
    srv = make_server()
    with MemoryClient(srv.address, plane="stream", retries=0, timeout=10) as c:
        c.create_stream(make_spec())
        srv.stop(0)
        with pytest.raises(Unavailable):
            c.stats()
        with pytest.raises(Unavailable):
            c.query("cam0", "nam", np.ones((LAYERS, DIM)), 1)


def test_failed_precondition_bogus_arenas(client, server, stub):
    missing = "memflow-test-" + secrets.token_hex(6)
    e = rpc_error(lambda: stub.RegisterArena(pb.RegisterArenaRequest(shm_name=missing, size=1 << 16,
                                                                     nonce=b"n" * NONCE_BYTES)))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert missing in e.details() and "not visible to the service" in e.details() and "stream data plane" in e.details()

    arena = Arena(1 << 16)  # a client-side arena, registered by hand through the raw stub
    try:
        e = rpc_error(lambda: stub.RegisterArena(pb.RegisterArenaRequest(shm_name=arena.name, size=arena.size,
                                                                         nonce=b"x" * NONCE_BYTES)))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "nonce differs" in e.details()
        arena_id = stub.RegisterArena(pb.RegisterArenaRequest(shm_name=arena.name, size=arena.size,
                                                              nonce=arena.nonce)).arena_id
        fetch = pb.FetchRequest(stream="cam0", ids=[0, 1], plane=pb.DATA_PLANE_SHM, arena_id="feedfacefeedface",
                                arena_offset=4096, arena_bytes=1 << 15)
        e = rpc_error(lambda: list(stub.Fetch(fetch)))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "is not registered" in e.details()
        fetch.arena_id, fetch.arena_bytes = arena_id, 100
        e = rpc_error(lambda: list(stub.Fetch(fetch)))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "reserved 100" in e.details()
        fetch.arena_bytes, fetch.arena_offset = 1 << 15, (1 << 16) - 100
        e = rpc_error(lambda: list(stub.Fetch(fetch)))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside arena" in e.details()
        fetch.arena_offset = 4096
        header = list(stub.Fetch(fetch))[0].header  # the honest request works, straight into the segment
        n = int(np.prod(header.shape))
        got = np.frombuffer(arena.segment.buf, ml_dtypes.bfloat16, count=n, offset=4096).reshape(tuple(header.shape))
        assert got.tobytes() == np.stack([make_entry(0).kv, make_entry(1).kv]).tobytes()
        del got
        stub.ReleaseArena(pb.ReleaseArenaRequest(arena_id=arena_id))
        e = rpc_error(lambda: list(stub.Fetch(fetch)))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "register the arena again" in e.details()
    finally:
        arena.close()


@pytest.mark.slow
def test_failed_precondition_client_shm_across_dev_shm_namespaces(tmp_path):
    """A service that can see neither the client's /dev/shm nor its processes (as on another host: its own
    mount and PID namespaces, so neither POSIX segments nor sealed memfds reach it): plane="shm" is an error,
    never a silent slow path; plane="auto" falls back to the stream plane and works."""
    unshare = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]
    probe = __import__("subprocess").run([*unshare, "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private /dev/shm and PID namespace here: {probe.stderr.decode().strip()}")
    script = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'
    proc = start_serve(str(tmp_path / "bank"), prefix=[*unshare, "sh", "-c", script, "sh"])
    try:
        with pytest.raises(FailedPrecondition, match="shared-memory data plane requested but unavailable"):
            MemoryClient(proc.target, plane="shm", arena_bytes=SMALL_ARENA)
        with MemoryClient(proc.target, plane="auto", arena_bytes=SMALL_ARENA) as c:
            assert c.plane == "stream"
            c.create_stream(make_spec())
            c.put("cam0", [make_entry(3)])
            assert c.fetch("cam0", [0]).kv[0].tobytes() == make_entry(3).kv.tobytes()
    finally:
        proc.kill()
