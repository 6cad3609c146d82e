"""Data-free / low-data INT2 g64 quantizers for experts GPTQ cannot serve (quant_notes.md §3.1 Fix B, §7.2).

Same format as GPTQ (:class:`~dsv4lib.quant.qweight.QuantizedWeight`), so a fallback expert is
indistinguishable on disk. Three methods, by name in :data:`METHODS`:

* ``"rtn"`` — min-max round-to-nearest (the reference grid: range contains 0, zero in 0..3);
* ``"mse"`` — per-(row, group) grid search (clipping + zero-point + negative scales) minimising
  the squared error, optionally weighted per input channel by ``importance`` (e.g. ``diag H`` of a
  thin Hessian, imatrix style);
* ``"lloyd"`` — ``"mse"`` followed by an alternating refinement in the spirit of HQQ's
  half-quadratic solver, adapted to the integer 4-bit zero: with the codes fixed, every zero
  ``z ∈ 0..15`` gets its least-squares scale and the best (fp16-rounded) pair is kept; then the
  codes are re-derived. A step is accepted per group only if its error drops. Measured on
  random weights with outlier channels it gains < 1 % over ``"mse"`` at ~7× the cost, so
  ``"mse"`` is the default.

An expert with no calibration data must come here, never through GPTQ (dead-column rule).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from dsv4lib.quant.grid import GridSearch, fake_quantize, quantize_codes, round_scale, search_grid
from dsv4lib.quant.qweight import QuantizedWeight

MAXQ = 3
ZERO_MAX = 15


def _groups(W: torch.Tensor, group_size: int) -> torch.Tensor:
    if W.shape[-1] % group_size:
        raise ValueError(f"fallback: in_features {W.shape[-1]} is not a multiple of {group_size}")
    return W.float().unflatten(-1, (-1, group_size))  # [..., out, ng, G]


def _importance(importance: torch.Tensor | None, W: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-input-channel weights broadcast to [..., 1, ng, G] (ones if None; mean-normalised)."""
    if importance is None:
        return torch.ones(1, 1, dtype=torch.float32, device=W.device)
    imp = importance.float().to(W.device)
    if imp.shape[-1] != W.shape[-1]:
        raise ValueError(f"fallback: importance has {imp.shape[-1]} channels, weight has {W.shape[-1]}")
    imp = imp / imp.mean(-1, keepdim=True).clamp_min(1e-30)
    imp = imp.clamp_min(1e-6)  # never ignore a channel entirely
    return imp.unflatten(-1, (-1, group_size)).unsqueeze(-3)  # [..., 1, ng, G]


def _cand(imp: torch.Tensor) -> torch.Tensor:
    """Importance broadcast against candidate errors [..., out, ng, K, G]."""
    return imp.unsqueeze(-2)


def _finish(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> QuantizedWeight:
    q = quantize_codes(g, scale[..., None], zero[..., None], MAXQ)  # [..., out, ng, G]
    return QuantizedWeight(q.flatten(-2).to(torch.uint8), scale.to(torch.float16), zero.to(torch.uint8),
                           group_size)


def rtn(W: torch.Tensor, group_size: int = 64, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Min-max round-to-nearest of ``W [..., out, in]`` (``importance`` is ignored)."""
    g = _groups(W, group_size)
    scale, zero = search_grid(g, None, MAXQ, ZERO_MAX, None)
    return _finish(g, scale, zero, group_size)


def mse(W: torch.Tensor, group_size: int = 64, importance: torch.Tensor | None = None,
        search: GridSearch | None = None) -> QuantizedWeight:
    """Grid search per (row, group) minimising ``Σ importance · err²``."""
    g = _groups(W, group_size)
    imp = _importance(importance, W, group_size)
    imp_k = _cand(imp)
    scale, zero = search_grid(g, lambda err: (err.square() * imp_k).sum(-1), MAXQ, ZERO_MAX,
                              search or GridSearch(n_shrink=24, max_shrink=0.5))
    return _finish(g, scale, zero, group_size)


def lloyd(W: torch.Tensor, group_size: int = 64, importance: torch.Tensor | None = None,
          iters: int = 3) -> QuantizedWeight:
    """:func:`mse` grid, then alternating (codes ↔ zero/scale) least-squares refinement."""
    g = _groups(W, group_size)  # [..., out, ng, G]
    imp = _importance(importance, W, group_size)
    start = mse(W, group_size, importance)
    scale, zero = start.scale.float(), start.zero.float()  # [..., out, ng]

    def loss_of(s, z):
        return ((g - fake_quantize(g, s[..., None], z[..., None], MAXQ)).square() * imp).sum(-1)

    best = loss_of(scale, zero)
    zs = torch.arange(ZERO_MAX + 1, dtype=torch.float32, device=g.device)  # candidate zeros
    for _ in range(iters):
        q = quantize_codes(g, scale[..., None], zero[..., None], MAXQ)  # [..., out, ng, G]
        a = q.unsqueeze(-2) - zs[:, None]  # [..., out, ng, Z, G] = q − z
        num = (g.unsqueeze(-2) * a * imp.unsqueeze(-2)).sum(-1)
        den = (a.square() * imp.unsqueeze(-2)).sum(-1).clamp_min(1e-30)
        s_cand = round_scale(num / den)  # [..., out, ng, Z]
        err = ((g.unsqueeze(-2) - a * s_cand[..., None]).square() * imp.unsqueeze(-2)).sum(-1)
        k = err.argmin(-1, keepdim=True)
        s_new, z_new = s_cand.gather(-1, k)[..., 0], zs[k[..., 0]]
        new = loss_of(s_new, z_new)  # codes re-derived from the new grid
        better = new < best
        if not bool(better.any()):
            break
        scale = torch.where(better, s_new, scale)
        zero = torch.where(better, z_new, zero)
        best = torch.where(better, new, best)
    return _finish(g, scale, zero, group_size)


METHODS: dict[str, Callable[..., QuantizedWeight]] = {"rtn": rtn, "mse": mse, "lloyd": lloyd}


def fallback_quantize(W: torch.Tensor, method: str = "mse", group_size: int = 64,
                      importance: torch.Tensor | None = None, row_chunk: int = 1024) -> QuantizedWeight:
    """Quantize ``W [..., out, in]`` with a data-free method from :data:`METHODS`.

    ``importance`` is ``[in]`` or ``[..., in]`` (one vector per matrix); rows are processed
    ``row_chunk`` at a time to bound the search's temporaries.
    """
    if method not in METHODS:
        raise ValueError(f"unknown fallback method {method!r} (use one of {sorted(METHODS)})")
    fn = METHODS[method]
    lead, (R, C) = W.shape[:-2], W.shape[-2:]
    Wf = W.reshape(-1, R, C)  # [M, R, C]
    imp = None
    if importance is not None:
        imp = importance.float().expand(*lead, C).reshape(-1, C)  # [M, C]
    parts = []
    for m in range(Wf.shape[0]):
        im = None if imp is None else imp[m]
        for r0 in range(0, R, row_chunk):
            parts.append(fn(Wf[m, r0:r0 + row_chunk], group_size=group_size, importance=im))
    codes = torch.cat([p.codes for p in parts]).reshape(W.shape)
    scale = torch.cat([p.scale for p in parts]).reshape(*lead, R, C // group_size)
    zero = torch.cat([p.zero for p in parts]).reshape(*lead, R, C // group_size)
    return QuantizedWeight(codes, scale, zero, group_size)
