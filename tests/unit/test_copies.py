"""copies.gather: every byte of every piece lands at its offset whether the gather runs on one thread or is cut
between several (pieces cut where a run ends, runs of unequal pieces, empty pieces, a gap left untouched), an
error in another thread's run is raised to the caller only after every run ended, and a fetch big enough to be
split returns the bytes it stored, from LMDB through both the shared-memory read and a degraded (fp8) layer."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from memory_service import copies
from memory_service import KeySpace, KVLayout, LocalMemory, NewEntry, StreamSpec
from memory_service.types import kv_numpy_dtype


def pieces(sizes: list[int], gap: int = 0, seed: int = 0) -> tuple[list[tuple[int, bytes]], int]:
    rng = np.random.default_rng(seed)
    out, offset = [], 0
    for n in sizes:
        out.append((offset, rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
        offset += n + gap
    return out, offset


@pytest.mark.parametrize("copiers", [1, 2, 3, 5])
@pytest.mark.parametrize("sizes", [[7, 0, 13, 1, 100_000, 3], [1 << 20] * 3, [5 << 20, 1, 2 << 20]])
def test_every_byte_lands_at_its_offset(monkeypatch, copiers, sizes):
    monkeypatch.setattr(copies, "PARALLEL_MIN_BYTES", 1)  # split even the small gathers
    parts, end = pieces(sizes, gap=3)
    out = np.full(end, 0xEE, np.uint8)
    copies.gather(out, parts, copiers=copiers)
    want = np.full(end, 0xEE, np.uint8)
    for offset, data in parts:
        want[offset:offset + len(data)] = np.frombuffer(data, np.uint8)
    assert np.array_equal(out, want)  # the gaps between pieces were not written


def test_a_big_gather_uses_another_thread(monkeypatch):
    seen: set[str] = set()
    real = copies._copy

    def spy(run):
        seen.add(threading.current_thread().name)
        real(run)

    monkeypatch.setattr(copies, "_copy", spy)
    parts, end = pieces([copies.PARALLEL_MIN_BYTES // 2 + 1] * 2)
    out = np.zeros(end, np.uint8)
    copies.gather(out, parts, copiers=2)
    assert len(seen) == 2 and any(n.startswith("memflow-copy") for n in seen)
    assert out.tobytes() == b"".join(p for _, p in parts)
    seen.clear()
    small = np.zeros(10, np.uint8)
    copies.gather(small, [(0, b"0123456789")], copiers=2)  # small: copied inline by the caller, no run handed off
    assert seen == set() and small.tobytes() == b"0123456789"


def test_an_error_in_a_pool_run_is_raised_after_every_run_ended(monkeypatch):
    monkeypatch.setattr(copies, "PARALLEL_MIN_BYTES", 1)
    finished = []
    real = copies._copy

    def flaky(run):
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("a run failed")
        real(run)
        finished.append(True)

    monkeypatch.setattr(copies, "_copy", flaky)
    parts, end = pieces([1000, 1000])
    with pytest.raises(ValueError, match="a run failed"):
        copies.gather(np.zeros(end, np.uint8), parts, copiers=2)
    assert finished == [True]  # the caller's own run was done before the error came up


@pytest.mark.parametrize("storage", ["raw", "fp8"])
def test_a_split_fetch_returns_what_was_stored(tmp_path, monkeypatch, storage):
    monkeypatch.setattr(copies, "PARALLEL_MIN_BYTES", 1)
    layout = KVLayout(layers=3, heads=2, head_dim=16, tokens_per_frame=8, dtype="bfloat16")
    rng = np.random.default_rng(5)
    kv = [rng.standard_normal(layout.shape).astype(kv_numpy_dtype("bfloat16")) for _ in range(5)]
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(StreamSpec("s", {"e": KeySpace(4)}, kv=layout, storage=storage))
        ids = m.put("s", [NewEntry(i, i, "p", {"e": rng.standard_normal(4).astype(np.float32)}, kv[i])
                          for i in range(5)])
        order = ids[::-1]
        got = m.fetch("s", order).kv
        some = m.fetch("s", order, layers=[2, 0]).kv
    want = np.stack([kv[ids.index(e)] for e in order])
    if storage == "raw":
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
        assert np.array_equal(some.view(np.uint16), want[:, [2, 0]].view(np.uint16))
    else:
        assert np.allclose(got.astype(np.float32), want.astype(np.float32), rtol=0.07, atol=0.01)


def test_a_batch_gathers_its_parts_as_one_at_its_end(monkeypatch):
    seen: list[int] = []
    real = copies._gather
    monkeypatch.setattr(copies, "_gather", lambda pieces, threads: (seen.append(len(pieces)), real(pieces, threads)))
    a, b = np.zeros(6, np.uint8), np.zeros(4, np.uint8)
    with copies.batched():
        copies.gather(a, [(0, b"abc"), (3, b"def")])
        with copies.batched():  # an inner block joins the outer one
            copies.gather(b, [(0, b"wxyz")])
        assert seen == [] and not a.any() and not b.any()  # nothing copied before the block ends
    assert seen == [3] and a.tobytes() == b"abcdef" and b.tobytes() == b"wxyz"
    with pytest.raises(RuntimeError):
        with copies.batched():
            copies.gather(a, [(0, b"zzz")])
            raise RuntimeError("the read failed")
    assert a.tobytes() == b"abcdef" and seen == [3]  # a failed block copies nothing
    copies.gather(b, [(0, b"1234")])  # outside any block: at once
    assert b.tobytes() == b"1234"
