"""ObjectStore against a real SeaweedFS: bit-exact round trips from several parts, ranged reads, listing with
pagination, deletes, errors that name what is wrong, and objects that survive a kill -9 of the server."""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
from s3_server import weed  # noqa: F401 - the fixture, found by pytest through this name

from memory_service.cluster import s3
from memory_service.cluster.s3 import ObjectStore
from memory_service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable


def _bucket(tag: str) -> str:
    return f"t-{tag}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(weed):  # noqa: F811 - the fixture imported above
    s = ObjectStore(weed.endpoint, _bucket("store"))
    yield s
    s.close()


def _parts(rng: np.random.Generator) -> list:
    kv = rng.standard_normal(4_500_000).astype(ml_dtypes.bfloat16)  # 9 MB: the big part (a K/V block)
    return [
        b"MFv1header",
        memoryview(bytearray(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())),
        b"",
        kv,
        rng.integers(0, 1 << 16, 777, dtype=np.uint16),  # bfloat16's bits as uint16
        memoryview(np.arange(12, dtype=np.float32)).cast("B"),
    ]


def _joined(parts: list) -> bytes:
    return b"".join(p.tobytes() if isinstance(p, np.ndarray) else bytes(p) for p in parts)


def test_round_trip_of_parts_is_bit_exact_and_ranges_read_into_a_buffer(store):
    parts = _parts(np.random.default_rng(0))
    want = _joined(parts)
    assert len(want) > 8 << 20
    store.put("a/obj", parts)
    got = store.get("a/obj")
    assert got == want

    # a range across the boundary between the 1000-byte part and the K/V block, read into a caller's array
    out = np.zeros(5000, dtype=np.uint8)
    store.read_into("a/obj", 500, memoryview(out))
    assert out.tobytes() == want[500:5500]
    tail = bytearray(100)
    store.read_into("a/obj", len(want) - 100, memoryview(tail))
    assert bytes(tail) == want[-100:]

    with pytest.raises(InvalidArgument, match="past its end"):
        store.read_into("a/obj", len(want) - 10, memoryview(bytearray(20)))
    with pytest.raises(InvalidArgument, match="past its end"):
        store.read_into("a/obj", len(want) + 10, memoryview(bytearray(20)))

    # an object replaced whole: the new bytes, none of the old
    store.put("a/obj", [b"short"])
    assert store.get("a/obj") == b"short"


def test_multipart_object_round_trips(store, monkeypatch):
    # smaller parts than production (S3's minimum, 5 MiB) so that a 12 MiB object goes up in three parts
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr(s3, "MULTIPART_PART", 5 << 20)
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, 7 << 20, dtype=np.uint8), b"x" * 3, rng.integers(0, 256, 5 << 20, dtype=np.uint8)]
    store.put("big", parts)
    assert store.get("big") == _joined(parts)
    out = bytearray(1 << 20)
    store.read_into("big", (5 << 20) - 100, memoryview(out))  # across the first part boundary
    assert bytes(out) == _joined(parts)[(5 << 20) - 100 : (6 << 20) - 100]


def test_list_paginates_and_delete_prefix_removes_everything_under_it(store):
    keys = [f"s/cam0/e{i:05d}" for i in range(1105)]  # > 1000: two pages of list_objects_v2, two delete batches
    with ThreadPoolExecutor(8) as pool:  # several threads share one store
        list(pool.map(lambda k: store.put(k, [k.encode()]), keys))
    store.put("s/cam1/e00000", [b"other stream"])
    store.put("s/cam01", [b"a prefix of cam0 in name only"])

    assert store.list("s/cam0/") == sorted(keys)
    assert store.get(keys[1042]) == keys[1042].encode()
    assert store.list("s/") == sorted([*keys, "s/cam1/e00000", "s/cam01"])
    assert store.delete_prefix("s/cam0/") == 1105
    assert store.list("s/cam0/") == []
    assert store.list("s/") == ["s/cam01", "s/cam1/e00000"]
    store.delete(["s/cam01", "s/never-was"])  # a missing key is no error
    assert store.list("s/") == ["s/cam1/e00000"]
    assert store.delete_prefix("nothing/") == 0


