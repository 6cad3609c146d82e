"""Flash-style prefill attention (kernels/prefill_attention.py) against the eager chunk math, and inside
the model (dsv4lib.model.attention.PREFILL_ATTN_KERNEL forced on; the CPU interpreter runs it)."""
import pytest
import torch

from dsv4lib.kernels.prefill_attention import prefill_attention, prefill_attention_reference

pytest.importorskip("triton")


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B=2, S=37, H=4, C=64, NW=50, NE=13, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, C, generator=g)
    win = torch.randn(B, NW, C, generator=g)
    ent = torch.randn(B, NE, C, generator=g)
    bias = torch.where(torch.rand(B, S, NE, generator=g) < 0.4, float("-inf"), 0.0)
    bias[:, 3] = float("-inf")                              # a query with no visible entry
    sink = torch.randn(H, generator=g)
    dev = _dev()
    return [t.to(dev) for t in (q.to(dtype), win.to(dtype), ent.to(dtype), bias, sink)]


@pytest.mark.parametrize("qpos0,wpos0,window", [(30, 10, 16), (0, 0, 8), (64, 40, 128)])
def test_prefill_attention_matches_reference(qpos0, wpos0, window):
    """Window edges (keys before, inside and after the window), entries with -inf bias, the sink, rows
    not a multiple of the tile, a query chunk that starts at a position > 0."""
    q, win, ent, bias, sink = _inputs()
    got = prefill_attention(q, win, ent, bias, sink, qpos0, wpos0, window, 0.125)
    ref = prefill_attention_reference(q.cpu(), win.cpu(), ent.cpu(), bias.cpu(), sink.cpu(), qpos0, wpos0, window, 0.125)
    assert torch.allclose(got.cpu(), ref, atol=2e-5, rtol=1e-4), (got.cpu() - ref).abs().max()


def test_prefill_attention_no_entries_and_sink_only_rows():
    """No entries (sliding layer); queries before every window key see only the sink: o = 0."""
    q, win, _, _, sink = _inputs(NW=20)
    got = prefill_attention(q, win, None, None, sink, 0, 5, 4, 0.1)
    ref = prefill_attention_reference(q.cpu(), win.cpu(), None, None, sink.cpu(), 0, 5, 4, 0.1)
    assert torch.allclose(got.cpu(), ref, atol=2e-5, rtol=1e-4)
    assert torch.all(got[:, :5] == 0) and got[:, 5:].abs().sum() > 0


def test_prefill_attention_into_out_slice_bf16():
    """Written into a slice of a larger output (the model's chunk loop), bf16 inputs (TF32 products)."""
    q, win, ent, bias, sink = _inputs(dtype=torch.bfloat16, C=32)
    out = torch.zeros(2, 50, 4, 32, dtype=torch.bfloat16, device=q.device)
    prefill_attention(q, win, ent, bias, sink, 30, 10, 16, 0.2, out=out[:, 5:42])
    ref = prefill_attention_reference(q.cpu(), win.cpu(), ent.cpu(), bias.cpu(), sink.cpu(), 30, 10, 16, 0.2)
    assert torch.allclose(out[:, 5:42].float().cpu(), ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.all(out[:, :5] == 0) and torch.all(out[:, 42:] == 0)


@pytest.mark.parametrize("p16", [False, True])
def test_prefill_attention_16bit_score_product(p16):
    """fp16 inputs: the score product on the 16-bit operands as loaded (DOT16; the path bf16 takes on the GPU --
    the interpreter's bf16 dot is broken, its fp16 one is not), the value product with p in TF32 or, ``p16``,
    rounded to fp16. Against the fp32 reference of the same fp16 values: within fp16 output rounding (p16:
    p's own 11-bit rounding on top)."""
    from dsv4lib.kernels.prefill_attention import AttnConfig
    q, win, ent, bias, sink = _inputs(dtype=torch.float16, C=64, S=40, NW=56)
    got = prefill_attention(q, win, ent, bias, sink, 30, 10, 16, 0.125, config=AttnConfig(16, 16, 4, 2, p16))
    ref = prefill_attention_reference(q.float().cpu(), win.float().cpu(), ent.float().cpu(), bias.cpu(), sink.cpu(),
                                      30, 10, 16, 0.125)
    err = (got.float().cpu() - ref).abs().max().item()
    assert err <= (4e-3 if p16 else 2e-3) * max(1.0, ref.abs().max().item()), err
    assert got[:, 3:].float().abs().sum() > 0


def test_prefill_attention_bad_input():
    q, win, ent, bias, sink = _inputs()
    with pytest.raises(ValueError, match="sink"):
        prefill_attention(q, win, ent, bias, sink[:2], 0, 0, 8, 0.1)
    with pytest.raises(ValueError, match="ent_bias"):
        prefill_attention(q, win, ent, bias[:, :, :5], sink, 0, 0, 8, 0.1)
    with pytest.raises(ValueError, match="share a dtype"):
        prefill_attention(q, win.half(), ent, bias, sink, 0, 0, 8, 0.1)
    with pytest.raises(ValueError, match="power-of-two"):
        prefill_attention(q[..., :48], win[..., :48], None, None, sink, 0, 0, 8, 0.1)


@torch.no_grad()
def test_model_forward_with_prefill_attention_kernel(monkeypatch):
    """The tiny model (window, HCA and CSA layers) with every query chunk through the kernel gives the torch
    path's logits, over several chunks (QUERY_CHUNK lowered) and after a cached prefix."""
    import dsv4lib.model.attention as attention
    from dsv4lib.config import ModelConfig
    from dsv4lib.model import DeepseekV4
    dev = _dev()
    torch.manual_seed(0)
    m = DeepseekV4(ModelConfig.tiny()).eval().to(dev)
    for layer in m.layers:                                  # non-zero sinks
        layer.attn.attn_sink.data.normal_()
    ids = torch.randint(0, m.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)).to(dev)
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)

    def run():
        cache = m.new_cache(2, 64)
        a = m(ids[:, :24], cache)
        return torch.cat([a, m(ids[:, 24:], cache)], 1)
    monkeypatch.setattr(attention, "PREFILL_ATTN_KERNEL", False)
    monkeypatch.setattr(attention, "PREFILL_NORM_ROPE_KERNEL", False)
    ref = run()
    monkeypatch.setattr(attention, "PREFILL_ATTN_KERNEL", True)
    if dev == "cpu":
        monkeypatch.setattr(attention, "_use_attn_kernel", lambda q: True)
    got = run()
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    # and with the norm + RoPE kernels (q_norm, per-head q norm + RoPE in place, kv_norm + RoPE) on top
    monkeypatch.setattr(attention, "PREFILL_NORM_ROPE_KERNEL", True)
    if dev == "cpu":
        monkeypatch.setattr(attention, "_use_norm_rope_kernel", lambda x: True)
    got = run()
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefill_attention_full_shapes_bf16():
    """V4-Flash shapes on the GPU: a 512-query chunk, 64 heads x 512, 639 window keys, 512 entries (CSA-like
    selection), bf16 -- the launch config that the offline compile test only assembles."""
    q, win, ent, bias, sink = _inputs(B=1, S=512, H=64, C=512, NW=639, NE=512, seed=3, dtype=torch.bfloat16)
    q, win, ent = q * 0.3, win * 0.3, ent * 0.3
    got = prefill_attention(q, win, ent, bias, sink, 1024, 1024 - 127, 128, 512 ** -0.5)
    ref = prefill_attention_reference(q, win, ent, bias, sink, 1024, 1024 - 127, 128, 512 ** -0.5)
    assert torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=2e-2), (got.float() - ref.float()).abs().max()
