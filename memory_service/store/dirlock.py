"""DirLock: one writer per data directory, across processes.

Owns the file `LOCK` inside a data directory. Promises:
- `DirLock.acquire(data_dir)` takes an exclusive `flock` on it without waiting and writes the holder's PID
  into it; while one is held, every other acquire - in another process, or a second bank in this one -
  raises `Unavailable` naming the holder's PID, so two services never hand out the same entry ids;
- the lock lives exactly as long as its open file: `release()` (or the holder's death, even by SIGKILL)
  frees it, so a crashed service never leaves a stale lock behind (a PID left in the file means nothing);
  a child forked while it is held does not keep it (its copy of the descriptor is closed in the child);
- readers (`memflow-service inspect`, a read-only bank) take no lock: LMDB serves readers of many processes.
The file is never deleted: unlinking it while another process waits on it would let two holders lock two
different files of the same name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import weakref
from typing import Optional

from memory_service.errors import Unavailable

LOCK_NAME = "LOCK"
_HELD: "weakref.WeakSet[DirLock]" = weakref.WeakSet()


class DirLock:
    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: Optional[int] = fd

    @classmethod
    def acquire(cls, data_dir: str) -> "DirLock":
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.join(data_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise Unavailable(
                f"data directory {data_dir} is in use by {_holder(path)} (it holds {path}); stop that "
                "process first, or give this one another --data-dir (`memflow-service inspect` can read it "
                "while it runs)"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk: the PID only names the holder in messages; the lock is held all the same
            pass  # (a bank must open on a full disk: deletes and drops are how its space is freed)
        lock = cls(path, fd)
        _HELD.add(lock)
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Free the lock; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # the PID would name a process that no longer holds anything
        except OSError:
            pass
        os.close(fd)  # closing the only descriptor of the open file drops the flock

    def __del__(self) -> None:  # a bank dropped unclosed (or failing in __init__) frees the directory with LMDB
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown; the process's exit frees the lock anyway
            pass

    def _forget_in_child(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the child's copy only: the parent's descriptor keeps the lock, its PID stays written


def _after_fork_in_child() -> None:
    # flock belongs to the open file, which a fork shares: a child outliving the bank would hold the lock
    for lock in list(_HELD):
        lock._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _holder(path: str) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read(64).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"process {text}" if text.isdigit() else "another process (its PID is not written yet)"
