"""Authentication, tenancy and transport security, against live servers.

Tokens come from a real token file; TLS uses a self-signed certificate made here (SAN localhost, 127.0.0.1).
"""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from svc_util import DIM, LAYERS, REPO, SMALL_ARENA, make_entry, make_spec, self_signed_cert, serve_cmd, write_tokens

from memory_service import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable
from memory_service.client import MemoryClient
from memory_service.config import ServiceConfig
from memory_service.service.server import MemoryServer

ALICE, BOB, ALICE_RO = "a" * 24, "b" * 24, "r" * 24
TOKEN_LINES = [f"alice:{ALICE}", f"bob:{BOB}", f"alice:{ALICE_RO}:ro"]


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    monkeypatch.delenv("MEMFLOW_TOKEN", raising=False)


@pytest.fixture
def token_file(tmp_path) -> str:
    return write_tokens(tmp_path / "tokens", TOKEN_LINES)


@pytest.fixture
def auth_server(make_server, token_file):
    return make_server(auth_token_file=token_file)


def connect(srv, token, plane="stream", **kw) -> MemoryClient:
    return MemoryClient(srv.address, token=token, plane=plane, arena_bytes=SMALL_ARENA, **kw)


def test_missing_or_wrong_token_is_unauthenticated(auth_server):
    for token in (None, "", "c" * 24, ALICE[:-1] + "b", ALICE + "a"):
        with connect(auth_server, token) as c:
            with pytest.raises(Unauthenticated):
                c.list_streams()
            with pytest.raises(Unauthenticated):
                c.create_stream(make_spec())
            with pytest.raises(Unauthenticated):
                c.stats()
    with pytest.raises(Unauthenticated):  # registering the shm arena needs a token too
        connect(auth_server, "c" * 24, plane="shm")
    with connect(auth_server, ALICE) as c:
        assert c.list_streams() == []  # and nothing was created by the refused calls
    channel = grpc.insecure_channel(auth_server.address)  # health stays open to probes without a token
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_tenants_with_the_same_stream_name_are_isolated(auth_server):
    with connect(auth_server, ALICE, plane="shm") as alice, connect(auth_server, BOB) as bob:
        alice.create_stream(make_spec())
        bob.create_stream(make_spec())
        bob.create_stream(make_spec("bob-secret"))
        assert alice.put("cam0", [make_entry(i) for i in range(3)]) == [0, 1, 2]
        assert bob.put("cam0", [make_entry(i) for i in range(100, 105)]) == [0, 1, 2, 3, 4]

        assert [s.name for s in alice.list_streams()] == ["cam0"]
        assert sorted(s.name for s in bob.list_streams()) == ["bob-secret", "cam0"]
        assert alice.stats("cam0").entries == 3 and bob.stats("cam0").entries == 5
        a, b = alice.stats(), bob.stats()
        assert (a.entries, [s.name for s in a.streams]) == (3, ["cam0"])
        assert (b.entries, sorted(s.name for s in b.streams)) == (5, ["bob-secret", "cam0"])

        target = make_entry(104)  # bob's: an exact match for bob, invisible to alice
        assert bob.query("cam0", "emb", target.keys["emb"], 1).ids.tolist() == [4]
        r = alice.query("cam0", "emb", target.keys["emb"], 5)
        assert set(r.ids.tolist()) == {0, 1, 2, -1} and r.scores[0] < 0.99
        with pytest.raises(NotFound):
            alice.fetch("cam0", [4])
        assert alice.fetch("cam0", [1]).kv[0].tobytes() == make_entry(1).kv.tobytes()
        assert bob.fetch("cam0", [1]).kv[0].tobytes() == make_entry(101).kv.tobytes()

        with pytest.raises(NotFound) as info:
            alice.stats("ghost")
        assert "['cam0']" in str(info.value) and "bob" not in str(info.value)  # no other tenant's names
        with pytest.raises(NotFound):
            alice.stats("bob-secret")

        alice.drop_stream("cam0")
        assert alice.list_streams() == [] and bob.stats("cam0").entries == 5


def test_naming_another_tenant_is_permission_denied(auth_server):
    with connect(auth_server, ALICE) as alice, connect(auth_server, BOB) as bob:
        bob.create_stream(make_spec())
        bob.put("cam0", [make_entry(7)])
        alice.create_stream(make_spec())
        q = np.ones((LAYERS, DIM), np.float32)
        for call in (lambda: alice.query("bob/cam0", "nam", q, 1), lambda: alice.fetch("bob/cam0", [0]),
                     lambda: alice.put("bob/cam0", [make_entry(1)]), lambda: alice.delete("bob/cam0", [0]),
                     lambda: alice.drop_stream("bob/cam0"), lambda: alice.stats("bob/cam0"),
                     lambda: alice.create_stream(make_spec("bob/new")), lambda: alice.entries("bob/cam0")):
            with pytest.raises(PermissionDenied, match="tenant 'bob'"):
                call()
        assert alice.put("alice/cam0", [make_entry(1)]) == [0]  # its own prefix is its own stream
        assert alice.stats("cam0").entries == 1
        assert [s.name for s in bob.list_streams()] == ["cam0"] and bob.stats("cam0").entries == 1
        assert bob.fetch("cam0", [0]).kv[0].tobytes() == make_entry(7).kv.tobytes()


