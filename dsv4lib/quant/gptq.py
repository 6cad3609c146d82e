"""GPTQ for INT2 g64 routed experts, batched over experts (quant_notes.md §1.1, §1.2, §7.3).

Algorithm (Frantar et al., "GPTQ", 2022; the IST-DASLab reference as described in quant_notes §1.1),
written for a stack of E independent problems ``W [E, out, in]``, ``H [E, in, in]`` at once:

1. dead columns (``diag H == 0``): ``H[d, d] = 1`` (and, only if asked, ``W[:, d] = 0`` as upstream);
2. damping ``H + λ·mean(diag H)·I``, λ = ``damp``; if a Cholesky fails the expert's λ is multiplied
   by ``damp_factor`` and retried, finally H is replaced by its diagonal (all logged in the result);
3. ``H⁻¹`` by Cholesky, then the *upper* Cholesky factor ``U`` of ``H⁻¹`` (after the act-order
   permutation, if any);
4. columns left to right in lazy blocks of ``block_size``; each column's scaled error
   ``(w − q)/U[i, i]`` updates the rest of its block (rank-1), and the whole block's errors update all
   later columns with one matmul at the block end.

Group grids (scale/zero per 64 inputs per row):

* dynamic (reference rule): a group's grid is computed when the loop reaches its first column,
  from ``W`` *as it stood at the start of the current block* (earlier blocks' updates included,
  the current block's not);
* static: every grid is computed up front from the original ``W`` (before any permutation), so
  act-order needs no ``g_idx`` and the on-disk format is unchanged.

Options beyond the reference: Hessian-aware grid search (range shrink = clipping, zero-point search
using the 4-bit zero's spare room, negative scales) scoring each candidate by the loss of fixing the
group with optimal compensation of the not-yet-quantized columns:
``eᵀ (H⁻¹_SS)⁻¹ e``, computed with a triangular factor. fp16 scale rounding happens before any
column is quantized, so the stored grid is exactly the one GPTQ used.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from dsv4lib.quant.grid import GridSearch, quantize_codes, search_grid
from dsv4lib.quant.qweight import QuantizedWeight

ZERO_MAX = 15  # zero points are stored in 4 bits


@dataclass(frozen=True)
class GPTQConfig:
    """Options of :func:`gptq_batched` (defaults: the project's choice, see docs/QUANT.md).

    ``grid_search=None`` with ``static_groups=False`` and ``zero_dead_columns=True`` is the
    reference algorithm (apart from the fp16 scale rounding the format needs).
    """

    bits: int = 2
    group_size: int = 64
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    grid_search: GridSearch | None = field(default_factory=GridSearch)
    zero_dead_columns: bool = False
    damp_factor: float = 10.0
    max_damp_tries: int = 4
    expert_chunk: int = 64

    def __post_init__(self):
        if self.bits != 2:
            raise ValueError(f"GPTQConfig: only bits=2 is supported by the INT2 format, got {self.bits}")
        if self.group_size <= 0 or self.block_size % self.group_size:
            raise ValueError(f"GPTQConfig: block_size {self.block_size} must be a multiple of "
                             f"group_size {self.group_size}")
        if self.act_order and not self.static_groups:
            raise ValueError("GPTQConfig: act_order needs static_groups=True (the INT2 format has no g_idx)")
        if not self.damp > 0 or self.damp_factor <= 1 or self.max_damp_tries < 0:
            raise ValueError(f"GPTQConfig: bad damping (damp={self.damp}, factor={self.damp_factor}, "
                             f"tries={self.max_damp_tries})")
        if self.expert_chunk < 1:
            raise ValueError(f"GPTQConfig: expert_chunk must be >= 1, got {self.expert_chunk}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @staticmethod
    def reference(**overrides) -> GPTQConfig:
        """The reference GPTQ (dynamic groups, min-max grid, dead columns zeroed)."""
        base = dict(grid_search=None, static_groups=False, act_order=False, zero_dead_columns=True)
        base.update(overrides)
        return GPTQConfig(**base)


@dataclass(frozen=True)
class GPTQResult:
    """Output of :func:`gptq_batched`: the quantized stack plus per-expert diagnostics."""

    qweight: QuantizedWeight  # codes [E, out, in]
    damp: torch.Tensor  # [E] damping fraction finally used
    damp_retries: torch.Tensor  # [E] int64, how many times damping was increased
    diagonal_fallback: torch.Tensor  # [E] bool, H replaced by diag(H) after all retries failed
    dead_columns: torch.Tensor  # [E] int64, input channels with diag(H) == 0


def _permute_sym(A: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``A[e][perm[e]][:, perm[e]]`` for A [E, C, C], perm [E, C]."""
    E, C, _ = A.shape
    rows = torch.gather(A, 1, perm[:, :, None].expand(E, C, C))
    return torch.gather(rows, 2, perm[:, None, :].expand(E, C, C))


def _inverse_factors(H: torch.Tensor, perm: torch.Tensor | None, cfg: GPTQConfig):
    """Damped ``H⁻¹`` (original order) and upper Cholesky ``U`` of the (permuted) ``H⁻¹``.

    Per-expert damping escalation on failure; returns (Hinv, U, damp [E], retries [E], diag_only [E]).
    """
    E, C, _ = H.shape
    eye = torch.eye(C, dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(-1)  # [E]
    damp = torch.full((E,), cfg.damp, dtype=H.dtype, device=H.device)
    retries = torch.zeros(E, dtype=torch.int64, device=H.device)
    diag_only = torch.zeros(E, dtype=torch.bool, device=H.device)
    Hinv, U = torch.empty_like(H), torch.empty_like(H)
    todo = torch.arange(E, device=H.device)
    for attempt in range(cfg.max_damp_tries + 2):
        sub = H[todo]  # [n, C, C]
        if attempt == cfg.max_damp_tries + 1:  # last resort: keep only the diagonal
            sub = torch.diag_embed(sub.diagonal(dim1=-2, dim2=-1))
            diag_only[todo] = True
        Hd = sub + (damp[todo] * mean_diag[todo])[:, None, None] * eye
        del sub
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        Hi = torch.cholesky_inverse(L)
        del L
        Hp = _permute_sym(Hi, perm[todo]) if perm is not None else Hi
        Uc, info2 = torch.linalg.cholesky_ex(Hp, upper=True)
        del Hp
        ok = (info == 0) & (info2 == 0) & torch.isfinite(Uc).all(-1).all(-1)
        Hinv[todo[ok]] = Hi[ok]
        U[todo[ok]] = Uc[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            break
        if attempt < cfg.max_damp_tries:
            damp[todo] *= cfg.damp_factor
            retries[todo] += 1
    if todo.numel():
        raise RuntimeError(f"GPTQ: Hessian of experts {todo.tolist()} is not usable even as a diagonal "
                           "(non-finite values?)")
    return Hinv, U, damp, retries, diag_only


def _static_metrics(Hinv: torch.Tensor, G: int) -> torch.Tensor:
    """Per group g: ``M_g`` with ``eᵀ (H⁻¹_gg)⁻¹ e = ‖e M_g‖²`` for row vectors e. → [E, ng, G, G]."""
    E, C, _ = Hinv.shape
    ng = C // G
    blocks = Hinv.unflatten(1, (ng, G)).unflatten(3, (ng, G))  # [E, ng, G, ng, G]
    idx = torch.arange(ng, device=Hinv.device)
    diag_blocks = blocks[:, idx, :, idx, :].transpose(0, 1)  # [E, ng, G, G]
    L = torch.linalg.cholesky(diag_blocks)
    eye = torch.eye(G, dtype=Hinv.dtype, device=Hinv.device)
    Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    return Linv.transpose(-1, -2)  # L^{-T}


def _row_loss(M: torch.Tensor):
    """Loss ``‖err @ M‖²`` per row and candidate for err [E, R, K, G], M [E, G, G] → [E, R, K]."""
    def loss(err: torch.Tensor) -> torch.Tensor:
        E, R, K, G = err.shape
        return torch.bmm(err.reshape(E, R * K, G), M).square_().sum(-1).view(E, R, K)
    return loss


def _gptq_chunk(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig):
    """GPTQ on one chunk. W [E, R, C], H [E, C, C] in the compute dtype (both modified in place)."""
    E, R, C = W.shape
    G, B, maxq = cfg.group_size, cfg.block_size, cfg.maxq
    ng = C // G
    dev = W.device
    diag = H.diagonal(dim1=-2, dim2=-1)  # view [E, C]
    dead = diag == 0  # [E, C]
    n_dead = dead.sum(-1)
    if bool(dead.any()):
        diag.masked_fill_(dead, 1.0)
        if cfg.zero_dead_columns:
            W.masked_fill_(dead[:, None, :], 0.0)
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True) if cfg.act_order else None  # [E, C]
    Hinv, U, damp, retries, diag_only = _inverse_factors(H, perm, cfg)
    del H, diag
    eye_g = torch.eye(G, dtype=W.dtype, device=dev)

    scale = torch.empty(E, R, ng, dtype=W.dtype, device=dev)
    zero = torch.empty(E, R, ng, dtype=W.dtype, device=dev)
    if cfg.static_groups:
        M = _static_metrics(Hinv, G) if cfg.grid_search is not None else None  # [E, ng, G, G]
        for g in range(ng):
            loss = _row_loss(M[:, g]) if M is not None else None
            scale[:, :, g], zero[:, :, g] = search_grid(W[:, :, g * G:(g + 1) * G], loss, maxq, ZERO_MAX,
                                                        cfg.grid_search)
    del Hinv
    if perm is not None:
        W = torch.gather(W, 2, perm[:, None, :].expand(E, R, C))
        col_group = perm // G  # [E, C] original group of each permuted column

    Q = torch.empty(E, R, C, dtype=torch.uint8, device=dev)
    for i1 in range(0, C, B):
        i2 = min(i1 + B, C)
        nb = i2 - i1
        if not cfg.static_groups:
            # Reference rule: a group's grid comes from W as it stands at the start of the current
            # block, so all grids of the block can be computed here, before its columns.
            for j in range(i1, i2, G):
                loss = None
                if cfg.grid_search is not None:
                    Mg = torch.linalg.solve_triangular(U[:, j:j + G, j:j + G], eye_g.expand(E, G, G), upper=True)
                    loss = _row_loss(Mg)
                scale[:, :, j // G], zero[:, :, j // G] = search_grid(W[:, :, j:j + G], loss, maxq, ZERO_MAX,
                                                                      cfg.grid_search)
            s_blk = scale[:, :, i1 // G:i2 // G].repeat_interleave(G, dim=-1).transpose(1, 2).contiguous()
            z_blk = zero[:, :, i1 // G:i2 // G].repeat_interleave(G, dim=-1).transpose(1, 2).contiguous()
        elif perm is None:
            s_blk = scale[:, :, i1 // G:i2 // G].repeat_interleave(G, dim=-1).transpose(1, 2).contiguous()
            z_blk = zero[:, :, i1 // G:i2 // G].repeat_interleave(G, dim=-1).transpose(1, 2).contiguous()
        else:
            g = col_group[:, i1:i2]  # [E, nb] original group of each column of the block
            gi = g[:, None, :].expand(E, R, nb)
            s_blk = torch.gather(scale, 2, gi).transpose(1, 2).contiguous()  # [E, nb, R]
            z_blk = torch.gather(zero, 2, gi).transpose(1, 2).contiguous()
        W1 = W[:, :, i1:i2].transpose(1, 2).contiguous()  # [E, nb, R] working copy of the block
        Q1 = torch.empty_like(W1)  # [E, nb, R] codes (float)
        Err1 = torch.empty_like(W1)  # [E, nb, R]
        U1 = U[:, i1:i2, i1:i2].contiguous()  # [E, nb, nb]
        dinv = 1.0 / U1.diagonal(dim1=-2, dim2=-1)  # [E, nb]
        for i in range(nb):
            w, s, z, q, err = W1[:, i], s_blk[:, i], z_blk[:, i], Q1[:, i], Err1[:, i]  # [E, R] views
            torch.div(w, s, out=q)
            q.round_().add_(z).clamp_(0, maxq)
            torch.sub(q, z, out=err)
            err.mul_(s).sub_(w).mul_(-dinv[:, i, None])  # (w − dequant(q)) / U[i, i]
            W1[:, i + 1:].addcmul_(U1[:, i, i + 1:, None], err[:, None, :], value=-1.0)  # rank-1 in block
        Q[:, :, i1:i2] = Q1.transpose(1, 2).to(torch.uint8)
        if i2 < C:
            W[:, :, i2:] -= torch.bmm(Err1.transpose(1, 2), U[:, i1:i2, i2:])  # lazy block update

    if perm is not None:
        Q = torch.empty_like(Q).scatter_(2, perm[:, None, :].expand(E, R, C), Q)
    qw = QuantizedWeight(Q, scale.to(torch.float16), zero.to(torch.uint8), G)
    return qw, damp, retries, diag_only, n_dead


def gptq_batched(W: torch.Tensor, H: torch.Tensor, config: GPTQConfig | None = None,
                 **options) -> GPTQResult:
    """GPTQ on a stack of experts: ``W [E, out, in]``, ``H [E, in, in]`` (Σ x xᵀ per expert).

    All experts of a chunk (``config.expert_chunk``) are one batched problem (batched Cholesky,
    bmm). Runs on W's device in fp32 (fp64 if H is fp64). Experts whose H is entirely zero (no
    calibration tokens) are rejected: route them to :mod:`dsv4lib.quant.fallback` instead of
    letting the dead-column rule touch them.
    """
    cfg = replace(config or GPTQConfig(), **options) if options else (config or GPTQConfig())
    if W.dim() != 3 or H.dim() != 3 or H.shape[0] != W.shape[0] or H.shape[1:] != (W.shape[2], W.shape[2]):
        raise ValueError(f"gptq_batched: need W [E, out, in] and H [E, in, in], got {tuple(W.shape)} "
                         f"and {tuple(H.shape)}")
    if W.shape[2] % cfg.group_size:
        raise ValueError(f"gptq_batched: in_features {W.shape[2]} is not a multiple of {cfg.group_size}")
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    empty = (H.diagonal(dim1=-2, dim2=-1) == 0).all(-1)
    if bool(empty.any()):
        raise ValueError(f"gptq_batched: experts {empty.nonzero().flatten().tolist()} have an all-zero "
                         "Hessian (no calibration data); quantize them with dsv4lib.quant.fallback")
    parts, damps, retries, diag_only, dead = [], [], [], [], []
    for e0 in range(0, W.shape[0], cfg.expert_chunk):
        e1 = min(e0 + cfg.expert_chunk, W.shape[0])
        qw, d, r, dg, nd = _gptq_chunk(W[e0:e1].to(device=W.device, dtype=dtype, copy=True),
                                       H[e0:e1].to(device=W.device, dtype=dtype, copy=True), cfg)
        parts.append(qw)
        damps.append(d)
        retries.append(r)
        diag_only.append(dg)
        dead.append(nd)
    return GPTQResult(QuantizedWeight.stack(parts), torch.cat(damps), torch.cat(retries),
                      torch.cat(diag_only), torch.cat(dead))


def quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int = 2, group_size: int = 64,
                    **options) -> QuantizedWeight:
    """GPTQ on one matrix ``W [out, in]`` with Hessian ``H [in, in]`` → :class:`QuantizedWeight`.

    ``options`` are :class:`GPTQConfig` fields (``damp``, ``block_size``, ``act_order``,
    ``static_groups``, ``grid_search``, ``zero_dead_columns``, …).
    """
    known = {f.name for f in fields(GPTQConfig)}
    bad = set(options) - known
    if bad:
        raise TypeError(f"quantize_weight: unknown options {sorted(bad)} (known: {sorted(known)})")
    cfg = GPTQConfig(bits=bits, group_size=group_size, **options)
    return gptq_batched(W[None], H[None], cfg).qweight[0]


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` per expert = ``‖(W − Ŵ) Xᵀ‖²`` when ``H = XᵀX``.

    W, W_hat ``[E, out, in]`` (or ``[out, in]``), H ``[E, in, in]`` → fp64 ``[E]`` (or scalar).
    """
    single = W.dim() == 2
    if single:
        W, W_hat, H = W[None], W_hat[None], H[None]
    out = []
    for e0 in range(0, W.shape[0], chunk):
        D = (W[e0:e0 + chunk].float() - W_hat[e0:e0 + chunk].float().to(W.device))  # [e, R, C]
        Hc = H[e0:e0 + chunk].to(device=W.device, dtype=torch.float32)
        out.append((torch.bmm(D, Hc) * D).sum((-1, -2)).double())
    res = torch.cat(out)
    return res[0] if single else res
