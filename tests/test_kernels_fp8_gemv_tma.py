"""kernels/fp8_gemv_tma.py: the TMA-fed FP8 GEMV against the dequantise-then-matmul reference (float64) and the
CUDA-core GEMV (only fp32 summation order differs), its shape guard, and fp8_linear's dispatch to it."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4lib.kernels.fp8_gemv import GemvConfig  # noqa: E402
from dsv4lib.kernels.fp8_gemv_tma import GemvTmaConfig, fits  # noqa: E402
from dsv4lib.kernels.fp8_linear import fp8_linear, fp8_linear_reference, random_fp8  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton.tools.tensor_descriptor")


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("M,N,K,G,cfg,dtype", [
    (1, 256, 512, 1, GemvTmaConfig(32, 2, 4), torch.bfloat16),
    (1, 384, 384, 1, GemvTmaConfig(64, 3, 2), torch.float32),
    (2, 128, 256, 4, GemvTmaConfig(16, 2, 1), torch.float32),     # grouped (V4's wo_a), two tokens
    (3, 96, 640, 1, GemvTmaConfig(8, 8, 1), torch.bfloat16)])     # several rows, a ring deeper than K's 5 blocks
def test_tma_gemv_matches_reference(M, N, K, G, cfg, dtype):
    g = torch.Generator(device=DEV).manual_seed(N + K + M)
    w, s = random_fp8(N, K, DEV, g)
    x = (torch.randn(M, *((G,) if G > 1 else ()), K, device=DEV, generator=g) * 2).to(dtype)
    y = fp8_linear(x, w, s, config=cfg, groups=G)
    ref = fp8_linear_reference(x.double(), w, s.double(), groups=G)
    assert y.shape == (M, N) and y.dtype == dtype
    assert _rel(y, ref) < (1e-6 if dtype == torch.float32 else 8e-3)   # bf16: the result's rounding
    cc = fp8_linear(x, w, s, config=GemvConfig(8, 1, 1), groups=G)     # the CUDA-core GEMV
    assert _rel(y, cc) < (2e-6 if dtype == torch.float32 else 8e-3)


def test_tma_gemv_guard_and_fallbacks():
    """Uneven tiles are refused by ``fits`` and fall back to the CUDA-core GEMV in fp8_linear, as does the RMSNorm
    prologue; off CUDA pick_config never picks the TMA GEMV."""
    from dsv4lib.kernels import fp8_linear as mod
    assert fits(256, 512, GemvTmaConfig(32)) and not fits(200, 512, GemvTmaConfig(32))
    assert not fits(256, 500, GemvTmaConfig(32)) and not fits(256, 512, GemvTmaConfig(32), groups=16)
    assert not fits(256, 512, GemvTmaConfig(48))                         # rows must divide 128
    g = torch.Generator(device=DEV).manual_seed(3)
    w, s = random_fp8(200, 384, DEV, g)
    x = torch.randn(1, 384, device=DEV, generator=g)
    ref = fp8_linear_reference(x.double(), w, s.double())
    assert _rel(fp8_linear(x, w, s, config=GemvTmaConfig(32)), ref) < 1e-6
    w, s = random_fp8(128, 256, DEV, g)
    xa = torch.randn(1, 256, device=DEV, generator=g)
    nw = torch.rand(256, device=DEV, generator=g) + 0.5
    assert torch.equal(fp8_linear(xa, w, s, norm=(nw, 1e-6), config=GemvTmaConfig(32)),
                       fp8_linear(xa, w, s, norm=(nw, 1e-6), config=mod.TUNED_GEMV.get((128, 256), GemvConfig())))
    saved = mod.TMA_GEMV
    try:
        mod.TMA_GEMV = True
        assert isinstance(mod.pick_config(1, 32768, 1024, torch.device("cpu")), GemvConfig)
        assert mod.pick_config(1, 32768, 1024, None) == mod.TUNED_GEMV[(32768, 1024)]
    finally:
        mod.TMA_GEMV = saved
