"""3-D rotary position embedding over (latent frame, row, column), laid out as Wan2.1 does it.

Owns the rotation used by the reference model for queries and cached keys, and its inverse (used by an
adapter that stores keys unrotated and rotates them again at load time). Layout: head_dim/2 interleaved
pairs split into [time | row | column] parts of c - 2(c//3), c//3, c//3 pairs (c = head_dim / 2); pair j of a
part of p pairs turns by position * theta^(-j/p). Promises: `rotate(x, f)` then `rotate(..., inverse=True)` at
the same frame is the identity up to float rounding; frame positions past `max_frames` are an error (the
reference caps a video at its RoPE table, 1024 latent frames), never a silent wrap. One frame `[N, H, D]` rotated
into `out` (the plugin's load and write-back paths, once per loaded frame) allocates nothing: it goes through a
workspace made on first use, with the same float arithmetic as `apply`, so the result is bit-identical.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def pair_split(head_dim: int) -> tuple[int, int, int]:
    """Pairs given to (time, row, column) for a head of `head_dim` channels."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _angles(positions: torch.Tensor, pairs: int, theta: float) -> torch.Tensor:
    # [P, pairs] float64: position * theta^(-j / pairs), as Wan's rope_params(dim = 2 * pairs)
    inv = 1.0 / theta ** (torch.arange(pairs, dtype=torch.float64) / pairs)
    return positions.to(torch.float64)[:, None] * inv[None, :]


class Rope3D:
    """Rotation tables for one model: time angles per frame position, spatial angles per token."""

    def __init__(self, head_dim: int, grid_h: int, grid_w: int, max_frames: int, theta: float = 10000.0,
                 device: Optional[torch.device] = None) -> None:
        self.head_dim, self.grid_h, self.grid_w, self.max_frames = head_dim, grid_h, grid_w, max_frames
        self.tokens_per_frame = grid_h * grid_w
        ct, ch, cw = pair_split(head_dim)
        time = _angles(torch.arange(max_frames), ct, theta)  # [max_frames, ct]
        rows = _angles(torch.arange(grid_h), ch, theta)  # [grid_h, ch]
        cols = _angles(torch.arange(grid_w), cw, theta)  # [grid_w, cw]
        spatial = torch.cat([rows[:, None, :].expand(grid_h, grid_w, ch),
                             cols[None, :, :].expand(grid_h, grid_w, cw)], dim=-1)
        spatial = spatial.reshape(self.tokens_per_frame, ch + cw)
        self.ct = ct
        self.time_cos = time.cos().float().to(device)  # [max_frames, ct]
        self.time_sin = time.sin().float().to(device)
        self.space_cos = spatial.cos().float().to(device)  # [N, ch + cw]
        self.space_sin = spatial.sin().float().to(device)
        self._frame_work: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (device, heads, stream) -> one frame's workspace

    def tables(self, first_frame: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `frames` frames from `first_frame`: `[frames * N, 1, head_dim / 2]` float32."""
        if first_frame < 0 or first_frame + frames > self.max_frames:
            raise ValueError(f"RoPE positions [{first_frame}, {first_frame + frames}) are outside the table of "
                             f"{self.max_frames} frames; raise max_frames or store keys unrotated")
        n = self.tokens_per_frame
        cos = torch.cat([self.time_cos[first_frame:first_frame + frames, None, :].expand(frames, n, self.ct),
                         self.space_cos[None].expand(frames, n, -1)], dim=-1)
        sin = torch.cat([self.time_sin[first_frame:first_frame + frames, None, :].expand(frames, n, self.ct),
                         self.space_sin[None].expand(frames, n, -1)], dim=-1)
        return cos.reshape(frames * n, 1, -1), sin.reshape(frames * n, 1, -1)

    def rotate(self, x: torch.Tensor, first_frame: int, inverse: bool = False,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotate `x` `[..., frames * N, H, D]` whose tokens start at frame `first_frame` (frame-major)."""
        tokens = x.shape[-3]
        if tokens % self.tokens_per_frame:
            raise ValueError(f"RoPE input has {tokens} tokens, expected a multiple of {self.tokens_per_frame} "
                             "(tokens per frame)")
        if out is not None and x.dim() == 3 and tokens == self.tokens_per_frame:
            return self._rotate_frame(x, first_frame, inverse, out)
        cos, sin = self.tables(first_frame, tokens // self.tokens_per_frame)
        if x.device != cos.device:
            cos, sin = cos.to(x.device), sin.to(x.device)
        return self.apply(x, cos, -sin if inverse else sin, out)

    def _rotate_frame(self, x: torch.Tensor, frame: int, inverse: bool, out: torch.Tensor) -> torch.Tensor:
        """`rotate` of one frame `[N, H, D]` into `out` (which may be `x`) through a reused workspace."""
        if frame < 0 or frame >= self.max_frames:
            self.tables(frame, 1)  # the same error as every other path
        n, h, d = x.shape
        # one workspace per stream: plugins of a batch rotate on their own copy streams, concurrently on the GPU
        key = (x.device, h, torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0)
        work = self._frame_work.get(key)
        if work is None:
            half = d // 2
            cos = torch.empty((n, 1, half), dtype=torch.float32, device=x.device)
            sin = torch.empty_like(cos)
            cos[:, 0, self.ct:].copy_(self.space_cos)
            sin[:, 0, self.ct:].copy_(self.space_sin)
            work = (cos, sin, *(torch.empty((n, h, half), dtype=torch.float32, device=x.device) for _ in range(4)))
            self._frame_work[key] = work
        cos, sin = work[0], work[1]
        cos[:, 0, :self.ct].copy_(self.time_cos[frame].expand(n, self.ct))  # [N, ct] broadcast, no copy of the table
        sin[:, 0, self.ct:].copy_(self.space_sin)
        sin[:, 0, :self.ct].copy_(self.time_sin[frame].expand(n, self.ct))
        if inverse:
            sin.neg_()
        return rotate_pairs_into(x, cos, sin, out, work[2:])

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotate `x` `[..., T, H, D]` by precomputed `tables` (a chunk computes them once for all layers)."""
        pairs = x.float().unflatten(-1, (-1, 2))  # [..., T, H, D/2, 2]
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        if out is None:
            return rotated.to(x.dtype)
        out.copy_(rotated)
        return out


def rotate_pairs_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                      work: Sequence[torch.Tensor]) -> torch.Tensor:
    """`rotate_half_pairs(x, cos, sin)` written into `out` (which may be `x`) through four preallocated float32
    buffers `[N, H, D/2]` (a, b, even, tmp): the same arithmetic in the same order, so the same bits, and no
    temporaries. `cos`/`sin` are `[N, 1, D/2]`."""
    a, b, even, tmp = work
    pairs = x.unflatten(-1, (-1, 2))  # [N, H, D/2, 2] view
    a.copy_(pairs[..., 0])
    b.copy_(pairs[..., 1])
    torch.mul(a, cos, out=even)
    torch.mul(b, sin, out=tmp)
    even.sub_(tmp)  # a cos - b sin
    torch.mul(a, sin, out=a)
    torch.mul(b, cos, out=tmp)
    a.add_(tmp)  # a sin + b cos
    dst = out.unflatten(-1, (-1, 2))
    dst[..., 0].copy_(even)
    dst[..., 1].copy_(a)
    return out
