"""The local socket (proto "the local socket"; service/local_server.py, local_channel.py).

A stock peer speaks it from the proto alone - its own framing (4-byte little-endian length, then the message),
the generated messages - and gets what gRPC answers: the same responses, the same status codes and messages.
MemoryClient on the SHM plane uses it once RegisterArena names it and falls back to gRPC whenever it cannot.
A hostile peer (oversized or malformed frames, too many connections, a stalled half frame) hurts only itself.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import grpc
import numpy as np
import pytest

from svc_util import SMALL_ARENA, make_entry, make_spec, start_serve, write_tokens

from memory_service import MemoryClient
from memory_service.errors import DeadlineExceeded, NotFound
from memory_service.wire.gen import memory_pb2 as pb
from memory_service.wire.gen import memory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(not os.uname().sysname == "Linux", reason="the abstract namespace is Linux's")


def connect(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(b"\0" + name[1:].encode() if name.startswith("@") else name)
    return sock


def frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def read_answer(sock: socket.socket):
    """The next LocalAnswer, or None when the service closed the connection."""
    head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("<I", head)
    body = sock.recv(n, socket.MSG_WAITALL) if n else b""
    return pb.LocalAnswer.FromString(body)


def call(sock: socket.socket, method: str, request, token: str = ""):
    sock.sendall(frame(pb.LocalCall(method=method, request=request.SerializeToString(), timeout_s=10,
                                    authorization=f"Bearer {token}" if token else "").SerializeToString()))
    return read_answer(sock)


def advertised(address: str, token: str = "") -> str:
    """The local socket a RegisterArena answer names (a client's arena: the service must be able to open it)."""
    with MemoryClient(address, plane="shm", arena_bytes=SMALL_ARENA, token=token or None) as c:
        return c._local.name


@pytest.fixture
def filled(server):
    with MemoryClient(server.address, plane="stream") as c:
        c.create_stream(make_spec())
        c.put("cam0", [make_entry(s) for s in range(6)])
    return server


def test_a_stock_peer_gets_what_grpc_answers(filled):
    name = advertised(filled.address)
    assert name.startswith("@memflow-")
    q = pb.QueryRequest(stream="cam0", space="nam", k=3,
                        vectors=pb.Tensor(dtype="float32", shape=[4, 32],
                                          data=np.random.default_rng(1).standard_normal((4, 32), np.float32).tobytes()))
    with grpc.insecure_channel(filled.address) as ch, connect(name) as sock:
        by_grpc = pb_grpc.MemoryServiceStub(ch).Query(q)
        answer = call(sock, "Query", q)
        assert answer.code == 0
        got = pb.QueryResponse.FromString(answer.response)
        assert got.ids == by_grpc.ids and got.scores == by_grpc.scores and got.ids.data
        # an error is the status gRPC sends, word for word; the connection goes on
        missing = pb.QueryRequest(stream="nope", space="nam", k=3, vectors=q.vectors)
        with pytest.raises(grpc.RpcError) as grpc_err:
            pb_grpc.MemoryServiceStub(ch).Query(missing)
        answer = call(sock, "Query", missing)
        assert answer.code == grpc.StatusCode.NOT_FOUND.value[0] == grpc_err.value.code().value[0]
        assert answer.message == grpc_err.value.details() and "nope" in answer.message
        assert call(sock, "Query", q).code == 0


def test_bad_frames_are_refused_with_a_reason_and_the_service_serves_on(filled):
    name = advertised(filled.address)
    with connect(name) as sock:
        sock.sendall(frame(b"\xff\xff\xff"))  # not a LocalCall
        answer = read_answer(sock)
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "LocalCall" in answer.message
        answer = call(sock, "DropStream", pb.DropStreamRequest(stream="cam0"))  # gRPC only
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "DropStream" in answer.message
        sock.sendall(frame(pb.LocalCall(method="Query", request=b"\x0a\xff").SerializeToString()))
        answer = read_answer(sock)
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "Query request" in answer.message
        # a length over the message limit: refused before its bytes are read, then the connection closes
        sock.sendall(struct.pack("<I", (64 << 20) + 1))
        answer = read_answer(sock)
        assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and str(64 << 20) in answer.message
        assert read_answer(sock) is None
    with MemoryClient(filled.address, plane="shm", arena_bytes=SMALL_ARENA) as c:
        assert len(c.fetch("cam0", [0, 5]).ids) == 2 and c.stats("cam0").entries == 6  # nothing was dropped


def test_a_stalled_half_frame_holds_only_its_own_connection(filled):
    name = advertised(filled.address)
    with connect(name) as stalled:
        stalled.sendall(struct.pack("<I", 1000) + b"x" * 10)  # and nothing more
        with MemoryClient(filled.address, plane="shm", arena_bytes=SMALL_ARENA) as c:
            t0 = time.monotonic()
            for _ in range(20):
                assert c.fetch("cam0", [1]).ids == (1,)
            assert c._local.name == name and time.monotonic() - t0 < 10


def test_tokens_and_tenants_as_on_grpc(make_server, tmp_path):
    tokens = write_tokens(tmp_path / "tokens", ["alice:alice-secret-0123456", "bob:bob-secret-01234567"])
    srv = make_server(auth_token_file=tokens)
    with MemoryClient(srv.address, plane="shm", arena_bytes=SMALL_ARENA, token="alice-secret-0123456") as alice:
        alice.create_stream(make_spec())
        alice.put("cam0", [make_entry(0)])
        name = alice._local.name
        assert name and alice.fetch("cam0", [0]).ids == (0,)
    ids = pb.FetchRequest(stream="cam0", ids=[0], plane=pb.DATA_PLANE_SHM)
    with connect(name) as sock:
        assert call(sock, "Fetch", ids).code == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert call(sock, "Fetch", ids, token="wrong").code == grpc.StatusCode.UNAUTHENTICATED.value[0]
        answer = call(sock, "Fetch", ids, token="bob-secret-01234567")  # bob's cam0 does not exist: alice's is not his
        assert answer.code == grpc.StatusCode.NOT_FOUND.value[0]
    with MemoryClient(srv.address, plane="shm", arena_bytes=SMALL_ARENA, token="bob-secret-01234567") as bob:
        with pytest.raises(NotFound):
            bob.fetch("cam0", [0])
        assert bob._local.name == name  # the refusal came by the socket, not by a fallback


def test_past_its_connections_a_client_falls_back_to_grpc(filled):
    filled.local.max_connections = 2
    name = advertised(filled.address)
    held = [connect(name), connect(name)]
    try:
        time.sleep(0.2)  # both accepted
        with connect(name) as third:  # told at once, before it sends anything
            answer = read_answer(third)
            assert answer.code == grpc.StatusCode.UNAVAILABLE.value[0] and "memflow-local-refused" in answer.trailers
        with MemoryClient(filled.address, plane="shm", arena_bytes=SMALL_ARENA) as c:
            got = c.fetch("cam0", [2, 4])  # refused by the socket, answered by gRPC
            assert got.ids == (2, 4) and got.kv.tobytes() == b"".join(
                np.asarray(make_entry(s).kv).tobytes() for s in (2, 4))
            assert c._local.name == name  # still named: the socket is only full
    finally:
        for s in held:
            s.close()


def test_off_names_no_socket_and_clients_use_grpc(make_server):
    srv = make_server(local_socket="off")
    with MemoryClient(srv.address, plane="shm", arena_bytes=SMALL_ARENA) as c:
        c.create_stream(make_spec())
        c.put("cam0", [make_entry(0), make_entry(1)])
        assert c._local.name == "" and c.fetch("cam0", [1]).ids == (1,)
    assert srv.local is None


def test_a_path_left_by_a_killed_service_is_taken_over(tmp_path):
    path = str(tmp_path / "memflow.sock")
    proc = start_serve(str(tmp_path / "bank"), "--local-socket", path)
    try:
        with MemoryClient(proc.target, plane="shm", arena_bytes=SMALL_ARENA, timeout=5) as c:
            c.create_stream(make_spec())
            c.put("cam0", [make_entry(0)])
            assert c._local.name == path and c.fetch("cam0", [0]).ids == (0,)
            proc.kill()
            assert os.path.exists(path)  # SIGKILL: nothing removed it
            proc = start_serve(str(tmp_path / "bank"), "--local-socket", path)
            with MemoryClient(proc.target, plane="shm", arena_bytes=SMALL_ARENA) as again:
                assert again._local.name == path and again.fetch("cam0", [0]).ids == (0,)
    finally:
        proc.kill()


def test_a_path_another_service_listens_on_is_refused_at_start(tmp_path):
    path = str(tmp_path / "memflow.sock")
    first = start_serve(str(tmp_path / "a"), "--local-socket", path)
    try:
        with pytest.raises(RuntimeError) as failed:
            start_serve(str(tmp_path / "b"), "--local-socket", path, timeout=30)
        assert "local socket" in str(failed.value) and "--local-socket" in str(failed.value)
    finally:
        first.kill()


def test_many_threads_share_one_client(filled):
    with MemoryClient(filled.address, plane="shm", arena_bytes=SMALL_ARENA) as c:
        want = {s: np.asarray(make_entry(s).kv).tobytes() for s in range(6)}
        errors: list[BaseException] = []

        def work(seed: int) -> None:
            try:
                for i in range(40):
                    eid = (seed + i) % 6
                    got = c.fetch("cam0", [eid])
                    assert got.kv[0].tobytes() == want[eid]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert c._local.name


def test_a_lease_past_its_deadline_stays_reserved_while_the_service_may_still_copy(make_server, monkeypatch):
    """gRPC (no local socket): the client cannot know when the service's copy into the lease ends, so a call past its
    deadline keeps its lease for client.LATE_COPY_S; the local socket keeps it until the late answer arrives."""
    import memory_service.client as client_module

    monkeypatch.setattr(client_module, "LATE_COPY_S", 1.0)
    for setting in ("off", "auto"):
        srv = make_server(local_socket=setting)
        with MemoryClient(srv.address, plane="shm", arena_bytes=SMALL_ARENA) as c:
            c.create_stream(make_spec())
            c.put("cam0", [make_entry(s) for s in range(6)])
            for _ in range(100):  # gRPC's clock may let a 1 us deadline pass a small call now and then
                try:
                    c.fetch("cam0", list(range(6)), timeout=1e-6)
                except DeadlineExceeded:
                    break
            else:
                pytest.fail("no fetch with a 1 us deadline failed in 100 tries")
            if setting == "off":
                assert c.arena_usage().leased == 1  # kept: the service may be copying into it
            deadline = time.monotonic() + 10
            while c.arena_usage().leased and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.arena_usage().leased == 0  # given back once the copy can no longer be running
            got = c.fetch("cam0", [3, 1])
            assert got.kv.tobytes() == b"".join(np.asarray(make_entry(s).kv).tobytes() for s in (3, 1))
