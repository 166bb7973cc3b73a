"""Spec limits, unopenable stream records and unknown enum values, against a real `memflow-service serve` process.

- Every size in a spec is bounded (memory_service/limits.py): a CreateStream past a limit is INVALID_ARGUMENT
  naming the field and the limit, answered at once (one such call used to build 2^40 indexes, growing the
  service by ~120 MB/s), and nothing of it is persisted (a restart shows no trace of it).
- A data directory holding stream records the service cannot open (planted straight into LMDB, as the code
  before the limits wrote them, or damaged) still comes up: the other streams are served, each bad one answers
  FAILED_PRECONDITION naming it and why, `inspect` lists it as unavailable, and DropStream removes it.
- An enum value the proto does not name (DataPlane 9) is INVALID_ARGUMENT naming the field, the value and the
  allowed values, and the call changes nothing (it used to be served as the STREAM plane).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import lmdb
import numpy as np
import pytest

from svc_util import REPO, make_entry, make_spec, start_serve

from memory_service import LocalMemory, NewEntry
from memory_service.client import MemoryClient
from memory_service.wire import convert
from memory_service.wire.gen import memory_pb2 as pb
from memory_service.wire.gen import memory_pb2_grpc as pb_grpc

T40 = 1 << 40


def ks(dim=8, per_layer=False, layers=0) -> pb.KeySpace:
    return pb.KeySpace(dim=dim, per_layer=per_layer, layers=layers)


def kvl(layers=2, heads=2, head_dim=8, tokens=4) -> pb.KVLayout:
    return pb.KVLayout(layers=layers, heads=heads, head_dim=head_dim, tokens_per_frame=tokens)


# (what, spec fields, what the refusal must say)
BAD_SPECS = [
    ("per-layer dim 1 over 2^40 KV layers (the issue's CreateStream)",
     dict(key_spaces={"nam": ks(1, per_layer=True)}, kv=kvl(layers=T40)), f"KVLayout.layers is {T40}"),
    ("per-layer dim 1 over 2^40 key layers", dict(key_spaces={"nam": ks(1, True, T40)}), f"KeySpace.layers is {T40}"),
    ("dim 2^31", dict(key_spaces={"e": ks(2**31)}), "key space dim is 2147483648"),
    ("dim 2^40", dict(key_spaces={"e": ks(T40)}), f"key space dim is {T40}"),
    ("dim 2^63-1", dict(key_spaces={"e": ks(2**63 - 1)}), f"key space dim is {2**63 - 1}"),
    ("KV layers -5", dict(key_spaces={"e": ks()}, kv=kvl(layers=-5)), "KVLayout.layers is -5"),
    ("KV layers -2^40", dict(key_spaces={"e": ks()}, kv=kvl(layers=-T40)), f"KVLayout.layers is {-T40}"),
    ("key layers -5", dict(key_spaces={"n": ks(4, True, -5)}), "KeySpace.layers is -5"),
    ("key layers -2^40", dict(key_spaces={"n": ks(4, True, -T40)}), f"KeySpace.layers is {-T40}"),
    ("2^40 heads", dict(key_spaces={"e": ks()}, kv=kvl(heads=T40)), f"KVLayout.heads is {T40}"),
    ("head_dim 2^20", dict(key_spaces={"e": ks()}, kv=kvl(head_dim=1 << 20)), "KVLayout.head_dim is 1048576"),
    ("2^31 tokens per frame", dict(key_spaces={"e": ks()}, kv=kvl(tokens=2**31)), "KVLayout.tokens_per_frame is"),
    ("a layout of 2^65 elements", dict(key_spaces={"e": ks()}, kv=kvl(2**15, 2**15, 2**17, 2**17)), "MAX_LAYERS"),
    ("2^54 K/V bytes per entry, every field within its limit",
     dict(key_spaces={"e": ks()}, kv=kvl(1024, 1024, 4096, 1 << 20)), "bytes of K/V per entry; expected at most"),
    ("8M key values per entry", dict(key_spaces={"n": ks(1 << 20, True, 8)}), "key values per entry"),
    ("17 key spaces", dict(key_spaces={f"s{i}": ks() for i in range(17)}), "17 key spaces; expected at most 16"),
    ("16 per-layer spaces of 1024 layers", dict(key_spaces={f"s{i}": ks(1, True, 1024) for i in range(16)}),
     "needs 16384 search indexes"),
    ("budget of 2^62 bytes", dict(key_spaces={"e": ks()}, budget=pb.Budget(max_bytes=2**62)), "Budget.max_bytes is"),
    ("budget of 2^62 entries", dict(key_spaces={"e": ks()}, budget=pb.Budget(max_entries=2**62)),
     "Budget.max_entries is"),
    ("budget of -1 entries", dict(key_spaces={"e": ks()}, budget=pb.Budget(max_entries=-1)),
     "Budget.max_entries is -1"),
    ("a 2000-character policy", dict(key_spaces={"e": ks()}, policy="fifo" * 500),
     "characters); expected a policy expression of at most 1000"),
]


def huge_record(name: str, sid: int) -> dict:
    """The record the code before the limits committed for the issue's spec (per_layer, dim 1, 2^40 layers)."""
    spec = {"name": name, "key_spaces": {"nam": {"dim": 1, "metric": "ip", "per_layer": True, "index": "flat",
                                                 "dtype": "float32", "layers": None}},
            "kv": {"layers": T40, "heads": 1, "head_dim": 1, "tokens_per_frame": 1, "dtype": "bfloat16"},
            "budget": {"max_entries": None, "max_bytes": None}, "policy": "fifo", "storage": "raw", "degrade": []}
    return {"sid": sid, "spec": spec, "next_id": 1, "version": 1}


