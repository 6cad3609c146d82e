"""Static-shape decode path (dsv4lib.model.graphed / static_cache) against the eager Cache path, and the
synthetic full-format model builder (dsv4lib.fullscale), on CPU configs."""
import pytest
import torch

from dsv4lib.config import ModelConfig
from dsv4lib.model import DeepseekV4
from dsv4lib.model.graphed import static_decode_step
from dsv4lib.model.static_cache import fill_synthetic, new_static_cache, static_from_cache


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny ops: one intra-op thread avoids OpenMP spin contention on loaded CI machines (40x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return DeepseekV4(cfg).eval()


@pytest.mark.parametrize("preset", ["tiny", "embedded"])
@torch.no_grad()
def test_static_decode_matches_eager_cache(preset):
    cfg = getattr(ModelConfig, preset)()
    m = _model(cfg)
    B, N, P = 2, 44, 13
    ids = torch.randint(0, cfg.vocab_size, (B, N), generator=torch.Generator().manual_seed(1))
    c = m.new_cache(B, 64)
    ref = torch.stack([m(ids[:, i:i + 1], c)[:, 0] for i in range(N)], 1)          # [B, N, V]
    sc = new_static_cache(m, B, 64)
    got = torch.stack([static_decode_step(m, sc, ids[:, i:i + 1]) for i in range(N)], 1)
    assert sc.position() == N
    assert (ref - got).abs().max() <= 1e-4
    # eager prefill of P tokens, copied into a static cache, then static decode
    c = m.new_cache(B, 64)
    m(ids[:, :P], c)
    sc = static_from_cache(m, c, 64)
    got = torch.stack([static_decode_step(m, sc, ids[:, i:i + 1]) for i in range(P, N)], 1)
    assert (ref[:, P:] - got).abs().max() <= 1e-4


@pytest.mark.parametrize("fused", [False, True])
@torch.no_grad()
def test_warm_up_leaves_the_cache_as_the_real_step_finds_it(fused):
    """GraphedDecoder warms up with ``warm_up`` (one uncaptured step, state restored) before capturing:
    the next real step at the same position must give exactly the logits of a step on the untouched
    cache -- at a position past the window (ring full) that completes both compressors' windows
    (embedded: W = 32, ratios 4 and 16, position 47). Two warm-up steps would not (checked below: the
    test can see the difference)."""
    from dsv4lib.model.graphed import warm_up
    cfg = ModelConfig.embedded()
    dev = "cuda" if torch.cuda.is_available() else "cpu"   # (fused kernels on a GPU machine need CUDA tensors)
    m = _model(cfg).to(dev)
    B, P = 2, 47
    assert P >= cfg.sliding_window and P % 4 == 3 and P % 16 == 15
    ids = torch.randint(0, cfg.vocab_size, (B, P + 1), generator=torch.Generator().manual_seed(3)).to(dev)
    c = m.new_cache(B, 64)
    m(ids[:, :P], c)
    clean = static_from_cache(m, c, 64)
    ref = static_decode_step(m, clean, ids[:, P:], fused)
    warmed = static_from_cache(m, c, 64)
    warm_up(m, warmed, torch.zeros_like(ids[:, P:]), fused)
    assert warmed.position() == P
    assert torch.equal(static_decode_step(m, warmed, ids[:, P:], fused), ref)
    twice = static_from_cache(m, c, 64)
    warm_up(m, twice, torch.zeros_like(ids[:, P:]), fused)
    twice.pos.add_(1)                                   # a second warm-up step at P + 1 ...
    warm_up(m, twice, torch.zeros_like(ids[:, P:]), fused)
    twice.pos.sub_(1)                                   # ... and back to P
    assert not torch.equal(static_decode_step(m, twice, ids[:, P:], fused), ref)


@torch.no_grad()
def test_eager_csa_decode_from_position_zero_matches_forward():
    """Token-by-token eager decode == one full forward on a CSA model (the indexer's compressor must be
    fed before the first main entry exists)."""
    cfg = ModelConfig.tiny().with_(compress_ratios=(0, 4, 4, 0, 8, 0))
    m = _model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(2))
    full = m(ids)
    c = m.new_cache(2, 32)
    step = torch.cat([m(ids[:, i:i + 1], c) for i in range(14)], 1)
    assert (full - step).abs().max() <= 1e-4


