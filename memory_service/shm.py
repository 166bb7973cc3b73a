"""Shared-memory segments for the same-host data plane (DESIGN.md "Control plane and data plane").

Owns the two halves of an arena:
- `Arena` (client side): a POSIX shared-memory segment the client creates, pre-faults once (first-touch
  page faults make a fresh segment several times slower than a warm one) and reuses for every call. Space
  is handed out as leases: `lease(nbytes)` returns a writable buffer object whose lifetime is the lease, so a
  numpy array built on it (and every view of that array) keeps its bytes reserved, and the bytes go back to
  the arena when the last array over them is garbage-collected. Fetch results are such arrays: zero copy
  to the caller, never overwritten under them.
- Two kinds of segment. A sealed memfd (Linux, the default): its size is sealed (`F_SEAL_SHRINK |
  F_SEAL_GROW | F_SEAL_SEAL`), so no one - the client included - can ever shrink it, and the service opens
  it through /proc/<client pid>/fd/<fd> (its name on the wire is `memfd:<pid>:<fd>`). A POSIX segment
  (/dev/shm, `shm_open`): the fallback where the service cannot reach the client's descriptors (another PID
  namespace) or memfds do not exist.
- `ClientSegment` (service side): a client's segment, opened without adopting it. The service only maps a
  segment whose size the kernel says is sealed against shrinking (it asks with F_GET_SEALS itself; a name or
  a flag from the client proves nothing): copies into and out of that mapping are plain memcpy. Any other
  segment is never mapped, because the client may shrink (`ftruncate`) it at any moment and a mapping touched
  past the new end raises SIGBUS, killing the whole service, and no size check before the copy can close
  that race. Its bytes move with `preadv` / `pwrite` on the descriptor instead: a read past the end comes
  back short (a clear FailedPrecondition), a write past it only extends the client's own file. Either way
  the service never faults on memory a client controls. A put through such a segment reads the client's
  bytes into a private buffer first (one extra copy).
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import functools
import mmap
import os
import secrets
import stat
import threading
import weakref
from multiprocessing import shared_memory
from typing import Optional

import numpy as np

from memory_service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

ALIGN = 4096
NONCE_BYTES = 16


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Segment(shared_memory.SharedMemory):
    """A SharedMemory whose finalizer tolerates arrays that still view it (they keep the mapping alive)."""

    def __del__(self) -> None:
        try:
            self.close()
        except BufferError:
            pass


_MAX_IO = 1 << 30  # bytes per preadv / pwrite call (Linux moves at most ~2 GiB per call anyway)


MEMFD_PREFIX = "memfd:"
# Every arena memfd has this name; the service accepts no other, so a client cannot make it open some other
# program's memfd (a sealed one with a guessable first 16 bytes) and read or write it on the client's behalf.
MEMFD_NAME = "memflow-arena"
# Linux only (as memfds are); elsewhere every segment is a POSIX one, moved by preadv / pwrite
_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0)
_SEALS = _SEAL_SHRINK | getattr(fcntl, "F_SEAL_GROW", 0) | getattr(fcntl, "F_SEAL_SEAL", 0)


class MemfdSegment:
    """The client side of a sealed memfd arena: created, sized, sealed and mapped here; `buf` as SharedMemory's."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self._mmap: Optional[mmap.mmap] = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.buf: Optional[memoryview] = memoryview(self._mmap)
        self.size = size
        self.name = f"{MEMFD_PREFIX}{os.getpid()}:{self.fd}"

    def unlink(self) -> None:
        """Nothing to unlink: the segment goes away with its last descriptor and mapping."""

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()  # BufferError while arrays still view it (then again at garbage collection)
            self.buf = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except BufferError:
            pass


def _memfd_path(name: str) -> str:
    pid, _, fd = name[len(MEMFD_PREFIX):].partition(":")
    if not (pid.isdigit() and fd.isdigit()) or len(pid) > 10 or len(fd) > 10:
        raise InvalidArgument(f"shared-memory segment name {name!r} is malformed; expected {MEMFD_PREFIX}<pid>:<fd>")
    return f"/proc/{int(pid)}/fd/{int(fd)}"


def _open_memfd(name: str) -> int:
    path = _memfd_path(name)
    # Any descriptor of any process the service may open: only a sealed memfd holding the client's nonce is
    # accepted after this (ClientSegment, ArenaRegistry.register), never a file such as the bank's own.
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FailedPrecondition(
            f"memfd segment {name!r} is not visible to the service (another host or PID namespace?); expected a "
            "segment on the service's host: use a POSIX segment (/dev/shm) or the stream data plane"
        ) from None
    except PermissionError as exc:
        raise FailedPrecondition(f"the service may not open memfd segment {name!r} ({exc}); use a POSIX segment "
                                 "(/dev/shm) or the stream data plane") from None
    except OSError as exc:  # the pid's descriptor is a socket or the like: not the client's (another PID namespace?)
        raise FailedPrecondition(f"memfd segment {name!r} cannot be opened by the service ({exc}): it is not the "
                                 "client's segment (another PID namespace?); use a POSIX segment (/dev/shm) or the "
                                 "stream data plane") from None


