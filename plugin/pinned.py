"""Page-locked host memory of one plugin: a bounded budget, and the client's shared-memory arenas registered with CUDA.

Owns every byte of pinned host memory a plugin holds. Promises:
- `PinnedBudget(limit)`: what is reserved never exceeds `limit` bytes (thread-safe). A refused reservation is
  counted and its caller goes on with pageable memory (slower copies, the same results), never an error;
- `host_buffer`: a host tensor, pinned (inside the budget) when asked and possible, else pageable;
- `ArenaPins`: a fetch over the shared-memory plane returns arrays that view the client's arena. The first
  time an arena is seen, its whole mapping is registered with `cudaHostRegister` (portable: pinned for every
  device's context, so a cache on cuda:1 reads it by DMA too), inside the budget, so host-to-device copies read
  the fetched frames where the service wrote them: one host copy on the whole path (bank -> arena). Nothing
  in memory_service is touched: the mapping is found from the array itself (its buffer chain ends at the
  arena's `mmap`), and a registration is keyed by that mapping object, never by an address;
- one `ArenaPins` per memory client (`ArenaPins.shared(memory, ...)`, counted by its users): the plugins of a
  batch, or several plugins over one client, register each arena once (CUDA refuses a second registration of
  the same pages) and count it once, in the budget of the plugin that made it;
- a registration holds its mapping only weakly: an arena the client lets go (closed, or dropped once the last
  array viewing it died) is never kept mapped by the plugin. A registration never outlives its mapping where
  it could be mistaken for another: mappings that are closed or gone are unregistered (`sweep`) before any new
  registration and before any array is judged, so an array of a new arena that the OS placed at an old one's
  address is never taken for pinned (a copy from it then goes through pinned staging, read by the CPU through
  the live page tables). While a copy reads an arena, the fetched arrays it reads are held (kv_slots.py), and
  with them the client's lease: the client never closes an arena a lease holds;
- a refused `cudaHostRegister` / `cudaHostUnregister` leaves its error as the CUDA runtime's "last error" of
  that thread, which the next kernel launch on the thread would report as its own (torch checks
  `cudaGetLastError` after every launch): it is consumed at once (`errors_cleared`) and the arena is copied
  through staging instead (`refused`), never an error for the generator;
- without CUDA, or with a registration refused, `direct(arr)` is False and nothing is registered.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
import weakref
from typing import Any, Callable, Optional

import numpy as np
import torch

log = logging.getLogger("memflow.plugin")
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable


class PinnedBudget:
    """At most `limit` bytes of pinned host memory for one plugin (see module docstring)."""

    def __init__(self, limit: int) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"pinned memory budget must be an int >= 0 bytes, got {limit!r}")
        self.limit = limit
        self.used = 0
        self.refused = 0  # reservations refused (their memory stayed pageable)
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit:
                self.refused += 1
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            if nbytes > self.used:
                raise RuntimeError(f"releasing {nbytes} pinned bytes, only {self.used} are reserved")
            self.used -= nbytes


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, pin: bool,
                budget: Optional[PinnedBudget]) -> tuple[torch.Tensor, int]:
    """(host tensor, pinned bytes it holds): pinned when `pin` and the budget allows, else pageable (0 bytes)."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if pin and budget is not None and budget.reserve(nbytes):
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True), nbytes
        except RuntimeError as exc:  # the driver refused (locked-memory limit): pageable, and say so once
            budget.release(nbytes)
            log.warning("memflow: %d bytes of pinned host memory refused by the driver (%s); using pageable memory",
                        nbytes, exc)
    return torch.empty(shape, dtype=dtype), 0


def backing_mmap(arr: np.ndarray) -> Optional[mmap.mmap]:
    """The `mmap` whose memory `arr` views (a shared-memory fetch result), or None."""
    obj: object = arr
    for _ in range(32):
        if isinstance(obj, mmap.mmap):
            return obj
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        elif isinstance(obj, torch.Tensor):
            return None
        else:  # a ctypes region made with from_buffer keeps its source memoryview in `_objects`
            kept = getattr(obj, "_objects", None)
            views = [v for v in kept.values() if isinstance(v, memoryview)] if isinstance(kept, dict) else []
            if not views:
                return None
            obj = views[0]
        if obj is None:
            return None
    return None


def _cuda_register(ptr: int, size: int) -> bool:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, size, HOST_REGISTER_PORTABLE)) == 0


def _cuda_unregister(ptr: int) -> bool:
    return int(torch.cuda.cudart().cudaHostUnregister(ptr)) == 0


def _cuda_clear_error() -> bool:
    """Consume this thread's pending CUDA "last error" (left by a failed runtime call); True once it is clear.

    torch exposes no `cudaGetLastError`, but its launch check after every kernel calls it, which reads and resets
    the error: the first tiny launch raises the stale error (consumed), a second one then succeeds.
    """
    for _ in range(2):
        try:
            torch.ones(1, device=torch.device("cuda", torch.cuda.current_device()))  # one fill kernel
            return True
        except RuntimeError:
            continue
    return False


