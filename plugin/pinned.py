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
- a registration never outlives its mapping where it could be mistaken for another: mappings the client has
  closed are unregistered (`sweep`) before any new registration and before any array is judged, so an array
  of a new arena that the OS placed at a closed one's address is never taken for pinned (a copy from it then
  goes through pinned staging, read by the CPU through the live page tables). While a copy reads an arena, the
  fetched arrays it reads are held (kv_slots.py), and with them the client's lease: the client never closes
  an arena a lease holds;
- without CUDA, or with a registration refused, `direct(arr)` is False and nothing is registered.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
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


class ArenaPins:
    """Registrations of shared-memory arenas with CUDA, inside a budget (see module docstring).

    `register(ptr, size) -> ok` / `unregister(ptr) -> ok` default to the CUDA runtime through torch; `device`
    (the cache's) is made current around them, so a thread that never used CUDA (the memory thread) does not
    create a context on cuda:0 for a cache on cuda:1.
    """

    def __init__(self, budget: PinnedBudget, register: Callable[[int, int], bool] = _cuda_register,
                 unregister: Callable[[int], bool] = _cuda_unregister,
                 device: Optional[torch.device] = None) -> None:
        self.budget = budget
        self._device = device if device is not None and torch.device(device).type == "cuda" else None
        self._register, self._unregister = register, unregister
        self._maps: dict[int, tuple[mmap.mmap, int, int]] = {}  # id(mapping) -> (mapping, base address, size)
        self._refused: set[int] = set()  # id(mapping) of mappings that could not be registered
        self._refused_maps: list[mmap.mmap] = []  # kept so their ids are not reused while in `_refused`
        self._lock = threading.Lock()
        self._closed = False
        self.registered = self.unregistered = self.refused = 0

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
            if id(mm) in self._maps:
                return True
            if id(mm) in self._refused:
                return False
            view = np.frombuffer(mm, np.uint8)  # a short-lived export: the mapping's address and size
            base, size = view.__array_interface__["data"][0], view.nbytes
            del view
            ok = self.budget.reserve(size)
            if ok:
                try:
                    with self._on_device():
                        ok = self._register(base, size)
                except Exception as exc:  # noqa: BLE001 - no CUDA runtime, a driver refusal: copy through staging
                    log.warning("memflow: cannot pin the shared-memory arena (%s); fetches go through staging", exc)
                    ok = False
                if not ok:
                    self.budget.release(size)
            if not ok:
                self.refused += 1
                self._refused.add(id(mm))
                self._refused_maps.append(mm)
                return False
            self.registered += 1
            self._maps[id(mm)] = (mm, base, size)
            return True

    def _on_device(self) -> Any:
        return torch.cuda.device(self._device) if self._device is not None else contextlib.nullcontext()

    def sweep(self) -> None:
        with self._lock:
            self._sweep()

    def _sweep(self) -> None:
        """Under the lock: unregister the arenas the client has closed (their mappings are gone)."""
        for key, (mm, base, size) in list(self._maps.items()):
            if mm.closed:
                self._drop(key, base, size)
        if any(m.closed for m in self._refused_maps):
            self._refused_maps = [m for m in self._refused_maps if not m.closed]
            self._refused = {id(m) for m in self._refused_maps}

    def _drop(self, key: int, base: int, size: int) -> None:
        del self._maps[key]
        try:
            with self._on_device():
                self._unregister(base)
        except Exception as exc:  # noqa: BLE001 - the runtime is gone (interpreter exit): nothing left to undo
            log.debug("memflow: cudaHostUnregister failed: %s", exc)
        self.budget.release(size)
        self.unregistered += 1

    def close(self) -> None:
        """Unregister everything (the caller has waited for the copies reading the arenas)."""
        with self._lock:
            self._closed = True
            for key, (_, base, size) in list(self._maps.items()):
                self._drop(key, base, size)
            self._refused_maps, self._refused = [], set()
