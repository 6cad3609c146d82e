"""TF32 products in bf16 models (dsv4lib.model.lowp.tf32_matmuls, used by Attention.forward for the scores
by Compressor.forward for its fp32 projections of the bf16 stream, and by the MoE Gate for its logits).

CPU: the context manager switches the flag and restores it (also after an exception).
GPU: a bf16 model's logits with TF32 attention products are as close to the fp32 model's as without
TF32 (q and keys hold bf16 values, exact in TF32; only the softmax probabilities are rounded, to 11 bits).
"""
import contextlib

import pytest
import torch

from dsv4lib.config import ModelConfig
from dsv4lib.model import DeepseekV4
from dsv4lib.model.lowp import tf32_matmuls


def _flag():
    m = torch.backends.cuda.matmul
    return m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32


def test_tf32_context_sets_and_restores():
    before = _flag()
    with tf32_matmuls(False):
        assert _flag() == before
    with tf32_matmuls(True):
        assert _flag() in ("tf32", True)
    assert _flag() == before
    with pytest.raises(RuntimeError), tf32_matmuls(True):
        raise RuntimeError("boom")
    assert _flag() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_bf16_attention_tf32_adds_no_error(monkeypatch):
    import dsv4lib.model.attention as attention
    import dsv4lib.model.compressor as compressor
    import dsv4lib.model.moe as moe
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    ref_model = DeepseekV4(cfg).eval().cuda()                          # fp32 reference (no TF32: fp32 operands)
    ids = torch.randint(0, cfg.vocab_size, (2, 96), device="cuda")
    ref = ref_model(ids)
    m16 = DeepseekV4(cfg, dtype=torch.bfloat16).eval().cuda()
    m16.load_state_dict(ref_model.state_dict())
    with_tf32 = m16(ids).float()
    monkeypatch.setattr(attention, "tf32_matmuls", lambda enabled: contextlib.nullcontext())
    monkeypatch.setattr(compressor, "tf32_matmuls", lambda enabled: contextlib.nullcontext())
    monkeypatch.setattr(moe, "tf32_matmuls", lambda enabled: contextlib.nullcontext())
    without = m16(ids).float()
    err_with = (with_tf32 - ref).abs().max().item()
    err_without = (without - ref).abs().max().item()
    assert err_with <= 1.25 * err_without + 1e-3 * ref.abs().max().item(), (err_with, err_without)
    # argmax vs the fp32 model: TF32 must not agree less than plain bf16 does (random tiny weights have
    # near-ties; two bf16 runs agree on 95 % of positions on the H200, so compare against the reference)
    agree = lambda a: (a.argmax(-1) == ref.argmax(-1)).float().mean().item()   # noqa: E731
    assert agree(with_tf32) >= agree(without) - 0.03, (agree(with_tf32), agree(without))