def _open_posix(name: str) -> int:
    try:
        import _posixshmem  # the module SharedMemory itself opens segments with

        return _posixshmem.shm_open("/" + name.lstrip("/"), os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        raise FailedPrecondition(
            f"shared-memory segment {name!r} is not visible to the service (another host or /dev/shm "
            "namespace?); expected a segment on the service's host, or use the stream data plane"
        ) from None
    except PermissionError as exc:
        raise FailedPrecondition(f"the service may not open shared-memory segment {name!r} ({exc}); expected a "
                                 "segment the service's user can read and write, or use the stream data plane") from None
    except (OSError, ValueError) as exc:  # a name the OS refuses (EINVAL, ENAMETOOLONG, a directory ...)
        raise InvalidArgument(f"shared-memory segment {name!r} cannot be opened: {exc}; expected the name of a "
                              "segment the client created") from None


def _sealed_against_shrinking(fd: int) -> Optional[bool]:
    """Whether the kernel forbids shrinking the file; None when it is no shared-memory file at all."""
    if not hasattr(fcntl, "F_GET_SEALS"):
        return False
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEAL_SHRINK)
    except OSError:  # EINVAL: not a tmpfs / memfd file
        return None


def _is_arena_memfd(fd: int) -> bool:
    """Whether our own descriptor `fd` is a memfd named MEMFD_NAME (asked of the file we hold: no race)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{MEMFD_NAME} ")
    except OSError:
        return False


class ClientSegment:
    """The service's handle on a client's segment (see the module doc): mapped only when sealed, else a descriptor."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._mmap: Optional[mmap.mmap] = None
        memfd = name.startswith(MEMFD_PREFIX)
        self._owner = _memfd_path(name) if memfd else None  # where the client holds it
        self.fd = _open_memfd(name) if memfd else _open_posix(name)
        try:
            st = os.fstat(self.fd)
            sealed = _sealed_against_shrinking(self.fd)
        except OSError as exc:  # pragma: no cover - fstat of a descriptor just opened
            self.close()
            raise InvalidArgument(f"shared-memory segment {name!r} cannot be examined: {exc}") from None
        if memfd and not (stat.S_ISREG(st.st_mode) and sealed and _is_arena_memfd(self.fd)):
            self.close()  # not what a client of this host would have named (another PID namespace?)
            raise FailedPrecondition(f"segment {name!r} seen by the service is not a memfd named {MEMFD_NAME!r} "
                                     "sealed against shrinking (F_SEAL_SHRINK); expected the client's sealed arena, "
                                     "or use a POSIX segment (/dev/shm) or the stream data plane")
        if not stat.S_ISREG(st.st_mode) or sealed is None:
            self.close()
            raise InvalidArgument(f"shared-memory segment {name!r} is not a shared-memory object")
        self.sealed = bool(sealed)

    def size(self) -> int:
        """The segment's size now (an unsealed one may change the next moment; nothing relies on it)."""
        return os.fstat(self.fd).st_size

    def map(self, size: int) -> None:
        """Map the first `size` bytes; only for a segment sealed against shrinking, whose pages can never vanish."""
        assert self.sealed, "an unsealed segment is never mapped"
        self._mmap = mmap.mmap(self.fd, size)

    def view(self, offset: int, nbytes: int) -> Optional[np.ndarray]:
        """A writable uint8 view of a mapped segment (None when it is not mapped: use its descriptor)."""
        if self._mmap is None:
            return None
        return np.frombuffer(self._mmap, np.uint8, count=nbytes, offset=offset)

    def orphaned(self) -> bool:
        """Whether the client let the segment go without releasing it (it died): a memfd its process no longer
        holds, a POSIX segment whose name is unlinked (a client's close, or its resource tracker at its death)."""
        try:
            st = os.fstat(self.fd)
            if self._owner is None:
                return st.st_nlink == 0
            there = os.stat(self._owner)  # the same file still open in that process (not a reused pid or fd)?
            return (there.st_dev, there.st_ino) != (st.st_dev, st.st_ino)
        except OSError:
            return True

    def dup(self) -> int:
        """A descriptor of its own for one request, so a concurrent release cannot close it under the request."""
        return os.dup(self.fd)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a request still views it; the mapping ends with the view
                pass
            self._mmap = None
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def read_exact(fd: int, offset: int, nbytes: int, what: str) -> np.ndarray:
    """`nbytes` of the segment at `offset`, copied into a fresh buffer; FailedPrecondition when it is shorter."""
    buf = np.empty(nbytes, np.uint8)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        try:
            n = os.preadv(fd, [view[got:got + _MAX_IO]], offset + got)
        except OSError as exc:
            raise FailedPrecondition(f"cannot read {what}: {exc}") from None
        if n == 0:
            raise FailedPrecondition(f"{what} ends at byte {offset + got} of the segment: the arena is smaller than "
                                     f"the range asked [{offset}, {offset + nbytes}) (was it truncated?)")
        got += n
    return buf


