"""Fail-open: memory calls run on a daemon thread, awaited for at most a deadline.

Owns the promise that the generator never crashes or stalls because of memory. Every read the plugin makes
runs as a task on one daemon worker thread; the generator waits for a task no longer than its deadline.
A task that raises (any exception: the memory object is a `LocalMemory` or a `MemoryClient`, closed,
unreachable or broken) or misses its deadline makes the chunk memory-free. A task still running past its
deadline marks the worker stuck: later chunks do not queue behind it, they skip memory until it returns.
Failures are counted; each outage episode (failures until the next success) is logged once when it starts
and once when it ends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Any, Callable, Optional

log = logging.getLogger("memflow.plugin")


class Guard:
    def __init__(self, name: str = "memflow-memory") -> None:
        self._tasks: "queue.SimpleQueue[Optional[tuple[Callable[[], Any], Future]]]" = queue.SimpleQueue()
        self._running_since: Optional[float] = None
        self._outstanding = 0  # submitted and not finished (queued + running)
        self._lock = threading.Lock()
        self.failures = 0
        self.episodes = 0
        self._episode: dict[str, int] = {}  # what -> failures in the current outage episode
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            fn, fut = task
            try:
                if not fut.set_running_or_notify_cancel():
                    continue
                self._running_since = time.monotonic()
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - every failure of memory is the caller's fallback
                    fut.set_exception(exc)
            finally:
                self._running_since = None
                with self._lock:
                    self._outstanding -= 1

    def submit(self, fn: Callable[[], Any], limit: Optional[int] = None) -> Optional[Future]:
        """Queue `fn`; None (nothing queued) when `limit` tasks are already outstanding: a memory slower
        than the generator must not grow a backlog."""
        with self._lock:
            if limit is not None and self._outstanding >= limit:
                return None
            self._outstanding += 1
        fut: Future = Future()
        self._tasks.put((fn, fut))
        return fut

    def stuck(self, deadline_s: float) -> bool:
        """A task has been running longer than `deadline_s`: do not queue behind it."""
        since = self._running_since
        return since is not None and time.monotonic() - since > deadline_s

    def wait(self, fut: Future, timeout_s: float) -> tuple[bool, Any]:
        """(True, result) or (False, reason); never raises, never waits past `timeout_s`."""
        try:
            return True, fut.result(timeout=max(0.0, timeout_s))
        except FutureTimeout:
            if timeout_s <= 0:  # the caller's own work before the wait used up the whole deadline
                return False, "no time left of the deadline when the wait began (the chunk's own work used it up)"
            return False, f"no answer within the {timeout_s * 1e3:.0f} ms left of the deadline"
        except Exception as exc:  # noqa: BLE001
            return False, f"{type(exc).__name__}: {exc}"

    # -- episode accounting ------------------------------------------------------------------------
    def failure(self, what: str, reason: str) -> None:
        """Count a failed `what` ("read", "write"); log only the first failure of an outage episode."""
        with self._lock:
            self.failures += 1
            self._episode[what] = self._episode.get(what, 0) + 1
            if self._episode[what] > 1:
                return
            self.episodes += 1
        log.warning("memory %s failed (%s); going on without memory until it answers again", what, reason)

    def success(self, what: str) -> None:
        with self._lock:
            failed = self._episode.pop(what, 0)
        if failed:
            log.warning("memory %s works again after %d failed call(s)", what, failed)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the memory thread, waiting at most `timeout_s` for the call it runs (a memory that hangs never holds
        the generator up): a call that finishes in time lets go of what it held (arena views) before this returns."""
        self._tasks.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
