"""DeepseekV4: embedding → mHC blocks → HCHead → norm → head (spec §2.1–2.2), plus the MTP
module (spec §2.9), hooks, swappable expert backends and the low-precision switch (§2.8).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import ModelConfig
from .attention import Attention
from .cache import Cache, LayerCache
from .experts import DenseExperts, ExpertBackend
from .linear import Linear, RMSNorm
from .mhc import hc_head, hc_post, hc_pre
from .moe import MoE, MoEHook

FUSED_MHC_PREFILL = True
"""Eager forward on CUDA: each mHC pre + the sublayer's input RMSNorm as one Triton launch
(kernels/mhc_prefill.py) instead of ~100 torch kernels, each mHC post as one (kernels/mhc_step.py).
H200, full scale (2026-11-29): 2K prefill 2,633 -> 3,049 tok/s, MMLU batch GPU time 1.66 -> 1.41 s
(docs/FULLSCALE_NOTES.md). Set False for the torch path. Module hooks on ``attn_norm``/``ffn_norm`` do
not fire on this path (no caller in the library uses them)."""


def _use_fused_mhc(X: torch.Tensor) -> bool:
    """The kernels' domain: CUDA, no fp64, hc (X's second-to-last dim) a power of two."""
    hc = X.shape[-2]
    return FUSED_MHC_PREFILL and X.is_cuda and X.dtype != torch.float64 and not hc & (hc - 1)


class Block(nn.Module):
    """One transformer layer with two mHC sites (attention, MoE)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, hooks, dtype=torch.float32, device=None,
                 expert_device=None) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hc, D = cfg.hc_mult, cfg.hidden_size
        n_mix = (2 + hc) * hc
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps, device)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps, device)
        self.attn = Attention(cfg, layer_idx, dtype, device)
        self.ffn = MoE(cfg, layer_idx, hooks, dtype, device, expert_device)
        for site in ("hc_attn", "hc_ffn"):
            setattr(self, f"{site}_fn", nn.Parameter(torch.empty(n_mix, hc * D, dtype=torch.float32, device=device)))
            setattr(self, f"{site}_base", nn.Parameter(torch.zeros(n_mix, dtype=torch.float32, device=device)))
            setattr(self, f"{site}_scale", nn.Parameter(torch.ones(3, dtype=torch.float32, device=device)))

    def _pre(self, X: torch.Tensor, site: str):
        c = self.cfg
        return hc_pre(X, getattr(self, f"{site}_fn"), getattr(self, f"{site}_scale"), getattr(self, f"{site}_base"),
                      c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def _pre_norm(self, X: torch.Tensor, site: str, norm: RMSNorm):
        """``_pre`` then ``norm`` of the sublayer input -> (normed input, post, comb)."""
        c = self.cfg
        if _use_fused_mhc(X):
            from dsv4lib.kernels.mhc_prefill import hc_pre_prefill
            return hc_pre_prefill(X, getattr(self, f"{site}_fn"), getattr(self, f"{site}_scale"),
                                  getattr(self, f"{site}_base"), c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps,
                                  norm.weight, norm.eps)
        x, post, comb = self._pre(X, site)
        return norm(x), post, comb

    def _post(self, f: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        if _use_fused_mhc(X):
            from dsv4lib.kernels.mhc_step import hc_post_fused    # elementwise over [tokens, hc, D]: any size
            return hc_post_fused(f, X, post, comb)
        return hc_post(f, X, post, comb)

    def forward(self, X: torch.Tensor, start_pos: int, input_ids: torch.Tensor | None,
                lc: LayerCache | None = None) -> torch.Tensor:
        """X [B,S,hc,D] -> [B,S,hc,D]."""
        x, post, comb = self._pre_norm(X, "hc_attn", self.attn_norm)
        X = self._post(self.attn(x, start_pos, lc), X, post, comb)
        x, post, comb = self._pre_norm(X, "hc_ffn", self.ffn_norm)
        return self._post(self.ffn(x, input_ids), X, post, comb)

class MTPBlock(Block):
    """Multi-token-prediction layer (spec §2.9): shares the main embedding and head."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, hooks, dtype=torch.float32, device=None,
                 expert_device=None) -> None:
        super().__init__(cfg, layer_idx, hooks, dtype, device, expert_device)
        D, hc = cfg.hidden_size, cfg.hc_mult
        self.e_proj = Linear(D, D, dtype, device, fp8_act=True)
        self.h_proj = Linear(D, D, dtype, device, fp8_act=True)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, device)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, device)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, device)
        self.hc_head_fn = nn.Parameter(torch.empty(hc, hc * D, dtype=torch.float32, device=device))
        self.hc_head_base = nn.Parameter(torch.zeros(hc, dtype=torch.float32, device=device))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device))

class DeepseekV4(nn.Module):
    """DeepSeek-V4 causal LM; parameter names = upstream checkpoint names (CONTRACTS "Model")."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device=None,
                 lowp_sim: bool = False, expert_device=None) -> None:
        """``expert_device="meta"`` builds the default dense routed experts without memory (the loader
        and GPTQ install compact backends layer by layer); a model with meta tensors is left
        uninitialised by ``reset_parameters`` — its caller loads every weight."""
        super().__init__()
        self.config, self.dtype = config, dtype
        cfg, D, hc = config, config.hidden_size, config.hc_mult
        self._moe_hooks: OrderedDict[int, MoEHook] = OrderedDict()
        self.embed = nn.Embedding(cfg.vocab_size, D, device=device, dtype=dtype)
        self.layers = nn.ModuleList([Block(cfg, i, self._moe_hooks, dtype, device, expert_device)
                                     for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, device)
        self.head = Linear(D, cfg.vocab_size, dtype, device)
        self.hc_head_fn = nn.Parameter(torch.empty(hc, hc * D, dtype=torch.float32, device=device))
        self.hc_head_base = nn.Parameter(torch.zeros(hc, dtype=torch.float32, device=device))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device))
        self.mtp = nn.ModuleList([MTPBlock(cfg, cfg.num_hidden_layers + j, self._moe_hooks, dtype, device, expert_device)
                                  for j in range(cfg.num_nextn_predict_layers)])
        self._lowp = False
        self.reset_parameters()
        if lowp_sim:
            self.set_lowp_sim(True)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Random init (std = initializer_range); norms 1, biases/ape/sinks 0, random tid2eid."""
        if any(p.is_meta for p in self.parameters()):
            return
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dtype == torch.float8_e4m3fn:
                continue
            if leaf in ("weight", "w1", "w2", "w3") and p.dim() >= 2 or leaf.endswith("_fn"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("norm.weight") or leaf.endswith("_scale"):
                p.fill_(1.0)
            else:
                p.zero_()
        E, k = self.config.n_routed_experts, self.config.num_experts_per_tok
        for name, b in self.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], E, generator=g).argsort(-1)[:, :k])

    @torch.no_grad()
    def reinit_buffers(self) -> None:
        """Recompute derived (non-persistent) buffers, e.g. after ``to_empty``."""
        from .rope import layer_freqs
        for m in self.modules():
            if "freqs" in m._buffers:
                m.freqs = layer_freqs(self.config, m.ratio).to(m.freqs.device)

    # ------------------------------------------------------------------ switches
    def set_lowp_sim(self, on: bool) -> None:
        """DeepSeek's FP8-activation / FP8-KV / indexer Hadamard+FP4 simulation on or off."""
        if on:
            problems = self.config.lowp_problems()
            if problems:
                raise ValueError("low-precision simulation impossible for this config: " + "; ".join(problems))
        self._lowp = bool(on)
        for m in self.modules():
            if hasattr(m, "lowp"):
                m.lowp = self._lowp

    @property
    def lowp_sim(self) -> bool:
        return self._lowp

    def moe_layer(self, layer_idx: int) -> MoE:
        n = self.config.num_hidden_layers
        if 0 <= layer_idx < n:
            return self.layers[layer_idx].ffn
        if n <= layer_idx < n + len(self.mtp):
            return self.mtp[layer_idx - n].ffn
        raise IndexError(f"no MoE layer {layer_idx} (main layers 0..{n - 1}, MTP {n}..{n + len(self.mtp) - 1})")

    def set_expert_backend(self, layer_idx: int, backend: ExpertBackend) -> None:
        """Replace the routed experts of MoE layer ``layer_idx`` (MTP layer = n_layers)."""
        cfg = self.config
        want = (cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        got = (backend.num_experts, backend.hidden, backend.inter)
        if got != want:
            raise ValueError(f"layer {layer_idx}: expert backend (E, D, I) = {got}, model needs {want}")
        backend.lowp = self._lowp
        self.moe_layer(layer_idx).experts = backend

    def add_moe_hook(self, fn: MoEHook) -> RemovableHandle:
        """``fn(layer_idx, MoEEvent)`` after routing, before the experts; returns a removable handle."""
        handle = RemovableHandle(self._moe_hooks)
        self._moe_hooks[handle.id] = fn
        return handle

    def new_cache(self, batch_size: int, max_seq_len: int) -> Cache:
        return Cache.for_ratios(self.config.compress_ratios, batch_size, max_seq_len)

    # ------------------------------------------------------------------ forward
    def forward_hidden(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """input_ids [B,S] -> final mHC streams [B,S,hc,D] (before HCHead)."""
        B, S = input_ids.shape
        start = 0
        if cache is not None:
            cache.check(B, S)
            start = cache.pos
        h = self.embed(input_ids)                                           # [B, S, D]
        X = h.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()   # [B, S, hc, D]
        for i, layer in enumerate(self.layers):
            X = layer(X, start, input_ids, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.pos += S
        return X

    def logits_from_hidden(self, X: torch.Tensor) -> torch.Tensor:
        c = self.config
        y = hc_head(X, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, c.hc_eps, c.rms_norm_eps)
        return self.head(self.norm(y)).float()

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """input_ids [B,S] -> fp32 logits [B,S,V] at every position."""
        return self.logits_from_hidden(self.forward_hidden(input_ids, cache))

    def mtp_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, start_pos: int = 0,
                   cache: Cache | None = None, depth: int = 0) -> torch.Tensor:
        """MTP module (spec §2.9): main streams ``hidden`` [B,S,hc,D] at positions start_pos… combined
        with the embeddings of the NEXT tokens ``next_ids`` [B,S] -> fp32 logits [B,S,V] for t+2."""
        if not self.mtp:
            raise ValueError("this config has num_nextn_predict_layers = 0 (no MTP module)")
        m, c = self.mtp[depth], self.config
        e = m.enorm(self.embed(next_ids))                                   # [B, S, D]
        X = m.e_proj(e).unsqueeze(2) + m.h_proj(m.hnorm(hidden))           # [B, S, hc, D]
        lc = cache.layers[c.num_hidden_layers + depth] if cache is not None else None
        X = m(X, start_pos, next_ids, lc)
        y = hc_head(X, m.hc_head_fn, m.hc_head_scale, m.hc_head_base, c.hc_eps, c.rms_norm_eps)
        return self.head(m.norm(y)).float()