@pytest.mark.parametrize("plane", ["stream", "shm"])
def test_read_only_token_reads_but_never_writes(auth_server, plane):
    with connect(auth_server, ALICE) as alice:
        alice.create_stream(make_spec())
        alice.put("cam0", [make_entry(i) for i in range(4)])
        before = [(m.entry_id, m.pinned) for m in alice.entries("cam0")]
    with connect(auth_server, ALICE_RO, plane=plane) as ro:
        assert ro.plane == plane and [s.name for s in ro.list_streams()] == ["cam0"]
        assert ro.query("cam0", "emb", make_entry(2).keys["emb"], 1).ids.tolist() == [2]
        assert ro.fetch("cam0", [3], layers=[1]).kv[0, 0].tobytes() == make_entry(3).kv[1].tobytes()
        assert ro.stats("cam0").entries == 4 and len(ro.entries("cam0")) == 4
        for call in (lambda: ro.put("cam0", [make_entry(9)]), lambda: ro.create_stream(make_spec("x")),
                     lambda: ro.delete("cam0", [0]), lambda: ro.pin("cam0", [0]), lambda: ro.prune("cam0"),
                     lambda: ro.drop_stream("cam0")):
            with pytest.raises(PermissionDenied, match="read-only"):
                call()
    with connect(auth_server, ALICE) as alice:
        assert [(m.entry_id, m.pinned) for m in alice.entries("cam0")] == before
        assert [s.name for s in alice.list_streams()] == ["cam0"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_non_loopback_bind_needs_auth_or_insecure(tmp_path, token_file, host):
    with pytest.raises(InvalidArgument, match="--insecure"):
        MemoryServer(ServiceConfig(data_dir=str(tmp_path / "bank"), host=host, port=0))
    # with a token file, or explicitly insecure, it may be built (never started here: no real 0.0.0.0 bind)
    for kw in (dict(auth_token_file=token_file), dict(insecure=True)):
        srv = MemoryServer(ServiceConfig(data_dir=str(tmp_path / "bank"), host=host, port=0, **kw))
        srv.stop(0)


def test_cli_refuses_a_non_loopback_bind_without_auth(tmp_path):
    r = subprocess.run(serve_cmd(str(tmp_path / "bank"), "--host", "0.0.0.0"), cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "serving" not in r.stdout
    assert "refusing to serve on 0.0.0.0 without authentication" in r.stderr and "--insecure" in r.stderr


def test_tls_round_trip_and_plaintext_refused(make_server, tmp_path, token_file):
    cert, key = self_signed_cert(tmp_path)
    srv = make_server(tls_cert=cert, tls_key=key, auth_token_file=token_file)
    with MemoryClient(srv.address, token=ALICE, tls=cert, plane="stream") as c:
        c.create_stream(make_spec())
        assert c.put("cam0", [make_entry(i) for i in range(3)]) == [0, 1, 2]
        assert c.fetch("cam0", [2, 0]).kv.tobytes() == np.stack([make_entry(2).kv, make_entry(0).kv]).tobytes()
    pem = open(cert, "rb").read()
    with MemoryClient(f"localhost:{srv.port}", token=ALICE, tls=pem, plane="shm", arena_bytes=SMALL_ARENA) as c:
        assert c.plane == "shm"
        assert c.query("cam0", "emb", make_entry(1).keys["emb"], 1).ids.tolist() == [1]
        assert c.fetch("cam0", [1], layers=[2]).kv[0, 0].tobytes() == make_entry(1).kv[2].tobytes()
    with MemoryClient(srv.address, token=ALICE, plane="stream", retries=0, timeout=10) as plain:
        with pytest.raises(Unavailable):
            plain.list_streams()
    other_ca, _ = self_signed_cert(tmp_path, "other")
    with MemoryClient(srv.address, token=ALICE, tls=other_ca, plane="stream", retries=0, timeout=10) as wrong:
        with pytest.raises(Unavailable):
            wrong.list_streams()
    with MemoryClient(srv.address, token="c" * 24, tls=cert, plane="stream") as bad_token:
        with pytest.raises(Unauthenticated):
            bad_token.list_streams()


def test_tls_needs_cert_and_key(tmp_path):
    cert, _ = self_signed_cert(tmp_path)
    with pytest.raises(InvalidArgument, match="both --tls-cert and --tls-key"):
        MemoryServer(ServiceConfig(data_dir=str(tmp_path / "bank"), port=0, tls_cert=cert))
