"""Spec limits in process (LocalMemory), records the bank cannot open, enum coverage, and the documented numbers.

The service-side forms of these tests (a real `memflow-service serve`) are in tests/service/test_spec_limits.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import lmdb
import numpy as np
import pytest

from conftest import make_entry, make_spec
from memory_service import (
    Budget, FailedPrecondition, InvalidArgument, KeySpace, KVLayout, LocalMemory, NewEntry, NotFound, StreamSpec,
)
from memory_service import limits
from memory_service.wire import convert
from memory_service.wire.gen import memory_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
T40 = 1 << 40


def spec_with(**kw) -> StreamSpec:
    return StreamSpec("bad", kw.pop("key_spaces", {"e": KeySpace(8)}), **kw)


BAD = [
    (lambda: KeySpace(2**31), "key space dim is 2147483648; expected an int in [1, 1048576] (MAX_KEY_DIM"),
    (lambda: KeySpace(T40), f"key space dim is {T40}"),
    (lambda: KeySpace(2**63 - 1), f"key space dim is {2**63 - 1}"),
    (lambda: KeySpace(0), "key space dim is 0"),
    (lambda: KeySpace(True), "key space dim is True"),
    (lambda: KeySpace(4, per_layer=True, layers=-5), "KeySpace.layers is -5; expected an int in [1, 1024]"),
    (lambda: KeySpace(4, per_layer=True, layers=-T40), f"KeySpace.layers is {-T40}"),
    (lambda: KeySpace(1, per_layer=True, layers=T40), f"KeySpace.layers is {T40}"),
    (lambda: KVLayout(-5, 1, 1, 1), "KVLayout.layers is -5"),
    (lambda: KVLayout(-T40, 1, 1, 1), f"KVLayout.layers is {-T40}"),
    (lambda: KVLayout(T40, 1, 1, 1), f"KVLayout.layers is {T40}; expected an int in [1, 1024] (MAX_LAYERS"),
    (lambda: KVLayout(2, T40, 8, 4), f"KVLayout.heads is {T40}; expected an int in [1, 1024] (MAX_HEADS"),
    (lambda: KVLayout(2, 2, 4097, 4), "KVLayout.head_dim is 4097; expected an int in [1, 4096] (MAX_HEAD_DIM"),
    (lambda: KVLayout(2, 2, 8, 2**31), "KVLayout.tokens_per_frame is 2147483648"),
    (lambda: KVLayout(2**15, 2**15, 2**17, 2**17), "MAX_LAYERS"),  # 2^65 elements
    (lambda: KVLayout(1, 1024, 4096, 257, "float16"), "is 4311744512 bytes of K/V per entry; expected at most "
     "4294967296 (MAX_KV_BYTES_PER_ENTRY"),
    (lambda: Budget(max_entries=-1), "Budget.max_entries is -1"),
    (lambda: Budget(max_entries=2**62), "Budget.max_entries is 4611686018427387904; expected an int in [1, "
     "281474976710656] or None"),
    (lambda: Budget(max_bytes=2**70), "Budget.max_bytes is 1180591620717411303424"),
    (lambda: spec_with(key_spaces={"n": KeySpace(1 << 20, per_layer=True, layers=8)}),
     "has 8388608 key values per entry (layers x dim over its key spaces); expected at most 4194304"),
    (lambda: spec_with(key_spaces={f"s{i}": KeySpace(1) for i in range(17)}), "17 key spaces; expected at most 16"),
    (lambda: spec_with(key_spaces={"a": KeySpace(1, per_layer=True, layers=1024),
                                   "b": KeySpace(1, per_layer=True, layers=1024), "c": KeySpace(1)}),
     "needs 2049 search indexes (one per layer of each per-layer key space, one per other space); expected at most "
     "2048 (MAX_INDEXES_PER_STREAM"),
    (lambda: spec_with(key_spaces={"x" * 201: KeySpace(1)}), "key space name is 'xxxx"),
    (lambda: spec_with(policy="lru" * 400), "(1200 characters); expected a policy expression of at most 1000"),
    (lambda: spec_with(degrade=("fp8",) * 9), "expected a list of at most 8 steps"),
    (lambda: StreamSpec("x" * 201, {"e": KeySpace(1)}), "(201 characters); expected 1-200 characters without NUL"),
]


@pytest.mark.parametrize("build,says", BAD, ids=[s[:40] for _, s in BAD])
def test_a_value_past_a_limit_is_invalid_argument(build, says):
    with pytest.raises(InvalidArgument) as info:
        build()
    assert says in str(info.value)


def test_every_limit_is_accepted_at_its_value(tmp_path):
    KeySpace(limits.MAX_KEY_DIM)
    KVLayout(limits.MAX_LAYERS, 1, 1, 1)
    KVLayout(1, limits.MAX_HEADS, 1, 1)
    KVLayout(1, 1, limits.MAX_HEAD_DIM, 1)
    KVLayout(1, 1, 1, limits.MAX_TOKENS_PER_FRAME)
    assert KVLayout(1, 1024, 4096, 256, "float16").entry_bytes == limits.MAX_KV_BYTES_PER_ENTRY
    Budget(limits.MAX_BUDGET_ENTRIES, limits.MAX_BUDGET_BYTES)
    StreamSpec("s", {f"s{i}": KeySpace(1) for i in range(limits.MAX_KEY_SPACES)})
    # 1024 + 1010 + 14 two_stage spaces (one index each) = 2048 indexes
    StreamSpec("s", {"a": KeySpace(1, per_layer=True, layers=1024), "b": KeySpace(1, per_layer=True, layers=1010),
                     **{f"t{i}": KeySpace(1, per_layer=True, layers=1024, index="two_stage") for i in range(14)}})
    spec = StreamSpec("e" * limits.MAX_STREAM_NAME_CHARS, {f"s{i}": KeySpace(1, per_layer=True, layers=1024)
                                                           for i in range(2)},
                      policy="fifo" + " " * (limits.MAX_POLICY_CHARS - 4), degrade=("fp8",) * 8)
    with LocalMemory(str(tmp_path / "bank")) as m:  # 2048 indexes: it builds, takes an entry and reopens
        m.create_stream(spec)
        m.put(spec.name, [NewEntry(0, 0, "", {f"s{i}": np.ones((1024, 1), np.float32) for i in range(2)})])
    with LocalMemory(str(tmp_path / "bank")) as m:
        assert m.query(spec.name, "s1", np.ones((1024, 1)), 1).ids[:, 0].tolist() == [0] * 1024


def test_a_spec_forced_past_the_limits_is_refused_by_the_bank_and_never_stored(tmp_path):
    """A frozen spec changed behind its constructor's back (object.__setattr__) still never reaches the disk: the
    bank builds the stream from the record it would write, which re-checks every limit."""
    spec = make_spec(kv=KVLayout(4, 2, 8, 5))  # its own layout: the shared test layout must stay as it is
    object.__setattr__(spec.kv, "layers", T40)
    with LocalMemory(str(tmp_path / "bank")) as m:
        with pytest.raises(InvalidArgument, match=f"KVLayout.layers is {T40}"):
            m.create_stream(spec)
        assert m.list_streams() == [] and m.stats().streams == ()
    with LocalMemory(str(tmp_path / "bank")) as m:
        assert m.list_streams() == [] and m.bank.unavailable_streams() == []


def plant(data_dir: str, records: dict[bytes, bytes]) -> None:
    env = lmdb.open(os.path.join(data_dir, "lmdb"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            for key, value in records.items():
                txn.put(key, value, db=env.open_db(b"streams", txn=txn))
    finally:
        env.close()


def test_unopenable_records_leave_the_others_served_in_process(tmp_path):
    data_dir = str(tmp_path / "bank")
    with LocalMemory(data_dir) as m:
        m.create_stream(make_spec())  # sid 1
        m.put("cam0", [make_entry(i) for i in range(2)])
    old = {"sid": 1, "next_id": 0, "version": 0,  # claims cam0's id: dropping it must not touch cam0's data
           "spec": {**make_spec("dup").to_json(), "kv": {**make_spec().to_json()["kv"], "layers": T40}}}
    counter = {**old, "sid": 7, "next_id": "x", "spec": make_spec("counter").to_json()}
    plant(data_dir, {b"dup": json.dumps(old).encode(), b"list": b"[1, 2]", b"counter": json.dumps(counter).encode()})
    with LocalMemory(data_dir) as m:
        assert [s.name for s in m.list_streams()] == ["cam0"]
        assert {u.name: u.sid for u in m.bank.unavailable_streams()} == {"counter": 7, "dup": 1, "list": None}
        # an unopened record holds its name: a tenant's max_streams counts it (it has no bytes the bank can read)
        assert m.bank.usage() == (4, m.bank.usage("cam0")[1]) and m.bank.usage("co")[0] == 1
        for name, why in (("dup", f"KVLayout.layers is {T40}"), ("list", "must be an object with a 'spec' object"),
                          ("counter", "field 'next_id' is 'x'")):
            with pytest.raises(FailedPrecondition, match=re.escape(f"stream {name!r} is unavailable")) as info:
                m.query(name, "emb", np.ones(16), 1)
            assert why in str(info.value)
        m.drop_stream("dup")
        with pytest.raises(NotFound):
            m.stats("dup")
        assert m.stats("cam0").entries == 2
    with LocalMemory(data_dir) as m:
        assert np.array_equal(m.fetch("cam0", [0, 1]).kv, np.stack([make_entry(i).kv for i in range(2)]))
        assert [u.name for u in m.bank.unavailable_streams()] == ["counter", "list"]


def test_every_enum_field_of_the_proto_is_checked():
    """proto3 enums are open: any int32 arrives. Every enum field of the contract is listed here, and the servicer
    checks each with convert.enum_from_pb (a new enum field fails this test until it is checked too)."""
    fields = sorted(f"{m.name}.{f.name}" for m in pb.DESCRIPTOR.message_types_by_name.values()
                    for f in m.fields if f.enum_type is not None)
    assert fields == ["FetchRequest.plane", "PutHeader.plane", "QueryFetchRequest.plane"]
    servicer = (REPO / "memory_service" / "service" / "servicer.py").read_text()
    for field in fields:
        assert 'convert.enum_from_pb(' in servicer and f'"{field}")' in servicer, field
        for good in (0, 1, 2):
            assert convert.enum_from_pb(good, field) == good
        for bad in (3, 9, -1, 2**31 - 1):
            with pytest.raises(InvalidArgument, match=re.escape(f"{field} is {bad}, which is not a DataPlane; "
                                                                "expected one of DATA_PLANE_UNSPECIFIED (0)")):
                convert.enum_from_pb(bad, field)


def test_the_documented_limits_are_the_limits():
    readme = (REPO / "README.md").read_text()
    proto = (REPO / "protos" / "memflow" / "v1" / "memory.proto").read_text()
    proto = re.sub(r"\s*\n\s*(//\s*)?", " ", proto)  # comments run on over lines
    for name, value in limits.ALL_LIMITS.items():
        assert f"| `{name}` | {value} |" in readme, name
        assert f"{value} ({name})" in proto, name
