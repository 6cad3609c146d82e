"""FP8 block-scaled linear and MXFP4 dequant / MoE kernels against their torch references."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4lib.kernels.dispatch import fp8_linear, mxfp4_moe  # noqa: E402
from dsv4lib.kernels.fp8_gemv import GemvConfig  # noqa: E402
from dsv4lib.kernels.fp8_linear import FP8Config, fp8_linear_reference, random_fp8  # noqa: E402
from dsv4lib.kernels.mxfp4 import (dequantize_mxfp4, dequantize_mxfp4_reference, mxfp4_moe_reference,  # noqa: E402
                                   random_mxfp4)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("M,N,K,cfg", [(1, 200, 384, None), (3, 130, 256, FP8Config(16, 32, 2)),
                                       (16, 64, 128, None), (40, 70, 256, FP8Config(32, 32))])
def test_fp8_linear_matches_reference(M, N, K, cfg):
    g = torch.Generator(device=DEV).manual_seed(M)
    w, s = random_fp8(N, K, DEV, g)
    x = torch.randn(M, K, device=DEV, generator=g)
    from dsv4lib.kernels.fp8_linear import fp8_linear as kernel
    y = kernel(x, w, s, config=cfg)
    assert y.shape == (M, N) and y.dtype == x.dtype
    assert _rel(y, fp8_linear_reference(x.double(), w, s.double())) < 1e-3


@pytest.mark.parametrize("M,N,K,cfg", [(1, 200, 384, None), (5, 96, 512, FP8Config(16, 32, 2, epilogue="last")),
                                       (200, 96, 256, None)])
def test_fp8_linear_fp32_activations_keep_fp32_accuracy(M, N, K, cfg):
    """fp32 x goes in as fp16 hi + lo terms: the result is fp32-accurate (a single fp16 rounding of x gave
    ~3e-4 relative -- the fused step of an fp32 model missed its 1e-4 bound on the GPU by that)."""
    g = torch.Generator(device=DEV).manual_seed(11)
    w, s = random_fp8(N, K, DEV, g)
    x = torch.randn(M, K, device=DEV, generator=g) * 3
    from dsv4lib.kernels.fp8_linear import fp8_linear as kernel
    y = kernel(x, w, s, config=cfg)
    ref = fp8_linear_reference(x.double(), w, s.double())
    assert y.dtype == torch.float32 and _rel(y, ref) < 2e-6
    assert _rel(kernel(x.half().float(), w, s, config=cfg), ref) > 1e-4     # what one fp16 rounding costs


def test_fp8_linear_e8m0_scale_and_batch_dims():
    g = torch.Generator(device=DEV).manual_seed(7)
    w, s = random_fp8(96, 256, DEV, g)
    e8 = (torch.log2(s) + 127).to(torch.uint8)                           # E8M0 bytes of the same scales
    x = torch.randn(2, 3, 256, device=DEV, generator=g).to(torch.bfloat16)
    y = fp8_linear(x, w, e8)
    assert y.shape == (2, 3, 96) and y.dtype == torch.bfloat16
    assert _rel(y, fp8_linear_reference(x.double(), w, s.double())) < 1e-2
    with pytest.raises(ValueError, match="scale"):
        fp8_linear(x, w, s[:, :1])


def test_mxfp4_dequant_exact():
    g = torch.Generator(device=DEV).manual_seed(3)
    p, sc = random_mxfp4(3, 40, 128, device=DEV, generator=g)
    sc[0, 0, 0] = 0                                                       # smallest E8M0 (2^-127)
    out = dequantize_mxfp4(p, sc, torch.float32)
    ref = dequantize_mxfp4_reference(p, sc)
    assert torch.equal(out[..., 32:], ref[..., 32:]) and torch.equal(out[1:], ref[1:])
    # row 0's first group is subnormal (<= 6 * 2^-127); GPUs may flush those to zero
    assert torch.allclose(out[0, 0, :32], ref[0, 0, :32], rtol=0, atol=1e-37)
    code = torch.tensor([[0x9F]], dtype=torch.uint8, device=DEV)          # low 0xF = -6, high 0x9 = -0.5
    one = torch.tensor([[127]], dtype=torch.uint8, device=DEV)
    small = dequantize_mxfp4(code.repeat(1, 16), one, torch.float32)
    assert small[0, :2].tolist() == [-6.0, -0.5]


def test_mxfp4_moe_matches_reference():
    g = torch.Generator(device=DEV).manual_seed(4)
    E, D, I = 4, 128, 64
    w1, w3, w2 = (random_mxfp4(E, I, D, device=DEV, generator=g), random_mxfp4(E, I, D, device=DEV, generator=g),
                  random_mxfp4(E, D, I, device=DEV, generator=g))
    x = torch.randn(3, D, device=DEV, generator=g)
    idx = torch.tensor([[0, 1], [1, 2], [3, 1]], device=DEV)
    wt = torch.rand(3, 2, device=DEV, generator=g) + 0.5
    y = mxfp4_moe(x, idx, wt, *w1, *w3, *w2, 7.0)
    assert _rel(y, mxfp4_moe_reference(x, idx, wt, *w1, *w3, *w2, 7.0)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 16, 300])
@pytest.mark.parametrize("N,K", [(1024, 4096), (32768, 1024), (4096, 8192)])
def test_fp8_full_shapes_gpu(M, N, K):
    g = torch.Generator(device=DEV).manual_seed(N + M)
    w, s = random_fp8(N, K, DEV, g)
    x = torch.randn(M, K, device=DEV, generator=g, dtype=torch.bfloat16)
    assert _rel(fp8_linear(x, w, s), fp8_linear_reference(x.double(), w, s.double())) < 1e-2


@pytest.mark.parametrize("M,N,K,cfg,dtype", [
    (1, 256, 1024, GemvConfig(16, 4), torch.bfloat16),          # EVEN: unmasked loads
    (1, 200, 384, GemvConfig(8, 2, 2), torch.float32),           # ragged N and K: masked
    (3, 130, 256, GemvConfig(4, 1, 1), torch.float32),           # several rows, partial last row block
    (2, 64, 512, GemvConfig(32, 8, 4), torch.bfloat16),          # one step covers all of K
    (1, 96, 200, GemvConfig(16, 2, 4, 2), torch.bfloat16)])      # the cp.async-pipelined loop
def test_fp8_gemv_matches_reference(M, N, K, cfg, dtype):
    """The CUDA-core GEMV (kernels/fp8_gemv.py) against the dequantise-then-matmul reference in float64, and
    against the tensor-core kernel on the same input (they differ only in fp32 summation order and in the tensor-core
    kernel's fp16 hi/lo split of fp32 activations); fp32 activations keep fp32 products."""
    from dsv4lib.kernels.fp8_linear import fp8_linear as kernel
    g = torch.Generator(device=DEV).manual_seed(N + K + M)
    w, s = random_fp8(N, K, DEV, g)
    x = (torch.randn(M, K, device=DEV, generator=g) * 2).to(dtype)
    y = kernel(x, w, s, config=cfg)
    ref = fp8_linear_reference(x.double(), w, s.double())
    assert y.shape == (M, N) and y.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 8e-3           # bf16 output rounding (2^-9 relative per element)
    assert _rel(y, ref) < tol
    tc = kernel(x, w, s, config=FP8Config(16, 32))
    assert _rel(y, tc) < (2e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("N,K,cfg", [(96, 256, None), (130, 384, GemvConfig(4, 2, 1)), (64, 1024, GemvConfig(1, 8, 1))])
def test_bf16_gemv_matches_linear(N, K, cfg):
    """The same kernel on bf16 weights without scales (the fused step's stacked compressor projections) equals
    ``F.linear`` in float64 up to the bf16 rounding of the result; a non-bf16 weight is refused."""
    from dsv4lib.kernels.fp8_gemv import bf16_gemv
    g = torch.Generator(device=DEV).manual_seed(N + K)
    w = torch.randn(N, K, device=DEV, generator=g).to(torch.bfloat16)
    x = torch.randn(1, 1, K, device=DEV, generator=g).to(torch.bfloat16)
    y = bf16_gemv(x, w, cfg)
    ref = x.double() @ w.double().T
    assert y.shape == (1, 1, N) and y.dtype == torch.bfloat16
    assert _rel(y, ref) < 8e-3 and _rel(y, torch.nn.functional.linear(x, w)) < 8e-3
    with pytest.raises(ValueError, match="bf16"):
        bf16_gemv(x, w.float())


def test_fp8_gemv_grouped_norm_and_bad_config():
    """Grouped mode (V4's wo_a: group g's rows read x[..., g, :]) and the RMSNorm-on-load prologue (V4's
    wq_b(q_norm(qa))) through the GEMV equal the reference; a row count that does not divide 128 is refused."""
    from dsv4lib.kernels.fp8_linear import fp8_linear as kernel
    g = torch.Generator(device=DEV).manual_seed(5)
    G, R, K = 4, 64, 256
    w, s = random_fp8(G * R, K, DEV, g)
    x = torch.randn(2, G, K, device=DEV, generator=g)
    y = kernel(x, w, s, groups=G, config=GemvConfig(16, 2))
    assert _rel(y, fp8_linear_reference(x.double(), w, s.double(), groups=G)) < 1e-6
    w, s = random_fp8(128, K, DEV, g)
    xa = torch.randn(1, K, device=DEV, generator=g).to(torch.bfloat16) * 3
    nw = torch.rand(K, device=DEV, generator=g) + 0.5
    xn = (nw * (xa.float() * torch.rsqrt(xa.float().pow(2).mean(-1, keepdim=True) + 1e-6))).to(torch.bfloat16)
    ref = fp8_linear_reference(xn.double(), w, s.double())
    assert _rel(kernel(xa, w, s, norm=(nw, 1e-6), config=GemvConfig(8, 2)), ref) < 8e-3
    assert _rel(kernel(xa, w, s, norm=(nw, 1e-6), config=GemvConfig(8, 2)),
                kernel(xa, w, s, norm=(nw, 1e-6), config=FP8Config(16, 32))) < 8e-3
    with pytest.raises(ValueError, match="rows"):
        kernel(xa, w, s, config=GemvConfig(24, 2))


@pytest.mark.parametrize("M,N,K,split", [(1, 200, 512, 4), (5, 130, 384, 3), (16, 64, 1024, 8)])
def test_fp8_linear_last_arrival_split_k(M, N, K, split):
    """Split-K with the one-launch epilogue (partials in a workspace, the last program of a tile sums them
    and resets its counter): equals the atomic epilogue, and the shared workspace/counters stay valid over
    repeated calls and different shapes."""
    from dsv4lib.kernels.fp8_linear import fp8_linear as kernel
    g = torch.Generator(device=DEV).manual_seed(N + split)
    w, s = random_fp8(N, K, DEV, g)
    x = torch.randn(M, K, device=DEV, generator=g).to(torch.bfloat16)
    ref = fp8_linear_reference(x.double(), w, s.double())
    atomic = kernel(x, w, s, config=FP8Config(16, 32, split, epilogue="atomic"))
    for _ in range(3):
        last = kernel(x, w, s, config=FP8Config(16, 32, split, epilogue="last"))
        assert last.dtype == x.dtype and last.shape == (M, N)
        assert _rel(last, ref) < 1e-2 and _rel(last, atomic) < 1e-2
    w2, s2 = random_fp8(96, 256, DEV, g)                                # another shape through the same buffers
    x2 = torch.randn(2, 256, device=DEV, generator=g)
    y2 = kernel(x2, w2, s2, config=FP8Config(16, 32, 2, epilogue="last"))
    assert _rel(y2, fp8_linear_reference(x2.double(), w2, s2.double())) < 1e-3
    with pytest.raises(ValueError, match="epilogue"):
        kernel(x2, w2, s2, config=FP8Config(16, 32, 2, epilogue="sum"))


@pytest.mark.parametrize("tokens,G,R,K,cfg", [(1, 4, 64, 256, None), (3, 2, 96, 384, FP8Config(16, 64, 2)),
                                              (2, 8, 32, 128, FP8Config(16, 128, 1))])
def test_fp8_linear_grouped(tokens, G, R, K, cfg):
    """Grouped projection (V4's wo_a): output rows of group g read only x[..., g, :] -- against the
    block-diagonal einsum of the dequantised weight, with a tile wider than a group (128 > R=32: the
    launcher narrows it) and a split-K config; a plain GEMV over all groups' rows gives other values."""
    from dsv4lib.kernels.fp8_linear import fp8_linear as kernel
    g = torch.Generator(device=DEV).manual_seed(G * R + tokens)
    w, s = random_fp8(G * R, K, DEV, g)
    x = torch.randn(tokens, 1, G, K, device=DEV, generator=g)
    y = kernel(x, w, s, config=cfg, groups=G)
    ref = fp8_linear_reference(x.double(), w, s.double(), groups=G)
    assert y.shape == (tokens, 1, G * R) and y.dtype == x.dtype
    assert _rel(y, ref) < 1e-3
    assert _rel(kernel(x[..., :1, :].expand(-1, -1, G, -1).contiguous(), w, s, groups=G),
                fp8_linear(x[..., 0, :], w, s)) < 1e-3          # every group fed x[..., 0, :] == plain GEMV
    with pytest.raises(ValueError, match="groups"):
        kernel(x[..., :G - 1, :], w, s, groups=G)


@pytest.mark.parametrize("M,N,K", [(70, 200, 384), (100, 130, 256)])
def test_fp8_chained_prefill_matches_per_block_kernel(M, N, K, monkeypatch):
    """The opt-in chained prefill GEMM (scales folded into bf16 weight tiles, one accumulator): the same exact
    products as the per-block kernel, so both land within bf16 output rounding of the fp64 reference; taken by
    ``fp8_linear`` only for bf16 x, M > 64 and power-of-two scales."""
    import dsv4lib.kernels.fp8_linear as f8
    g = torch.Generator(device=DEV).manual_seed(M + N)
    w, s = random_fp8(N, K, DEV, g)                                      # power-of-two scales
    x = torch.randn(M, K, device=DEV, generator=g).to(torch.bfloat16)
    ref = fp8_linear_reference(x.double(), w, s.double())
    assert f8.scales_are_pow2(s)
    got = f8.fp8_gemm_chained(x, w, s)
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    assert _rel(got, ref) < 4e-3
    calls = []
    monkeypatch.setattr(f8, "CHAINED_PREFILL", True)
    real = f8.fp8_gemm_chained
    monkeypatch.setattr(f8, "fp8_gemm_chained", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(f8.fp8_linear(x, w, s), got) and calls == [1]
    s2 = s.clone()
    s2[0, 0] *= 1.5                                                      # not a power of two: per-block kernel
    assert not f8.scales_are_pow2(s2)
    y2 = f8.fp8_linear(x, w, s2)
    assert calls == [1] and _rel(y2, fp8_linear_reference(x.double(), w, s2.double())) < 4e-3
    f8.fp8_linear(x.float(), w, s)                                       # fp32 x: per-block kernel too
    assert calls == [1]
    e8 = (torch.log2(s) + 127).to(torch.uint8)                           # E8M0 bytes: powers of two by format
    assert torch.equal(f8.fp8_linear(x, w, e8), got) and calls == [1, 1]


@pytest.mark.parametrize("tokens,G,R,K", [(70, 4, 64, 256), (80, 2, 48, 384)])
def test_fp8_chained_grouped(tokens, G, R, K, monkeypatch):
    """The chained GEMM in grouped mode (V4's wo_a at prefill): output rows of group g read x[:, g] only --
    against the block-diagonal fp64 reference, and taken by ``fp8_linear(groups=G)`` for bf16 x, M > 64 when
    ``CHAINED_GROUPED`` is on."""
    import dsv4lib.kernels.fp8_linear as f8
    g = torch.Generator(device=DEV).manual_seed(G * R + tokens)
    w, s = random_fp8(G * R, K, DEV, g)
    x = torch.randn(tokens, G, K, device=DEV, generator=g).to(torch.bfloat16)
    ref = fp8_linear_reference(x.double(), w, s.double(), groups=G)
    got = f8.fp8_gemm_chained(x.reshape(-1, K), w, s, groups=G)
    assert got.shape == (tokens, G * R) and _rel(got, ref) < 4e-3
    other = f8.fp8_gemm_chained(x[:, :1].expand(-1, G, -1).reshape(-1, K), w, s, groups=G)
    assert _rel(other, ref) > 0.1                                        # the group's own x rows matter
    monkeypatch.setattr(f8, "CHAINED_GROUPED", True)
    assert torch.equal(f8.fp8_linear(x, w, s, groups=G), got)        # the dispatch (opt-in CHAINED_GROUPED)


def test_fp8_dequant_bf16_exact():
    """The many-token path's dequant: bf16 W equal to the fp64 dequant for power-of-two multipliers (e4m3 x 2^k is
    a bf16 value), ragged N and K tiles included."""
    from dsv4lib.kernels.fp8_linear import dequantize_fp8_bf16, dequantize_fp8_reference
    g = torch.Generator(device=DEV).manual_seed(5)
    w, s = random_fp8(200, 320, DEV, g)
    got = dequantize_fp8_bf16(w, s)
    assert got.dtype == torch.bfloat16 and torch.equal(got.double(), dequantize_fp8_reference(w, s.double()))


@pytest.mark.parametrize("M,G,R,K", [(40, 1, 96, 256), (36, 4, 64, 128)])
def test_fp8_dequant_gemm_dispatch(M, G, R, K, monkeypatch):
    """``fp8_linear`` sends bf16 x with >= DEQUANT_PREFILL_MIN_M rows and power-of-two scales to dequant + matmul
    (plain and grouped): within bf16 output rounding of the fp64 reference; not for fp32 x or other scales."""
    import dsv4lib.kernels.fp8_linear as f8
    g = torch.Generator(device=DEV).manual_seed(M * G)
    w, s = random_fp8(G * R, K, DEV, g)
    x = torch.randn(M, G, K, device=DEV, generator=g).to(torch.bfloat16)
    xin = x if G > 1 else x[:, 0]
    ref = fp8_linear_reference(xin.double(), w, s.double(), groups=G)
    calls = []
    real = f8.fp8_gemm_dequant
    monkeypatch.setattr(f8, "fp8_gemm_dequant", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(f8, "DEQUANT_PREFILL_MIN_M", 32)
    got = f8.fp8_linear(xin, w, s, groups=G)
    assert calls == [1] and got.dtype == torch.bfloat16 and got.shape == (M, G * R)
    assert _rel(got, ref) < 4e-3
    if G > 1:   # each group's output block reads its own x rows
        assert _rel(f8.fp8_linear(x[:, :1].expand(-1, G, -1).contiguous(), w, s, groups=G), ref) > 0.1
    n = len(calls)
    f8.fp8_linear(xin.float(), w, s, groups=G)                           # fp32 x: not this path
    s2 = s.clone()
    s2[0, 0] *= 1.5                                                      # not a power of two: not this path
    f8.fp8_linear(xin, w, s2, groups=G)
    assert len(calls) == n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K", [(32768, 1024), (4096, 8192), (4096, 4096)])
def test_fp8_chained_full_shapes_gpu(N, K):
    """Both prefill GEMMs at V4 projection shapes: the chained kernel and dequant + cuBLAS (the same GEMM)."""
    g = torch.Generator(device=DEV).manual_seed(N)
    w, s = random_fp8(N, K, DEV, g)
    x = torch.randn(2048, K, device=DEV, generator=g, dtype=torch.bfloat16)
    from dsv4lib.kernels.fp8_linear import fp8_gemm_chained, fp8_gemm_dequant
    ref = fp8_linear_reference(x.double(), w, s.double())
    chained = fp8_gemm_chained(x, w, s)
    got = fp8_gemm_dequant(x, w, s)
    assert _rel(chained, ref) < 4e-3 and _rel(got, ref) < 4e-3 and _rel(got, chained) < 1e-3


@pytest.mark.parametrize("M,K,dtype", [(1, 256, torch.bfloat16), (3, 384, torch.float32), (8, 200, torch.bfloat16)])
def test_fp8_linear_norm_prologue(M, K, dtype):
    """``norm=(w, eps)``: the x rows RMS-normalised on load (V4's wq_b(q_norm(qa)) in one launch) -- equal to
    RMSNorm (kernels.rmsnorm_rope, mode 0) followed by the plain kernel, up to the norm's fp32 summation order;
    K not a multiple of 128; the plain kernel on the raw x differs."""
    from dsv4lib.kernels.rmsnorm_rope import rmsnorm_rope_reference
    g = torch.Generator(device=DEV).manual_seed(M * K)
    w, s = random_fp8(160, K, DEV, g)
    x = (torch.randn(M, K, device=DEV, generator=g) * 3).to(dtype)
    nw = torch.rand(K, device=DEV, generator=g) + 0.5
    ref = fp8_linear(rmsnorm_rope_reference(x, nw, 1e-6), w, s)
    got = fp8_linear(x, w, s, norm=(nw, 1e-6))
    assert got.shape == ref.shape and got.dtype == dtype
    assert _rel(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert _rel(fp8_linear(x, w, s), ref) > 0.1
    with pytest.raises(ValueError, match="norm"):
        fp8_linear(x, w, s, norm=(nw[:-1], 1e-6))
