"""LMDB environment: one environment per data directory, its transactions, growth and full-disk behaviour.

Owns the mechanics under the LMDB store (lmdb_store.py holds the layout and the bank's verbs). Promises: a
`write` is one LMDB transaction (all of it is visible after it returns, none of it before, and it survives
`kill -9` once committed); the map grows by doubling when full, only while no reader is inside (the gate),
up to `max_map_size`; past that, or on a full disk, writes raise ResourceExhausted and every committed
record stays readable. Reads hand out buffers straight from the memory map.

A full disk never locks the bank up. LMDB is copy-on-write, so even a delete needs a few fresh pages; the
store keeps a reserve file (`reserve`, real blocks, reserve.py) beside the environment and gives it up when a
write that frees space (`write(..., frees=True)`: delete, drop, prune) hits ENOSPC, then retries. Pages a
commit frees become reusable only after one more commit (LMDB keeps the previous snapshot whole), and an
aborted write does not count, so a put retried on a full disk would never see them: after a space-freeing
commit on a low disk, and once before a write gives up on ENOSPC, the store commits a one-key "advance"
transaction. The reserve is refilled (as far as the disk allows) after later commits, before puts can take
that space.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import lmdb
import numpy as np

from memory_service.errors import NotFound, PermissionDenied, ResourceExhausted
from memory_service.store.reserve import RESERVE_FILE, Reserve, is_disk_full

T = TypeVar("T")
log = logging.getLogger("memflow.store")
DBS = ("streams", "entries", "stats", "keys", "phead", "pbody", "meta")


class _Gate:
    """Many readers or one resizer: LMDB's set_mapsize needs no transaction open in this process."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class Writer:
    """The operations of one write transaction (handed to the function given to `LMDBEnv.write`)."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.txn = txn
        self._dbs = dbs

    def put(self, db: str, key: bytes, value: Any) -> None:
        self.txn.put(key, value, db=self._dbs[db])

    def delete(self, db: str, key: bytes) -> None:
        self.txn.delete(key, db=self._dbs[db])

    def get(self, db: str, key: bytes) -> Optional[bytes]:
        return self.txn.get(key, db=self._dbs[db])

    def delete_prefix(self, db: str, prefix: bytes) -> int:
        cursor = self.txn.cursor(db=self._dbs[db])
        n = 0
        if cursor.set_range(prefix):
            while cursor.key()[: len(prefix)] == prefix:
                n += 1
                if not cursor.delete():
                    break
        return n


class Reader:
    """One read transaction; buffers it returns are valid only inside the `with` block."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.txn = txn
        self._dbs = dbs

    def get(self, db: str, key: bytes) -> Optional[memoryview]:
        return self.txn.get(key, db=self._dbs[db])

    def iter_prefix(self, db: str, prefix: bytes) -> Iterator[tuple[bytes, memoryview]]:
        cursor = self.txn.cursor(db=self._dbs[db])
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            key = bytes(key)
            if key[: len(prefix)] != prefix:
                return
            yield key, value


