"""INT2 g64 kernels (dequant, MoE decode, MoE prefill, dispatch) against their torch references.

Runs under TRITON_INTERPRET=1 on CPU with small shapes (tests/conftest.py); the ``gpu`` tests use
V4-Flash shapes and skip without CUDA. Inputs are fresh random tensors (never zeros).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4lib.kernels.dispatch import int2_moe  # noqa: E402
from dsv4lib.kernels.int2_dequant import dequantize_int2, dequantize_int2_reference, random_int2  # noqa: E402
from dsv4lib.kernels.int2_moe_decode import (DecodeConfig, StageConfig, decode_configs,  # noqa: E402
                                             int2_moe_decode, int2_moe_reference)
from dsv4lib.kernels.int2_moe_prefill import (GemmConfig, PrefillConfig, align_pairs, int2_moe_prefill,  # noqa: E402
                                              pick_prefill_config)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LIMIT = 7.0


def _experts(E, D, I, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [t for p in (random_int2(E, I, D, DEV, g), random_int2(E, I, D, DEV, g), random_int2(E, D, I, DEV, g))
            for t in p]


def _routing(T, E, k, seed, shared=False):
    g = torch.Generator().manual_seed(seed)
    if shared:   # every token picks from the same few experts, in different orders
        pool = torch.randperm(E, generator=g)[:k + 1]
        idx = torch.stack([pool[torch.randperm(k + 1, generator=g)[:k]] for _ in range(T)])
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return idx.to(DEV), (torch.rand(T, k, generator=g) + 0.25).to(DEV)


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def test_dequant_matches_reference():
    g = torch.Generator(device=DEV).manual_seed(1)
    w = random_int2(3, 37, 256, DEV, g)                                  # K_out not a block multiple
    out = dequantize_int2(*w, out_dtype=torch.float32)
    assert torch.equal(out, dequantize_int2_reference(*w))


def test_reference_bit_order():
    # one word with codes 0..15 = j % 4 -> the reference must read code j at bits [2j, 2j+2)
    word = sum((j % 4) << (2 * j) for j in range(16))
    packed = torch.tensor([[[word - (1 << 32) if word >= 1 << 31 else word] * 8]], dtype=torch.int32)
    scale = torch.ones(1, 1, 2, dtype=torch.float16)
    zero = torch.tensor([[[0x21]]], dtype=torch.int8)                   # group 0 -> 1, group 1 -> 2
    w = dequantize_int2_reference(packed, scale, zero)[0, 0]
    q = torch.tensor([j % 4 for j in range(16)] * 8, dtype=torch.float32)
    assert torch.equal(w, q - torch.tensor([1.0] * 64 + [2.0] * 64))


@pytest.mark.parametrize("T,use_dot,shared", [(1, False, False), (3, False, True), (3, True, False),
                                               (16, True, True)])
def test_decode_matches_reference(T, use_dot, shared):
    E, D, I, k = 8, 256, 128, 3
    w = _experts(E, D, I, seed=T)
    x = torch.randn(T, D, device=DEV)
    idx, wt = _routing(T, E, k, seed=T + 10, shared=shared)
    y = int2_moe_decode(x, idx, wt, *w, LIMIT, use_dot=use_dot, half=False)   # fp32 CUDA-core loop (exact)
    ref = int2_moe_reference(x, idx, wt, *w, LIMIT)
    assert _rel(y, ref) < (2e-3 if use_dot else 1e-5)


@pytest.mark.parametrize("use_dot,cfg", [
    (False, DecodeConfig(StageConfig(64, 4, 2, split=4), StageConfig(64, 4, 2, split=2))),
    (True, DecodeConfig(StageConfig(64, 4, 4, split=4), StageConfig(16, 4, 4, split=2))),
    (True, DecodeConfig(StageConfig(64, 8, 4, split=2), StageConfig(32, 8, 4, split=1)))])
def test_decode_split_k_matches_reference(use_dot, cfg):
    # several K splits per tile: partial sums by atomics, SwiGLU applied by the last program to arrive
    E, D, I, k, T = 4, 256, 128, 2, 2
    w = _experts(E, D, I, seed=21)
    x = torch.randn(T, D, device=DEV)
    idx, wt = _routing(T, E, k, seed=22, shared=True)
    ref = int2_moe_reference(x, idx, wt, *w, LIMIT)
    y = int2_moe_decode(x, idx, wt, *w, LIMIT, use_dot=use_dot, config=cfg, half=False)
    assert _rel(y, ref) < (2e-3 if use_dot else 1e-5)
    y2 = int2_moe_decode(x, idx, wt, *w, LIMIT, use_dot=use_dot, config=cfg, half=False)   # workspace re-zeroed
    assert torch.equal(y, y2) or _rel(y2, ref) < (2e-3 if use_dot else 1e-5)


def test_decode_duplicate_expert_in_one_token():
    # a token routed twice to the same expert: de-duplication must still count both pairs
    E, D, I = 4, 128, 128
    w = _experts(E, D, I, seed=5)
    x = torch.randn(2, D, device=DEV).bfloat16().float()               # exact in fp16 (the half path's input)
    idx = torch.tensor([[1, 1], [1, 2]], device=DEV)
    wt = torch.rand(2, 2, device=DEV) + 0.5
    for use_dot, half in ((False, False), (False, True), (True, False)):
        y = int2_moe_decode(x, idx, wt, *w, LIMIT, use_dot=use_dot, half=half)
        assert _rel(y, int2_moe_reference(x, idx, wt, *w, LIMIT)) < 2e-3


def test_decode_config_candidates_valid():
    for use_dot, half in ((False, False), (True, False), (False, True)):
        for cfg in decode_configs(use_dot, half):
            assert cfg.gate_up.block_n % (64 if use_dot else 16) == 0
            assert not use_dot or (cfg.down.block_n >= 16 and cfg.gate_up.w % 4 == 0 and cfg.down.w % 4 == 0)
            # V4-Flash rows: 256 / 128 packed words, every K split a whole number of steps
            assert 256 % (cfg.gate_up.w * cfg.gate_up.split) == 0 and 128 % (cfg.down.w * cfg.down.split) == 0


def test_align_pairs_covers_every_pair_once():
    idx, _ = _routing(50, 8, 3, seed=3)
    sorted_ids, bexp = align_pairs(idx, 8, 16)
    S = idx.numel()
    ids = sorted_ids[sorted_ids < S].sort().values
    assert torch.equal(ids.cpu(), torch.arange(S, dtype=torch.int32))
    flat = idx.reshape(-1)
    for b in range(bexp.numel()):
        blk = sorted_ids[b * 16:(b + 1) * 16]
        blk = blk[blk < S].long()
        if bexp[b] < 0:
            assert blk.numel() == 0
        else:
            assert (flat[blk] == bexp[b]).all()


_SMALL = GemmConfig(32, 4, 4, 2)


@pytest.mark.parametrize("T,cfg", [
    (50, PrefillConfig(16, _SMALL, _SMALL)),                                      # weights on the left
    # natural-order gate/up (expand=1) writing h in the pair order of the down launch; a register cap
    (20, PrefillConfig(16, GemmConfig(32, 4, 4, 2, expand=1, maxnreg=168), GemmConfig(32, 4, 4, 2, maxnreg=168))),
    (24, PrefillConfig(16, GemmConfig(32, 4, 4, 2, expand=3), GemmConfig(32, 4, 4, 2, expand=1))),   # and back
    (7, PrefillConfig(32, GemmConfig(32, 8, 4, 2, swap=False), GemmConfig(64, 4, 4, 2, swap=False), 16)),
    (40, PrefillConfig(32, GemmConfig(16, 4, 4, 2, expand=1), GemmConfig(32, 8, 4, 2, expand=1), 16)),
    (33, PrefillConfig(16, GemmConfig(32, 4, 4, 2, False, chunk=3), GemmConfig(32, 4, 4, 2, True, chunk=5))),
    (64, None)])                                                                  # the default for T
def test_prefill_matches_reference(T, cfg):
    # E=8, k=3: some experts get 0 tokens, several M-blocks end in padding, down_block_m < block_m skips
    # all-padding sub-blocks, chunk>0 dequantises a few experts at a time (blocks of other experts exit)
    E, D, I, k = 8, 256, 128, 3
    w = _experts(E, D, I, seed=T)
    x = torch.randn(T, D, device=DEV)
    idx, wt = _routing(T, E, k, seed=T + 1)
    y = int2_moe_prefill(x, idx, wt, *w, LIMIT, config=cfg)
    ref = int2_moe_reference(x, idx, wt, *w, LIMIT)
    assert _rel(y, ref) < 2e-3


def test_prefill_config_choice_and_bad_block():
    for T in (17, 64, 2048, 6144, 50000):
        c = pick_prefill_config(T, 6, 256)
        assert c.block_m % (c.down_block_m or c.block_m) == 0 and c.block_m >= 16
    E, D, I, k = 4, 128, 128, 2
    w = _experts(E, D, I, seed=3)
    x = torch.randn(20, D, device=DEV)
    idx, wt = _routing(20, E, k, seed=4)
    with pytest.raises(ValueError, match="down_block_m"):
        int2_moe_prefill(x, idx, wt, *w, LIMIT, config=PrefillConfig(32, _SMALL, _SMALL, 64))


def test_dispatch_and_bad_input():
    E, D, I, k = 4, 128, 128, 2
    w = _experts(E, D, I, seed=9)
    x = torch.randn(2, D, device=DEV, dtype=torch.bfloat16)
    idx, wt = _routing(2, E, k, seed=2)
    y = int2_moe(x, idx, wt, *w, LIMIT)
    assert y.dtype == torch.float32 and y.shape == (2, D)
    assert _rel(y, int2_moe_reference(x, idx, wt, *w, LIMIT)) < 1e-3   # fp16 inner loop (HALF_DEFAULT)
    with pytest.raises(ValueError, match="w2"):
        int2_moe(x, idx, wt, *w[:6], w[6], w[7].float(), w[8], LIMIT)
    with pytest.raises(ValueError, match="idx"):
        int2_moe(x, idx[:1], wt, *w, LIMIT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 3, 16, 100, 1024])
def test_full_shape_gpu(T):
    E, D, I, k = 256, 4096, 2048, 6
    w = _experts(E, D, I, seed=T)
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    idx, wt = _routing(T, E, k, seed=T, shared=(T == 16))
    y = int2_moe(x, idx, wt, *w, 10.0)
    ref = int2_moe_reference(x, idx, wt, *w, 10.0)
    assert _rel(y, ref) < (3e-4 if T == 1 else 3e-3)                   # T=1: fp16 decode loop, 6.6e-5 measured
    if T <= 16:
        y2 = int2_moe_decode(x, idx, wt, *w, 10.0, use_dot=T > 1)
        y3 = int2_moe_prefill(x, idx, wt, *w, 10.0)
        assert _rel(y2, ref) < 3e-3 and _rel(y3, ref) < 3e-3
        from dsv4lib.kernels.int2_moe_prefill import SPLIT_DECODE_CONFIG
        for _ in range(2):   # the split-K launches at full shape; the second call sees the re-zeroed workspace
            y4 = int2_moe_prefill(x, idx, wt, *w, 10.0, config=SPLIT_DECODE_CONFIG)
            assert _rel(y4, ref) < 3e-3 and _rel(y4, y3) < 1e-3


@pytest.mark.parametrize("T,E,k,bm,seed", [(50, 8, 3, 16, 3), (700, 256, 6, 64, 4), (1, 8, 2, 16, 5), (300, 24, 6, 128, 6)])
def test_align_pairs_fused_equals_torch(T, E, k, bm, seed):
    """The Triton align (histogram per 256-pair chunk, one planning program, stable scatter) gives the torch
    align_pairs' outputs bit for bit: runs in expert order, pairs in index order inside a run, S as padding,
    -1 past the used blocks -- several chunks (T*k > 256), experts with no pairs, one token."""
    from dsv4lib.kernels.int2_moe_prefill import align_pairs_fused
    idx, _ = _routing(T, E, k, seed=seed)
    if T == 700:   # skewed: a quarter of the experts unused, one expert hot
        idx = torch.where(idx % 4 == 0, torch.full_like(idx, 5), idx)
    ref = align_pairs(idx, E, bm)
    got = align_pairs_fused(idx, E, bm)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, ref)), (got, ref)


def test_prefill_with_align_kernel_matches_default(monkeypatch):
    """int2_moe_prefill with ALIGN_KERNEL (the Triton align, the default) gives the torch align's output: the
    blocks are identical, so only the down launch's fp32 atomic order may differ (exact on one thread)."""
    import dsv4lib.kernels.int2_moe_prefill as P
    E, D, I, k, T = 8, 256, 128, 3, 90
    w = _experts(E, D, I, seed=21)
    x = torch.randn(T, D, device=DEV)
    idx, wt = _routing(T, E, k, seed=22)
    monkeypatch.setattr(P, "ALIGN_KERNEL", False)
    y0 = int2_moe_prefill(x, idx, wt, *w, LIMIT)
    monkeypatch.setattr(P, "ALIGN_KERNEL", True)
    y1 = int2_moe_prefill(x, idx, wt, *w, LIMIT)
    assert (y1 - y0).abs().max() <= 1e-6 * y0.abs().max()
    assert _rel(y1, int2_moe_reference(x, idx, wt, *w, LIMIT)) < 2e-3


