"""Per-expert Hessian accumulation (dsv4lib.quant.hessian) and the data-free fallbacks (dsv4lib.quant.fallback)."""
from __future__ import annotations

import pytest
import torch

from dsv4lib.formats import int2
from dsv4lib.quant import fallback
from dsv4lib.quant.hessian import ExpertHessians, accumulate, accumulate_all


def _naive(x, idx, weight, E):
    H = torch.zeros(E, x.shape[1], x.shape[1], dtype=torch.float64)
    cnt = torch.zeros(E, dtype=torch.int64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < 0:
                continue
            w = 1.0 if weight is None else float(weight[t, j])
            H[e] += w * torch.outer(x[t].double(), x[t].double())
            cnt[e] += 1
    return H, cnt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_accumulate_matches_naive_sum(dtype, weighted):
    g = torch.Generator().manual_seed(0)
    T, D, E, k = 300, 24, 7, 3
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct per token
    idx[::5, 0] = -1  # skipped visits
    idx[idx == 6] = 5  # expert 6 never visited
    w = torch.rand(T, k, generator=g) if weighted else None
    acc = ExpertHessians.zeros(E, D, dtype=dtype)
    accumulate(acc, x[:170], idx[:170], None if w is None else w[:170], token_chunk=64)
    accumulate(acc, x[170:], idx[170:], None if w is None else w[170:], token_chunk=1000)
    H, cnt = _naive(x, idx, w, E)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(acc.H.double(), H, rtol=tol, atol=tol * 10)
    assert torch.equal(acc.count, cnt) and acc.count[6] == 0 and acc.H[6].abs().sum() == 0
    expected_ws = cnt.double() if w is None else torch.zeros(E, dtype=torch.float64).index_add_(
        0, idx[idx >= 0], w[idx >= 0].double())
    torch.testing.assert_close(acc.weight_sum, expected_ws)
    torch.testing.assert_close(acc.normalized()[0].double(), H[0] / expected_ws[0], rtol=1e-4, atol=1e-5)


def test_accumulate_all_and_errors():
    x = torch.randn(50, 16)
    acc = ExpertHessians.zeros(4, 16)
    accumulate_all(acc, x, torch.tensor([1, 3]), token_chunk=20)
    torch.testing.assert_close(acc.H[1], x.T @ x, rtol=1e-5, atol=1e-5)
    assert acc.H[0].abs().sum() == 0 and acc.count.tolist() == [0, 50, 0, 50]
    with pytest.raises(ValueError, match="out of range"):
        accumulate(acc, x, torch.full((50, 1), 4))
    with pytest.raises(ValueError, match="x must be"):
        accumulate(acc, torch.randn(5, 8), torch.zeros(5, 1, dtype=torch.long))


def _outlier_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(2, 64, 256, generator=g) * 0.02
    W[..., ::7] *= 4
    W[0, :3, :64] = W[0, :3, :64].abs() + 0.01  # all-positive groups
    W[1, :3, :64] = -W[1, :3, :64].abs() - 0.01  # all-negative groups
    return W


def test_fallbacks_format_and_error_order():
    W = _outlier_weights()
    errs = {}
    for m in fallback.METHODS:
        qw = fallback.fallback_quantize(W, m, row_chunk=40)
        assert qw.codes.shape == W.shape and qw.scale.shape == (2, 64, 4)
        deq = qw.dequantize()
        assert deq.abs().sum() > 0  # never zeroed
        packed = qw.pack()
        assert torch.equal(int2.dequantize(packed["w_packed"], packed["w_scale"], packed["w_zero_packed"]), deq)
        errs[m] = float((deq - W).square().sum())
    q, s, z = int2.quantize_rtn(W)
    assert errs["rtn"] == pytest.approx(float((int2.dequantize_codes(q, s, z) - W).square().sum()), rel=1e-6)
    assert errs["mse"] < 0.9 * errs["rtn"]
    assert errs["lloyd"] <= errs["mse"] * (1 + 1e-6)
    # the zero-point search uses the spare 4-bit room: one-signed groups are not forced to contain 0
    qw = fallback.fallback_quantize(W, "mse")
    assert int(qw.zero.max()) > 3 or bool((qw.scale < 0).any())


def test_importance_weighting_lowers_weighted_error():
    W = _outlier_weights(1)
    imp = torch.rand(256, generator=torch.Generator().manual_seed(3)) ** 4 * 10
    plain = fallback.fallback_quantize(W, "mse").dequantize()
    weighted = fallback.fallback_quantize(W, "mse", importance=imp).dequantize()

    def werr(d):
        return float(((d - W).square() * imp).sum())

    assert werr(weighted) < werr(plain)
    with pytest.raises(ValueError, match="unknown fallback"):
        fallback.fallback_quantize(W, "nope")