def test_missing_key_is_not_found_and_exists_says_so(store, weed):  # noqa: F811
    assert not store.exists("nope")
    with pytest.raises(NotFound) as e:
        store.get("nope")
    assert str(e.value) == f"object 'nope' is not in bucket '{store.bucket}' at {weed.endpoint}"
    with pytest.raises(NotFound, match="'nope'"):
        store.read_into("nope", 0, memoryview(bytearray(4)))
    store.put("yes", [b"1"])
    assert store.exists("yes")
    store.delete(["yes"])
    assert not store.exists("yes")


def test_bad_arguments_are_invalid_argument(store):
    with pytest.raises(InvalidArgument, match="non-contiguous"):
        store.put("k", [np.zeros((4, 4), dtype=np.float32)[:, 1]])
    with pytest.raises(InvalidArgument, match="expected bytes"):
        store.put("k", ["a str"])
    with pytest.raises(InvalidArgument, match="object key"):
        store.put("", [b"x"])
    with pytest.raises(InvalidArgument, match="negative"):
        store.read_into("k", -1, memoryview(bytearray(1)))
    with pytest.raises(InvalidArgument, match="not a URL"):
        ObjectStore("127.0.0.1:9000", "b")
    assert not store.exists("k")  # nothing was written by the refused puts


def test_bucket_is_created_on_first_use_unless_told_not_to(weed):  # noqa: F811
    name = _bucket("new")
    with pytest.raises(FailedPrecondition, match=f"bucket '{name}' does not exist"):
        ObjectStore(weed.endpoint, name, create_bucket=False)
    first = ObjectStore(weed.endpoint, name)
    first.put("k", [b"v"])
    again = ObjectStore(weed.endpoint, name, create_bucket=False)  # exists now
    assert again.get("k") == b"v"
    first.close()
    again.close()


def test_no_credentials_is_unsigned_which_an_authenticating_store_refuses(weed, monkeypatch, tmp_path, caplog):  # noqa: F811
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(s3, "_unsigned_warned", set())
    with caplog.at_level(logging.WARNING, logger=s3.__name__):
        with pytest.raises(FailedPrecondition, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
            ObjectStore(weed.endpoint, _bucket("unsigned"))  # weed here runs with auth on
    assert any("unsigned requests" in r.getMessage() for r in caplog.records)


def test_objects_survive_kill_9_and_a_store_that_is_down_is_unavailable(weed, store):  # noqa: F811
    rng = np.random.default_rng(2)
    objects = {f"d/{i}": [rng.integers(0, 1 << 16, 50_000 * (i + 1), dtype=np.uint16), b"tail"] for i in range(5)}
    for k, parts in objects.items():
        store.put(k, parts)
    quick = ObjectStore(weed.endpoint, store.bucket, timeout_s=1.0, retries=1)
    weed.kill()
    try:
        with pytest.raises(Unavailable) as e:
            quick.get("d/0")
        assert weed.endpoint in str(e.value) and "cannot be reached" in str(e.value)
        with pytest.raises(Unavailable, match=weed.endpoint):
            quick.put("d/new", [b"x"])
        with pytest.raises(Unavailable, match=weed.endpoint):
            ObjectStore(weed.endpoint, store.bucket, timeout_s=1.0, retries=0)
    finally:
        weed.restart()
    for k, parts in objects.items():  # through the client that was open across the restart
        assert store.get(k) == _joined(parts)
    assert store.list("d/") == sorted(objects)
    assert not store.exists("d/new")  # the put refused while down left nothing
    store.put("d/after", [b"written right after the restart"])  # writable at once, not only readable
    assert store.get("d/after") == b"written right after the restart"
    quick.close()
