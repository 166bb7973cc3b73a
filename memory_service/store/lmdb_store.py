"""LMDB tensor store: the bank's source of truth on disk.

Owns one LMDB environment per data directory with named databases:
    streams  name -> stream record (JSON: id, spec, counters)
    entries  sid|eid -> entry metadata (JSON)          stats  sid|eid -> retrieval statistics (JSON)
    keys     sid|space|eid -> key vectors (raw floats) phead  sid|eid|layer -> payload header
    pbody    sid|eid|layer -> payload body (raw bytes, one value per layer so fetches can pick layers)
Promises: a `write` is one LMDB transaction (all of it is visible after it returns, none of it before,
and it survives `kill -9` once committed); the map grows by doubling when full, only while no reader is
inside (the gate), up to `max_map_size`; past that, or on a full disk, writes raise ResourceExhausted
and every committed record stays readable. Reads hand out buffers straight from the memory map.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import threading
from typing import Any, Callable, Iterator, Optional, TypeVar

import lmdb
import numpy as np

from memory_service.errors import ResourceExhausted
from memory_service.store.codec import Header

T = TypeVar("T")
DBS = ("streams", "entries", "stats", "keys", "phead", "pbody", "meta")
_SID = struct.Struct(">I")
_SID_EID = struct.Struct(">IQ")
_SID_SPACE_EID = struct.Struct(">IBQ")
_SID_EID_LAYER = struct.Struct(">IQH")


def entry_key(sid: int, eid: int) -> bytes:
    return _SID_EID.pack(sid, eid)


def keys_key(sid: int, space: int, eid: int) -> bytes:
    return _SID_SPACE_EID.pack(sid, space, eid)


def payload_key(sid: int, eid: int, layer: int) -> bytes:
    return _SID_EID_LAYER.pack(sid, eid, layer)


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
    """The operations of one write transaction (handed to the function given to `LMDBStore.write`)."""

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

    def put_payload(self, sid: int, eid: int, layer: int, header: Header, body: np.ndarray) -> None:
        key = payload_key(sid, eid, layer)
        self.put("phead", key, header.pack())
        self.put("pbody", key, as_bytes(body))

    def delete_entry(self, sid: int, eid: int, spaces: int, layers: int) -> None:
        self.delete("entries", entry_key(sid, eid))
        self.delete("stats", entry_key(sid, eid))
        for s in range(spaces):
            self.delete("keys", keys_key(sid, s, eid))
        for layer in range(layers):
            self.delete("phead", payload_key(sid, eid, layer))
            self.delete("pbody", payload_key(sid, eid, layer))


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

    def payload(self, sid: int, eid: int, layer: int) -> Optional[tuple[Header, memoryview]]:
        key = payload_key(sid, eid, layer)
        head = self.get("phead", key)
        if head is None:
            return None
        return Header.unpack(head), self.get("pbody", key)


class LMDBStore:
    """The one `TensorStore` implementation: an LMDB environment in `path`."""

    def __init__(self, path: str, map_size: int = 1 << 30, max_map_size: int = 1 << 40, durable: bool = True) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.max_map_size = max_map_size
        self._gate = _Gate()
        self._write_lock = threading.Lock()
        self.env = lmdb.open(
            path, map_size=min(map_size, max_map_size), max_dbs=len(DBS) + 1, max_readers=512,
            readahead=False, metasync=durable, sync=durable, lock=True,
        )
        # A reopened environment keeps its (possibly grown) map size: never shrink below the file.
        current = self.env.info()["map_size"]
        if current < min(map_size, max_map_size):
            self.env.set_mapsize(min(map_size, max_map_size))
        self._dbs = {name: self.env.open_db(name.encode()) for name in DBS}

    # -- reads -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reader(self) -> Iterator[Reader]:
        with self._gate.shared():
            with self.env.begin(buffers=True) as txn:
                yield Reader(txn, self._dbs)

    # -- writes ----------------------------------------------------------------------------------
    def write(self, fn: Callable[[Writer], T]) -> T:
        """Run `fn` in one write transaction; grow the map and rerun it if the map fills up.

        `fn` must not change anything outside the transaction: it may run more than once.
        """
        with self._write_lock:
            while True:
                try:
                    with self._gate.shared():
                        with self.env.begin(write=True, buffers=True) as txn:
                            return fn(Writer(txn, self._dbs))
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.Error as exc:
                    if _is_disk_full(exc, self.path):
                        raise ResourceExhausted(
                            f"disk full under {self.path}: the write was rolled back and the bank is unchanged; "
                            "free space or lower the stream budgets"
                        ) from None
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
        return sum(
            os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path)
            if os.path.isfile(os.path.join(self.path, f))
        )

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        self.env.close()


def _is_disk_full(exc: lmdb.Error, path: str) -> bool:
    """ENOSPC, or EIO on a nearly full filesystem: LMDB reports a short page write as EIO."""
    text = str(exc)
    if "No space left" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return True
    if "Input/output error" in text or getattr(exc, "errno", None) == errno.EIO:
        usage = shutil.disk_usage(path)
        return usage.free < max(64 << 20, usage.total // 100)
    return False


def as_bytes(arr: np.ndarray) -> memoryview:
    """A byte view of a C-contiguous array, no copy (ml_dtypes arrays cannot export a buffer directly)."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def loads(buf: bytes | memoryview) -> Any:
    return json.loads(bytes(buf))