def write_all(fd: int, offset: int, data: memoryview, what: str) -> None:
    """Write all of `data` at `offset` (a write past the end only extends the client's own segment)."""
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    while done < len(data):
        try:
            done += os.pwrite(fd, data[done:done + _MAX_IO], offset + done)
        except OSError as exc:  # ENOSPC of /dev/shm, EFBIG
            raise FailedPrecondition(f"cannot write {what}: {exc}") from None


@functools.lru_cache(maxsize=256)
def _region_type(nbytes: int) -> type:
    # A Python subclass of a ctypes array accepts weak references, which is what ties a lease to the
    # lifetime of the arrays built on it (numpy keeps the buffer provider alive as `base`).
    return type(f"Region{nbytes}", (ctypes.c_ubyte * nbytes,), {})


class Arena:
    """A client-owned, pre-faulted shared-memory segment with a first-fit lease allocator."""

    def __init__(self, size: int, prefault: bool = True, sealed: bool = True) -> None:
        """`sealed`: a sealed memfd where the OS has them (the service maps it: memcpy speed), else POSIX."""
        if size < ALIGN:
            raise InvalidArgument(f"arena size {size} is below the minimum of {ALIGN} bytes")
        self.size = _align(size)
        self.segment: "MemfdSegment | Segment"
        try:
            self.segment = MemfdSegment(self.size) if sealed and hasattr(os, "memfd_create") and _SEALS else \
                Segment(create=True, size=self.size)
        except OSError as exc:
            raise ResourceExhausted(f"cannot create a {self.size}-byte shared-memory arena: {exc}") from None
        self.name = self.segment.name
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        buf = np.frombuffer(self.segment.buf, np.uint8)
        if prefault:
            buf.fill(0)  # touch every page once, here, instead of inside the first fetch
        buf[:NONCE_BYTES] = np.frombuffer(self.nonce, np.uint8)
        self._base = buf.__array_interface__["data"][0]
        del buf
        self._lock = threading.RLock()
        self._free: list[tuple[int, int]] = [(ALIGN, self.size - ALIGN)]  # (offset, size), sorted; page 0 = nonce
        self.live = 0
        self._closed = False

    def __len__(self) -> int:
        return self.size

    def lease(self, nbytes: int) -> Optional[tuple[int, object]]:
        """(offset, buffer) of `nbytes` reserved bytes, or None when no free run is large enough."""
        want = _align(max(1, nbytes))
        with self._lock:
            for i, (off, size) in enumerate(self._free):
                if size >= want:
                    if size == want:
                        del self._free[i]
                    else:
                        self._free[i] = (off + want, size - want)
                    region = _region_type(nbytes).from_buffer(self.segment.buf, off)
                    weakref.finalize(region, self._release, off, want)
                    self.live += 1
                    return off, region
        return None

    def _release(self, off: int, size: int) -> None:
        with self._lock:
            self.live -= 1
            i = bisect.bisect(self._free, (off, size))
            self._free.insert(i, (off, size))
            # merge with the right and then the left neighbour
            if i + 1 < len(self._free) and off + size == self._free[i + 1][0]:
                self._free[i] = (off, size + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
                self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
                del self._free[i]

    def contains(self, arr: np.ndarray) -> Optional[int]:
        """The arena offset of `arr` when its bytes lie inside this arena (C-contiguous), else None."""
        if not arr.flags.c_contiguous:
            return None
        start = arr.__array_interface__["data"][0]
        if self._base <= start and start + arr.nbytes <= self._base + self.size:
            return start - self._base
        return None

    def close(self) -> None:
        """Unlink the segment; unmap it now unless leases still hold arrays over it (then at their end)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.segment.unlink()
        except FileNotFoundError:
            pass
        try:
            self.segment.close()
        except BufferError:
            pass  # live arrays still view it; the mapping goes away with them

