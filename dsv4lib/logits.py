"""Logits at chosen positions only (spec §2.10 head): prefill for scoring and generation needs one
position per row, and the head over all positions costs ``B*S*V`` fp32 (a 2K prompt with V4's 129K
vocabulary: ~1 GB). Models with ``forward_hidden`` + ``logits_from_hidden`` (``DeepseekV4``) run the
head (HCHead, norm, vocab projection; all per position) on the selected rows; other models (test
stand-ins that only implement ``forward``) fall back to full logits and a gather.
"""
from __future__ import annotations

import torch


def logits_at(model, ids: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
    """ids [B, S] (prefill, optionally into ``cache``) -> fp32 logits [B, V] at ``positions`` [B]."""
    B = ids.shape[0]
    rows = torch.arange(B, device=ids.device)
    positions = positions.to(ids.device)
    if hasattr(model, "forward_hidden") and hasattr(model, "logits_from_hidden"):
        X = model.forward_hidden(ids, cache)                                       # [B, S, hc, D]
        return model.logits_from_hidden(X[rows, positions][:, None])[:, 0].float()  # [B, V]
    logits = model(ids) if cache is None else model(ids, cache=cache)             # [B, S, V]
    return logits[rows, positions].float()
