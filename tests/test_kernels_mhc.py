"""kernels/mhc_step.py (interpreted on CPU, compiled on CUDA) against the eager mHC math
(dsv4lib.model.mhc.hc_pre / hc_post): fresh random inputs, D not a power of two, fp32 and bf16 streams."""
import pytest
import torch

from dsv4lib.kernels.mhc_step import (hc_comb, hc_post_fused, hc_post_pre_fused, hc_post_reference, hc_pre_fused,
                                      hc_pre_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(dtype, B=3, hc=4, D=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(B, 1, hc, D, generator=g) * 2).to(DEV, dtype)      # [B, 1, hc, D]
    fn = (torch.randn((2 + hc) * hc, hc * D, generator=g) * (hc * D) ** -0.5).to(DEV)
    scale = (torch.rand(3, generator=g) + 0.5).to(DEV)
    base = torch.randn((2 + hc) * hc, generator=g).to(DEV)
    return X, fn, scale, base


@pytest.mark.parametrize("launch,hc", [("one", 4), ("many", 4), ("one", 2), ("many", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_pre_fused_matches_eager(dtype, launch, hc, monkeypatch):
    """Both launch configs of the pre (``pre_launch``: one token / several tokens), forced for any token count;
    hc 4 (V4) and 2 (the embedded model)."""
    import dsv4lib.kernels.mhc_step as mhc
    cfg = mhc.PRE_ONE if launch == "one" else mhc.PRE_MANY
    monkeypatch.setattr(mhc, "PRE_ONE", cfg)
    monkeypatch.setattr(mhc, "PRE_MANY", cfg)
    X, fn, scale, base = _inputs(dtype, hc=hc)
    y, post, comb = hc_pre_fused(X, fn, scale, base, 20, 1e-6, 1e-6)
    ry, rpost, rcomb = hc_pre_reference(X, fn, scale, base, 20, 1e-6, 1e-6)
    assert y.dtype == dtype and y.shape == ry.shape and post.shape == rpost.shape and comb.shape == rcomb.shape
    assert (post - rpost).abs().max() <= 1e-5
    assert (comb - rcomb).abs().max() <= 1e-5
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (y.float() - ry.float()).abs().max() <= tol * ry.float().abs().max()
    assert (comb.sum(-2) - 1).abs().max() < 1e-3                         # Sinkhorn ran (columns ~ 1)


@pytest.mark.parametrize("dtype,D,single_max", [(torch.float32, 200, 4096), (torch.bfloat16, 1500, 4096),
                                                (torch.bfloat16, 1500, 1024)])
def test_hc_pre_fused_with_norm(dtype, D, single_max, monkeypatch):
    """The sublayer's RMSNorm fused into the finishing program -- the row in registers (D <= SINGLE_MAX_D)
    and the two-pass loop (D = 1500 > 1024: two chunks) -- and the per-token arrival counters reset
    between calls (three calls, fresh inputs each)."""
    import dsv4lib.kernels.mhc_step as mhc
    from dsv4lib.model.linear import RMSNorm
    monkeypatch.setattr(mhc, "SINGLE_MAX_D", single_max)
    norm = RMSNorm(D, eps=1e-5).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=torch.Generator().manual_seed(9)) + 0.5)
    for seed in range(3):
        X, fn, scale, base = _inputs(dtype, B=2, D=D, seed=10 + seed)
        y, post, comb = hc_pre_fused(X, fn, scale, base, 20, 1e-6, 1e-6, norm.weight, norm.eps)
        ry, rpost, rcomb = hc_pre_reference(X, fn, scale, base, 20, 1e-6, 1e-6)
        ry = norm(ry)
        assert y.dtype == dtype and y.shape == ry.shape
        assert (post - rpost).abs().max() <= 1e-5 and (comb - rcomb).abs().max() <= 1e-5
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (y.float() - ry.float()).abs().max() <= tol * ry.float().abs().max(), seed


@pytest.mark.parametrize("hc,T", [(4, 1), (4, 3), (2, 3)])
def test_hc_pre_deferred_comb(hc, T):
    """``defer_comb``: the launch returns the mixing logits instead of post / comb, y unchanged, and ``hc_comb``
    of them gives the in-launch post and comb (and the eager reference's); also through ``hc_post_pre_fused``."""
    from dsv4lib.model.linear import RMSNorm
    X, fn, scale, base = _inputs(torch.bfloat16, B=T, hc=hc, D=300, seed=31)
    norm = RMSNorm(300, eps=1e-5).to(DEV)
    y, post, comb = hc_pre_fused(X, fn, scale, base, 20, 1e-6, 1e-6, norm.weight, norm.eps)
    dy, mix = hc_pre_fused(X, fn, scale, base, 20, 1e-6, 1e-6, norm.weight, norm.eps, defer_comb=True)
    assert mix.shape == (T, 1, (2 + hc) * hc) and mix.dtype == torch.float32
    assert torch.equal(dy, y)
    dpost, dcomb = hc_comb(mix, scale, base, hc, 20, 1e-6)
    assert dpost.shape == post.shape and dcomb.shape == comb.shape
    assert (dpost - post).abs().max() <= 1e-6 and (dcomb - comb).abs().max() <= 1e-6
    _, rpost, rcomb = hc_pre_reference(X, fn, scale, base, 20, 1e-6, 1e-6)
    assert (dpost - rpost).abs().max() <= 1e-5 and (dcomb - rcomb).abs().max() <= 1e-5
    assert (dcomb.sum(-2) - 1).abs().max() < 1e-3                        # the Sinkhorn ran
    f = torch.randn(T, 1, 300, generator=torch.Generator().manual_seed(32)).to(DEV, torch.bfloat16)
    Xn, y2, post2, comb2 = hc_post_pre_fused(f, X, post, comb, None, fn, scale, base, 20, 1e-6, 1e-6, norm.weight, norm.eps)
    dXn, dy2, mix2 = hc_post_pre_fused(f, X, post, comb, None, fn, scale, base, 20, 1e-6, 1e-6, norm.weight, norm.eps,
                                       defer_comb=True)
    assert torch.equal(dXn, Xn) and torch.equal(dy2, y2)
    dpost2, dcomb2 = hc_comb(mix2, scale, base, hc, 20, 1e-6)
    assert (dpost2 - post2).abs().max() <= 1e-6 and (dcomb2 - comb2).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_post_fused_matches_eager(dtype):
    X, fn, scale, base = _inputs(dtype, seed=1)
    _, post, comb = hc_pre_reference(X, fn, scale, base, 20, 1e-6, 1e-6)
    f = torch.randn(X.shape[0], 1, X.shape[-1], generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    f2 = torch.randn(f.shape, generator=torch.Generator().manual_seed(3)).to(DEV)   # fp32 (routed experts)
    for extra in (None, f2):
        got = hc_post_fused(f, X, post, comb, extra)
        ref = hc_post_reference(f, X, post, comb, extra)
        assert got.dtype == dtype and got.shape == ref.shape
        assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    assert (hc_post_fused(f, X, post, comb, f2) - hc_post_fused(f, X, post, comb)).abs().max() > 0.1


@pytest.mark.parametrize("dtype,D,with_f2", [(torch.float32, 200, False), (torch.bfloat16, 200, True),
                                             (torch.bfloat16, 1500, True)])
def test_hc_post_pre_fused_matches_post_then_pre(dtype, D, with_f2):
    """The previous sublayer's mHC post computed inside the next mHC pre's mixing programs == hc_post
    then hc_pre (+ the sublayer's RMSNorm): the new streams, y, post, comb; D = 1500: slices that cross
    two streams and the two-chunk finish (SINGLE_MAX_D lowered below)."""
    import dsv4lib.kernels.mhc_step as mhc
    from dsv4lib.model.linear import RMSNorm
    X, fn, scale, base = _inputs(dtype, B=2, D=D, seed=21)
    _, post_in, comb_in = hc_pre_reference(X, fn, scale, base, 20, 1e-6, 1e-6)
    g = torch.Generator().manual_seed(22)
    f = torch.randn(2, 1, D, generator=g).to(DEV, dtype)
    f2 = torch.randn(2, 1, D, generator=g).to(DEV) if with_f2 else None
    fn2 = fn.flip(0).contiguous()                                      # the next site's own weights
    norm = RMSNorm(D, eps=1e-5).to(DEV)
    old = mhc.SINGLE_MAX_D
    mhc.SINGLE_MAX_D = 1024
    try:
        Xn, y, post, comb = hc_post_pre_fused(f, X, post_in, comb_in, f2, fn2, scale, base, 20, 1e-6, 1e-6,
                                              norm.weight, norm.eps)
        kX = hc_post_fused(f, X, post_in, comb_in, f2)                 # the two launches it replaces
        ky, kpost, kcomb = hc_pre_fused(kX, fn2, scale, base, 20, 1e-6, 1e-6, norm.weight, norm.eps)
    finally:
        mhc.SINGLE_MAX_D = old
    for a, b in ((Xn, kX), (y, ky), (post, kpost), (comb, kcomb)):   # same arithmetic (a GPU may contract FMAs differently)
        assert torch.equal(a, b) if DEV == "cpu" else (a.float() - b.float()).abs().max() <= 8e-3 * b.float().abs().max()
    rX = hc_post_reference(f, X, post_in, comb_in, f2)
    ry, rpost, rcomb = hc_pre_reference(rX, fn2, scale, base, 20, 1e-6, 1e-6)
    ry = norm(ry)
    # bf16: the streams differ from the torch math by 1-2 ulps of rounding order, and post / comb follow
    tol, ptol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 1e-2)
    assert Xn.shape == X.shape and Xn.dtype == dtype
    assert (Xn.float() - rX.float()).abs().max() <= tol * rX.float().abs().max()
    assert (post - rpost).abs().max() <= ptol and (comb - rcomb).abs().max() <= ptol
    assert (y.float() - ry.float()).abs().max() <= 2 * tol * ry.float().abs().max()


def test_mhc_step_bad_input():
    X, fn, scale, base = _inputs(torch.float32)
    with pytest.raises(ValueError, match="out_norm"):
        hc_pre_fused(X, fn, scale, base, 20, 1e-6, 1e-6, torch.ones(7, device=X.device))
    with pytest.raises(ValueError, match="hc_pre_fused: fn"):
        hc_pre_fused(X, fn[:, :-1], scale, base, 20, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="power of two"):
        hc_post_fused(X[..., :3, :].sum(-2), X[..., :3, :], torch.zeros(3, 1, 3), torch.zeros(3, 1, 3, 3))


@pytest.mark.parametrize("dtype,D,block_m", [(torch.float32, 200, 32), (torch.bfloat16, 96, 16)])
def test_hc_pre_prefill_matches_eager(dtype, D, block_m):
    """kernels/mhc_prefill.py (BM tokens per program, fp32 ieee dot for the mixing): 3 x 7 tokens (a
    partial last block), with and without the fused RMSNorm, against the eager hc_pre (+ RMSNorm)."""
    from dsv4lib.kernels.mhc_prefill import hc_pre_prefill
    from dsv4lib.model.linear import RMSNorm
    X, fn, scale, base = _inputs(dtype, B=3, D=D, seed=4)
    X = (X.expand(3, 7, *X.shape[2:]) + torch.randn(3, 7, *X.shape[2:], generator=torch.Generator().manual_seed(5))
         .to(DEV, dtype)).contiguous()
    y, post, comb = hc_pre_prefill(X, fn, scale, base, 20, 1e-6, 1e-6, block_m=block_m)
    ry, rpost, rcomb = hc_pre_reference(X, fn, scale, base, 20, 1e-6, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.shape == ry.shape and y.dtype == dtype and post.shape == rpost.shape and comb.shape == rcomb.shape
    assert (y.float() - ry.float()).abs().max() <= tol * ry.float().abs().max()
    assert (post - rpost).abs().max() <= 1e-5 and (comb - rcomb).abs().max() <= 1e-5
    norm = RMSNorm(D, eps=1e-5).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=torch.Generator().manual_seed(6)) + 0.5)
    yn, _, _ = hc_pre_prefill(X, fn, scale, base, 20, 1e-6, 1e-6, norm.weight, norm.eps, block_m=block_m)
    rn = norm(ry)
    assert (yn.float() - rn.float()).abs().max() <= 2 * tol * rn.float().abs().max()


@pytest.mark.parametrize("dtype,split,block_k,max_bd", [(torch.bfloat16, 3, 64, 64), (torch.float32, 4, 32, 8192),
                                                        (torch.bfloat16, None, 32, 8192)])
def test_hc_pre_prefill_split_k(dtype, split, block_k, max_bd, monkeypatch):
    """The split-K mixing: 21 tokens (BM = 16: a partial token block), K = 4*200 = 800 in `split` slices of
    whole BK steps, the last slice shorter (BK = 64: its last step partial too); None: the default split
    (here 3 slices of 288); the collapse's two-pass path (D = 200 in 64-wide chunks, the last partial) when
    max_bd = 64; the same bits on a second call (fixed-order sums)."""
    import dsv4lib.kernels.mhc_prefill as mp
    from dsv4lib.model.linear import RMSNorm
    monkeypatch.setattr(mp, "COLLAPSE_MAX_BD", max_bd)
    X, fn, scale, base = _inputs(dtype, B=3, D=200, seed=7)
    X = (X.expand(3, 7, *X.shape[2:]) + torch.randn(3, 7, *X.shape[2:], generator=torch.Generator().manual_seed(8))
         .to(DEV, dtype)).contiguous()
    SPLIT, KS = mp.mix_split(21, 800, 16, block_k, split)
    assert SPLIT == (split or 3) and KS % block_k == 0 and 800 % KS != 0       # a shorter last slice
    norm = RMSNorm(200, eps=1e-5).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(200, generator=torch.Generator().manual_seed(9)) + 0.5)
    ry, rpost, rcomb = hc_pre_reference(X, fn, scale, base, 20, 1e-6, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for out_norm, ref in ((None, ry), (norm.weight, norm(ry))):
        kw = dict(block_m=16, split=split, block_k=block_k)
        y, post, comb = mp.hc_pre_prefill(X, fn, scale, base, 20, 1e-6, 1e-6, out_norm, 1e-5, **kw)
        assert y.shape == ref.shape and y.dtype == dtype and post.shape == rpost.shape and comb.shape == rcomb.shape
        assert (y.float() - ref.float()).abs().max() <= 2 * tol * ref.float().abs().max()
        assert (post - rpost).abs().max() <= 1e-5 and (comb - rcomb).abs().max() <= 1e-5
        again = mp.hc_pre_prefill(X, fn, scale, base, 20, 1e-6, 1e-6, out_norm, 1e-5, **kw)
        assert all(torch.equal(a, b) for a, b in zip((y, post, comb), again))


@torch.no_grad()
def test_model_forward_with_fused_mhc_prefill(monkeypatch):
    """The eager model with the mHC prefill kernel (dsv4lib.model.transformer.FUSED_MHC_PREFILL, on by default
    for CUDA tensors) gives the torch path's logits: on the GPU with the flag toggled, on the CPU forced on
    (the interpreter runs it)."""
    import dsv4lib.model.transformer as tr
    from dsv4lib.config import ModelConfig
    from dsv4lib.model import DeepseekV4
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    m = DeepseekV4(ModelConfig.tiny()).eval().to(dev)
    ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)).to(dev)
    monkeypatch.setattr(tr, "FUSED_MHC_PREFILL", False)
    ref = m(ids)
    monkeypatch.setattr(tr, "FUSED_MHC_PREFILL", True)
    if dev == "cpu":
        monkeypatch.setattr(tr, "_use_fused_mhc", lambda X: True)
    got = m(ids)
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_fp32_planes_are_exact():
    """fn split into three bf16 planes sums back to the fp32 value exactly (normal range, both signs, values
    whose low bits are set) -- so three bf16 tensor-core dots against bf16 streams give fp32 products."""
    from dsv4lib.kernels.mhc_prefill import fp32_planes
    g = torch.Generator().manual_seed(12)
    w = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-60, 60, (4096,), generator=g).float())
    w = torch.cat([w, torch.tensor([1 + 2 ** -23, -(1 - 2 ** -24), 3.0, 0.0])])
    p = fp32_planes(w)
    assert p.dtype == torch.bfloat16 and p.shape == (3, w.numel())
    assert torch.equal(p[0].float() + p[1].float() + p[2].float(), w)
    assert not torch.equal(p[0].float(), w)                             # the low planes carry real bits