def plant(data_dir: str, records: dict[bytes, bytes], entry_sid: int) -> None:
    """Write stream records (and one entry row under `entry_sid`) straight into the bank's LMDB, no bank open."""
    env = lmdb.open(os.path.join(data_dir, "lmdb"), max_dbs=16)
    try:
        streams, entries = env.open_db(b"streams"), env.open_db(b"entries")
        with env.begin(write=True) as txn:
            for key, value in records.items():
                txn.put(key, value, db=streams)
            txn.put(entry_sid.to_bytes(4, "big") + (0).to_bytes(8, "big"), b"{}", db=entries)
    finally:
        env.close()


def lmdb_rows(data_dir: str, db: bytes) -> list[bytes]:
    env = lmdb.open(os.path.join(data_dir, "lmdb"), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return [bytes(k) for k, _ in txn.cursor(db=env.open_db(db, txn=txn))]
    finally:
        env.close()


def inspect(data_dir: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMFLOW_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "memory_service.cli", "inspect", "--data-dir", data_dir], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def code_of(call) -> tuple:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_specs_past_a_limit_are_refused_and_never_persisted(tmp_path):
    data_dir = str(tmp_path / "bank")
    proc = start_serve(data_dir)
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            for what, fields, says in BAD_SPECS:
                spec = pb.StreamSpec(name="bad", **fields)
                code, details = code_of(lambda: stub.CreateStream(pb.CreateStreamRequest(spec=spec), timeout=30))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, details)
                assert says in details and "expected" in details, (what, details)
                assert list(stub.ListStreams(pb.ListStreamsRequest(), timeout=30).streams) == [], what
            # at the limits themselves a stream is fine: two dim-1 per-layer spaces of 1024 layers (2048 indexes)
            edge = pb.StreamSpec(name="edge", key_spaces={f"s{i}": ks(1, True, 1024) for i in range(2)})
            stub.CreateStream(pb.CreateStreamRequest(spec=edge), timeout=30)
        assert proc.terminate() == 0
        proc = start_serve(data_dir)
        with MemoryClient(proc.target, plane="stream") as c:
            assert [s.name for s in c.list_streams()] == ["edge"]
            ids = c.put("edge", [make_edge_entry()])
            assert c.query("edge", "s1", np.ones((1024, 1), np.float32), 1).ids[:, 0].tolist() == ids * 1024
    finally:
        proc.kill()
    assert [line.get("stream") for line in inspect(data_dir)] == ["edge", None]


def make_edge_entry() -> NewEntry:
    return NewEntry(0, 0, "", {f"s{i}": np.ones((1024, 1), np.float32) for i in range(2)})