@pytest.mark.parametrize("shared", [False, True])
def test_prefill_split_k_matches_reference(shared):
    """Split-K launches (``GemmConfig.split``; the shape of ``SPLIT_DECODE_CONFIG``): gate/up partial sums added into
    the zeroed fp32 workspace and the tile's last split applying SwiGLU, down splits adding into y -- against the
    reference and the unsplit launch, twice (the finishing programs leave the workspace and counters zero), with
    16 tokens on independent experts and on the same experts."""
    import dsv4lib.kernels.int2_moe_prefill as P
    from dsv4lib.kernels.workspace import zeroed_workspace
    E, D, I, k, T = 8, 256, 256, 3, 16
    w = _experts(E, D, I, seed=31)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(33)).to(DEV)
    idx, wt = _routing(T, E, k, seed=32, shared=shared)
    cfg = PrefillConfig(16, GemmConfig(64, 8, 4, 3, split=2), GemmConfig(64, 8, 4, 3, split=2))
    ref = int2_moe_reference(x, idx, wt, *w, LIMIT)
    y0 = int2_moe_prefill(x, idx, wt, *w, LIMIT)
    for _ in range(2):
        y = int2_moe_prefill(x, idx, wt, *w, LIMIT, config=cfg)
        assert _rel(y, ref) < 2e-3
        assert (y - y0).abs().max() <= 1e-3 * y0.abs().max()     # fp32 order; an h may round the other way
    assert zeroed_workspace(DEV, 0).abs().max() == 0
    with pytest.raises(ValueError, match="split=3"):
        int2_moe_prefill(x, idx, wt, *w, LIMIT, config=PrefillConfig(16, GemmConfig(64, 8, 4, 3, split=3)))
    assert P.SPLIT_DECODE_CONFIG.gate_up.split > 1 and P.SPLIT_DECODE_CONFIG.block_m == 16
