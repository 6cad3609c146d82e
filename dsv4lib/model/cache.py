"""Explicit incremental-decoding cache (spec §2.4 decode-time state, §2.10).

Per layer: the last ``sliding_window - 1`` window KV entries, and for compressed layers the
compressor state (projected kv/gate of the current partial window, CSA's previous complete
window half, all emitted entries) plus the indexer's own compressor state. All sequences of a
batch sit at the same position ``pos`` (left-aligned, no padding).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompressorState:
    """Streaming state of one compressor (main or indexer)."""
    buf_kv: torch.Tensor | None = None      # [B, m, coff*hd] projected kv of the partial window (m < ratio)
    buf_gate: torch.Tensor | None = None    # [B, m, coff*hd] raw gate logits (ape added on completion)
    prev_kv: torch.Tensor | None = None     # [B, ratio, hd] CSA: previous complete window, first half
    prev_gate: torch.Tensor | None = None   # [B, ratio, hd] its gate logits (+ape)
    entries: torch.Tensor | None = None     # [B, N, hd] all compressed entries emitted so far
    n_entries: int = 0


@dataclass
class LayerCache:
    window: torch.Tensor | None = None      # [B, <= W-1, c] most recent window KV
    comp: CompressorState | None = None
    index: CompressorState | None = None


@dataclass
class Cache:
    """Decoding cache for a whole model (main layers, then the MTP layers)."""
    batch_size: int
    max_seq_len: int
    layers: list[LayerCache] = field(default_factory=list)
    pos: int = 0

    @classmethod
    def for_ratios(cls, ratios: tuple[int, ...], batch_size: int, max_seq_len: int) -> "Cache":
        layers = [LayerCache(comp=CompressorState() if r else None, index=CompressorState() if r == 4 else None)
                  for r in ratios]
        return cls(batch_size, max_seq_len, layers)

    def check(self, batch: int, seq: int) -> None:
        if batch != self.batch_size:
            raise ValueError(f"cache was made for batch {self.batch_size}, got batch {batch}")
        if self.pos + seq > self.max_seq_len:
            raise ValueError(f"cache max_seq_len {self.max_seq_len} exceeded ({self.pos} + {seq})")
