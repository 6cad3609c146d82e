"""Static-shape decoding cache (spec §2.10, demo layout) for CUDA-graph decode.

Every tensor is preallocated for ``max_seq_len`` and never changes shape; the position is a device
tensor (``pos``, int64 scalar), so one captured decode step replays at any position:

* ``window [B, W, c]`` ring of the last W window keys (position p at slot p % W);
* per compressor (main CSA/HCA and the indexer's own): ``buf_kv``/``buf_gate [B, r, coff*hd]``
  (fp32, position p at slot p % r; the slots of the current partial window), ``prev_kv``/
  ``prev_gate [B, r, hd]`` (CSA: first half of the previous complete window, gate + ape; zeros /
  -inf before the first), ``entries [B, ceil(max_seq_len/r), hd]`` (entry i = window i; entries
  ≥ (p+1)//r are masked by the reader, so a slot may hold a partial candidate).

Main entries are stored in the model dtype (the eager path casts them to the window dtype before
attention), indexer keys in fp32 (the eager indexer scores them in fp32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import Cache


@dataclass
class StaticCompressorState:
    buf_kv: torch.Tensor      # [B, r, coff*hd] fp32
    buf_gate: torch.Tensor    # [B, r, coff*hd] fp32 (raw gate logits, ape added when read)
    prev_kv: torch.Tensor     # [B, r, hd] fp32 (CSA only; empty [B, 0, hd] for HCA)
    prev_gate: torch.Tensor   # [B, r, hd] fp32
    entries: torch.Tensor     # [B, ceil(L/r), hd]


@dataclass
class StaticLayerCache:
    window: torch.Tensor                        # [B, W, c] ring
    comp: StaticCompressorState | None = None
    index: StaticCompressorState | None = None


@dataclass
class StaticCache:
    batch_size: int
    max_seq_len: int
    pos: torch.Tensor                           # [] int64 on the cache's device
    layers: list[StaticLayerCache]

    def position(self) -> int:
        """Host copy of the position (syncs; not for use inside a captured step)."""
        return int(self.pos.item())

    def small_state(self) -> list[torch.Tensor]:
        """Tensors a decode step overwrites in place and later reads back *before* rewriting
        (position and CSA ``prev_*``); saved/restored around graph warm-up runs."""
        out = [self.pos]
        for lc in self.layers:
            for st in (lc.comp, lc.index):
                if st is not None:
                    out += [st.prev_kv, st.prev_gate]
        return out

    def nbytes(self) -> int:
        seen = 0
        for lc in self.layers:
            seen += lc.window.numel() * lc.window.element_size()
            for st in (lc.comp, lc.index):
                if st is not None:
                    seen += sum(t.numel() * t.element_size() for t in
                                (st.buf_kv, st.buf_gate, st.prev_kv, st.prev_gate, st.entries))
        return seen


def _comp_state(B: int, ratio: int, hd: int, max_seq_len: int, entry_dtype, device) -> StaticCompressorState:
    coff = 2 if ratio == 4 else 1
    n_prev = ratio if ratio == 4 else 0
    f32 = torch.float32
    return StaticCompressorState(
        buf_kv=torch.zeros(B, ratio, coff * hd, dtype=f32, device=device),
        buf_gate=torch.zeros(B, ratio, coff * hd, dtype=f32, device=device),
        prev_kv=torch.zeros(B, n_prev, hd, dtype=f32, device=device),
        prev_gate=torch.full((B, n_prev, hd), float("-inf"), dtype=f32, device=device),
        entries=torch.zeros(B, -(-max_seq_len // ratio), hd, dtype=entry_dtype, device=device))


def new_static_cache(model, batch_size: int, max_seq_len: int, device=None) -> StaticCache:
    """Empty static cache (position 0) for the main layers of ``model`` (MTP layers not cached)."""
    cfg = model.config
    if device is None:
        device = next(model.parameters()).device
    dtype = model.dtype
    layers = []
    for i in range(cfg.num_hidden_layers):
        r = cfg.compress_ratios[i]
        win = torch.zeros(batch_size, cfg.sliding_window, cfg.head_dim, dtype=dtype, device=device)
        comp = _comp_state(batch_size, r, cfg.head_dim, max_seq_len, dtype, device) if r else None
        index = (_comp_state(batch_size, 4, cfg.index_head_dim, max_seq_len, torch.float32, device)
                 if r == 4 else None)
        layers.append(StaticLayerCache(win, comp, index))
    return StaticCache(batch_size, max_seq_len, torch.zeros((), dtype=torch.long, device=device), layers)


def _copy_comp(dst: StaticCompressorState, src, pos: int, ratio: int) -> None:
    m = pos % ratio
    if src.buf_kv is not None and src.buf_kv.shape[1]:
        if src.buf_kv.shape[1] != m:
            raise ValueError(f"compressor buffer holds {src.buf_kv.shape[1]} tokens, position {pos} needs {m}")
        dst.buf_kv[:, :m] = src.buf_kv
        dst.buf_gate[:, :m] = src.buf_gate
    if dst.prev_kv.shape[1] and src.prev_kv is not None:
        dst.prev_kv.copy_(src.prev_kv)
        dst.prev_gate.copy_(src.prev_gate)
    n = src.n_entries
    if n:
        dst.entries[:, :n] = src.entries.to(dst.entries.dtype)


@torch.no_grad()
def static_from_cache(model, cache: Cache, max_seq_len: int) -> StaticCache:
    """Static copy of an eager :class:`Cache` (e.g. after an eager prefill); positions continue."""
    P = cache.pos
    if P > max_seq_len:
        raise ValueError(f"cache position {P} exceeds max_seq_len {max_seq_len}")
    sc = new_static_cache(model, cache.batch_size, max_seq_len)
    cfg = model.config
    W = cfg.sliding_window
    sc.pos.fill_(P)
    for i in range(cfg.num_hidden_layers):
        lc, dst = cache.layers[i], sc.layers[i]
        if lc.window is not None and lc.window.shape[1]:
            n = lc.window.shape[1]
            slots = torch.arange(P - n, P, device=dst.window.device) % W                 # [n]
            dst.window.index_copy_(1, slots, lc.window.to(dst.window.dtype))
        r = cfg.compress_ratios[i]
        if r:
            _copy_comp(dst.comp, lc.comp, P, r)
        if r == 4:
            _copy_comp(dst.index, lc.index, P, 4)
    return sc


@torch.no_grad()
def fill_synthetic(cache: StaticCache, pos: int, generator: torch.Generator | None = None) -> None:
    """Pretend ``pos`` tokens were decoded: random window keys, compressed entries and indexer keys
    (unit-RMS values), random partial-window state. For timing long contexts without a prefill."""
    if pos > cache.max_seq_len:
        raise ValueError(f"fill_synthetic: position {pos} exceeds max_seq_len {cache.max_seq_len}")

    def rnd(t: torch.Tensor) -> None:
        t.copy_(torch.randn(t.shape, device=t.device, generator=generator, dtype=torch.float32))

    for lc in cache.layers:
        rnd(lc.window)
        for st in (lc.comp, lc.index):
            if st is not None:
                for t in (st.buf_kv, st.buf_gate, st.prev_kv, st.prev_gate, st.entries):
                    rnd(t)
    cache.pos.fill_(pos)
