"""Neighbours: each eviction candidate's nearest other candidate by compact key, kept current as entries come and go.

Owns the redundancy policy's expensive input. Ranking from scratch is O(n^2 d) per prune (a 1000 x 1000 x 128
product every few dozen puts, which also busies every BLAS thread); kept current it costs O(n d) per added
entry and O(r n d) per prune, r the entries whose nearest neighbour went. The stream keeps one (for policies
that need vectors) over its unpinned entries, under the stream's lock; `snapshot` gives a pruning pass a copy it
may read outside the lock. Similarities are cosines of unit-norm compact keys; an entry alone has none (-inf).
Products go through faiss's single-threaded SIMD kernel, never BLAS: a threaded BLAS call here left its threads
spinning on the core the request path needed (put p99 2.7 ms single-threaded against 49 ms threaded, measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class NeighbourView:
    """A copy, aligned by row: `ids` [n], `vectors` [n, d], `sim` [n] (cosine to the nearest other row), `nn` [n]
    (that row's position; -1 when alone)."""

    ids: np.ndarray
    vectors: np.ndarray
    sim: np.ndarray
    nn: np.ndarray


class Neighbours:
    def __init__(self, dim: int) -> None:
        self._n = 0
        # rows [:n] live, in arrival order; buffers grow by doubling, so an add never copies the others
        self._ids = np.empty(64, np.int64)
        self._x = np.empty((64, dim), np.float32)  # [cap, d] unit-norm
        self._sim = np.empty(64, np.float32)
        self._nn = np.empty(64, np.int64)  # entry id of the nearest other row, -1 when alone

    def __len__(self) -> int:
        return self._n

    def _reserve(self, n: int) -> None:
        cap = len(self._ids)
        if n <= cap:
            return
        while cap < n:
            cap *= 2
        for name in ("_ids", "_x", "_sim", "_nn"):
            old = getattr(self, name)
            buf = np.empty((cap, *old.shape[1:]), old.dtype)
            buf[:self._n] = old[:self._n]
            setattr(self, name, buf)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """New rows `ids` [m] with unit-norm `vectors` [m, d] (ids not present)."""
        m, n = len(ids), self._n
        if not m:
            return
        self._reserve(n + m)
        self._ids[n:n + m] = ids
        self._x[n:n + m] = vectors
        x, row_ids = self._x[:n + m], self._ids[:n + m]
        sims = _ip(x[n:], x)  # [m, n + m]: new rows against all
        sims[np.arange(m), n + np.arange(m)] = -np.inf
        if n:  # an old row whose nearest is now a new one
            cross = sims[:, :n]  # [m, n]
            best = np.argmax(cross, axis=0)
            best_sim = cross[best, np.arange(n)]
            closer = best_sim > self._sim[:n]
            self._sim[:n][closer] = best_sim[closer]
            self._nn[:n][closer] = self._ids[n + best[closer]]
        pick = np.argmax(sims, axis=1)
        sim = sims[np.arange(m), pick]
        self._sim[n:n + m] = sim
        self._nn[n:n + m] = np.where(np.isfinite(sim), row_ids[pick], -1)
        self._n = n + m

    def remove(self, ids) -> None:
        """Drop rows `ids` (absent ones are ignored); rows whose nearest went get theirs afresh."""
        n = self._n
        ids = np.asarray(list(ids), np.int64)
        gone = np.isin(self._ids[:n], ids)
        if not gone.any():
            return
        keep = np.flatnonzero(~gone)
        k = len(keep)
        for buf in (self._ids, self._x, self._sim, self._nn):
            buf[:k] = buf[keep]
        self._n = k
        stale = np.flatnonzero(np.isin(self._nn[:k], ids))
        if len(stale):
            x = self._x[:k]
            sims = _ip(x[stale], x)  # [r, k]
            sims[np.arange(len(stale)), stale] = -np.inf
            pick = np.argmax(sims, axis=1)
            sim = sims[np.arange(len(stale)), pick]
            self._sim[stale] = sim
            self._nn[stale] = np.where(np.isfinite(sim), self._ids[pick], -1)

    def snapshot(self) -> NeighbourView:
        n = self._n
        order = np.argsort(self._ids[:n], kind="stable")
        ids = self._ids[order]
        pos = np.searchsorted(ids, self._nn[order])
        nn = np.where(self._nn[order] >= 0, np.minimum(pos, max(0, n - 1)), -1)
        return NeighbourView(ids, self._x[order], self._sim[order], nn)


def _ip(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Inner products `[m, n]` of rows `q` [m, d] with rows `x` [n, d], one single-threaded kernel call per row."""
    q = np.ascontiguousarray(q, np.float32)
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty((len(q), len(x)), np.float32)
    if len(x):
        xp = faiss.swig_ptr(x)
        for i in range(len(q)):
            faiss.fvec_inner_products_ny(  # type: ignore[attr-defined]  # swig export without a stub
                faiss.swig_ptr(out[i]), faiss.swig_ptr(q[i]), xp, x.shape[1], len(x))
    return out
