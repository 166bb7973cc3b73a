"""A bank that fails to open releases its data directory's lock at once (and closes its store): the caller's
traceback keeps the half-built bank alive, so the lock must not wait for garbage collection. A real directory,
a real LMDB environment."""

from __future__ import annotations

import pytest

from memory_service import LocalMemory
from memory_service.bank import MemoryBank
from memory_service.store.dirlock import DirLock


def test_a_store_that_cannot_open_releases_the_directory_lock(tmp_path):
    (tmp_path / "lmdb").write_text("not a directory")  # the store cannot make its environment here
    with pytest.raises(OSError) as failed:
        MemoryBank(str(tmp_path))
    assert failed.value is not None  # the traceback (and the half-built bank in it) is still alive here
    DirLock.acquire(str(tmp_path)).release()  # free: the failed open let go of it


def test_a_bank_whose_records_cannot_be_read_releases_the_directory_lock(tmp_path):
    with LocalMemory(str(tmp_path)) as m:
        m.bank.store.write(lambda w: w.put("meta", b"next_sid", b"not a number"))  # a damaged counter
    with pytest.raises(ValueError) as failed:
        MemoryBank(str(tmp_path))
    assert failed.value is not None
    DirLock.acquire(str(tmp_path)).release()
