"""Full-size DeepSeek-V4-Flash with synthetic weights, built directly on the device (spec §1.1, §3.2, §7).

``synthetic_model(cfg, device)`` constructs the model on ``meta`` and then allocates every tensor
once on ``device`` in the loader's in-memory formats: FP8 e4m3 weights + fp32 block scales (powers of two, the
values of the release's E8M0 scales) for the
linears that are FP8 in the release (attention wq_a/wq_b/wkv/wo_a/wo_b, shared experts, indexer
wq_b), routed experts as :class:`INT2Experts` (random codes, fp16 scales ~ in^-1/2, zeros 1..2),
BF16/F32 for the rest, random ``tid2eid``. Nothing is written to disk and no dense expert stack
exists at any time. ``decode_bytes_per_token`` counts the bytes one decode step reads (§7).
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from .config import ModelConfig
from .model.linear import BLOCK, Linear
from .model.quantized_experts import INT2Experts

FP8_LINEARS = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b",
               "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3", "e_proj", "h_proj")


def without_mtp(cfg: ModelConfig) -> ModelConfig:
    """The main model only (decode does not use the MTP layer; saves ~3.6 GB)."""
    n = cfg.num_hidden_layers
    return cfg.with_(num_nextn_predict_layers=0, compress_ratios=cfg.compress_ratios[:n])


def _rand_int2(E: int, D: int, I: int, device, g: torch.Generator) -> INT2Experts:
    m = INT2Experts(E, D, I, device="meta")
    for name, buf in list(m.named_buffers()):
        k_in = D if name.startswith(("w1", "w3")) else I
        if name.endswith("_packed") and buf.dtype == torch.uint32:
            t = torch.randint(-2 ** 31, 2 ** 31 - 1, buf.shape, dtype=torch.int32, device=device,
                              generator=g).view(torch.uint32)                  # [E, out, in/16]
        elif name.endswith("_scale"):
            t = ((torch.rand(buf.shape, device=device, generator=g) + 0.5) * k_in ** -0.5).half()   # [E, out, in/64]
        else:  # zero nibbles in 1..2
            lo = torch.randint(1, 3, buf.shape, dtype=torch.int8, device=device, generator=g)
            hi = torch.randint(1, 3, buf.shape, dtype=torch.int8, device=device, generator=g)
            t = lo | (hi << 4)                                                 # [E, out, in/128]
        setattr(m, name, t)
    return m


def _fill(name: str, shape, dtype, device, g: torch.Generator, cfg: ModelConfig) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "tid2eid":
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        return torch.rand(shape[0], E, device=device, generator=g).argsort(-1)[:, :k].contiguous()
    if name.endswith("norm.weight") or leaf.endswith("_scale"):
        return torch.ones(shape, dtype=dtype, device=device)
    if len(shape) >= 2 and (leaf == "weight" or leaf.endswith("_fn")):
        std = 1.0 if name == "embed.weight" else shape[-1] ** -0.5
        return (torch.randn(shape, device=device, generator=g, dtype=torch.float32) * std).to(dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


@torch.no_grad()
def synthetic_model(cfg: ModelConfig, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                    seed: int = 0, fp8: bool = True, int2_experts: bool = True):
    """A ``DeepseekV4`` with random weights in the release's in-memory formats, built on ``device``."""
    from .model import DeepseekV4
    from .model.rope import layer_freqs

    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    model = DeepseekV4(cfg, dtype=dtype, device="meta")
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    n_moe = cfg.num_hidden_layers + len(model.mtp)
    if int2_experts:
        for li in range(n_moe):
            model.set_expert_backend(li, _rand_int2(E, D, I, device, g))
    for mname, mod in model.named_modules():
        if fp8 and isinstance(mod, Linear) and any(mname.endswith(k) for k in FP8_LINEARS):
            o, i = mod.out_features, mod.in_features
            w = torch.randn(o, i, device=device, generator=g, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
            # power-of-two multipliers ~ i^-1/2, as the release's F8_E8M0 block scales (v4_arch.md section 3.2)
            sc = torch.full((-(-o // BLOCK), -(-i // BLOCK)), 2.0 ** round(-0.5 * math.log2(i)), device=device)
            mod.set_fp8(w, sc)
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                full = f"{mname}.{pname}" if mname else pname
                mod._parameters[pname] = nn.Parameter(_fill(full, p.shape, p.dtype, device, g, cfg),
                                                      requires_grad=False)
        for bname, b in list(mod._buffers.items()):
            if b is None or not b.is_meta:
                continue
            if bname == "freqs":
                mod._buffers[bname] = layer_freqs(cfg, mod.ratio).to(device)
            else:
                full = f"{mname}.{bname}" if mname else bname
                mod._buffers[bname] = _fill(full, b.shape, b.dtype, device, g, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"synthetic_model: {len(left)} tensors left on meta, e.g. {left[0]}")
    return model.eval()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def expected_distinct(E: int, k: int, batch: int) -> float:
    """Expected number of distinct experts hit by ``batch`` tokens routing uniformly to k of E."""
    return E * (1.0 - (1.0 - k / E) ** batch)


def decode_bytes_per_token(model, batch: int = 1, context: int = 0) -> dict[str, float]:
    """Bytes one decode step of ``batch`` tokens reads (weights at their resident formats, spec §7),
    per component, plus the KV reads at ``context`` and ``per_token`` = total / batch.

    Routed experts: expected distinct experts per layer under uniform routing; tid2eid and the
    embedding count only the rows read.
    """
    cfg = model.config
    out: dict[str, float] = {}

    def add(k: str, v: float) -> None:
        out[k] = out.get(k, 0.0) + v

    from .checkpoint.loader import _component
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("mtp.") or name.endswith("freqs"):
            continue
        comp = _component(name)
        if comp == "routed_experts":
            frac = expected_distinct(cfg.n_routed_experts, cfg.num_experts_per_tok, batch) / cfg.n_routed_experts
            add(comp, _nbytes(t) * frac)
        elif name.endswith("tid2eid") or comp == "embed":
            add(comp, batch * _nbytes(t) / t.shape[0])
        else:
            add(comp, _nbytes(t))
    if context:
        c, cI, W = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window
        es = model.dtype.itemsize if hasattr(model.dtype, "itemsize") else 2
        kv = 0.0
        for i in range(cfg.num_hidden_layers):
            r = cfg.compress_ratios[i]
            kv += min(W, context) * c * es
            if r == 4:
                kv += min(cfg.index_topk, context // 4) * c * es + (context // 4) * cI * 4
            elif r:
                kv += (context // r) * c * es
        add("kv_cache", batch * kv)
    out["total"] = sum(v for k, v in out.items())
    out["per_token"] = out["total"] / batch
    return out


def copy_bandwidth(device, nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy rate in bytes/s counting read + write (the roofline's ceiling)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    ms = time_cuda(lambda: b.copy_(a), reps)
    del a, b
    return 2 * nbytes / (ms * 1e-3)


def time_cuda(fn, reps: int = 10, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` (CUDA events; one sync per rep). Without CUDA (CPU smoke runs of
    the benchmarks) the host clock is used instead."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        ts.sort()
        return ts[len(ts) // 2]
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]
