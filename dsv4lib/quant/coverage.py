"""Calibration coverage of routed experts (quant_notes.md §3.1 Fixes A–C, §3.2, §7.2).

A *visit* is a (token, expert, weight) triple that feeds an expert's Hessian. Strategies, by name
in :data:`STRATEGIES`:

* ``"routed"`` — the router's own choices only (top-k, or ``tid2eid[token_id]`` in hash layers);
* ``"balanced"`` — routed visits, plus, for every expert with fewer than ``threshold`` routed
  tokens, the not-yet-routed calibration tokens with the highest affinity ``scores[:, e]`` to it,
  until it has ``threshold`` (for the Hessian only: the forward pass keeps the true routing);
* ``"all"`` — every token visits every expert (GPTQModel's routing bypass / llm-compressor's
  calibrate-all-experts), unweighted.

Hash layers need no special case here: their routed visits come from the token ids (the model
routes them through ``tid2eid``), and extra balanced visits use the gate affinities, which hash
layers compute too. A visit's weight is the routing weight the expert would get for that token
(for extra visits: its affinity renormalised over the token's routed set plus itself, times
``route_scale``), used only when Hessians are routing-weighted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STRATEGIES = ("routed", "balanced", "all")


@dataclass(frozen=True)
class Visits:
    """Flat visit list: ``token [n]``, ``expert [n]`` (sorted by expert, then token), ``weight [n]`` fp32."""

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    num_experts: int

    def counts(self) -> torch.Tensor:
        """Visits per expert ``[E]`` int64."""
        return torch.bincount(self.expert, minlength=self.num_experts)

    def of(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, weights) visiting expert ``e``."""
        m = self.expert == e
        return self.token[m], self.weight[m]


def _sorted(token, expert, weight, E) -> Visits:
    key = expert.to(torch.int64) * (int(token.max()) + 1 if token.numel() else 1) + token
    order = torch.argsort(key, stable=True)
    return Visits(token[order], expert[order], weight[order].float(), E)


def routed_visits(idx: torch.Tensor, weight: torch.Tensor, num_experts: int) -> Visits:
    """The router's visits: ``idx [T, k]``, ``weight [T, k]``."""
    T, k = idx.shape
    token = torch.arange(T, device=idx.device).repeat_interleave(k)  # [T*k]
    return _sorted(token, idx.reshape(-1).to(torch.int64), weight.reshape(-1), num_experts)


def summary(counts: torch.Tensor) -> dict:
    """min / max / median and the full per-expert list (JSON-ready ints)."""
    c = counts.to(torch.int64).cpu()
    return {"min": int(c.min()), "max": int(c.max()), "median": float(c.double().median()),
            "zero": int((c == 0).sum()), "counts": c.tolist()}


def plan_visits(strategy: str, scores: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                threshold: int = 128, route_scale: float = 1.0) -> Visits:
    """Visits for one layer's calibration tokens under ``strategy``.

    ``scores [T, E]`` fp32 unbiased affinities, ``idx [T, k]`` routed experts, ``weight [T, k]``
    routing weights (renormalised, route-scaled) — the fields of a ``MoEEvent``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown coverage strategy {strategy!r} (use one of {STRATEGIES})")
    T, E = scores.shape
    routed = routed_visits(idx, weight, E)
    if strategy == "routed":
        return routed
    if strategy == "all":
        tok = torch.arange(T, device=idx.device).repeat(E)  # [E*T]
        exp = torch.arange(E, device=idx.device).repeat_interleave(T)
        return Visits(tok, exp, torch.ones(E * T, device=idx.device), E)
    counts = routed.counts()
    need = (threshold - counts).clamp(min=0)  # [E]
    if not bool(need.any()):
        return routed
    is_routed = torch.zeros(T, E, dtype=torch.bool, device=idx.device)
    is_routed.scatter_(1, idx, True)
    routed_sum = scores.gather(1, idx).sum(-1)  # [T]
    toks, exps, ws = [routed.token], [routed.expert], [routed.weight]
    for e in torch.nonzero(need).flatten().tolist():
        cand = scores[:, e].masked_fill(is_routed[:, e], float("-inf"))  # [T]
        n = min(int(need[e]), int((~is_routed[:, e]).sum()))
        if n == 0:
            continue
        top = torch.topk(cand, n, sorted=True).indices  # highest affinity first (deterministic order)
        s = scores[top, e]
        toks.append(top)
        exps.append(torch.full_like(top, e))
        ws.append((s / (routed_sum[top] + s) * route_scale).float())
    return _sorted(torch.cat(toks), torch.cat(exps), torch.cat(ws), E)
