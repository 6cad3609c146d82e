"""GPTQ INT2 g64 (dsv4lib.quant.gptq) against a plain re-implementation of the reference algorithm.

The reference below follows quant_notes.md §1.1 step by step with per-column Python loops and no
batching: dead columns, 1 % damping, Cholesky of the inverse, lazy blocks of 128, dynamic group
grids from the block-start weights, asymmetric min-max grid containing 0. The only change is the
fp16 rounding of each scale (the on-disk format stores fp16 scales).
"""
from __future__ import annotations

import pytest
import torch

from dsv4lib.formats import int2
from dsv4lib.quant.gptq import GPTQConfig, gptq_batched, output_error, quantize_weight
from dsv4lib.quant.grid import GridSearch
from dsv4lib.quant.qweight import QuantizedWeight


def _ref_grid(x: torch.Tensor, maxq: int = 3):
    """Min-max grid per row of x [R, G] (range contains 0), fp16 scale."""
    lo = torch.clamp(x.min(1).values, max=0)
    hi = torch.clamp(x.max(1).values, min=0)
    both = (lo == 0) & (hi == 0)
    lo[both], hi[both] = -1.0, 1.0
    s = ((hi - lo) / maxq).half().float()
    z = torch.round(-lo / s)
    return s, z


def reference_gptq(W: torch.Tensor, H: torch.Tensor, group: int = 64, block: int = 128,
                   damp: float = 0.01) -> torch.Tensor:
    """Dequantized GPTQ result for one matrix, written as plain per-column loops (fp64)."""
    W = W.double().clone()
    H = H.double().clone()
    R, C = W.shape
    for c in range(C):  # dead columns
        if H[c, c] == 0:
            H[c, c] = 1.0
            W[:, c] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(C, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                s, z = _ref_grid(W[:, col:col + group].float())
                s, z = s.double(), z.double()
            w = W1[:, i]
            q = (torch.clamp(torch.round(w / s) + z, 0, 3) - z) * s
            Q[:, col] = q
            e = (w - q) / Hinv[col, col]
            for k in range(i, i2 - i1):  # column-by-column update of the rest of the block
                W1[:, k] -= e * Hinv[col, i1 + k]
            Err1[:, i] = e
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q.float()


def _rtn(W: torch.Tensor) -> torch.Tensor:
    q, s, z = int2.quantize_rtn(W)
    return int2.dequantize_codes(q, s, z)


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """X = Z @ A with A = (low rank d/4) + 0.1·I: strongly correlated input channels."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g)
    A = torch.randn(d, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g) / d ** 0.5
    return Z @ (A + 0.1 * torch.eye(d))


def _problem(R=64, C=256, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    W = torch.randn(R, C, generator=g) * 0.05
    X = _correlated(n, C, seed)
    return W, X, X.T @ X


def _err(W, Wq, X):
    return float(torch.linalg.norm((W - Wq) @ X.T))


def test_reference_rule_reproduced_exactly():
    W, X, H = _problem(seed=1)
    ref = reference_gptq(W, H)
    ours = quantize_weight(W, H, **{k: v for k, v in vars(GPTQConfig.reference()).items()
                                    if k not in ("bits", "group_size")}).dequantize()
    # same codes up to rare ties (fp32 vs fp64 arithmetic): ≥ 99.5 % identical, same error
    assert (ours == ref).float().mean() > 0.995
    assert abs(_err(W, ours, X) - _err(W, ref, X)) < 0.01 * _err(W, ref, X)


@pytest.mark.parametrize("seed", [2, 3])
def test_gptq_beats_reference_and_rtn(seed):
    W, X, H = _problem(seed=seed)
    e_ref = _err(W, reference_gptq(W, H), X)
    e_rtn = _err(W, _rtn(W), X)
    for opts in ({}, {"act_order": True, "static_groups": True}):
        qw = quantize_weight(W, H, **opts)
        e = _err(W, qw.dequantize(), X)
        assert e <= e_ref, (opts, e, e_ref)
        assert e <= 0.4 * e_rtn, (opts, e, e_rtn)
    # output_error is the same quantity as ‖(W − Q)Xᵀ‖²
    Wq = quantize_weight(W, H).dequantize()
    assert float(output_error(W, Wq, H)) == pytest.approx(_err(W, Wq, X) ** 2, rel=1e-3)


def test_batched_equals_unbatched():
    probs = [_problem(R=32, C=128, n=512, seed=s) for s in range(4, 8)]
    W = torch.stack([p[0] for p in probs])
    H = torch.stack([p[2] for p in probs])
    for cfg in (GPTQConfig(), GPTQConfig(act_order=True, static_groups=True), GPTQConfig.reference()):
        res = gptq_batched(W, H, cfg, expert_chunk=3)  # chunking must not change anything
        for e in range(4):
            single = gptq_batched(W[e:e + 1], H[e:e + 1], cfg).qweight
            assert torch.equal(res.qweight.codes[e], single.codes[0])
            assert torch.equal(res.qweight.scale[e], single.scale[0])
            assert torch.equal(res.qweight.zero[e], single.zero[0])


def test_zero_hessian_expert_rejected_and_dead_columns_kept():
    W, X, H = _problem(R=32, C=128, n=256, seed=9)
    Hs = torch.stack([H, torch.zeros_like(H)])
    with pytest.raises(ValueError, match=r"experts \[1\].*fallback"):
        gptq_batched(torch.stack([W, W]), Hs)
    # one dead input channel: by default its weights are kept (quantized), not zeroed
    X2 = X.clone()
    X2[:, 5] = 0
    H2 = X2.T @ X2
    qw = quantize_weight(W, H2)
    assert qw.dequantize()[:, 5].abs().sum() > 0
    ref = quantize_weight(W, H2, zero_dead_columns=True)
    assert ref.dequantize()[:, 5].abs().sum() == 0


def test_damping_escalates_per_expert_on_indefinite_hessian():
    W, X, H = _problem(R=32, C=128, n=512, seed=11)
    bad = H - 0.05 * H.diagonal().mean() * torch.eye(128)  # indefinite: 1 % damping cannot fix it
    bad = bad - 2.0 * H.diagonal().mean() * torch.outer(torch.ones(128), torch.ones(128)) / 128
    res = gptq_batched(torch.stack([W, W]), torch.stack([H, bad]))
    assert res.damp[0].item() == pytest.approx(0.01)
    assert res.damp_retries[0] == 0 and res.damp_retries[1] >= 1
    assert res.damp[1].item() > 0.01
    deq = res.qweight.dequantize()
    assert torch.isfinite(deq).all()
    assert _err(W, deq[1], X) < _err(W, _rtn(W), X) * 1.5  # still a sane quantization


def test_pack_dequantize_consistency():
    W, X, H = _problem(R=48, C=256, n=512, seed=12)
    qw = quantize_weight(W, H)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 3
    assert int(qw.zero.max()) <= 15 and qw.scale.dtype == torch.float16
    packed = qw.pack("w1")
    assert set(packed) == {"w1.w_packed", "w1.w_scale", "w1.w_zero_packed"}
    assert packed["w1.w_packed"].shape == (48, 16) and packed["w1.w_zero_packed"].shape == (48, 2)
    assert torch.equal(int2.dequantize(packed["w1.w_packed"], packed["w1.w_scale"],
                                       packed["w1.w_zero_packed"]), qw.dequantize())
    back = QuantizedWeight.unpack(packed, "w1")
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero)


def test_stored_grid_is_the_grid_used():
    """Each dequantized weight lies exactly on its group's stored fp16 grid and GPTQ-tracked error
    uses it: re-deriving codes from the dequantized values and the stored grid gives the same codes."""
    W, X, H = _problem(R=32, C=128, n=512, seed=13)
    qw = quantize_weight(W, H, grid_search=GridSearch(n_shrink=8))
    deq = qw.dequantize().unflatten(-1, (-1, 64))  # [R, ng, 64]
    s = qw.scale.float()[..., None]
    z = qw.zero.float()[..., None]
    codes = torch.round(deq / s + z)
    assert torch.equal(codes.flatten(-2).to(torch.uint8), qw.codes)
    assert (s != 0).all()


def test_config_validation():
    with pytest.raises(ValueError, match="g_idx"):
        GPTQConfig(act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="block_size"):
        GPTQConfig(block_size=96)
    with pytest.raises(TypeError, match="unknown options"):
        quantize_weight(torch.zeros(4, 64), torch.eye(64), dampp=0.1)