def test_a_bad_stream_record_on_disk_leaves_the_others_served(tmp_path):
    data_dir = str(tmp_path / "bank")
    with LocalMemory(data_dir) as m:  # the good stream, sid 1
        m.create_stream(make_spec())
        m.put("cam0", [make_entry(i) for i in range(3)])
    plant(data_dir, {
        b"huge": json.dumps(huge_record("huge", 99)).encode(),
        b"wrapped": json.dumps({**huge_record("wrapped", 98), "spec": {
            **huge_record("wrapped", 98)["spec"], "kv": None,
            "key_spaces": {"e": {"dim": 2**31, "metric": "ip", "per_layer": False}}}}).encode(),
        b"garbage": b"\x00 not a JSON record",
    }, entry_sid=99)

    proc = start_serve(data_dir, timeout=120)  # before the fix: never ready (it built 2^40 indexes)
    try:
        with MemoryClient(proc.target, plane="stream") as c, grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            assert [s.name for s in c.list_streams()] == ["cam0"]
            got = c.fetch("cam0", [0, 1, 2]).kv
            assert np.array_equal(got, np.stack([make_entry(i).kv for i in range(3)]))
            assert c.query("cam0", "emb", make_entry(1).keys["emb"], 1).ids.tolist() == [1]
            for name, why in (("huge", f"KVLayout.layers is {T40}"), ("wrapped", "key space dim is 2147483648"),
                              ("garbage", "the record is not valid JSON")):
                code, details = code_of(lambda: stub.Stats(pb.StatsRequest(stream=name), timeout=30))
                assert code == grpc.StatusCode.FAILED_PRECONDITION, (name, code, details)
                assert f"stream {name!r} is unavailable" in details and why in details, details
                code, details = code_of(lambda: stub.CreateStream(pb.CreateStreamRequest(
                    spec=pb.StreamSpec(name=name, key_spaces={"e": ks()})), timeout=30))
                assert code == grpc.StatusCode.ALREADY_EXISTS and "unavailable" in details, details
            # inspect beside the running service: it finishes, and names every unavailable stream with why
            lines = inspect(data_dir)
            assert [x["stream"] for x in lines if x.get("unavailable")] == ["garbage", "huge", "wrapped"]
            assert [x["stream"] for x in lines if "entries" in x and "stream" in x] == ["cam0"]
            assert "MAX_LAYERS" in next(x["reason"] for x in lines if x.get("stream") == "huge")
            c.drop_stream("huge")  # the operator's way out: the record and its data go
            code, details = code_of(lambda: stub.Stats(pb.StatsRequest(stream="huge"), timeout=30))
            assert code == grpc.StatusCode.NOT_FOUND, details
        assert proc.terminate() == 0
    finally:
        proc.kill()
    assert sorted(lmdb_rows(data_dir, b"streams")) == [b"cam0", b"garbage", b"wrapped"]
    assert not [k for k in lmdb_rows(data_dir, b"entries") if k[:4] == (99).to_bytes(4, "big")]
    proc = start_serve(data_dir)
    try:
        with MemoryClient(proc.target, plane="stream") as c:
            assert [s.name for s in c.list_streams()] == ["cam0"] and c.stats("cam0").entries == 3
    finally:
        proc.kill()


def test_unknown_enum_values_are_invalid_argument(tmp_path):
    proc = start_serve(str(tmp_path / "bank"))
    try:
        with MemoryClient(proc.target, plane="stream") as c, grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            c.create_stream(make_spec())
            c.put("cam0", [make_entry(0)])
            e = make_entry(1)
            header = pb.PutHeader(stream="cam0", entries=[convert.entry_to_pb(e)], plane=9)
            kv = np.ascontiguousarray(e.kv).tobytes()
            msgs = [pb.PutRequest(header=header), pb.PutRequest(kv_chunk=kv)]
            code, details = code_of(lambda: stub.Put(iter(msgs), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
            assert "PutHeader.plane is 9" in details and "DATA_PLANE_STREAM (1), DATA_PLANE_SHM (2)" in details
            header.plane = -3  # keys only: nothing on the data plane at all, and still refused
            del header.entries[:]
            header.entries.append(convert.entry_to_pb(make_entry(2, kv=False)))
            code, details = code_of(lambda: stub.Put(iter([pb.PutRequest(header=header)]), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "PutHeader.plane is -3" in details, details
            for plane in (9, 3, -1):
                req = pb.FetchRequest(stream="cam0", ids=[0], plane=plane)
                code, details = code_of(lambda: list(stub.Fetch(req, timeout=30)))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (plane, code, details)
                assert f"FetchRequest.plane is {plane}" in details and "DATA_PLANE_UNSPECIFIED (0)" in details
            query = convert.query_to_pb("cam0", "emb", make_entry(0).keys["emb"], 1, "per_layer", None, False, None)
            for plane in (9, -1):
                req = pb.QueryFetchRequest(query=query, plane=plane)
                code, details = code_of(lambda: list(stub.QueryFetch(req, timeout=30)))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (plane, code, details)
                assert f"QueryFetchRequest.plane is {plane}" in details, details
            assert c.stats("cam0").entries == 1 and c.stats("cam0").next_entry_id == 1
            assert np.array_equal(c.fetch("cam0", [0]).kv[0], make_entry(0).kv)
    finally:
        proc.kill()