def test_static_cache_guards():
    cfg = ModelConfig.tiny()
    m = _model(cfg)
    sc = new_static_cache(m, 1, 16)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        fill_synthetic(sc, 17)
    with pytest.raises(ValueError, match="cache made for batch 1"):
        static_decode_step(m, sc, torch.zeros(2, 1, dtype=torch.long))


@torch.no_grad()
def test_synthetic_model_loader_formats_and_decode():
    from dsv4lib.checkpoint.loader import model_memory_report
    from dsv4lib.fullscale import decode_bytes_per_token, synthetic_model, without_mtp
    from dsv4lib.model.quantized_experts import INT2Experts

    cfg = without_mtp(ModelConfig.tiny())
    m = synthetic_model(cfg, "cpu", torch.float32, seed=3)
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    a = m.layers[1].attn
    for lin in (a.wq_a, a.wq_b, a.wkv, a.wo_a, a.wo_b, a.indexer.wq_b, m.layers[0].ffn.shared_experts.w2):
        assert lin.weight.dtype == torch.float8_e4m3fn and lin.scale.dtype == torch.float32
        assert tuple(lin.scale.shape) == (-(-lin.out_features // 128), -(-lin.in_features // 128))
    assert a.compressor.wkv.weight.dtype == torch.float32 and m.head.weight.dtype == torch.float32
    ex = m.layers[2].ffn.experts
    assert isinstance(ex, INT2Experts) and ex.w1_packed.dtype == torch.uint32
    assert ex.w1_packed.shape == (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size // 16)
    z = ex.w2_zero_packed.to(torch.int32)
    assert set((z & 0xF).unique().tolist()) <= {1, 2} and set((z >> 4).unique().tolist()) <= {1, 2}
    rep = model_memory_report(m)
    assert rep["total"] == sum(v for k, v in rep.items() if k != "total") and rep["routed_experts"] > 0
    # routing spreads over experts
    x = torch.randn(64, cfg.hidden_size)
    idx = m.layers[4].ffn.gate(x, None)[1]
    assert idx.unique().numel() >= cfg.n_routed_experts // 2
    b1, b8 = decode_bytes_per_token(m, 1, 100), decode_bytes_per_token(m, 8, 100)
    assert b1["routed_experts"] < b8["routed_experts"] < 8 * b1["routed_experts"]
    assert b8["per_token"] < b1["per_token"]
    # the static path runs on the synthetic INT2/FP8 model and equals the eager one
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    c, sc = m.new_cache(1, 16), new_static_cache(m, 1, 16)
    for i in range(10):
        e, s = m(ids[:, i:i + 1], c)[:, 0], static_decode_step(m, sc, ids[:, i:i + 1])
        assert torch.isfinite(s).all() and (e - s).abs().max() <= 1e-4 * max(1.0, e.abs().max().item())


def test_hc_split_kernel_matches_torch_sinkhorn():
    from dsv4lib.kernels.mhc_sinkhorn import hc_split, hc_split_reference
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(3, 5, 24, generator=g) * 3                        # [B, S, (2+hc)*hc]
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
    if torch.cuda.is_available():
        mix, scale, base = mix.cuda(), scale.cuda(), base.cuda()
    for got, ref in zip(hc_split(mix, scale, base, 4, 20, 1e-6), hc_split_reference(mix, scale, base, 4, 20, 1e-6)):
        assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5
    pre, post, comb = hc_split(mix, scale, base, 4, 20, 1e-6, want_pre=False)   # the deferred decode launch
    _, rpost, rcomb = hc_split_reference(mix, scale, base, 4, 20, 1e-6)
    assert pre is None and (post - rpost).abs().max() <= 1e-5 and (comb - rcomb).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="power of two"):
        hc_split(mix[..., :15], scale, base[:15], 3, 20, 1e-6)


@pytest.mark.parametrize("ratio,hd", [(4, 64), (32, 32)])
@torch.no_grad()
def test_compressor_step_kernel_matches_torch(ratio, hd):
    """kernels/compressor_step.py (TRITON_INTERPRET on CPU) == the torch compressor step, state by state,
    over two and a half windows (CSA overlap and plain; ratio 32 exercises the chunked online softmax).
    Buffers and CSA prev are compared every step; entries only where visible (index < (pos+1)//r):
    the torch reference rewrites a partial entry every step, the kernel writes an entry only when its
    window completes, so the not-yet-visible rows of the kernel's state must still be untouched."""
    from dsv4lib.kernels.compressor_step import compressor_step_fused
    from dsv4lib.model.compressor import Compressor
    from dsv4lib.model.rope import cos_sin
    from dsv4lib.model.static_cache import _comp_state
    from compressor_check import step_and_compare

    cfg = ModelConfig.tiny().with_(qk_rope_head_dim=16)
    torch.manual_seed(6)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    comp = Compressor(cfg, ratio, hd).to(dev)
    for p in (comp.wkv.weight, comp.wgate.weight, comp.ape, comp.norm.weight):
        p.copy_(torch.randn(p.shape) * (0.3 if p is not comp.norm.weight else 1.0))
    B = 3
    ref, got = (_comp_state(B, ratio, hd, 3 * ratio, torch.float32, dev) for _ in range(2))
    vis = step_and_compare(comp, ref, got, range(5 * ratio // 2), B, torch.float32, dev, 1e-5)
    assert vis == 2 and got.entries[:, :vis].abs().amax(-1).min() > 0        # two complete windows checked
    kv, gate = comp.wkv(torch.randn(B, cfg.hidden_size, device=dev)), comp.wgate(torch.randn(B, cfg.hidden_size, device=dev))
    cos, sin = (t[0] for t in cos_sin(comp.freqs, torch.tensor([0], device=dev)))
    with pytest.raises(ValueError, match="compressor_step_fused"):
        compressor_step_fused(kv[:, :3], gate, torch.tensor(0, device=dev), got.buf_kv, got.buf_gate, got.prev_kv,
                              got.prev_gate, comp.ape, comp.norm.weight, cos, sin, got.entries, comp.norm.eps)


@torch.no_grad()
def test_static_decode_fused_compressor_matches_eager():
    """The static step with the fused compressor kernel (interpreted on CPU) == the eager Cache path."""
    cfg = ModelConfig.tiny()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = _model(cfg).to(dev)
    B, N = 2, 18
    ids = torch.randint(0, cfg.vocab_size, (B, N), generator=torch.Generator().manual_seed(7)).to(dev)
    c = m.new_cache(B, 32)
    ref = torch.stack([m(ids[:, i:i + 1], c)[:, 0] for i in range(N)], 1)          # [B, N, V]
    sc = new_static_cache(m, B, 32)
    got = torch.stack([static_decode_step(m, sc, ids[:, i:i + 1], fused=True) for i in range(N)], 1)
    assert (ref - got).abs().max() <= 1e-4
    from dsv4lib.model.graphed import FUSED_FAILURES
    assert not FUSED_FAILURES                                           # the kernels ran, no torch fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_rope_kernel_matches_torch(dtype):
    """kernels/rmsnorm_rope.py (interpreted on CPU) == RMSNorm / q-norm / identity followed by apply_rope."""
    from dsv4lib.kernels.rmsnorm_rope import rmsnorm_rope, rmsnorm_rope_reference
    from dsv4lib.model.rope import cos_sin
    g = torch.Generator().manual_seed(8)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(2, 1, 3, 96, generator=g) * 3).to(dev, dtype)     # [B, 1, H, D], D not a power of two
    w = (torch.rand(96, generator=g) + 0.5).to(dev)
    cos, sin = (t[0] for t in cos_sin(torch.rand(16, generator=g).to(dev), torch.tensor([1234], device=dev)))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for mode, cs in ((0, None), (0, (cos, sin)), (1, (cos, sin)), (2, (cos, -sin))):
        a = rmsnorm_rope(x, w if mode == 0 else None, 1e-6, *(cs or (None, None)), mode=mode)
        b = rmsnorm_rope_reference(x, w, 1e-6, *(cs or (None, None)), mode=mode)
        assert a.dtype == dtype and a.shape == x.shape
        assert (a.float() - b.float()).abs().max() <= tol * max(1.0, b.float().abs().max().item()), mode
    with pytest.raises(ValueError, match="rmsnorm_rope"):
        rmsnorm_rope(x[..., :95], None, 1e-6, mode=1)
    # scatter: each row of a strided [B, 1, D] slice straight into buf[b, slot] (the decode key -> window)
    xs = x[:, :, 1, :]                                                  # [2, 1, 96], row stride 3*96
    buf = torch.randn(2, 5, 96, generator=g).to(dev, dtype)
    before = buf.clone()
    slot = torch.tensor([3], device=dev)
    assert rmsnorm_rope(xs, w, 1e-6, cos, sin, scatter_to=(buf, slot)) is None
    ref = rmsnorm_rope_reference(xs, w, 1e-6, cos, sin)[:, 0]
    assert (buf[:, 3].float() - ref.float()).abs().max() <= tol * max(1.0, ref.float().abs().max().item())
    assert torch.equal(buf[:, [0, 1, 2, 4]], before[:, [0, 1, 2, 4]])     # other slots untouched
    with pytest.raises(ValueError, match="scatter_to"):
        rmsnorm_rope(xs, w, 1e-6, cos, sin, scatter_to=(buf[:1], slot))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_rope_kernel_per_position_in_place(dtype):
    """Prefill use: cos/sin per position [S, R/2] for x [B, S, H, D] (heads share a position) and [B, S, D],
    written in place (out=x) -- the eager model's torch math with the same roundings; bf16 within one ulp at
    the tensor's scale (tl.rsqrt is approximate on the GPU; the CPU interpreter rounds fp32 -> bf16 toward zero)."""
    from dsv4lib.kernels.rmsnorm_rope import rmsnorm_rope, rmsnorm_rope_reference
    from dsv4lib.model.rope import cos_sin
    g = torch.Generator().manual_seed(9)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cos, sin = cos_sin(torch.rand(16, generator=g).to(dev), torch.arange(100, 105, device=dev))   # [5, 16]
    w = (torch.rand(64, generator=g) + 0.5).to(dev)
    for shape, mode in (((2, 5, 3, 64), 1), ((2, 5, 64), 0), ((2, 5, 3, 64), 2)):
        x = (torch.randn(*shape, generator=g) * 3).to(dev, dtype)
        ref = rmsnorm_rope_reference(x, w, 1e-6, cos, sin, mode=mode)
        y = x.clone()
        assert rmsnorm_rope(y, w if mode == 0 else None, 1e-6, cos, sin, mode=mode, out=y) is not None
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7 if dev == "cuda" else 2.0 ** -5   # (two truncations)
        assert (y.float() - ref.float()).abs().max() <= tol * max(1.0, ref.float().abs().max().item()), (shape, mode)
        # a wrong position row (one shared angle set) would differ
        assert not torch.allclose(rmsnorm_rope(x, None, 1e-6, cos[0], sin[0], mode=2).float(), ref.float()) or mode != 2
    with pytest.raises(ValueError, match="per-position"):
        rmsnorm_rope(torch.zeros(2, 4, 64, device=dev), None, 1e-6, cos, sin, mode=1)

@torch.no_grad()
def test_stacked_projections_fused_static_decode_matches_eager():
    """stack_projections (FP8 wq_a||wkv, float compressor/indexer projections as row views of one weight)
    keeps the eager model's values, and the fused static step over the stacked GEMVs equals it."""
    from dsv4lib.fullscale import synthetic_model, without_mtp
    from dsv4lib.model.graphed import _stacked_base, stack_projections

    cfg = without_mtp(ModelConfig.tiny())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = synthetic_model(cfg, dev, torch.float32, seed=9)
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(10)).to(dev)
    c = m.new_cache(1, 16)
    ref = torch.stack([m(ids[:, i:i + 1], c)[:, 0] for i in range(10)], 1)
    a = m.layers[1].attn
    before = a.wkv.dequantized_weight().clone(), a.indexer.weights_proj.weight.clone()
    n_params = sum(p.numel() for p in m.parameters())
    stack_projections(m)
    stack_projections(m)                                                # idempotent
    assert _stacked_base([a.wq_a, a.wkv]) is not None
    grp = [a.compressor.wkv, a.compressor.wgate, a.indexer.compressor.wkv, a.indexer.compressor.wgate,
           a.indexer.weights_proj]
    assert _stacked_base(grp) is not None and _stacked_base(grp[:2]) is None
    assert torch.equal(a.wkv.dequantized_weight(), before[0]) and torch.equal(a.indexer.weights_proj.weight, before[1])
    assert sum(p.numel() for p in m.parameters()) == n_params
    c = m.new_cache(1, 16)
    eager = torch.stack([m(ids[:, i:i + 1], c)[:, 0] for i in range(10)], 1)
    assert torch.equal(eager, ref)
    sc = new_static_cache(m, 1, 16)
    got = torch.stack([static_decode_step(m, sc, ids[:, i:i + 1], fused=True) for i in range(10)], 1)
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    from dsv4lib.model.graphed import FUSED_FAILURES
    assert not FUSED_FAILURES
    a.wkv.set_fp8(torch.zeros(a.wkv.out_features, a.wkv.in_features, device=dev), a.wkv.scale.clone())   # breaks the stack
    assert _stacked_base([a.wq_a, a.wkv]) is None


@torch.no_grad()
def test_q_norm_prologue_in_the_fused_step(monkeypatch):
    """graphed.Q_NORM_PROLOGUE (q_norm applied by the wq_b FP8 GEMVs on load, the indexer's too): the fused
    static step of a bf16 synthetic model (FP8 attention weights, CSA/HCA layers, the indexer selecting) gives
    the logits of the default step up to the norm's fp32 summation order (on the CPU also the fp16 operand
    rounding of the kernel, which the default CPU path does not have), and the prologue really ran."""
    import dsv4lib.kernels.dispatch as dispatch
    from dsv4lib.fullscale import synthetic_model, without_mtp
    from dsv4lib.model import graphed
    cfg = without_mtp(ModelConfig.tiny())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = synthetic_model(cfg, dev, torch.bfloat16, seed=11)
    gw = torch.Generator().manual_seed(13)
    for layer in m.layers:                                              # (synthetic q_norm weights are all ones)
        layer.attn.q_norm.weight.data.copy_(torch.rand(layer.attn.q_norm.weight.shape, generator=gw) + 0.5)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(12)).to(dev)

    def run():
        sc = new_static_cache(m, 2, 16)
        return torch.stack([static_decode_step(m, sc, ids[:, i:i + 1], fused=True) for i in range(12)], 1).float()
    ref = run()
    seen = []
    real = dispatch.fp8_linear
    monkeypatch.setattr(dispatch, "fp8_linear", lambda *a, **k: (seen.append(k.get("norm") is not None), real(*a, **k))[1])
    monkeypatch.setattr(graphed, "Q_NORM_PROLOGUE", True)
    got = run()
    n_idx = sum(1 for layer in m.layers if layer.attn.indexer is not None)
    assert sum(seen) >= 12 * len(m.layers) and n_idx > 0             # every layer's wq_b (+ indexers once selecting)
    assert not graphed.FUSED_FAILURES.get("fp8_linear")
    scale = ref.abs().max().item()
    per_pos = (got - ref).abs().amax(-1).flatten()
    assert per_pos.median().item() <= 0.02 * scale, (per_pos.tolist(), scale)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_attention_kernel_matches_torch(dtype):
    """kernels/decode_attention.py (interpreted on CPU) == the torch window+entries+sink attention:
    window only, HCA (all entries, future masked) and CSA (gathered top-k, strided sel), early positions;
    one key block per program and (bn=16, one split) several blocks per program through the score
    scratch; the heads in groups of 16-32 per program (``groups``; H = 64 defaults to 4 groups). fp16 runs the tensor-core path (p @ v as hi + lo halves); bf16 on the CPU interpreter
    runs upcast (its bf16 tl.dot is wrong), on a GPU the tensor-core path."""
    from dsv4lib.kernels.decode_attention import decode_attention, decode_attention_reference
    from dsv4lib.kernels.rmsnorm_rope import rmsnorm_rope_reference
    from dsv4lib.model.rope import cos_sin
    g = torch.Generator().manual_seed(11)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(2, 4, 128, 8, 9, None, 5), (2, 4, 128, 8, 9, None, 30), (1, 20, 64, 8, 16, 12, 40),
             (2, 16, 64, 128, 40, None, 200), (2, 4, 128, 8, 16, 8, 3), (1, 4, 64, 8, 0, None, 2),
             (1, 64, 32, 8, 16, 12, 40)]
    for B, H, C, W, T, K, pos in cases:
        q = (torch.randn(B, H, C, generator=g) * 0.2).to(dev, dtype)
        win = torch.randn(B, W, C, generator=g).to(dev, dtype)
        ent = torch.randn(B, T, C, generator=g).to(dev, dtype) if T else None
        sink = torch.randn(H, generator=g).to(dev)
        p, thr = torch.tensor(pos, device=dev), torch.tensor((pos + 1) // 4, device=dev)
        sel = None
        if K:
            sel = torch.stack([torch.randperm(T, generator=g) for _ in range(B)]).to(dev)[:, :K]   # strided rows
        r = decode_attention_reference(q, win, ent, sel, p, thr, sink, C ** -0.5)
        tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}[dtype]
        HP = max(16, 1 << (H - 1).bit_length())
        kws = [{}, {"bn": 16, "max_programs": B}] + [{"groups": g} for g in (2, 4) if HP // g >= 16]   # head groups
        kws += [{"bn": 16, "max_programs": B, "groups": HP // 16}] if HP > 16 else []                 # + scratch
        for kw in kws:
            a = decode_attention(q, win, ent, sel, p, thr if T else None, sink, C ** -0.5, **kw)
            assert a.dtype == dtype
            assert (a.float() - r.float()).abs().max() <= tol * max(1.0, r.float().abs().max().item()), (B, H, T, kw)
        # the inverse RoPE of the output fused into the combine == rmsnorm_rope mode 2 on the output
        # (a rotated channel mixes two channels' rounding: twice the tolerance)
        cos, sin = (t[0] for t in cos_sin(torch.rand(C // 8, generator=g).to(dev), torch.tensor([pos], device=dev)))
        a = decode_attention(q, win, ent, sel, p, thr if T else None, sink, C ** -0.5, rope=(cos, -sin))
        rr = rmsnorm_rope_reference(r, None, 0.0, cos, -sin, mode=2)
        assert (a.float() - rr.float()).abs().max() <= 2 * tol * max(1.0, rr.float().abs().max().item()), (B, H, T, "rope")
        assert (rr.float() - r.float()).abs().max() > 10 * tol * max(1.0, r.float().abs().max().item())   # it rotated
    with pytest.raises(ValueError, match="decode_attention"):
        decode_attention(q, win.float() if dtype != torch.float32 else win.half(), None, None, p, None, sink, 1.0)


@torch.no_grad()
def test_deferred_mhc_comb_in_the_fused_step(monkeypatch):
    """graphed.DEFER_COMB (post and comb of every mHC post+pre launch computed by a second launch, on the side
    stream on a GPU, in place on the CPU): the fused static step gives the logits of the undeferred step and
    the deferred launch really ran for every site but the first."""
    import dsv4lib.kernels.mhc_step as mhc
    from dsv4lib.fullscale import synthetic_model, without_mtp
    from dsv4lib.model import graphed
    cfg = without_mtp(ModelConfig.tiny())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = synthetic_model(cfg, dev, torch.bfloat16, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(6)).to(dev)

    def run():
        sc = new_static_cache(m, 2, 8)
        return torch.stack([static_decode_step(m, sc, ids[:, i:i + 1], fused=True) for i in range(6)], 1).float()
    monkeypatch.setattr(graphed, "DEFER_COMB", False)
    ref = run()
    calls = []
    real = mhc.hc_comb
    monkeypatch.setattr(mhc, "hc_comb", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    monkeypatch.setattr(graphed, "DEFER_COMB", True)
    got = run()
    assert len(calls) == 6 * (2 * len(m.layers) - 1)
    assert not graphed.FUSED_FAILURES.get("hc_post_pre")
    if dev == "cpu":
        assert torch.equal(got, ref)
    else:   # (the Sinkhorn's 4-element sums may be ordered differently by the two launches)
        assert (got - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()


def test_branch_and_join_wait_only_for_open_forks(monkeypatch):
    """The fused step's fork / join bookkeeping (model/graphed.py ``_branch`` / ``_join``), with stand-in streams: a
    join waits for each side stream that work was forked to since the last join, once; ``second`` forks go to the
    third stream when there is one and to the side stream otherwise."""
    import contextlib
    from types import SimpleNamespace

    from dsv4lib.model import graphed

    class Stream:
        def __init__(self, name):
            self.name, self.device, self.waited = name, "dev", []

        def wait_stream(self, other):
            self.waited.append(other.name)

    main, side, side2 = Stream("main"), Stream("side"), Stream("side2")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    ctx = SimpleNamespace(side=side, side2=side2, side_open=False, side2_open=False)
    graphed._join(ctx)
    assert main.waited == []                                            # nothing forked yet
    with graphed._branch(ctx):
        pass
    with graphed._branch(ctx, second=True):
        pass
    assert side.waited == ["main"] and side2.waited == ["main"]         # each fork follows the main stream
    graphed._join(ctx)
    graphed._join(ctx)
    assert main.waited == ["side", "side2"]                             # each once
    ctx = SimpleNamespace(side=side, side2=None, side_open=False, side2_open=False)
    with graphed._branch(ctx, second=True):                            # no third stream: the side stream
        pass
    graphed._join(ctx)
    assert main.waited[-1] == "side" and len(main.waited) == 3


def test_on_side_forks_and_join_side_joins(monkeypatch):
    """The fork / join pair the prefill's side-stream branches (model/attention.py compressors, model/moe.py shared
    expert) and the decode step's ``_branch`` share: ``on_side(s)`` makes ``s`` wait for the current stream and runs the
    block with ``s`` current; ``join_side(s)`` makes the current stream wait for ``s``; ``None`` runs in place."""
    import contextlib

    from dsv4lib.model.attention import join_side, on_side

    class Stream:
        def __init__(self, name):
            self.name, self.device, self.waited = name, "dev", []

        def wait_stream(self, other):
            self.waited.append(other.name)

    main, side = Stream("main"), Stream("side")
    current = [main]

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    with on_side(side):
        assert current[-1] is side
    assert side.waited == ["main"] and current == [main]
    join_side(side)
    assert main.waited == ["side"]
    with on_side(None):
        assert current == [main]
    join_side(None)
    assert main.waited == ["side"] and side.waited == ["main"]
