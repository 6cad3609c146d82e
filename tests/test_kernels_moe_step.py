"""kernels/moe_step.py (interpreted on CPU, compiled on CUDA) against the eager router / SwiGLU math."""
import pytest
import torch

from dsv4lib.kernels.moe_step import router_fused, router_reference, router_topk, swiglu_reference, swiglu_rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("E, k, renorm", [(256, 6, True), (40, 3, False), (16, 4, True)])
def test_router_topk_matches_gate(E, k, renorm):
    g = torch.Generator().manual_seed(E + k)
    T = 5
    logits = (torch.randn(T, E, generator=g) * 4).to(DEV)               # includes very negative logits
    logits[0, :3] = -40.0                                               # softplus far in the tail
    bias = (torch.randn(E, generator=g) * 0.3).to(DEV)
    s, idx, w = router_topk(logits, bias, k, 1.5, renorm)
    rs, ridx, rw = router_reference(logits, bias, k, 1.5, renorm)
    assert (s - rs).abs().max() <= 1e-6 * max(1.0, rs.abs().max().item()) + 1e-7
    assert torch.equal(idx, ridx)                                       # same experts, in score order
    assert (w - rw).abs().max() <= 1e-6
    # hash routing: the given experts, their unbiased scores
    hidx = torch.randint(0, E, (T, k), generator=g).to(DEV)
    s, idx, w = router_topk(logits, None, k, 1.5, renorm, hash_idx=hidx)
    rs, ridx, rw = router_reference(logits, None, k, 1.5, renorm, hash_idx=hidx)
    assert torch.equal(idx, hidx) and (w - rw).abs().max() <= 1e-6


@pytest.mark.parametrize("T, E, D, k, renorm, tokens, rows", [(1, 256, 300, 6, True, 16, 2), (3, 40, 128, 3, False, 16, 2),
                                                              (12, 20, 200, 4, True, 16, 2), (12, 20, 200, 4, True, 5, 4),
                                                              (3, 40, 128, 3, False, 1, 1), (3, 41, 128, 3, False, 2, 4)])
def test_router_fused_matches_gate(T, E, D, k, renorm, tokens, rows, monkeypatch):
    """Logits GEMV + routing in one launch (bf16 x and weight) against Gate's math on the same bf16
    values in fp64: E not a multiple of the 8-expert tile, D not of the K tile, T up to 12 (the 64-wide
    K tile), ``tokens`` per program (ROUTER_TOKENS < T: a second grid axis, a partial last group), ``rows`` (experts)
    per program (E = 41: a partial last row group); three calls
    through the same arrival counter; hash routing."""
    import dsv4lib.kernels.moe_step as ms
    monkeypatch.setattr(ms, "ROUTER_TOKENS", tokens)
    monkeypatch.setattr(ms, "ROUTER_ROWS", rows)
    g = torch.Generator().manual_seed(T * E + D)
    x = torch.randn(T, D, generator=g).to(DEV, torch.bfloat16)
    W = (torch.randn(E, D, generator=g) * 0.2).to(DEV, torch.bfloat16)
    bias = (torch.randn(E, generator=g) * 0.3).to(DEV)
    logits = (x.double() @ W.double().T)
    rs, ridx, rw = router_reference(logits, bias.double(), k, 1.5, renorm)
    for _ in range(3):
        idx, w = router_fused(x, W, bias, k, 1.5, renorm)
        assert torch.equal(idx, ridx)
        assert (w.double() - rw).abs().max() <= 1e-5
    hidx = torch.randint(0, E, (T, k), generator=g).to(DEV)
    idx, w = router_fused(x, W, None, k, 1.5, renorm, hash_idx=hidx)
    _, _, rw = router_reference(logits, None, k, 1.5, renorm, hash_idx=hidx)
    assert torch.equal(idx, hidx) and (w.double() - rw).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="16-bit"):
        router_fused(x.float(), W, bias, k, 1.5, renorm)


def test_router_ties_go_to_lower_id():
    logits = torch.zeros(1, 16, device=DEV)
    _, idx, _ = router_topk(logits, torch.zeros(16, device=DEV), 3, 1.0, True)
    assert idx.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_rows_matches_shared_expert_math(dtype):
    g = torch.Generator().manual_seed(3)
    gu = (torch.randn(3, 1, 2 * 300, generator=g) * 6).to(DEV, dtype)  # beyond the clamp, I not a power of two
    got = swiglu_rows(gu, 7.0)
    ref = swiglu_reference(gu, 7.0)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_moe_step_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        router_topk(torch.zeros(2, 8, device=DEV), None, 2, 1.0, True)
    with pytest.raises(ValueError, match="logits must be fp32"):
        router_topk(torch.zeros(2, 8, device=DEV, dtype=torch.bfloat16), torch.zeros(8, device=DEV), 2, 1.0, True)
    with pytest.raises(ValueError, match="swiglu_rows"):
        swiglu_rows(torch.zeros(2, 7, device=DEV), 7.0)