class ArenaPins:
    """Registrations of shared-memory arenas with CUDA, inside a budget (see module docstring).

    `register(ptr, size) -> ok` / `unregister(ptr) -> ok` default to the CUDA runtime through torch, and
    `clear_error() -> ok` to consuming the runtime's pending error after either failed; `device` (the cache's) is
    made current around them, so a thread that never used CUDA (the memory thread) does not create a context on
    cuda:0 for a cache on cuda:1. `ArenaPins.shared(memory, budget, device)` is the one instance of a client.
    """

    def __init__(self, budget: PinnedBudget, register: Callable[[int, int], bool] = _cuda_register,
                 unregister: Callable[[int], bool] = _cuda_unregister,
                 device: Optional[torch.device] = None,
                 clear_error: Callable[[], bool] = _cuda_clear_error) -> None:
        self.budget = budget
        self._device = device if device is not None and torch.device(device).type == "cuda" else None
        self._register, self._unregister, self._clear_error = register, unregister, clear_error
        # id(mapping) -> (weak reference to it, base address, size): the mapping's life is the client's to end
        self._maps: dict[int, tuple[weakref.ref, int, int]] = {}
        self._refused: dict[int, weakref.ref] = {}  # id(mapping) -> mapping that could not be registered
        self._lock = threading.Lock()
        self._closed = False
        self._users = 1
        self.registered = self.unregistered = self.refused = self.errors_cleared = 0

    @classmethod
    def shared(cls, memory: object, budget: PinnedBudget, device: Optional[torch.device] = None) -> "ArenaPins":
        """The `ArenaPins` of memory client `memory` (made with `budget` and `device` by its first user): one more
        user, each of which calls `close()` once; the last one's close unregisters everything."""
        with _SHARED_LOCK:
            try:
                pins = _SHARED.get(memory)
            except TypeError:  # a memory object that takes no weak reference: a private instance
                return cls(budget, device=device)
            if pins is not None and not pins._closed:
                with pins._lock:
                    pins._users += 1
                return pins
            pins = cls(budget, device=device)
            _SHARED[memory] = pins
            return pins

    @property
    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(size for _, _, size in self._maps.values())

    def direct(self, arr: np.ndarray) -> bool:
        """Whether a host-to-device copy may read `arr` in place by DMA: it views a registered, open arena."""
        mm = backing_mmap(arr)
        if mm is None:
            return False
        with self._lock:
            if self._closed:  # a stage still running on the memory thread after the plugin closed
                return False
            self._sweep()
            entry = self._maps.get(id(mm))
            if entry is not None and entry[0]() is mm:
                return True
            refused = self._refused.get(id(mm))
            if refused is not None and refused() is mm:
                return False
            view = np.frombuffer(mm, np.uint8)  # a short-lived export: the mapping's address and size
            base, size = view.__array_interface__["data"][0], view.nbytes
            del view
            ok = self.budget.reserve(size)
            if ok:
                try:
                    with self._on_device():
                        ok = self._register(base, size)
                        if not ok:
                            self._cleared()
                except Exception as exc:  # noqa: BLE001 - no CUDA runtime, a driver refusal: copy through staging
                    log.warning("memflow: cannot pin the shared-memory arena (%s); fetches go through staging", exc)
                    ok = False
                if not ok:
                    self.budget.release(size)
            if not ok:
                self.refused += 1
                self._refused[id(mm)] = weakref.ref(mm)
                return False
            self.registered += 1
            self._maps[id(mm)] = (weakref.ref(mm), base, size)
            return True

    def _cleared(self) -> None:
        """Under the lock, device current: a runtime call failed; consume the error it left for this thread."""
        if self._clear_error():
            self.errors_cleared += 1
        else:
            log.warning("memflow: a CUDA error left by a failed host (un)registration could not be cleared")

    def _on_device(self) -> Any:
        return torch.cuda.device(self._device) if self._device is not None else contextlib.nullcontext()

    def sweep(self) -> None:
        with self._lock:
            self._sweep()

    def _sweep(self) -> None:
        """Under the lock: unregister the arenas the client has closed or let go (their mappings are gone)."""
        for key, (ref, base, size) in list(self._maps.items()):
            mm = ref()
            if mm is None or mm.closed:
                self._drop(key, base, size)
        for key, ref in list(self._refused.items()):
            mm = ref()
            if mm is None or mm.closed:
                del self._refused[key]

    def _drop(self, key: int, base: int, size: int) -> None:
        del self._maps[key]
        try:
            with self._on_device():
                if not self._unregister(base):
                    self._cleared()
        except Exception as exc:  # noqa: BLE001 - the runtime is gone (interpreter exit): nothing left to undo
            log.debug("memflow: cudaHostUnregister failed: %s", exc)
        self.budget.release(size)
        self.unregistered += 1

    def close(self) -> None:
        """One user is done; the last one unregisters everything (its callers waited for the copies reading
        the arenas)."""
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._closed:
                return
            self._closed = True
            for key, (_, base, size) in list(self._maps.items()):
                self._drop(key, base, size)
            self._refused = {}


_SHARED: "weakref.WeakKeyDictionary[object, ArenaPins]" = weakref.WeakKeyDictionary()  # memory client -> its pins
_SHARED_LOCK = threading.Lock()
