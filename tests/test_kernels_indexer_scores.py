"""Indexer scores kernel (kernels/indexer_scores.py) against the eager indexer's torch math, and inside the
model (the tiny model's CSA layers with the kernel forced on; the CPU interpreter runs it)."""
import pytest
import torch

from dsv4lib.kernels.indexer_scores import indexer_scores, indexer_scores_reference

pytest.importorskip("triton")


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B=2, S=37, NH=3, CI=32, T=13, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, NH, CI, generator=g).to(dtype)
    k = torch.randn(B, T, CI, generator=g).to(dtype)
    w = torch.randn(B, S, NH, generator=g)
    return [t.to(_dev()) for t in (q, k, w)]


@pytest.mark.parametrize("dtype,start", [(torch.float32, 0), (torch.float32, 21), (torch.float16, 5)])
def test_indexer_scores_match_reference(dtype, start):
    """Tiles across the future mask (a chunk starting at position 0 or later), rows/entries not multiples of
    the tile, negative weights (ReLU before the weighting), fp16 operands straight into the dot."""
    q, k, w = _inputs(dtype=dtype)
    pos = torch.arange(start, start + q.shape[1], device=q.device)
    got = indexer_scores(q, k, w, pos, 4)
    ref = indexer_scores_reference(q, k, w, pos, 4)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)                 # the same future mask
    assert fin.sum() > 0 and (~fin).sum() > 0
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert (got[fin] - ref[fin]).abs().max() <= tol * ref[fin].abs().max()


@pytest.mark.parametrize("prec", ["ieee", "tf32x3"])
def test_indexer_scores_16bit_q_fp32_keys(prec):
    """The bf16 model's case: 16-bit q (fp16 here: the interpreter's bf16 dot is broken) against fp32 keys (the
    compressor entries), q cast up exactly, fp32 products ('tf32x3' on the GPU; the interpreter is exact)."""
    q, k, w = _inputs()
    q16 = q.half()
    pos = torch.arange(9, 9 + q.shape[1], device=q.device)
    got = indexer_scores(q16, k, w, pos, 4, fp32_precision=prec)
    ref = indexer_scores_reference(q16.float(), k, w, pos, 4)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    assert (got[fin] - ref[fin]).abs().max() <= 1e-5 * ref[fin].abs().max()


def test_indexer_scores_bad_input():
    q, k, w = _inputs()
    pos = torch.arange(q.shape[1], device=q.device)
    with pytest.raises(ValueError, match="keys"):
        indexer_scores(q, k[..., :16], w, pos, 4)
    with pytest.raises(ValueError, match="keys must be fp32"):
        indexer_scores(q.half(), k.bfloat16(), w, pos, 4)
    with pytest.raises(ValueError, match="fp32_precision"):
        indexer_scores(q, k, w, pos, 4, fp32_precision="tf32")
    with pytest.raises(ValueError, match="pos"):
        indexer_scores(q, k, w, pos.float(), 4)


@torch.no_grad()
def test_model_forward_with_indexer_kernel(monkeypatch):
    """The tiny model with the indexer's scores through the kernel selects the same entries: equal logits,
    over a chunked prefill and decode steps (the kernel's sums differ from the einsum's only in order)."""
    import dsv4lib.model.indexer as indexer
    from dsv4lib.config import ModelConfig
    from dsv4lib.model import DeepseekV4
    dev = _dev()
    torch.manual_seed(0)
    m = DeepseekV4(ModelConfig.tiny()).eval().to(dev)
    ids = torch.randint(0, m.config.vocab_size, (2, 44), generator=torch.Generator().manual_seed(2)).to(dev)

    def run():
        cache = m.new_cache(2, 64)
        outs = [m(ids[:, :30], cache)] + [m(ids[:, i:i + 1], cache) for i in range(30, 44)]
        return torch.cat(outs, 1)
    monkeypatch.setattr(indexer, "INDEXER_KERNEL", False)
    ref = run()
    calls = []
    monkeypatch.setattr(indexer, "INDEXER_KERNEL", True)
    monkeypatch.setattr(indexer, "INDEXER_KERNEL_FP32_KEYS", True)
    if dev == "cpu":
        monkeypatch.setattr(indexer, "_use_kernel", lambda q: calls.append(1) or True)
    got = run()
    assert dev != "cpu" or calls
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_indexer_scores_full_shapes_bf16():
    """V4-Flash shapes on the GPU: 2048 queries x 64 heads x 128 against 512 entries, bf16 operands."""
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(1, 2048, 64, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, 512, 128, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, 2048, 64, device="cuda", generator=g) * 0.01
    pos = torch.arange(2048, device="cuda")
    got = indexer_scores(q, k, w, pos, 4)
    ref = indexer_scores_reference(q, k, w, pos, 4)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    assert (got[fin] - ref[fin]).abs().max() <= 1e-5 * ref[fin].abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_indexer_scores_bf16_q_fp32_keys_tf32x3():
    """The bf16 full-scale case on the GPU: bf16 q [2048, 64, 128] against fp32 keys [512, 128], 3xTF32."""
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(1, 2048, 64, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, 512, 128, device="cuda", generator=g)
    w = torch.randn(1, 2048, 64, device="cuda", generator=g) * 0.01
    pos = torch.arange(2048, device="cuda")
    got = indexer_scores(q, k, w, pos, 4, fp32_precision="tf32x3")
    ref = indexer_scores_reference(q, k, w, pos, 4)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    assert (got[fin] - ref[fin]).abs().max() <= 1e-4 * ref[fin].abs().max()
