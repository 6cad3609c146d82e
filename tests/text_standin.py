"""Small stand-in language models that honour the model contract (CONTRACTS "Model"):
``model(ids [B,S], cache=None) -> fp32 logits [B,S,V]`` and ``model.new_cache(B, max_len)``.
Used by the text / generation / eval tests for the scoring and assembly logic only."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RNNCache:
    batch_size: int
    max_seq_len: int
    h: torch.Tensor | None = None
    pos: int = 0


class RNNStandin(nn.Module):
    """Elman RNN LM; the cached path runs the very same per-step ops as the full forward."""

    def __init__(self, vocab: int, dim: int = 32, seed: int = 0, scale: float = 3.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g) / dim ** 0.5)
        self.head = nn.Parameter(torch.randn(dim, vocab, generator=g) * scale / dim ** 0.5)
        self.calls = 0

    def new_cache(self, batch_size: int, max_seq_len: int) -> RNNCache:
        return RNNCache(batch_size, max_seq_len)

    def forward(self, ids: torch.Tensor, cache: RNNCache | None = None) -> torch.Tensor:
        self.calls += 1
        B, S = ids.shape
        h = cache.h if cache is not None and cache.h is not None else torch.zeros(B, self.w.shape[0])
        if cache is not None and cache.pos + S > cache.max_seq_len:
            raise ValueError("cache overflow")
        out = []
        for t in range(S):
            h = torch.tanh(self.embed[ids[:, t]] + h @ self.w)
            out.append(h @ self.head)
        if cache is not None:
            cache.h, cache.pos = h, cache.pos + S
        return torch.stack(out, 1).float()


class PerturbedStandin(RNNStandin):
    """Same RNN with its head perturbed: a 'quantized' copy for perplexity / KL comparisons."""

    def __init__(self, base: RNNStandin, noise: float, seed: int = 1) -> None:
        nn.Module.__init__(self)
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(base.embed.detach().clone())
        self.w = nn.Parameter(base.w.detach().clone())
        self.head = nn.Parameter(base.head.detach() + noise * torch.randn(base.head.shape, generator=g))
        self.calls = 0
