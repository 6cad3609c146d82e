"""Static-shape one-token decode step and its CUDA-graph capture (spec §2.1–2.7, §2.10).

``static_decode_step(model, cache, ids)`` is the eager model's decode math (attention with the
window ring + CSA/HCA entries + indexer, mHC, MoE, head) on a :class:`StaticCache`: fixed shapes,
the position a device tensor, every mask computed on the device (invalid keys get -inf; the
indexer's top-k runs over the fixed ``ceil(max_seq_len/4)`` keys with the future ones masked) and
no host synchronisation, so the whole step can be captured once and replayed
(:class:`GraphedDecoder`). Uncaptured, the same function runs anywhere (the CPU tests compare it
with the eager ``Cache`` path). The MoE layer is the model's own module: capture needs a backend
without host syncs (INT2 on CUDA; the dense and MXFP4 backends sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import grouped_output_a, join_side, on_side, side_stream
from .compressor import Compressor
from .lowp import hp
from .mhc import _mix, hc_post
from .rope import apply_rope, cos_sin
from .static_cache import StaticCache, StaticCompressorState, StaticLayerCache


@dataclass
class StepContext:
    """Per-step tensors shared by all layers (computed once per decode step, not per layer).

    ``rot[f]``/``rot_inv[f]``: complex RoPE factors ``cos + i sin`` [r/2] at ``pos`` for flavour
    ``f`` (0 = sliding-only layers, 1 = compressed layers, spec §2.6), ``cs[f]`` = (cos, sin, -sin)
    [r/2] for the fused kernels; ``ent_thr[r]`` = (pos + 1) // r (HCA entries below it are visible); ``comp_cs[r]``: (cos, sin)
    [r/2] at ``(pos // r) * r`` for the compressor of ratio r; ``win_bias [W]`` and ``ent_bias[r]
    [T_r]`` (HCA) are 0 / -inf visibility biases; ``idx_future [T_4]`` masks the indexer's future keys.
    """
    pos: torch.Tensor
    fused: bool
    rot: dict
    rot_inv: dict
    cs: dict
    comp_cs: dict
    win_slot: torch.Tensor
    win_bias: torch.Tensor
    ent_bias: dict
    ent_thr: dict
    idx_thr: torch.Tensor | None
    idx_future: torch.Tensor | None
    zero: torch.Tensor
    ninf: torch.Tensor
    side: object = None     # torch.cuda.Stream for the fused step's concurrent branches, or None
    side2: object = None    # a third stream (the deferred mHC Sinkhorn: DEFER_COMB), or None
    side_open: bool = False    # work issued on side since the last join
    side2_open: bool = False   # work issued on side2 since the last join


CONCURRENT = True
"""Fused CUDA step: run the independent pieces of a layer on a second stream (see :func:`_branch`).
A CUDA graph captures the fork/join as parallel branches. False: one stream (the bench's A/B switch)."""

class _branch:
    """``with _branch(ctx): ...`` runs the block on ``ctx.side`` (``second``: ``ctx.side2`` if there is one) after
    everything issued so far on the current stream (fork); :func:`_join` makes the current stream wait for what was
    forked since the last join. Without a side stream (CPU, torch step, ``CONCURRENT=False``) the block runs in
    place. The fused step forks only work whose inputs stay referenced until the join and whose outputs are read
    after it, so the caching allocator cannot hand a block to one stream while the other still uses it."""

    def __init__(self, ctx: StepContext | None, second: bool = False) -> None:
        side2 = getattr(ctx, "side2", None) if second else None
        self.side = side2 if side2 is not None else getattr(ctx, "side", None)
        self._cm = None   # on_side(self.side) while the block runs
        if side2 is not None:
            ctx.side2_open = True
        elif self.side is not None:
            ctx.side_open = True

    def __enter__(self):
        self._cm = on_side(self.side)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _join(ctx: StepContext | None) -> None:
    """The current stream waits for the side streams' work forked since the last join (nothing when none was: a
    stream that took no part in a capture cannot be waited on, and a second wait adds nothing)."""
    if getattr(ctx, "side_open", False):
        join_side(ctx.side)
        ctx.side_open = False
    if getattr(ctx, "side2_open", False):
        join_side(ctx.side2)
        ctx.side2_open = False


def step_context(model, cache: StaticCache, fused: bool) -> StepContext:
    pos = cache.pos
    dev = pos.device
    p1 = pos.view(1)
    rot, rot_inv, cs, comp_cs, ent_bias, ent_thr = {}, {}, {}, {}, {}, {}
    zero = torch.zeros((), device=dev)
    ninf = torch.full((), float("-inf"), device=dev)
    idx_thr = idx_future = None
    for layer, lc in zip(model.layers, cache.layers):
        attn = layer.attn
        f = 1 if attn.ratio else 0
        if f not in rot:
            cos, sin = cos_sin(attn.freqs, p1)                          # [1, r/2]
            rot[f] = torch.complex(cos[0], sin[0])                      # [r/2]
            rot_inv[f] = torch.complex(cos[0], -sin[0])
            if fused:
                cs[f] = (cos[0], sin[0], -sin[0])
        r = attn.ratio
        if r and r not in comp_cs:
            cos, sin = cos_sin(attn.compressor.freqs, ((pos // r) * r).view(1))
            comp_cs[r] = (cos[0], sin[0])                               # [r/2] each
            T = lc.comp.entries.shape[1]
            if attn.indexer is None:
                ent_thr[r] = (pos + 1) // r
                ent_bias[r] = torch.where(torch.arange(T, device=dev) < ent_thr[r], zero, ninf)   # [T]
            else:
                idx_thr = (pos + 1) // attn.indexer.ratio
                idx_future = torch.arange(lc.index.entries.shape[1], device=dev) >= idx_thr          # [T4]
                if selects_all(attn, lc):   # top-k takes every visible entry: HCA-style visibility
                    ent_thr[r] = idx_thr
                    ent_bias[r] = torch.where(torch.arange(T, device=dev) < idx_thr, zero, ninf)   # [T]
    W = cache.layers[0].window.shape[1]
    win_bias = torch.where(torch.arange(W, device=dev) <= pos, zero, ninf)   # [W]
    side = side_stream(dev) if fused and CONCURRENT and pos.is_cuda else None
    side2 = side_stream(dev, 1) if side is not None and SECOND_SIDE else None
    return StepContext(pos, fused, rot, rot_inv, cs, comp_cs, (pos % W).view(1), win_bias, ent_bias, ent_thr,
                       idx_thr, idx_future, zero, ninf, side, side2)


def selects_all(attn, lc: StaticLayerCache) -> bool:
    """True when the indexer's top-k covers every entry slot of this static cache (``T <= topk``): the
    selection is then all visible entries (spec §2.5: k = min(topk, #visible)), so the indexer's scores
    and sort can be skipped -- only its compressor must keep running. A property of the cache's fixed
    length, decided at capture time (the eager path selects the same set, in score order)."""
    return attn.indexer is not None and lc.index.entries.shape[1] <= attn.indexer.topk


FUSED_FAILURES: dict[str, str] = {}
"""Fused kernels that raised (e.g. a Triton compile error under another Triton version): name ->
error. After a failure the torch path is used for that kernel in this process; callers report it."""
Q_NORM_PROLOGUE = False
"""Fused step: q_norm applied by the wq_b FP8 GEMV on load (``fp8_linear(norm=...)``; the indexer's wq_b too)
instead of its own launch on the query's critical path -- 43 launches fewer per step. Off: slower both times it
was timed (bench variant ``q_norm_prologue``; session 6 with the tensor-core kernel b1 5.68 -> 5.87 ms, session 13 with
the CUDA-core GEMV 4.46 -> 4.72: each of wq_b's 8192 programs recomputes the RMS)."""


def _guarded(name: str, kernel, fallback):
    """``kernel()`` unless it failed before; its first exception is recorded and ``fallback()`` runs.
    Failures surface at the first (uncaptured warm-up) call, before anything was written."""
    if name not in FUSED_FAILURES:
        try:
            return kernel()
        except Exception as e:  # noqa: BLE001 -- recorded in FUSED_FAILURES, reported by callers
            FUSED_FAILURES[name] = repr(e)[:500]
    return fallback()


def _rms(x: torch.Tensor, weight, eps: float, cos=None, sin=None, mode: int = 0) -> torch.Tensor:
    """kernels.rmsnorm_rope with the torch reference as the guarded fallback."""
    from dsv4lib.kernels.rmsnorm_rope import rmsnorm_rope, rmsnorm_rope_reference
    return _guarded("rmsnorm_rope", lambda: rmsnorm_rope(x, weight, eps, cos, sin, mode),
                    lambda: rmsnorm_rope_reference(x, weight, eps, cos, sin, mode))


def _q_norm_prologue(attn, qa: torch.Tensor) -> bool:
    """``Q_NORM_PROLOGUE`` applies: FP8 wq_b weights (the indexer's too). The FP8 kernel takes its activations as
    fp16 operands: exact for 16-bit models; fp32 ones get the rounding every FP8 linear of theirs has on CUDA
    (on the CPU the default path keeps fp32 through the torch dequant)."""
    fp8 = torch.float8_e4m3fn
    return (Q_NORM_PROLOGUE and qa.dtype in (torch.float32, torch.bfloat16, torch.float16) and attn.wq_b.weight.dtype == fp8
            and (attn.indexer is None or attn.indexer.wq_b.weight.dtype == fp8) and not attn.wq_b.lowp
            and "fp8_linear" not in FUSED_FAILURES)


def _fusable(ctx: StepContext, x: torch.Tensor) -> bool:
    return ctx.fused and x.dtype != torch.float64


def _rope_(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """In-place interleaved RoPE of the trailing ``2*len(rot)`` dims of a fresh tensor ``x`` by the
    complex factors ``rot`` (same math as ``rope.apply_rope``: (a + ib)(cos + i sin)); returns x."""
    r = 2 * rot.shape[-1]
    xr = x[..., -r:]
    if x.dtype in (torch.float32, torch.float64):
        torch.view_as_complex(xr.unflatten(-1, (-1, 2))).mul_(rot)
        return x
    c = torch.view_as_complex(hp(xr).contiguous().unflatten(-1, (-1, 2)))   # [..., r/2] fp32 copy
    xr.copy_(torch.view_as_real(c.mul_(rot)).flatten(-2))
    return x


@torch.no_grad()
def _stack_group(lins: list) -> bool:
    """Make the weights of Linears that read the same input row slices of ONE tensor (values
    unchanged, no extra memory: each ``.weight`` becomes a view); FP8 needs 128-row blocks."""
    w0 = lins[0].weight
    fp8 = w0.dtype == torch.float8_e4m3fn
    if any(lin.weight.dtype != w0.dtype or lin.in_features != lins[0].in_features
           or lin.weight.device != w0.device or (fp8 and lin.out_features % 128) for lin in lins):
        return False
    if fp8:   # concatenate the bytes (cat of float8 tensors is not implemented on every backend)
        W = torch.cat([lin.weight.view(torch.uint8) for lin in lins]).view(torch.float8_e4m3fn)   # [sum out, in]
    else:
        W = torch.cat([lin.weight for lin in lins])                    # [sum out, in]
    S = torch.cat([lin.scale for lin in lins]) if fp8 else None        # [sum out / 128, in / 128]
    o = 0
    for lin in lins:
        n = lin.out_features
        lin.weight = torch.nn.Parameter(W[o:o + n], requires_grad=lin.weight.requires_grad)
        if fp8:
            lin.scale = S[o // 128:(o + n) // 128]
        o += n
    lins[0]._stacked = (W, S)
    return True


def stack_projections(model) -> None:
    """Stack, per layer, the projections of the attention input x (FP8: ``wq_a ‖ wkv``; float:
    compressor ``wkv ‖ wgate`` ‖ indexer compressor ``wkv ‖ wgate`` ‖ indexer ``weights_proj``) so
    the static step reads each group with one GEMV (``_proj``). Idempotent; the eager model sees
    the same values. Call before capturing (:class:`GraphedDecoder` does)."""
    for layer in model.layers:
        a = layer.attn
        groups = [[a.wq_a, a.wkv]]
        se = layer.ffn.shared_experts
        if se is not None:
            groups.append([se.w1, se.w3])
        if a.compressor is not None:
            g = [a.compressor.wkv, a.compressor.wgate]
            if a.indexer is not None:
                g += [a.indexer.compressor.wkv, a.indexer.compressor.wgate, a.indexer.weights_proj]
            groups.append(g)
        for g in groups:
            if _stacked_base(g) is None:
                _stack_group(g)


def _stacked_base(lins: list):
    """(weight, scale or None) of the stacked tensor when the weights of ``lins`` are still its
    consecutive row slices (host-side pointer checks, no sync); else None."""
    st = getattr(lins[0], "_stacked", None)
    if st is None:
        return None
    W, S = st
    o = 0
    for lin in lins:
        w = lin.weight
        if (w.dtype != W.dtype or w.shape != (lin.out_features, W.shape[1]) or o + lin.out_features > W.shape[0]
                or w.data_ptr() != W[o:].data_ptr()):
            return None
        if S is not None and lin.scale.data_ptr() != S[o // 128:].data_ptr():
            return None
        o += lin.out_features
    return (W, S) if o == W.shape[0] else None


def _proj_joint(lins: list, x: torch.Tensor) -> torch.Tensor:
    """``cat([lin(x) for lin in lins], -1)`` (float ones not upcast: bf16 stays bf16): one GEMV over
    the stacked weight when the group was stacked by :func:`stack_projections`."""
    st = _stacked_base(lins)
    if st is None:
        return torch.cat([_linear_raw(lin, x) for lin in lins], -1)
    return _stacked_gemv(st, x)


def _stacked_gemv(st: tuple, x: torch.Tensor) -> torch.Tensor:
    """x times a stacked (weight, FP8 scale or None) -> [..., sum out]."""
    W, S = st
    if S is not None:
        if x.is_cuda:
            from dsv4lib.kernels.dispatch import fp8_linear
            return fp8_linear(x, W, S)
        from .linear import dequant_fp8_block
        return F.linear(x, dequant_fp8_block(W, S, x.dtype))
    if W.dtype in (torch.float32, torch.float64):
        return F.linear(hp(x), W)
    if W.dtype == torch.bfloat16 and x.is_cuda and x.numel() <= W.shape[1] * _gemv_max_m():
        from dsv4lib.kernels.fp8_gemv import bf16_gemv   # one row: the CUDA-core GEMV, no cuBLAS split-K + reduce
        return bf16_gemv(x, W)
    return F.linear(x.to(W.dtype), W)                                   # [B, 1, sum out]


def _gemv_max_m() -> int:
    """Rows up to which stacked projections take the CUDA-core GEMV (kernels.fp8_linear.GEMV_MAX_M: one switch
    for the FP8 and the bf16 ones; the bench's ``fp8_gemv`` variant toggles both)."""
    from dsv4lib.kernels import fp8_linear
    return fp8_linear.GEMV_MAX_M


def _proj(lins: list, x: torch.Tensor) -> list[torch.Tensor]:
    """[lin(x) for lin in lins] as column slices of one stacked GEMV when the group was stacked."""
    st = _stacked_base(lins)
    if st is None:
        return [_linear_raw(lin, x) for lin in lins]
    y = _stacked_gemv(st, x)
    out, o = [], 0
    for lin in lins:
        out.append(y[..., o:o + lin.out_features])
        o += lin.out_features
    return out


def _linear_f32(lin, x: torch.Tensor) -> torch.Tensor:
    """fp32 result of a (float-weight) Linear; bf16 weights are not upcast (one read of the weight)."""
    if lin.weight.dtype in (torch.float32, torch.float64) or lin.weight.dtype == torch.float8_e4m3fn:
        return lin(hp(x))
    return F.linear(x.to(lin.weight.dtype), lin.weight).float()


def _linear_raw(lin, x: torch.Tensor) -> torch.Tensor:
    """A Linear's result in its natural dtype (the fused compressor upcasts in registers)."""
    if lin.weight.dtype in (torch.float32, torch.float64) or lin.weight.dtype == torch.float8_e4m3fn:
        return lin(hp(x))
    return F.linear(x.to(lin.weight.dtype), lin.weight)


def compressor_step(comp: Compressor, x: torch.Tensor, ctx: StepContext, st: StaticCompressorState,
                    kvg: tuple | None = None) -> None:
    """Append the token x [B,1,D] at position ``ctx.pos`` and write entry pos // r (spec §2.4): the
    torch path rewrites it every step, the fused kernel (one launch after the projections, when
    ``ctx.fused``; kernels/compressor_step.py) only when its window completes -- readers mask the
    entry until then (visibility (pos+1)//r), so both give the same visible entries.
    ``kvg``: the token's (kv, gate) projections [B, 1, coff*hd] if already computed."""
    cos, sin = ctx.comp_cs[comp.ratio]
    if _fusable(ctx, x):
        from dsv4lib.kernels.compressor_step import compressor_step_fused
        kv, gate = kvg if kvg is not None else _proj([comp.wkv, comp.wgate], x)
        kv, gate = kv[:, 0], gate[:, 0]                                 # [B, coff*hd]
        _guarded("compressor_step",
                 lambda: compressor_step_fused(kv, gate, ctx.pos, st.buf_kv, st.buf_gate, st.prev_kv, st.prev_gate,
                                               comp.ape, comp.norm.weight, cos, sin, st.entries, comp.norm.eps),
                 lambda: compressor_step_torch(comp, x, ctx.pos, st, cos, sin))
        return
    compressor_step_torch(comp, x, ctx.pos, st, cos, sin)


def compressor_step_torch(comp: Compressor, x: torch.Tensor, pos: torch.Tensor, st: StaticCompressorState,
                          cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Torch reference of the compressor step; ``cos``/``sin`` [r/2] at position (pos // r) * r."""
    r, hd = comp.ratio, comp.head_dim
    kv = _linear_f32(comp.wkv, x)                                       # [B, 1, coff*hd]
    gate = _linear_f32(comp.wgate, x)
    slot = (pos % r).view(1)
    st.buf_kv.index_copy_(1, slot, kv)
    st.buf_gate.index_copy_(1, slot, gate)
    ck = st.buf_kv                                                      # [B, r, coff*hd]
    cg = st.buf_gate + comp.ape
    if comp.overlap:
        complete = (pos % r) == r - 1
        a_kv, a_g = ck[..., :hd], cg[..., :hd]
        ck = torch.cat([st.prev_kv, ck[..., hd:]], 1)                  # [B, 2r, hd]
        cg = torch.cat([st.prev_gate, cg[..., hd:]], 1)
    e = (ck * cg.softmax(1)).sum(1, keepdim=True)                       # [B, 1, hd]
    e = comp.norm(e)
    e = apply_rope(e, cos.view(1, -1), sin.view(1, -1))
    st.entries.index_copy_(1, (pos // r).view(1), e.to(st.entries.dtype))
    if comp.overlap:
        st.prev_kv.copy_(torch.where(complete, a_kv, st.prev_kv))
        st.prev_gate.copy_(torch.where(complete, a_g, st.prev_gate))


def indexer_select(idx_mod, x: torch.Tensor, qr: torch.Tensor | None, ctx: StepContext,
                   st: StaticCompressorState, pre: list | None = None,
                   qa_norm: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k entries for the token at ``ctx.pos`` (spec §2.5) -> (indices [B, k], valid [B, k]).
    ``pre``: [compressor kv, compressor gate, weights_proj] of x if already computed. ``qr`` None:
    ``qa_norm`` = (qa, q_norm weight, eps) and the indexer's wq_b applies q_norm on load."""
    if pre is None:
        pre = ([None, None, _linear_raw(idx_mod.weights_proj, x)] if not _fusable(ctx, x) else
               _proj([idx_mod.compressor.wkv, idx_mod.compressor.wgate, idx_mod.weights_proj], x))
    compressor_step(idx_mod.compressor, x, ctx, st, None if pre[0] is None else (pre[0], pre[1]))
    keys = st.entries                                                   # [B, T, cI] fp32
    T = keys.shape[1]
    if qr is None:
        from dsv4lib.kernels.dispatch import fp8_linear
        qa, nw, eps = qa_norm
        q = fp8_linear(qa, idx_mod.wq_b.weight, idx_mod.wq_b.scale, norm=(nw, eps))
    else:
        q = idx_mod.wq_b(qr)
    q = q.unflatten(-1, (idx_mod.n_heads, idx_mod.head_dim))            # [B, 1, nI, cI]
    if _fusable(ctx, x):
        cos, sin, _ = ctx.cs[1]
        q = _rms(q, None, 0.0, cos, sin, mode=2)
    else:
        q = _rope_(q, ctx.rot[1])
    w = hp(pre[2]) * (idx_mod.head_dim ** -0.5 * idx_mod.n_heads ** -0.5)   # [B, 1, nI]
    s = torch.einsum("bshd,btd->bsht", hp(q), hp(keys)).relu()         # [B, 1, nI, T]
    score = (s * w.unsqueeze(-1)).sum(2)[:, 0]                          # [B, T]
    score = score.masked_fill(ctx.idx_future, float("-inf"))
    k = min(idx_mod.topk, T)
    sel = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]   # [B, k]
    return sel, sel < ctx.idx_thr


def attention_step(attn, x: torch.Tensor, ctx: StepContext, lc: StaticLayerCache) -> torch.Tensor:
    """x [B,1,D] (post attn_norm) at device position ``ctx.pos`` -> [B,1,D] (spec §2.3)."""
    B = x.shape[0]
    H, c = attn.n_heads, attn.head_dim
    f = 1 if attn.ratio else 0
    ent = sel = thr = pre = None
    if attn.ratio:   # compressors (and the indexer's projections): independent of the q/kv path below
        all_sel = attn.indexer is None or selects_all(attn, lc)
        cp = [attn.compressor.wkv, attn.compressor.wgate]
        ip = ([attn.indexer.compressor.wkv, attn.indexer.compressor.wgate, attn.indexer.weights_proj]
              if attn.indexer is not None else [])
        with _branch(ctx):
            pre = _proj(cp + ip, x) if _fusable(ctx, x) and _stacked_base(cp + ip) is not None else None
            compressor_step(attn.compressor, x, ctx, lc.comp, None if pre is None else (pre[0], pre[1]))
            if attn.indexer is not None and all_sel:   # every entry is selected; the indexer's keys still advance
                compressor_step(attn.indexer.compressor, x, ctx, lc.index, None if pre is None else (pre[2], pre[3]))
    if _fusable(ctx, x):
        cos, sin, _ = ctx.cs[f]
        qa, kva = _proj([attn.wq_a, attn.wkv], x)                       # [B, 1, q_lora], [B, 1, c]
        kv = None
        if (lc.window.dtype == kva.dtype and lc.window.is_contiguous() and ctx.win_slot.dtype == torch.int64
                and "rmsnorm_rope" not in FUSED_FAILURES):
            from dsv4lib.kernels.rmsnorm_rope import rmsnorm_rope   # the key straight into the window ring,
            with _branch(ctx):                                      # off the query's critical path
                rmsnorm_rope(kva, attn.kv_norm.weight, attn.kv_norm.eps, cos, sin, scatter_to=(lc.window, ctx.win_slot))
        else:
            kv = _rms(kva, attn.kv_norm.weight, attn.kv_norm.eps, cos, sin)   # [B, 1, c]
        if _q_norm_prologue(attn, qa):   # q_norm applied by the wq_b GEMV(s) on load: one launch fewer
            from dsv4lib.kernels.dispatch import fp8_linear
            qr, qa_norm = None, (qa, attn.q_norm.weight, attn.q_norm.eps)
            qb = fp8_linear(qa, attn.wq_b.weight, attn.wq_b.scale, norm=qa_norm[1:])
        else:
            qr, qa_norm = _rms(qa, attn.q_norm.weight, attn.q_norm.eps), None   # [B, 1, q_lora]
            qb = attn.wq_b(qr)
        q = _rms(qb.unflatten(-1, (H, c)), None, attn.eps, cos, sin, mode=1)   # [B, 1, H, c]
    else:
        qa_norm = None
        qr = attn.q_norm(attn.wq_a(x))                                  # [B, 1, q_lora]
        q = attn.wq_b(qr).unflatten(-1, (H, c))                         # [B, 1, H, c]
        q = _rope_(q * torch.rsqrt(hp(q).pow(2).mean(-1, keepdim=True) + attn.eps).to(q.dtype), ctx.rot[f])
        kv = _rope_(attn.kv_norm(attn.wkv(x)), ctx.rot[f])              # [B, 1, c]
    if kv is not None:
        lc.window.index_copy_(1, ctx.win_slot, kv.to(lc.window.dtype))
    _join(ctx)                                                          # window key and compressors written
    if attn.ratio:
        ent = lc.comp.entries                                           # [B, T, c]
        if not all_sel:
            sel, _ = indexer_select(attn.indexer, x, qr, ctx, lc.index, None if pre is None else pre[2:],
                                    qa_norm)                                                    # [B, k]
            thr = ctx.idx_thr
        else:
            thr = ctx.ent_thr[attn.ratio]

    def core_torch() -> torch.Tensor:
        keys = lc.window                                                # [B, W, c]
        bias = ctx.win_bias.expand(B, -1)                               # [B, W]
        if ent is not None:
            if sel is not None:
                e = ent.gather(1, sel.unsqueeze(-1).expand(-1, -1, c))  # [B, k, c]
                cb = torch.where(sel < thr, ctx.zero, ctx.ninf)         # [B, k]
            else:
                e, cb = ent, ctx.ent_bias[attn.ratio].expand(B, -1)     # [B, T, c], [B, T]
            keys = torch.cat([keys, e.to(keys.dtype)], 1)
            bias = torch.cat([bias, cb], -1)
        z = torch.einsum("bshd,bnd->bhsn", hp(q), hp(keys)) * c ** -0.5 + bias[:, None, None, :]
        sink = hp(attn.attn_sink).view(1, H, 1, 1).expand(B, H, 1, 1)
        p = torch.cat([z, sink], -1).softmax(-1)[..., :-1]              # [B, H, 1, N]
        return torch.einsum("bhsn,bnd->bshd", p, hp(keys)).to(x.dtype)  # [B, 1, H, c]

    if _fusable(ctx, x):   # attention core + the inverse RoPE of its output (-sin) in the combine launch
        from dsv4lib.kernels.decode_attention import decode_attention
        cos, _, nsin = ctx.cs[f]
        o = _guarded("decode_attention",
                     lambda: decode_attention(q[:, 0], lc.window, ent, sel, ctx.pos, thr, attn.attn_sink,
                                              c ** -0.5, rope=(cos, nsin)).unsqueeze(1),
                     lambda: _rms(core_torch(), None, 0.0, cos, nsin, mode=2))   # [B, 1, H, c]
    else:
        o = _rope_(core_torch(), ctx.rot_inv[f])
    u = grouped_output_a(attn, o.reshape(B, 1, attn.groups, -1))       # [B, 1, G*o_lora]
    return attn.wo_b(u)


def hc_pre_step(layer, X: torch.Tensor, site: str, fused: bool = False, norm=None):
    """``Block._pre`` (spec §2.2), then ``norm`` (the sublayer's input RMSNorm) when given. ``fused``:
    the whole site, norm included, in one Triton launch (kernels/mhc_step.py); otherwise on CUDA the
    split + Sinkhorn run as one Triton launch."""
    c = layer.cfg
    hc = c.hc_mult

    def then_norm(r):
        return r if norm is None else (norm(r[0]), r[1], r[2])

    if hc & (hc - 1) or X.dtype == torch.float64 or not (X.is_cuda or fused):
        return then_norm(layer._pre(X, site))
    fn, scale, base = (getattr(layer, f"{site}_{k}") for k in ("fn", "scale", "base"))
    if fused:
        from dsv4lib.kernels.mhc_step import hc_pre_fused
        return _guarded("hc_pre", lambda: hc_pre_fused(X, fn, scale, base, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps,
                                                       None if norm is None else norm.weight,
                                                       1e-6 if norm is None else norm.eps),
                        lambda: then_norm(layer._pre(X, site)))
    from dsv4lib.kernels.mhc_sinkhorn import hc_split
    mix = _mix(X, fn, c.rms_norm_eps)                                   # [B, 1, (2+hc)*hc]
    pre, post, comb = hc_split(mix, scale, base, hc, c.hc_sinkhorn_iters, c.hc_eps)
    y = (pre.unsqueeze(-1) * hp(X)).sum(-2)                             # [B, 1, D]
    return then_norm((y.to(X.dtype), post, comb))


def hc_post_step(f: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fused: bool,
                 f2: torch.Tensor | None = None) -> torch.Tensor:
    """``hc_post`` (spec §2.2) of the sublayer output ``f`` (``(f + f2)`` rounded to X's dtype when
    ``f2`` is given); one Triton launch when ``fused`` (kernels/mhc_step.py)."""
    def torch_path():
        ff = f if f2 is None else (hp(f) + hp(f2)).to(X.dtype)
        return hc_post(ff, X, post, comb)
    if fused and X.dtype != torch.float64 and not X.shape[-2] & (X.shape[-2] - 1):
        from dsv4lib.kernels.mhc_step import hc_post_fused
        return _guarded("hc_post", lambda: hc_post_fused(f, X, post, comb, f2), torch_path)
    return torch_path()


def _router_logits(gate, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ W^T`` of the router; bf16/fp16 operands on CUDA go to one GEMM with fp32 output
    (products of bf16 values are exact in fp32) instead of upcasting the weight every step."""
    W = gate.weight
    if x.is_cuda and W.dtype in (torch.bfloat16, torch.float16) and x.dtype == W.dtype and "mm_out_dtype" not in FUSED_FAILURES:
        try:
            return torch.mm(x, W.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError) as e:   # torch without mm(..., out_dtype=)
            FUSED_FAILURES["mm_out_dtype"] = repr(e)[:200]
    return F.linear(hp(x), hp(W))


def moe_step(ffn, x: torch.Tensor, ids: torch.Tensor, ctx: StepContext | None = None):
    """The MoE of the fused decode step for x [B,1,D] (spec §2.7) -> (routed fp32 [B,1,D], shared
    [B,1,D] in x's dtype or None): router logits + top-k in one launch (kernels/moe_step.py), the expert
    backend, the shared expert as one stacked w1‖w3 GEMV + one SwiGLU launch + w2 (on ``ctx.side``,
    concurrent with the router and the routed experts, when there is one). The two parts are summed (and rounded to x's dtype, as ``MoE.forward``) inside the mHC post kernel."""
    from dsv4lib.kernels.moe_step import router_fused, router_topk, swiglu_rows
    shape = x.shape
    se = ffn.shared_experts
    sh = None
    if se is not None:   # concurrent with the router and the routed experts
        with _branch(ctx):
            gu = _proj_joint([se.w1, se.w3], x)                        # [B, 1, 2I] (g ‖ u)
            sh = se.w2(swiglu_rows(gu, se.limit).to(x.dtype))           # [B, 1, D]
    xf = x.reshape(-1, shape[-1])                                       # [B, D]
    g = ffn.gate
    hidx = g.tid2eid[ids.reshape(-1)] if g.hash else None
    if xf.dtype == g.weight.dtype and xf.dtype in (torch.bfloat16, torch.float16) and xf.shape[0] <= 16:
        idx, w = router_fused(xf, g.weight, None if g.hash else g.bias, g.k, g.scale, g.renorm, hidx)
    else:
        logits = _router_logits(g, xf)                                  # [B, E] fp32
        _, idx, w = router_topk(logits, None if g.hash else g.bias, g.k, g.scale, g.renorm, hidx)
    y = ffn.experts(xf, idx, w, ffn.limit).reshape(shape)               # [B, 1, D] fp32
    if se is not None:
        _join(ctx)
    return y, sh


def _moe_fusable(ffn) -> bool:
    return not ffn._hooks and ffn.limit > 0


SECOND_SIDE = True
"""With DEFER_COMB: the deferred Sinkhorn launch runs on a third stream (``StepContext.side2``), beside the side
stream's compressor projections / shared expert instead of ahead of them (on one side stream it delayed the
compressor branch, which the attention core waits for, by its 3.5 us). False: on the side stream (the bench's A/B)."""

DEFER_COMB = True
"""Fused step with a side stream: the mHC post+pre launch leaves post and comb (the Sinkhorn: ~2 of its 8 us
at b1) to a small launch on a side stream (``SECOND_SIDE``; kernels/mhc_step.py ``defer_comb`` / ``hc_comb``); they are
first read by the mHC post after the sublayer, past the next join. Not on CUDA without a side stream (it would
add a launch to the chain). False: computed inside the launch (the bench's A/B switch)."""


def _post_pre(layer, X: torch.Tensor, site: str, fz: bool, norm, pending, ctx: StepContext | None = None):
    """The previous sublayer's pending mHC post (``(f, f2, post, comb)`` or None), then this site's mHC
    pre and ``norm`` -> (X, normed sublayer input, post, comb, mix). Fused: one launch for both
    (kernels/mhc_step.py ``hc_post_pre_fused``); otherwise ``hc_post_step`` then ``hc_pre_step``.
    ``mix``: None, or with ``DEFER_COMB`` and a side stream the mixing logits that post and comb are
    being computed from on ``ctx.side2`` (``ctx.side`` without ``SECOND_SIDE``) -- the caller keeps it
    referenced until its next :func:`_join`."""
    def separate():
        Xn = X if pending is None else hc_post_step(pending[0], X, pending[2], pending[3], fz, pending[1])
        return (Xn, *hc_pre_step(layer, Xn, site, fz, norm), None)
    c = layer.cfg
    hc = c.hc_mult
    if pending is None or not fz or X.dtype == torch.float64 or hc & (hc - 1):
        return separate()
    from dsv4lib.kernels.mhc_step import hc_comb, hc_post_pre_fused
    f, f2, pp, pc = pending
    fn, scale, base = (getattr(layer, f"{site}_{k}") for k in ("fn", "scale", "base"))
    # (on the CPU -- the interpreter -- the deferred launch runs in place: the same code path as a GPU's)
    defer = DEFER_COMB and (getattr(ctx, "side", None) is not None or not X.is_cuda)

    def fused():
        r = hc_post_pre_fused(f, X, pp, pc, f2, fn, scale, base, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps,
                              norm.weight, norm.eps, defer_comb=defer)
        if not defer:
            return (*r, None)
        Xn, y, mix = r
        with _branch(ctx, second=True):          # post and comb off the critical path
            post, comb = hc_comb(mix, scale, base, hc, c.hc_sinkhorn_iters, c.hc_eps)
        return Xn, y, post, comb, mix
    return _guarded("hc_post_pre", fused, separate)


def block_step(layer, X: torch.Tensor, ctx: StepContext, ids: torch.Tensor, lc: StaticLayerCache,
               pending=None) -> tuple[torch.Tensor, tuple]:
    """One mHC block (spec §2.2) for X [B,1,hc,D]. ``pending``: the previous block's FFN output
    ``(f, f2, post, comb)`` not yet added into X -- its mHC post runs inside this block's first mHC pre
    (one launch fewer when fused). Returns (X, this block's pending FFN output) the same way."""
    fz = ctx.fused
    # mix_a / mix_f: inputs of side-stream work (DEFER_COMB), referenced here until the joins in attention_step
    # and below
    X, x, post, comb, mix_a = _post_pre(layer, X, "hc_attn", fz, layer.attn_norm, pending, ctx)   # x: attn_norm(input)
    a = attention_step(layer.attn, x, ctx, lc)
    X, xn, post, comb, mix_f = _post_pre(layer, X, "hc_ffn", fz, layer.ffn_norm, (a, None, post, comb), ctx)
    if _fusable(ctx, xn) and _moe_fusable(layer.ffn):
        y, sh = moe_step(layer.ffn, xn, ids, ctx)
        out = X, (y, sh, post, comb)
    else:
        out = X, (layer.ffn(xn, ids), None, post, comb)
    _join(ctx)   # what is still open (the FFN site's deferred Sinkhorn when moe_step ran no shared expert)
    del mix_a, mix_f
    return out


def check_static_ready(model) -> None:
    if model.lowp_sim:
        raise ValueError("static decode: the low-precision simulation is not implemented on this path")


@torch.no_grad()
def static_decode_step(model, cache: StaticCache, ids: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """ids [B,1] at position ``cache.pos`` -> fp32 logits [B, V]; advances ``cache.pos`` on device.

    ``fused`` runs the step's small pieces as Triton launches: compressor steps, RMSNorm(+RoPE), the
    attention core (kernels/compressor_step.py, rmsnorm_rope.py, decode_attention.py), mHC pre/post
    (mhc_step.py), router logits + top-k and the shared expert's SwiGLU (moe_step.py), with the
    independent branches on a side stream (``CONCURRENT``). :class:`GraphedDecoder` and the benchmark use
    it by default (H200, b1 @1K: 6.0 ms per step vs 28.2 ms for the torch step, docs/FULLSCALE_NOTES.md);
    False is the torch reference path (the CPU tests' default). Each block's FFN output is applied to the
    streams inside the next block's first mHC pre (``block_step``'s ``pending``).
    """
    B = ids.shape[0]
    if B != cache.batch_size or ids.shape[1] != 1:
        raise ValueError(f"static decode: ids {tuple(ids.shape)}, cache made for batch {cache.batch_size}, 1 token")
    X = model.embed(ids).unsqueeze(2).expand(-1, -1, model.config.hc_mult, -1).contiguous()   # [B, 1, hc, D]
    ctx = step_context(model, cache, fused)
    pending = None
    for i, layer in enumerate(model.layers):
        X, pending = block_step(layer, X, ctx, ids, cache.layers[i], pending)
    f, f2, post, comb = pending
    X = hc_post_step(f, X, post, comb, fused, f2)
    cache.pos.add_(1)
    return model.logits_from_hidden(X)[:, 0]


def warm_up(model, cache: StaticCache, ids: torch.Tensor, fused: bool) -> None:
    """One uncaptured step at the cache's position (kernel compilation, allocator warm-up before a
    capture), then the position and the small state restored.

    Exactly one step: everything it writes (window slot ``pos % W``, compressor buffer slot ``pos % r``,
    entry ``pos // r`` on completion) is rewritten by the next real step at the same position before
    that step reads it. A second warm-up step (at ``pos + 1``) would leave a wrong key in window slot
    ``(pos + 1) % W`` -- still visible at ``pos`` once ``pos >= W - 1`` -- and, when ``pos`` completes a
    compressor window, a wrong row in the buffer the completion reads: the first real step would then
    attend to one wrong key (it did until 2026-11-29, with two warm-up steps)."""
    saved = [t.clone() for t in cache.small_state()]
    static_decode_step(model, cache, ids, fused)
    for t, v in zip(cache.small_state(), saved):
        t.copy_(v)


class GraphedDecoder:
    """The whole decode step captured in one CUDA graph over a :class:`StaticCache`.

    ``step(ids [B,1]) -> logits [B, V]`` (a view of the graph's static output: copy it if kept
    across steps). One warm-up step (:func:`warm_up`) runs before the capture at the cache's current
    position, leaving the cache as the real step will find it.
    """

    def __init__(self, model, cache: StaticCache, fused: bool = True) -> None:
        check_static_ready(model)
        if fused:
            stack_projections(model)
        self.model, self.cache = model, cache
        dev = cache.pos.device
        self.ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=dev)
        saved = [t.clone() for t in cache.small_state()]
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            warm_up(model, cache, self.ids, fused)
        torch.cuda.current_stream(dev).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = static_decode_step(model, cache, self.ids, fused)
        for t, v in zip(cache.small_state(), saved):   # capture records, runs nothing; be safe
            t.copy_(v)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


def graph_capturable(model, device) -> bool:
    """Whether the whole decode step of ``model`` can be captured in a CUDA graph on ``device``: CUDA,
    no low-precision simulation, INT2 experts (the dense and MXFP4 backends sync with the host) and no
    MoE hooks (they observe routing on the host)."""
    from .quantized_experts import INT2Experts
    return (torch.device(device).type == "cuda" and hasattr(model, "layers") and not getattr(model, "lowp_sim", True)
            and all(isinstance(layer.ffn.experts, INT2Experts) and not layer.ffn._hooks for layer in model.layers))


class StaticDecoder:
    """One-token decode steps over a :class:`StaticCache`: replays of a captured CUDA graph
    (``capture=True``, :class:`GraphedDecoder`) or the same step uncaptured (any device).

    ``step(ids [B,1]) -> fp32 logits [B, V]`` (a fresh tensor). ``fused`` defaults to ``capture``
    (the Triton step kernels on the GPU, the torch reference step elsewhere).
    """

    def __init__(self, model, cache: StaticCache, capture: bool = False, fused: bool | None = None) -> None:
        self.model, self.cache = model, cache
        self.fused = capture if fused is None else fused
        self.graph = GraphedDecoder(model, cache, fused=self.fused) if capture else None

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            return self.graph.step(ids).clone()
        return static_decode_step(self.model, self.cache, ids, self.fused)

