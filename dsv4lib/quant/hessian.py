"""Per-expert Hessians ``H_e = Σ_t w_t x_t x_tᵀ`` for GPTQ (quant_notes.md §1.1, §3.1 Fix D).

Tokens routed to an expert (``idx [T, k]`` from the router, or any visit list) are grouped by
expert with one sort, and each expert with visits gets one ``addmm`` of its token block — a loop
over *experts that received tokens*, never over tokens. ``weight`` is the per-visit multiplier of
the token's contribution (pass the routing weight squared for output-MSE-optimal weighting, see
quant_notes §3.1 Fix D); visits with a negative expert id are skipped. Sums are kept (not running
means): GPTQ's damping is relative to ``mean(diag H)``, so the overall scale does not matter, and
the visit counts are kept beside them for coverage decisions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertHessians:
    """Accumulator: ``H [E, D, D]`` (fp32 or fp64), ``count [E]`` int64 visits, ``weight_sum [E]`` fp64."""

    H: torch.Tensor
    count: torch.Tensor
    weight_sum: torch.Tensor

    @staticmethod
    def zeros(num_experts: int, dim: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> ExpertHessians:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"ExpertHessians: accumulate in float32 or float64, not {dtype}")
        return ExpertHessians(torch.zeros(num_experts, dim, dim, dtype=dtype, device=device),
                              torch.zeros(num_experts, dtype=torch.int64, device=device),
                              torch.zeros(num_experts, dtype=torch.float64, device=device))

    @property
    def num_experts(self) -> int:
        return self.H.shape[0]

    def normalized(self) -> torch.Tensor:
        """``H_e / Σ w`` (a mean over visits; experts without visits stay 0). [E, D, D]."""
        denom = self.weight_sum.clamp_min(1e-30).to(self.H.dtype)
        return self.H / denom[:, None, None]


def accumulate(acc: ExpertHessians, x: torch.Tensor, idx: torch.Tensor,
               weight: torch.Tensor | None = None, token_chunk: int = 16384) -> None:
    """Add tokens ``x [T, D]`` visiting experts ``idx [T, k]`` (weights ``[T, k]``) to ``acc`` in place.

    Matmuls run in ``acc.H.dtype`` on ``acc.H.device``; tokens are processed ``token_chunk`` at a
    time to bound the gathered copy (T·k·D elements otherwise).
    """
    if x.dim() != 2 or x.shape[1] != acc.H.shape[1]:
        raise ValueError(f"accumulate: x must be [T, {acc.H.shape[1]}], got {tuple(x.shape)}")
    if idx.dim() == 1:
        idx = idx[:, None]
        weight = None if weight is None else weight.reshape(-1, 1)
    if idx.shape[0] != x.shape[0] or (weight is not None and weight.shape != idx.shape):
        raise ValueError(f"accumulate: idx {tuple(idx.shape)} / weight "
                         f"{None if weight is None else tuple(weight.shape)} do not match x {tuple(x.shape)}")
    E = acc.num_experts
    if idx.numel() and int(idx.max()) >= E:
        raise ValueError(f"accumulate: expert id {int(idx.max())} out of range for {E} experts")
    dev, dt = acc.H.device, acc.H.dtype
    for t0 in range(0, x.shape[0], token_chunk):
        xc = x[t0:t0 + token_chunk].to(device=dev, dtype=dt)  # [t, D]
        ic = idx[t0:t0 + token_chunk].to(dev)  # [t, k]
        k = ic.shape[1]
        flat = ic.reshape(-1)  # [t*k]
        keep = flat >= 0
        order = torch.argsort(torch.where(keep, flat, E), stable=True)[: int(keep.sum())]  # grouped by expert
        experts = flat[order]  # [n] sorted
        xs = xc[order // k]  # [n, D]
        if weight is not None:
            wc = weight[t0:t0 + token_chunk].to(device=dev, dtype=torch.float64).reshape(-1)[order]  # [n]
            if bool((wc < 0).any()):
                raise ValueError("accumulate: visit weights must be >= 0")
            acc.weight_sum.index_add_(0, experts, wc)
            xs = xs * wc.sqrt().to(dt)[:, None]
        else:
            acc.weight_sum.index_add_(0, experts, torch.ones_like(experts, dtype=torch.float64))
        counts = torch.bincount(experts, minlength=E)  # [E]
        acc.count.add_(counts)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                blk = xs[start:start + c]  # [c, D]
                acc.H[e].addmm_(blk.T, blk)
                start += c


def accumulate_all(acc: ExpertHessians, x: torch.Tensor, experts: torch.Tensor | None = None,
                   token_chunk: int = 16384) -> None:
    """Add every token of ``x [T, D]`` to each expert in ``experts`` (default: all), unweighted.

    One ``XᵀX`` shared by all those experts (coverage strategy "all tokens to all experts").
    """
    dev, dt = acc.H.device, acc.H.dtype
    sel = torch.arange(acc.num_experts, device=dev) if experts is None else experts.to(dev)
    if sel.numel() == 0:
        return
    G = torch.zeros(acc.H.shape[1], acc.H.shape[1], dtype=dt, device=dev)
    for t0 in range(0, x.shape[0], token_chunk):
        xc = x[t0:t0 + token_chunk].to(device=dev, dtype=dt)  # [t, D]
        G.addmm_(xc.T, xc)
    acc.H[sel] += G
    acc.count[sel] += x.shape[0]
    acc.weight_sum[sel] += float(x.shape[0])
