"""The full-disk reserve: disk space held back so that writes which free space still commit on a full disk.

Owns the file `reserve` beside a store's files and the test for "this error means the disk is full".
"""

from __future__ import annotations

import errno
import os
import shutil

RESERVE_FILE = "reserve"


class Reserve:
    """Disk space held back for writes that free space: a file of real blocks (fallocate, else zeros).

    Its size is `target` bytes, at most 1/16 of the filesystem; `release` empties it, `refill` grows it back as
    far as free space allows (a partial reserve is better than none). Only the write lock's holder calls it.
    """

    CHUNK = 64 << 10

    def __init__(self, path: str, target: int) -> None:
        self.path = path
        try:
            total = shutil.disk_usage(os.path.dirname(path)).total
        except OSError:
            total = 0
        self.target = max(0, min(int(target), total // 16)) // 4096 * 4096
        self.size = os.path.getsize(path) if os.path.exists(path) else 0

    def disk_low(self) -> bool:
        return shutil.disk_usage(os.path.dirname(self.path)).free < max(2 * self.target, 4 << 20)

    def release(self) -> bool:
        if self.size == 0:
            return False
        os.truncate(self.path, 0)
        self.size = 0
        return True

    def refill(self) -> None:
        if self.size >= self.target or shutil.disk_usage(os.path.dirname(self.path)).free < 4096:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            try:
                os.posix_fallocate(fd, self.size, self.target - self.size)
                self.size = self.target
            except OSError:  # ENOSPC, or a filesystem without fallocate: zeros, chunk by chunk, while they fit
                os.ftruncate(fd, self.size)
                zeros = bytes(self.CHUNK)
                while self.size < self.target:
                    try:
                        n = os.pwrite(fd, zeros[: min(self.CHUNK, self.target - self.size)], self.size)
                    except OSError:
                        break
                    if n <= 0:
                        break
                    self.size += n
                os.ftruncate(fd, self.size)
            os.fsync(fd)
        except OSError:
            pass  # the reserve is best effort; the disk may be full right now
        finally:
            os.close(fd)


def is_disk_full(exc: Exception, path: str) -> bool:
    """ENOSPC, or EIO on a nearly full filesystem: LMDB reports a short page write as EIO."""
    text = str(exc)
    if "No space left" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return True
    if "Input/output error" in text or getattr(exc, "errno", None) == errno.EIO:
        usage = shutil.disk_usage(path)
        return usage.free < max(64 << 20, usage.total // 100)
    return False
