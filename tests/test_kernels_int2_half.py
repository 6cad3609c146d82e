"""INT2 MoE decode, fp16 CUDA-core inner loop (``half=True``, the default) against the fp32 torch
reference: int16-half code extraction (codes 0-4 in place, 5-7 after a shift), fp16 products over the 8
codes of a half, group scale/zero in fp32; SwiGLU output written in the fp16 half layout with atomic
group sums. bf16 activations (the model's) are exact in fp16, so the error is the fp16 rounding of the
products and of h: measured 4e-5 - 2e-4 relative here (bound 1e-3); the fp32 path stays at ~1e-7."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4lib.kernels.int2_dequant import random_int2  # noqa: E402
from dsv4lib.kernels.int2_moe_decode import (HALF_DEFAULT, DecodeConfig, StageConfig,  # noqa: E402
                                             int2_moe_decode, int2_moe_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(T, E=8, D=256, I=128, k=3, seed=0, shared=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = [t for p in (random_int2(E, I, D, DEV, g), random_int2(E, I, D, DEV, g), random_int2(E, D, I, DEV, g))
         for t in p]
    gc = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, D, generator=gc).to(DEV, torch.bfloat16)
    pool = torch.randperm(E, generator=gc)[:k + 1]
    idx = torch.stack([(pool if shared else torch.randperm(E, generator=gc))[torch.randperm(k + 1 if shared else E,
                                                                                            generator=gc)[:k]]
                       for _ in range(T)]).to(DEV)
    wt = (torch.rand(T, k, generator=gc) + 0.25).to(DEV)
    return x, idx, wt, w


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("T, shared", [(1, False), (3, False), (5, True)])
def test_half_decode_matches_reference(T, shared):
    x, idx, wt, w = _case(T, seed=T, shared=shared)
    ref = int2_moe_reference(x, idx, wt, *w, 7.0)
    half = int2_moe_decode(x, idx, wt, *w, 7.0, half=True)
    full = int2_moe_decode(x, idx, wt, *w, 7.0, half=False)
    assert _rel(half, ref) < 1e-3
    assert _rel(full, ref) < 1e-5
    # default: the fp16 loop for bf16 activations, the exact fp32 loop for fp32 ones
    assert HALF_DEFAULT is False or torch.equal(int2_moe_decode(x, idx, wt, *w, 7.0), half)
    assert torch.equal(int2_moe_decode(x.float(), idx, wt, *w, 7.0), full)


@pytest.mark.parametrize("cfg", [DecodeConfig(StageConfig(16, 8, 2, split=4), StageConfig(32, 4, 2, split=2)),
                                 DecodeConfig(StageConfig(64, 4, 2, split=2), StageConfig(16, 8, 2, split=1)),
                                 DecodeConfig(StageConfig(128, 8, 4, split=1), StageConfig(64, 8, 4, split=4))])
def test_half_decode_tiles_and_splits(cfg):
    # gate/up tiles below, at and above one 64-row group (atomic group sums of h), K splits on both stages
    x, idx, wt, w = _case(2, D=512, I=256, k=2, seed=7)
    ref = int2_moe_reference(x, idx, wt, *w, 7.0)
    y = int2_moe_decode(x, idx, wt, *w, 7.0, half=True, config=cfg)
    assert _rel(y, ref) < 1e-3
    y2 = int2_moe_decode(x, idx, wt, *w, 7.0, half=True, config=cfg)    # workspace (group sums) re-zeroed
    assert _rel(y2, ref) < 1e-3


def test_half_decode_bad_tile():
    x, idx, wt, w = _case(1, seed=3)
    with pytest.raises(ValueError, match="fp16 path"):
        int2_moe_decode(x, idx, wt, *w, 7.0, half=True, config=DecodeConfig(StageConfig(48, 8, 2), StageConfig(16, 8, 2)))