class LMDBEnv:
    """An LMDB environment in `path` with the write discipline above (`LMDBStore` adds the bank's verbs)."""

    reader_class: type = Reader  # what `reader()` hands out

    def __init__(self, path: str, map_size: int = 1 << 30, max_map_size: int = 1 << 40, durable: bool = True,
                 readonly: bool = False, reserve_bytes: int = 8 << 20) -> None:
        # readonly: beside a live writer in another process (LMDB serves readers of many processes); creates
        # nothing, and a write raises PermissionDenied.
        if readonly and not os.path.exists(os.path.join(path, "data.mdb")):
            raise NotFound(f"no memory bank in {os.path.dirname(path)}: {path}/data.mdb does not exist")
        if not readonly:
            os.makedirs(path, exist_ok=True)
        self.path = path
        self.readonly = readonly
        self.max_map_size = max_map_size
        self._gate = _Gate()
        self._write_lock = threading.Lock()
        self._advances = 0
        self.env = lmdb.open(
            path, map_size=min(map_size, max_map_size), max_dbs=len(DBS) + 1, max_readers=512,
            readahead=False, metasync=durable, sync=durable, lock=True, readonly=readonly,
        )
        # A reopened environment keeps its (possibly grown) map size: never shrink below the file.
        current = self.env.info()["map_size"]
        if current < min(map_size, max_map_size) and not readonly:
            self.env.set_mapsize(min(map_size, max_map_size))
        self._dbs = {name: self.env.open_db(name.encode()) for name in DBS}
        self.reserve = Reserve(os.path.join(path, RESERVE_FILE), 0 if readonly else reserve_bytes)
        self.reserve.refill()

    # -- reads -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reader(self) -> Iterator[Any]:
        if self.readonly:
            self._follow_growth()
        with self._gate.shared():
            with self.env.begin(buffers=True) as txn:
                yield self.reader_class(txn, self._dbs)

    def _follow_growth(self) -> None:
        """Read-only beside a writer: when its map has grown past ours, map the new size (LMDB refuses a read
        transaction with MDB_MAP_RESIZED until then)."""
        with self._gate.shared():
            try:
                self.env.begin().abort()
                return
            except lmdb.MapResizedError:
                pass
        with self._gate.exclusive():
            self.env.set_mapsize(0)  # 0: adopt the size the writer recorded

    # -- writes ----------------------------------------------------------------------------------
    def write(self, fn: Callable[[Writer], T], frees: bool = False) -> T:
        """Run `fn` in one write transaction; grow the map and rerun it if the map fills up.

        `frees`: the write frees space (a delete, drop, prune, or a put that evicts), so on a full disk it may
        use the reserve.
        `fn` must not change anything outside the transaction: it may run more than once.
        """
        if self.readonly:
            raise PermissionDenied(f"the bank in {os.path.dirname(self.path)} is open read-only; open it without "
                                   "read_only to write (only while no other process holds it)")
        with self._write_lock:
            advanced = released = False
            while True:
                try:
                    with self._gate.shared():
                        with self.env.begin(write=True, buffers=True) as txn:
                            result = fn(Writer(txn, self._dbs))
                    break
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.Error as exc:
                    if not is_disk_full(exc, self.path):
                        raise
                    if not advanced:  # pages the last commit freed become usable after one more commit
                        advanced = True
                        self.env.reader_check()  # a dead process's reader slot would pin freed pages
                        if self._advance():
                            continue
                    if frees and not released and self.reserve.release():
                        released = True
                        continue
                    raise ResourceExhausted(
                        f"disk full under {self.path}: the write was rolled back and the bank is unchanged; "
                        + ("even the space reserve did not make room for it; " if frees else
                           "delete entries or drop streams (they still work on a full disk), ")
                        + "free space or lower the stream budgets"
                    ) from None
            self._after_commit(frees, released)
            return result

    def _after_commit(self, frees: bool, released: bool) -> None:
        """Housekeeping after a commit; never raises (the caller's write is committed whatever happens here)."""
        try:
            if released or (frees and self.reserve.disk_low()):
                self._advance()  # so that the next write can reuse what this one freed
            self.reserve.refill()
        except Exception as exc:  # noqa: BLE001 - e.g. the filesystem went away: the next write reports it
            log.warning("full-disk reserve upkeep failed under %s: %s", self.path, exc)

    def _advance(self) -> bool:
        """Commit a one-key transaction (see the module docstring); False if even that found no room."""
        try:
            with self._gate.shared():
                with self.env.begin(write=True) as txn:
                    self._advances += 1
                    txn.put(b"advance", str(self._advances).encode(), db=self._dbs["meta"])
            return True
        except lmdb.MapFullError:
            return False  # the caller grows the map when its own write hits this
        except lmdb.Error as exc:
            if is_disk_full(exc, self.path):
                return False
            raise

    def _grow(self) -> None:
        size = self.env.info()["map_size"]
        if size >= self.max_map_size:
            raise ResourceExhausted(
                f"LMDB map is full at {size} bytes and max_map_size is {self.max_map_size}: the write was rolled "
                "back; raise bank.max_map_size, lower stream budgets, or prune"
            )
        with self._gate.exclusive():
            self.env.set_mapsize(min(size * 2, self.max_map_size))

    # -- housekeeping ----------------------------------------------------------------------------
    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def disk_bytes(self) -> int:
        """Bytes of the LMDB files (the full-disk reserve beside them is not counted)."""
        return sum(
            os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path)
            if f != RESERVE_FILE and os.path.isfile(os.path.join(self.path, f))
        )

    def close(self) -> None:
        self.env.close()


def as_bytes(arr: np.ndarray) -> memoryview:
    """A byte view of a C-contiguous array, no copy (ml_dtypes arrays cannot export a buffer directly)."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def back_to_back(arrays: Sequence[np.ndarray]) -> bytes | memoryview:
    """The bytes of `arrays` one after another: a view spanning them when they already lie so in memory (the layers
    of one raw entry, `codec.encode_layers`), else a joined copy. The view is valid while `arrays` are."""
    first = arrays[0]
    end = first.__array_interface__["data"][0]
    for a in arrays:
        if not a.flags.c_contiguous or a.__array_interface__["data"][0] != end:
            return b"".join(as_bytes(a) for a in arrays)
        end += a.nbytes
    start = first.__array_interface__["data"][0]
    # every byte from start to end belongs to one of `arrays`, which the caller holds while it uses the view
    return memoryview(np.lib.stride_tricks.as_strided(first.reshape(-1).view(np.uint8), (end - start,), (1,)))
