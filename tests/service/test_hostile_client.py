"""A hostile same-host client against a real `memflow-service serve` (issue 10 items 1, 6, 7).

- Its shared memory: a segment it shrinks (`ftruncate`) after registering it, once or racing the service's
  copies, must get FAILED_PRECONDITION and leave the service alive (the old service died of SIGBUS). Arenas
  the service maps are sealed memfds, which no one can shrink.
- Its share: arenas, streams and stored bytes are bounded per tenant; one tenant at its quota is
  RESOURCE_EXHAUSTED, and another tenant goes on as if nothing happened.
- What it can see: /metrics names no stream unless the operator opts in; its Stats shows only its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from svc_util import LAYERS, DIM, REPO, SMALL_ARENA, make_entry, make_spec, scrape, write_tokens

from memory_service import ResourceExhausted
from memory_service.client import MemoryClient
from memory_service.wire import convert
from memory_service.wire.gen import memory_pb2 as pb
from memory_service.wire.gen import memory_pb2_grpc as pb_grpc
from memory_service.shm import NONCE_BYTES, Arena

ALICE, ALICE_RO, BOB = "a" * 24, "r" * 24, "b" * 24
TOKENS = [f"alice:{ALICE}", f"alice:{ALICE_RO}:ro", f"bob:{BOB}"]
MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    monkeypatch.delenv("MEMFLOW_TOKEN", raising=False)


def start(serve, tmp_path, config=None, *flags):
    args = ["--auth-token-file", write_tokens(tmp_path / "tokens", TOKENS), *flags]
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
        args += ["--config", str(tmp_path / "config.json")]
    return serve(tmp_path / "bank", *args)


class Raw:
    """The wire, as a hostile client drives it: a raw stub with one tenant's token."""

    def __init__(self, target: str, token: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.MemoryServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {token}"),)

    def register(self, name: str, size: int, nonce: bytes) -> str:
        return self.stub.RegisterArena(pb.RegisterArenaRequest(shm_name=name, size=size, nonce=nonce),
                                       metadata=self.md, timeout=30).arena_id

    def fetch(self, arena_id: str, offset: int, ids=(0,)) -> list:
        return list(self.stub.Fetch(pb.FetchRequest(stream="cam0", ids=list(ids), plane=pb.DATA_PLANE_SHM,
                                                    arena_id=arena_id, arena_offset=offset, arena_bytes=MiB),
                                    metadata=self.md, timeout=30))

    def put(self, arena_id: str, offset: int, seed: int = 50):
        header = pb.PutHeader(stream="cam0", entries=[convert.entry_to_pb(make_entry(seed), 0)],
                              plane=pb.DATA_PLANE_SHM, arena_id=arena_id, arena_offset=offset)
        return self.stub.Put(iter([pb.PutRequest(header=header)]), metadata=self.md, timeout=30)

    def close(self) -> None:
        self.channel.close()


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def posix_segment(size: int = MiB) -> Arena:
    """A POSIX /dev/shm segment with its nonce written, as any client could make one."""
    return Arena(size, prefault=False, sealed=False)


def arena_fds() -> set[tuple[str, int]]:
    """(kind, fd) of every shared-memory segment this process holds open: "memfd" (a client's sealed arena) or
    "posix" (/dev/shm)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if "memflow-arena" in target:
            out.add(("memfd", int(name)))
        elif target.startswith("/dev/shm/"):
            out.add(("posix", int(name)))
    return out


def assert_alive_and_unchanged(proc, before) -> None:
    assert proc.proc.poll() is None, f"the service died (rc {proc.proc.returncode}):\n{proc.stderr()[-2000:]}"
    channel = grpc.insecure_channel(proc.target)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    with MemoryClient(proc.target, token=ALICE, plane="shm", arena_bytes=SMALL_ARENA) as c:
        assert [m.entry_id for m in c.entries("cam0")] == before
        assert c.fetch("cam0", [0]).kv[0].tobytes() == make_entry(0).kv.tobytes()
        assert c.query("cam0", "nam", make_entry(1).keys["nam"], 1).ids.shape == (LAYERS, 1)


# ---- item 1: a segment shrunk under the service ---------------------------------------------------------

def test_a_truncated_arena_is_failed_precondition_and_the_service_lives(serve, tmp_path):
    proc = start(serve, tmp_path)
    with MemoryClient(proc.target, token=ALICE, plane="stream") as c:
        c.create_stream(make_spec())
        c.put("cam0", [make_entry(i) for i in range(3)])
    ro, rw = Raw(proc.target, ALICE_RO), Raw(proc.target, ALICE)
    seg = posix_segment()
    try:
        ro_id = ro.register(seg.name, seg.size, seg.nonce)  # a read-only token may register and fetch
        rw_id = rw.register(seg.name, seg.size, seg.nonce)
        assert ro.fetch(ro_id, 8192)[0].header.nbytes == make_entry(0).kv.nbytes  # whole, it works
        os.ftruncate(seg.segment._fd, 4096)  # then the client shrinks it under the registration
        for call in (lambda: ro.fetch(ro_id, 8192), lambda: rw.put(rw_id, 8192), lambda: rw.fetch(rw_id, 4096)):
            e = rpc_error(call)
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.code(), e.details())
            assert "smaller than the range asked" in e.details() and "4096 bytes now" in e.details()
        assert_alive_and_unchanged(proc, [0, 1, 2])
        os.ftruncate(seg.segment._fd, seg.size)  # grown back, the same registration works again
        assert len(rw.put(rw_id, 8192).ids) == 1
    finally:
        ro.close()
        rw.close()
        seg.close()
    assert_alive_and_unchanged(proc, [0, 1, 2, 3])


def test_shrinking_while_the_service_copies_never_kills_it(serve, tmp_path):
    proc = start(serve, tmp_path)
    with MemoryClient(proc.target, token=ALICE, plane="stream") as c:
        c.create_stream(make_spec())
        c.put("cam0", [make_entry(i) for i in range(3)])
    raw = Raw(proc.target, ALICE)
    seg = posix_segment()
    stop = threading.Event()

    def flip() -> None:  # shrink and regrow the segment as fast as the OS allows
        while not stop.is_set():
            os.ftruncate(seg.segment._fd, 4096)
            os.ftruncate(seg.segment._fd, seg.size)

    flipper = threading.Thread(target=flip)
    codes = set()
    try:
        arena_id = raw.register(seg.name, seg.size, seg.nonce)
        flipper.start()
        for i in range(150):
            for call in (lambda: raw.fetch(arena_id, 8192, ids=(0, 1, 2)), lambda: raw.put(arena_id, 8192)):
                try:
                    call()
                    codes.add("OK")
                except grpc.RpcError as exc:
                    codes.add(exc.code().name)
                    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, (exc.code(), exc.details())
    finally:
        stop.set()
        if flipper.is_alive():
            flipper.join()
        raw.close()
        seg.close()
    assert proc.proc.poll() is None, f"the service died (rc {proc.proc.returncode}):\n{proc.stderr()[-2000:]}"
    assert codes <= {"OK", "FAILED_PRECONDITION"}
    with MemoryClient(proc.target, token=ALICE, plane="shm", arena_bytes=SMALL_ARENA) as c:
        assert c.stats("cam0").entries >= 3  # every put that answered OK is there, and the service answers


def test_sealed_arenas_cannot_shrink_and_unsealed_memfds_are_refused(serve, tmp_path):
    proc = start(serve, tmp_path)
    before = arena_fds()
    with MemoryClient(proc.target, token=ALICE, plane="shm", arena_bytes=SMALL_ARENA) as c:
        c.create_stream(make_spec())
        c.put("cam0", [make_entry(i) for i in range(3)])
        made = arena_fds() - before
        assert made and {kind for kind, _ in made} == {"memfd"}  # the default arena: a sealed memfd
        for _, fd in made:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 4096)  # the seal: not even its owner can shrink it
        assert c.fetch("cam0", [0, 1]).kv[1].tobytes() == make_entry(1).kv.tobytes()
    fd = os.memfd_create("memflow-arena", os.MFD_ALLOW_SEALING)  # without the seal: never mapped, refused
    other = os.memfd_create("someone-elses", os.MFD_ALLOW_SEALING)  # sealed, but no arena of ours
    raw = Raw(proc.target, ALICE)
    try:
        for f in (fd, other):
            os.ftruncate(f, MiB)
            os.pwrite(f, b"n" * NONCE_BYTES, 0)
        e = rpc_error(lambda: raw.register(f"memfd:{os.getpid()}:{fd}", MiB, b"n" * NONCE_BYTES))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "sealed against shrinking" in e.details()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        fcntl.fcntl(other, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        assert raw.register(f"memfd:{os.getpid()}:{fd}", MiB, b"n" * NONCE_BYTES)  # sealed, it is accepted
        e = rpc_error(lambda: raw.register(f"memfd:{os.getpid()}:{other}", MiB, b"n" * NONCE_BYTES))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "'memflow-arena'" in e.details()
        bank = os.path.join(proc.data_dir, "lmdb", "data.mdb")  # never a file that is no memfd
        bank_fd = os.open(bank, os.O_RDONLY)
        try:
            e = rpc_error(lambda: raw.register(f"memfd:{os.getpid()}:{bank_fd}", 4096, os.pread(bank_fd, 16, 0)))
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "not a memfd" in e.details()
        finally:
            os.close(bank_fd)
    finally:
        os.close(fd)
        os.close(other)
        raw.close()
    assert_alive_and_unchanged(proc, [0, 1, 2])


def test_a_service_in_another_pid_namespace_gets_posix_arenas(serve, tmp_path):
    """It cannot open this process's memfds, so the client falls back to a POSIX segment, which the service
    never maps: the bytes go through pread/pwrite and arrive intact."""
    unshare = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if subprocess.run([*unshare, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a PID namespace here")
    proc = serve(tmp_path / "bank", prefix=unshare)
    before = arena_fds()
    with MemoryClient(proc.target, plane="shm", arena_bytes=SMALL_ARENA) as c:
        made = arena_fds() - before
        assert made and {kind for kind, _ in made} == {"posix"}  # the memfd it tried first is gone
        c.create_stream(make_spec())
        assert c.put("cam0", [make_entry(i) for i in range(4)]) == [0, 1, 2, 3]
        got = c.fetch("cam0", [3, 1], layers=[2, 0]).kv
        want = np.stack([make_entry(3).kv[[2, 0]], make_entry(1).kv[[2, 0]]])
        assert got.tobytes() == want.tobytes()
        assert c.query("cam0", "nam", make_entry(2).keys["nam"], 1).ids.shape == (LAYERS, 1)


# ---- item 6: quotas per tenant ----------------------------------------------------------------------------

def test_one_tenant_filling_its_arenas_leaves_another_tenant_its_own(serve, tmp_path):
    proc = start(serve, tmp_path)  # the default quotas
    hog = Raw(proc.target, ALICE_RO)  # even a read-only token registers arenas
    seg = posix_segment(64 << 10)
    try:
        held = 0
        with pytest.raises(grpc.RpcError) as info:
            for _ in range(300):  # more than the old service-wide table of 256
                hog.register(seg.name, seg.size, seg.nonce)
                held += 1
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'alice'" in info.value.details() and "quotas.max_arenas" in info.value.details()
        assert held == 32
        with MemoryClient(proc.target, token=BOB, plane="shm", arena_bytes=SMALL_ARENA) as bob:
            bob.create_stream(make_spec())
            bob.put("cam0", [make_entry(7)])
            assert bob.fetch("cam0", [0]).kv[0].tobytes() == make_entry(7).kv.tobytes()
    finally:
        hog.close()
        seg.close()


CLIENT = """
import sys, time
from memory_service.client import MemoryClient
c = MemoryClient(sys.argv[1], token=sys.argv[2], plane="shm", arena_bytes=1 << 20)
print("ready", flush=True)
time.sleep(120)
"""


def came_up(child: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Whether the child printed "ready" (it may die first; a resource tracker it spawned may hold its stdout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([child.stdout], [], [], 0.2)[0]:
            return child.stdout.readline().strip() == "ready"
        if child.poll() is not None:
            return False
    return False


def test_clients_that_die_without_releasing_do_not_use_up_the_quota(serve, tmp_path):
    proc = start(serve, tmp_path, {"quotas": {"max_arenas": 2}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(3):  # more dead clients than the quota holds
        child = subprocess.Popen([sys.executable, "-c", CLIENT, proc.target, ALICE], stdout=subprocess.PIPE,
                                 text=True, env=env)
        try:
            assert came_up(child), "a client could not register its arena"
        finally:
            child.kill()
            child.wait(30)
    raw = Raw(proc.target, ALICE)
    segs = [posix_segment(64 << 10) for _ in range(2)]
    try:
        for seg in segs:
            raw.register(seg.name, seg.size, seg.nonce)  # the dead clients' arenas made room
        extra = posix_segment(64 << 10)
        e = rpc_error(lambda: raw.register(extra.name, extra.size, extra.nonce))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # two live ones: the quota holds
        segs[0].close()  # closed (unlinked) without ReleaseArena, as a client's resource tracker does at its death
        raw.register(extra.name, extra.size, extra.nonce)
        segs.append(extra)
    finally:
        raw.close()
        for seg in segs:
            seg.close()


def test_arena_bytes_streams_and_stored_bytes_are_bounded_per_tenant(serve, tmp_path):
    entry_bytes = make_entry(0).kv.nbytes + (LAYERS * DIM + 16) * 4  # payload + keys of one entry
    proc = start(serve, tmp_path, {"quotas": {"max_arena_bytes": 3 * MiB, "max_streams": 2,
                                              "max_stored_bytes": 5 * entry_bytes // 2}})
    hog = Raw(proc.target, ALICE)
    seg = posix_segment(MiB)
    try:
        ids = [hog.register(seg.name, seg.size, seg.nonce) for _ in range(3)]
        e = rpc_error(lambda: hog.register(seg.name, seg.size, seg.nonce))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quotas.max_arena_bytes" in e.details()
        hog.stub.ReleaseArena(pb.ReleaseArenaRequest(arena_id=ids[0]), metadata=hog.md, timeout=30)
        hog.register(seg.name, seg.size, seg.nonce)  # released bytes count no more
    finally:
        hog.close()
        seg.close()
    with MemoryClient(proc.target, token=ALICE, plane="stream") as alice, \
            MemoryClient(proc.target, token=BOB, plane="stream") as bob:
        alice.create_stream(make_spec("s1"))
        alice.create_stream(make_spec("cam0"))
        with pytest.raises(ResourceExhausted, match="quotas.max_streams"):
            alice.create_stream(make_spec("s3"))
        alice.drop_stream("s1")
        alice.create_stream(make_spec("s3"))  # a dropped stream frees its place
        bob.create_stream(make_spec("s1"))  # bob's streams are his: alice's count is not his
        bob.create_stream(make_spec("cam0"))
        assert sorted(s.name for s in bob.list_streams()) == ["cam0", "s1"]

        assert alice.put("cam0", [make_entry(0), make_entry(1)]) == [0, 1]
        with pytest.raises(ResourceExhausted, match="quotas.max_stored_bytes"):
            alice.put("cam0", [make_entry(2)])
        with pytest.raises(ResourceExhausted, match="quotas.max_stored_bytes"):
            alice.put("s3", [make_entry(2)])  # the quota is the tenant's, over all its streams
        assert alice.stats().entries == 2  # a refused put stored nothing
        assert bob.put("cam0", [make_entry(i) for i in range(2)]) == [0, 1]  # bob has his own quota
        alice.delete("cam0", [0])
        assert alice.put("cam0", [make_entry(2)]) == [2]  # deleted bytes count no more


# ---- item 7: what a tenant can see ------------------------------------------------------------------------

def test_metrics_name_no_stream_and_stats_show_only_the_tenants_own(serve, tmp_path):
    proc = start(serve, tmp_path, None, "--metrics-port", "0")
    with MemoryClient(proc.target, token=ALICE, plane="stream") as alice, \
            MemoryClient(proc.target, token=BOB, plane="stream") as bob:
        alice.create_stream(make_spec("alice-secret-plans"))
        alice.put("alice-secret-plans", [make_entry(i) for i in range(3)])
        bob.create_stream(make_spec("cam0"))
        bob.put("cam0", [make_entry(9)])
        mine = alice.stats()
        assert [s.name for s in mine.streams] == ["alice-secret-plans"] and mine.entries == 3
        assert (mine.map_size, mine.disk_bytes) == (0, 0)  # the whole bank's sizes are the operator's
        assert bob.stats().entries == 1 and bob.stats().payload_bytes == make_entry(9).kv.nbytes
    m = scrape(proc.metrics_port)
    labels = {v for (_, lab), _ in m.items() for _, v in lab}
    assert not any("alice" in v or "cam0" in v for v in labels), sorted(labels)
    assert not any(name.startswith("memflow_stream_") for name, _ in m)
    assert m[("memflow_entries", ())] == 4 and m[("memflow_streams", ())] == 2
    assert m[("memflow_disk_bytes", ())] > 0


def test_per_stream_metrics_are_the_operators_choice(serve, tmp_path):
    proc = start(serve, tmp_path, {"metrics_stream_labels": True}, "--metrics-port", "0")
    with MemoryClient(proc.target, token=ALICE, plane="stream") as alice:
        alice.create_stream(make_spec())
        alice.put("cam0", [make_entry(0)])
    assert scrape(proc.metrics_port)[("memflow_stream_entries", (("stream", "alice/cam0"),))] == 1


def test_without_auth_the_operator_sees_the_whole_bank(serve, tmp_path):
    proc = serve(tmp_path / "bank")
    with MemoryClient(proc.target, plane="stream") as c:
        c.create_stream(make_spec())
        st = c.stats()
        assert st.map_size > 0 and st.disk_bytes > 0


def test_quota_config_is_strict():
    from memory_service import InvalidArgument
    from memory_service.config import ServiceConfig, build, load_service_config

    assert load_service_config(environ={"MEMFLOW_QUOTAS__MAX_STREAMS": "7"}).quotas.max_streams == 7
    assert build(ServiceConfig, {"quotas": {"max_stored_bytes": None}}, "config").quotas.max_stored_bytes is None
    with pytest.raises(InvalidArgument, match=r"unknown config key\(s\) \['max_streamz'\] in config.quotas"):
        build(ServiceConfig, {"quotas": {"max_streamz": 1}}, "config")
    with pytest.raises(InvalidArgument, match="quotas.max_arenas is -1"):
        build(ServiceConfig, {"quotas": {"max_arenas": -1}}, "config")
