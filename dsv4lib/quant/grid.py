"""Asymmetric uniform grids for INT2 g64 (ARCHITECTURE.md "INT2 g64 on-disk format").

One grid per (row, group of ``group_size`` input channels): ``w = (q − z) · s`` with codes
``q ∈ {0..maxq}``, an fp16 scale ``s`` and an integer zero ``z ∈ {0..zero_max}`` (4-bit on disk).

* :func:`minmax_grid` — the reference min-max rule of GPTQ (quant_notes.md §1.1 "Asymmetric min-max
  grid"): the range is forced to contain 0, ``s = (xmax − xmin)/maxq``, ``z = round(−xmin/s)``.
  The scale is rounded to fp16 *here*, before any code is chosen, so the stored grid is the one
  the quantizer used.
* :func:`search_grid` — candidate grids (range shrink = clipping; optionally ranges that do not
  contain 0, which the 4-bit zero has room for, and negative scales for all-positive groups),
  scored by a caller-supplied row loss (Hessian-aware in GPTQ, plain or diagonal-weighted MSE in
  the fallbacks); the best candidate per row wins. The reference grid is always a candidate, so
  the search never scores worse than it under the given loss.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal); a scale never rounds to 0


@dataclass(frozen=True)
class GridSearch:
    """Candidate set for :func:`search_grid`.

    ``n_shrink`` range shrinks ``p`` evenly spaced in ``[1 − max_shrink, 1]`` (clipping search);
    ``free_zero`` adds ranges that do not contain 0 (the zero-point search), ``negative_scale``
    lets all-positive groups use ``s < 0`` so their levels need not include 0.
    """

    n_shrink: int = 8
    max_shrink: float = 0.45
    free_zero: bool = True
    negative_scale: bool = True

    def __post_init__(self):
        if self.n_shrink < 1:
            raise ValueError(f"GridSearch.n_shrink must be >= 1, got {self.n_shrink}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"GridSearch.max_shrink must be in [0, 1), got {self.max_shrink}")

    def shrinks(self) -> list[float]:
        if self.n_shrink == 1:
            return [1.0]
        step = self.max_shrink / (self.n_shrink - 1)
        return [1.0 - k * step for k in range(self.n_shrink)]


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """fp16-representable scale (same dtype as input), never 0: |s| >= 2**-24, |s| <= 65504."""
    mag = scale.abs().clamp(FP16_TINY, 65504.0)
    s = torch.where(scale < 0, -mag, mag)
    return s.to(torch.float16).to(scale.dtype)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (float, integral values) ``clamp(round(x/s) + z, 0, maxq)``; s, z broadcast against x."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``(q − z)·s`` with q from :func:`quantize_codes` (same dtype as x)."""
    return (quantize_codes(x, scale, zero, maxq) - zero) * scale


def grid_from_range(lo: torch.Tensor, hi: torch.Tensor, maxq: int, zero_max: int,
                    negative_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-rounded) and integer zero mapping ``[lo, hi]`` onto the codes ``0..maxq``.

    If the range lies above 0 and ``negative_scale``, the grid is flipped (``s < 0``: code 0 is the
    top level) so the levels need not include 0. Zeros are clamped to ``[0, zero_max]``.
    """
    degenerate = hi <= lo
    lo = torch.where(degenerate, lo - 1.0, lo)  # upstream: an all-zero group gets [-1, 1]
    hi = torch.where(degenerate, hi + 1.0, hi)
    scale = round_scale((hi - lo) / maxq)
    zero = torch.round(-lo / scale)
    if negative_scale:
        flip = lo > 0
        nscale = -scale
        nzero = torch.round(hi / scale)  # code 0 ↔ hi: (0 − z)·(−|s|) = hi
        scale = torch.where(flip, nscale, scale)
        zero = torch.where(flip, nzero, zero)
    return scale, zero.clamp(0, zero_max)


def minmax_grid(x: torch.Tensor, maxq: int, zero_max: int = 15,
                shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference grid over the last dim of ``x [..., G]`` → scale, zero ``[...]`` (range contains 0)."""
    lo = torch.clamp(x.amin(-1), max=0.0) * shrink
    hi = torch.clamp(x.amax(-1), min=0.0) * shrink
    both0 = (lo == 0) & (hi == 0)
    lo = torch.where(both0, torch.full_like(lo, -1.0), lo)
    hi = torch.where(both0, torch.full_like(hi, 1.0), hi)
    return grid_from_range(lo, hi, maxq, zero_max)


def _candidate_ranges(x: torch.Tensor, search: GridSearch):
    """Candidate ranges for x [..., G]: (lo, hi, allow_flip) each [..., K]; candidate 0 = the reference."""
    gmin, gmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)  # [..., 1]
    p = torch.tensor(search.shrinks(), dtype=x.dtype, device=x.device)  # [S]
    lo0, hi0 = gmin.clamp(max=0.0), gmax.clamp(min=0.0)
    both0 = (lo0 == 0) & (hi0 == 0)
    lo0 = torch.where(both0, torch.full_like(lo0, -1.0), lo0)
    hi0 = torch.where(both0, torch.full_like(hi0, 1.0), hi0)
    los, his = [lo0 * p], [hi0 * p]
    flips = [torch.zeros(p.shape[0], dtype=torch.bool, device=x.device)]
    if search.free_zero:
        center, half = (gmax + gmin) / 2, (gmax - gmin) / 2
        los.append(center - half * p)
        his.append(center + half * p)
        flips.append(torch.full_like(flips[0], search.negative_scale))
    return torch.cat(los, -1), torch.cat(his, -1), torch.cat(flips)


def search_grid(x: torch.Tensor, row_loss: Callable[[torch.Tensor], torch.Tensor] | None, maxq: int,
                zero_max: int = 15, search: GridSearch | None = None,
                cand_chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Best grid per row of ``x [..., G]`` under ``row_loss(err [..., K, G]) -> [..., K]``.

    Candidates are scored ``cand_chunk`` at a time (one batched evaluation each); ties keep the
    earlier candidate, so the reference grid wins unless another is strictly better. Without
    ``search`` this is :func:`minmax_grid`.
    """
    if search is None:
        return minmax_grid(x, maxq, zero_max)
    lo, hi, flip = _candidate_ranges(x, search)  # [..., K]
    scale_p, zero_p = grid_from_range(lo, hi, maxq, zero_max)
    scale_n, zero_n = grid_from_range(lo, hi, maxq, zero_max, negative_scale=True)
    scale = torch.where(flip, scale_n, scale_p)  # [..., K]
    zero = torch.where(flip, zero_n, zero_p)
    xs = x.unsqueeze(-2)  # [..., 1, G]
    losses = []
    for k0 in range(0, scale.shape[-1], cand_chunk):
        s, z = scale[..., k0:k0 + cand_chunk, None], zero[..., k0:k0 + cand_chunk, None]
        losses.append(row_loss(xs - fake_quantize(xs, s, z, maxq)))  # [..., k]
    best = torch.cat(losses, -1).argmin(-1, keepdim=True)  # first minimum
    return scale.gather(-1, best)[..., 0], zero.gather(-1, best)[..., 0]
