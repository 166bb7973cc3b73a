"""Query building and frame selection: NAM, the embedding scorer, adaptive K.

Owns the math of "which past frames does this chunk attend to". Promises:
- NAM is the reference's score, exactly: per layer, score(frame) = mean over text tokens, heads and frame
  tokens of (text cross-attention key . cached frame key) / sqrt(head_dim). A mean of dot products is a dot
  product of means, so it is one inner product of `nam_query` (the mean text key, `[layers, heads*head_dim]`,
  scaled by 1 / (heads * sqrt(head_dim))) with the entry's per-layer mean key (`nam_entry_keys`): the bank
  answers it with an exact per-layer inner-product search. `reference_nam_scores` is the brute-force
  formula, kept for tests.
- `select` keeps, per layer, the newest non-resident records the plugin wrote (`keep_newest`) plus the
  best-scoring other entries, each entry at most once, in score order; its result does not depend on
  anything but its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from memory_service import QueryResult


def nam_query(text_keys: torch.Tensor) -> np.ndarray:
    """`[layers, T, H, D]` text keys -> `[layers, H*D]` float32 query whose inner product is the NAM score."""
    layers, _, heads, head_dim = text_keys.shape
    mean = text_keys.float().mean(dim=1).reshape(layers, heads * head_dim)
    return (mean / (heads * math.sqrt(head_dim))).cpu().numpy().astype(np.float32)


def nam_entry_keys(frame_keys: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Per-layer mean key of one frame: `[N, H, D]` per layer -> `out` `[layers, H*D]` float32 (in place)."""
    for layer, k in enumerate(frame_keys):
        torch.mean(k, dim=0, dtype=torch.float32, out=out[layer].view(k.shape[1], k.shape[2]))
    return out


def reference_nam_scores(text_keys: torch.Tensor, frame_keys: torch.Tensor) -> torch.Tensor:
    """Brute force, as the reference computes it: `[L, T, H, D]` x `[F, L, N, H, D]` -> `[L, F]` float64."""
    t = text_keys.double()
    f = frame_keys.double()
    head_dim = t.shape[-1]
    scores = torch.einsum("lthd,flnhd->lfthn", t, f) / math.sqrt(head_dim)
    return scores.mean(dim=(2, 3, 4))


@dataclass(frozen=True)
class Selection:
    """The memory frames of one chunk: per layer, entry ids in attention order; each entry's frame."""

    layer_ids: tuple[tuple[int, ...], ...]
    frames: tuple[tuple[int, int], ...]  # (entry id, absolute frame), every id used by some layer
    scores: tuple[tuple[float, ...], ...] = ()  # per layer, the scores of the score-chosen ids (tests, plots)

    def frame_of(self, entry_id: int) -> int:
        return dict(self.frames)[entry_id]

    @property
    def entry_ids(self) -> tuple[int, ...]:
        return tuple(e for e, _ in self.frames)


EMPTY = Selection((), ())


def adaptive_count(scores: np.ndarray, mode: str, threshold: float, lo: int, hi: int) -> int:
    """How many score-ranked frames to keep this chunk: `scores` `[layers, n]` descending, -inf padded.

    "threshold": per layer, the frames within `threshold * |best|` of the best; "gap": per layer, the frames
    above the largest drop between neighbours. The per-layer counts are averaged, rounded half up and
    clamped to [lo, hi].
    """
    counts = []
    for row in np.atleast_2d(scores):
        row = row[np.isfinite(row)][:hi]
        if len(row) == 0:
            counts.append(0)
        elif mode == "threshold":
            counts.append(int(np.sum(row >= row[0] - threshold * abs(row[0]))))
        elif len(row) == 1:
            counts.append(1)
        else:
            counts.append(int(np.argmax(row[:-1] - row[1:])) + 1)
    return int(min(hi, max(lo, math.floor(float(np.mean(counts)) + 0.5))))


def select(result: Optional[QueryResult], newest: Sequence[tuple[int, int]], layers: int, k: int,
           adaptive: str = "off", k_min: int = 1, k_max: int = 3, threshold: float = 0.1,
           skip_frames_below: int = 0) -> Selection:
    """Per-layer memory frames from a bank query and the plugin's newest records.

    `result` ids are `[layers, kq]` (NAM) or `[kq]` (one ranking for every layer); `newest` are (id, frame)
    of the newest records below the window, newest first, and are always kept. The rest of each layer's
    `k` (or the adaptive count) is filled in score order, skipping ids already taken and hits on frames
    below `skip_frames_below` (the sink, resident for the whole video).
    """
    forced = list(dict.fromkeys(e for e, _ in newest))
    frames = {e: f for e, f in newest}
    if result is not None:
        ids = np.asarray(result.ids)
        scores = np.asarray(result.scores, np.float64)
        hit_frames = np.asarray(result.frames)
        if ids.ndim == 1:
            ids, scores, hit_frames = (np.broadcast_to(a, (layers, a.shape[0])) for a in (ids, scores, hit_frames))
        ranked = []  # per layer: [(id, score)] without forced ids
        for row_ids, row_scores, row_frames in zip(ids, scores, hit_frames):
            row = [(int(e), float(s)) for e, s, f in zip(row_ids, row_scores, row_frames)
                   if e >= 0 and int(e) not in forced and f >= skip_frames_below]
            ranked.append(row)
            frames.update((int(e), int(f)) for e, f in zip(row_ids, row_frames) if e >= 0)
    else:
        ranked = [[] for _ in range(layers)]
    if adaptive != "off":
        width = max(len(r) for r in ranked) if ranked else 0
        table = np.full((layers, max(width, 1)), -np.inf)
        for layer, row in enumerate(ranked):
            table[layer, :len(row)] = [s for _, s in row]
        lo, hi = max(0, k_min - len(forced)), max(0, k_max - len(forced))
        scored = adaptive_count(table, adaptive, threshold, lo, hi) if width else 0
    else:
        scored = max(0, k - len(forced))
    layer_ids, layer_scores = [], []
    for row in ranked:
        chosen = row[:scored]
        layer_ids.append(tuple(forced) + tuple(e for e, _ in chosen))
        layer_scores.append(tuple(s for _, s in chosen))
    used = dict.fromkeys(e for ids_ in layer_ids for e in ids_)
    return Selection(tuple(layer_ids), tuple((e, frames[e]) for e in used), tuple(layer_scores))
