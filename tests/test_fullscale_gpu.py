"""CUDA-graph decode (dsv4lib.model.graphed.GraphedDecoder) gives the eager model's greedy tokens on the
embedded model with RTN INT2 experts (GPU only)."""
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REF = Path(__file__).resolve().parents[1] / "data" / "tiny-v4"


@pytest.mark.parametrize("fused,pdl,B", [(False, False, 2), (True, False, 2), (True, True, 2), (True, True, 1)])
@torch.no_grad()
def test_graphed_greedy_equals_eager(tmp_path, fused, pdl, B, monkeypatch):
    """``pdl``: the fused step's Triton kernels with programmatic dependent launch (kernels/pdl.py); ``B`` = 1: the
    one-row FP8 projections run on the CUDA-core GEMV (kernels/fp8_gemv.py, ``fp8_linear.GEMV_MAX_M``)."""
    import dsv4lib.kernels.pdl as pdl_mod
    monkeypatch.setattr(pdl_mod, "ENABLED", pdl)
    from dsv4lib.checkpoint import load_model
    from dsv4lib.model.graphed import GraphedDecoder
    from dsv4lib.model.static_cache import static_from_cache
    from dsv4lib.quant.pipeline import quantize_rtn

    int2 = quantize_rtn(REF, tmp_path / "int2")
    model = load_model(REF, int2, device="cuda", dtype=torch.float32)
    P, N = 47, 40   # P: window ring full, both compressors complete at the first graphed step (warm_up)
    prompt = torch.randint(0, model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(0)).cuda()

    cache = model.new_cache(B, P + N + 4)
    logits = model(prompt, cache)[:, -1]
    eager, eager_logits = [], []
    for _ in range(N):
        tok = logits.argmax(-1, keepdim=True)
        eager.append(tok)
        logits = model(tok, cache)[:, -1]
        eager_logits.append(logits)

    cache = model.new_cache(B, P + N + 4)
    logits = model(prompt, cache)[:, -1]
    dec = GraphedDecoder(model, static_from_cache(model, cache, P + N + 4), fused=fused)
    graphed, diffs = [], []
    for i in range(N):
        tok = logits.argmax(-1, keepdim=True)
        graphed.append(tok)
        logits = dec.step(tok).clone()
        diffs.append((logits - eager_logits[i]).abs().max().item())
    from dsv4lib.model.graphed import FUSED_FAILURES
    assert not FUSED_FAILURES, FUSED_FAILURES                           # fused kernels ran (no torch fallback)
    assert torch.equal(torch.cat(eager, 1), torch.cat(graphed, 1))
    assert max(diffs) <= 1e-2 * max(1.0, eager_logits[0].abs().max().item())


@pytest.mark.parametrize("ratio,hd,coff", [(128, 512, 1), (4, 512, 2), (4, 128, 2)])
@torch.no_grad()
def test_fused_decode_kernels_full_shapes_bf16(ratio, hd, coff):
    """The compressor-step and RMSNorm+RoPE kernels at V4-Flash shapes in bf16 == the torch references
    (to bf16 rounding of the stored entries / outputs). Entries are compared where visible (index <
    (pos+1)//r): the kernel writes an entry only when its window completes, the torch step every step."""
    from dsv4lib.config import ModelConfig
    from dsv4lib.kernels.rmsnorm_rope import rmsnorm_rope, rmsnorm_rope_reference
    from dsv4lib.model.compressor import Compressor
    from dsv4lib.model.rope import cos_sin
    from dsv4lib.model.static_cache import _comp_state
    from compressor_check import step_and_compare

    cfg = ModelConfig.v4_flash()
    torch.manual_seed(0)
    comp = Compressor(cfg, ratio, hd, device="cuda")
    for p_ in (comp.wkv.weight, comp.wgate.weight, comp.ape):
        p_.copy_(torch.randn(p_.shape) * 0.3)
    for lin in (comp.wkv, comp.wgate):
        lin.weight.data = lin.weight.data.bfloat16()
    B = 2
    ref, got = (_comp_state(B, ratio, hd, 2 * ratio + 2, torch.bfloat16, "cuda") for _ in range(2))
    step_and_compare(comp, ref, got, (ratio - 2, ratio - 1, ratio, ratio + 1), B, torch.bfloat16, "cuda", 0.05)
    x = torch.randn(1, 1, 64, 512, device="cuda").bfloat16() * 3
    cos, sin = (t[0] for t in cos_sin(comp.freqs, torch.tensor([16000], device="cuda")))
    for mode in (0, 1, 2):
        w = torch.rand(512, device="cuda") + 0.5
        a = rmsnorm_rope(x, w if mode == 0 else None, 1e-6, cos, sin, mode=mode).float()
        b = rmsnorm_rope_reference(x, w, 1e-6, cos, sin, mode=mode).float()
        assert (a - b).abs().max() <= 2e-2 * b.abs().max(), mode   # a few bf16 ulps (two roundings)


@pytest.mark.parametrize("topk", [512, None])
@torch.no_grad()
def test_decode_attention_full_shapes_bf16(topk):
    """The split-key decode attention kernel at V4-Flash shapes (64 heads x 512, window 128, CSA top-512
    of 4096 entries / HCA 128 entries) in bf16 == the torch reference."""
    from dsv4lib.kernels.decode_attention import decode_attention, decode_attention_reference
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, C, W = 2, 64, 512, 128
    T = 4096 if topk else 128
    pos = 16000
    q = (torch.randn(B, H, C, device="cuda", generator=g) * 0.05).bfloat16()
    win = torch.randn(B, W, C, device="cuda", generator=g).bfloat16()
    ent = torch.randn(B, T, C, device="cuda", generator=g).bfloat16()
    sink = torch.randn(H, device="cuda", generator=g)
    sel = torch.argsort(torch.rand(B, T, device="cuda", generator=g), -1)[:, :topk] if topk else None
    p = torch.tensor(pos, device="cuda")
    thr = torch.tensor((pos + 1) // (4 if topk else 128), device="cuda")
    a = decode_attention(q, win, ent, sel, p, thr, sink, C ** -0.5).float()
    r = decode_attention_reference(q, win, ent, sel, p, thr, sink, C ** -0.5).float()
    assert (a - r).abs().max() <= 1e-2 * r.abs().max()
