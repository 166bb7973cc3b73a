"""A bank opens on a disk with no free byte at all: the directory lock takes no space (its PID is only for
messages), so a service restarted on a full disk starts and serves, and the deletes that free space commit.
The bank on a real 4 MiB tmpfs, filled to the last block by another file.

Needs permission to mount tmpfs (root, as on CI and developer machines here); skips cleanly elsewhere.
"""

from __future__ import annotations

import errno
import os

import pytest

from tiny_disk import tiny_disk  # noqa: F401 - the fixture, found by pytest through this name

from conftest import make_entry, make_spec
from memory_service import LocalMemory
from memory_service.config import BankConfig
from memory_service.errors import Unavailable

CONFIG = BankConfig(map_size=64 << 20, snapshot_on_close=False)


def fill_disk(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def test_a_bank_opens_on_a_full_disk_and_its_deletes_commit(tiny_disk):
    data = os.path.join(tiny_disk, "bank")
    with LocalMemory(data, CONFIG) as m:
        m.create_stream(make_spec())
        m.put("cam0", [make_entry(i) for i in range(50)])
    fill_disk(os.path.join(tiny_disk, "filler"))
    assert os.statvfs(tiny_disk).f_bavail == 0
    with LocalMemory(data, CONFIG) as m:  # was OSError ENOSPC from writing the PID into LOCK
        assert m.stats("cam0").entries == 50
        with pytest.raises(Unavailable, match="in use by"):  # and it is held all the same
            LocalMemory(data, CONFIG)
        assert m.delete("cam0", [0, 1]) == 2
    with LocalMemory(data, CONFIG) as m:
        assert m.stats("cam0").entries == 48