@pytest.mark.parametrize("planes", [True, False])
def test_hc_pre_prefill_bf16_planes_match_fp32_mixing(planes, monkeypatch):
    """bf16 streams: the three-plane mixing (MIX_PLANES, the default) and the fp32 FMA mixing agree to fp32
    rounding in post / comb (their only difference is the summation order of the same products), and both match
    the eager reference."""
    import dsv4lib.kernels.mhc_prefill as mp
    X, fn, scale, base = _inputs(torch.bfloat16, B=3, D=160, seed=13)
    X = (X.expand(3, 9, *X.shape[2:]) + torch.randn(3, 9, *X.shape[2:], generator=torch.Generator().manual_seed(14))
         .to(DEV, torch.bfloat16)).contiguous()
    monkeypatch.setattr(mp, "MIX_PLANES", planes)
    y, post, comb = mp.hc_pre_prefill(X, fn, scale, base, 20, 1e-6, 1e-6, block_m=16)
    monkeypatch.setattr(mp, "MIX_PLANES", not planes)
    y2, post2, comb2 = mp.hc_pre_prefill(X, fn, scale, base, 20, 1e-6, 1e-6, block_m=16)
    assert (post - post2).abs().max() <= 2e-6 and (comb - comb2).abs().max() <= 2e-6
    ry, rpost, rcomb = hc_pre_reference(X, fn, scale, base, 20, 1e-6, 1e-6)
    assert (post - rpost).abs().max() <= 1e-5 and (comb - rcomb).abs().max() <= 1e-5
    assert (y.float() - ry.float()).abs().max() <= 1e-2 * ry.float().abs().max()
