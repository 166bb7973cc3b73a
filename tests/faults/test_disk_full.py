"""A real full disk: the bank on a 4 MiB tmpfs fills up; the failing put is RESOURCE_EXHAUSTED and changes nothing.

Needs permission to mount tmpfs (root, as on CI and developer machines here); skips cleanly elsewhere.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import make_entry, make_spec
from memory_service import LocalMemory, ResourceExhausted
from memory_service.config import BankConfig


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_resource_exhausted_and_bank_stays_readable(tiny_disk):
    data = tiny_disk + "/bank"
    with LocalMemory(data, BankConfig(map_size=64 << 20, snapshot_on_close=False)) as m:
        m.create_stream(make_spec())
        acked: list[int] = []
        with pytest.raises(ResourceExhausted, match="disk full"):
            for i in range(10_000):  # 4 MiB holds a few thousand 1.3 KiB entries at most
                acked += m.put("cam0", [make_entry(i) for i in range(i * 8, i * 8 + 8)])
        before = m.stats("cam0")
        assert before.entries == len(acked) > 0
        kv = m.fetch("cam0", acked).kv  # everything acknowledged is readable and verifies its checksum
        assert np.array_equal(kv[-1], make_entry(acked[-1]).kv)
        q = make_entry(acked[0]).keys["emb"]
        assert m.query("cam0", "emb", q, 1).ids.tolist() == [acked[0]]
        with pytest.raises(ResourceExhausted):  # larger than what is left: refused, nothing changes
            m.put("cam0", [make_entry(10**6 + i) for i in range(512)])
        assert m.stats("cam0") == before
        assert np.array_equal(m.fetch("cam0", acked).kv, kv)
    with LocalMemory(data, BankConfig(snapshot_on_close=False)) as m:  # reopens after the failures
        assert m.stats("cam0").entries == len(acked)
