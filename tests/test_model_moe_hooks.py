"""MoE routing, expert backends and hooks (spec §2.7, CONTRACTS "Experts"/"Hooks")."""
import torch
import torch.nn.functional as F

from dsv4lib import DeepseekV4, ModelConfig
from dsv4lib.model.experts import DenseExperts, ExpertBackend, swiglu


def _naive(w1, w3, w2, x, idx, weight, limit):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = swiglu(x[t] @ w1[e].T, x[t] @ w3[e].T, limit) * weight[t, j]
            out[t] += h @ w2[e].T
    return out


def test_dense_experts_match_naive_loop():
    g = torch.Generator().manual_seed(0)
    be = DenseExperts(8, 32, 16)
    with torch.no_grad():
        for p in be.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(23, 32, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(23)])
    w = torch.rand(23, 3, generator=g)
    got = be(x, idx, w, 2.0)
    assert got.dtype == torch.float32
    assert torch.allclose(got, _naive(be.w1, be.w3, be.w2, x, idx, w, 2.0), atol=1e-4)
    assert be.resident_bytes() == 3 * 8 * 32 * 16 * 4


class _CountingBackend(ExpertBackend):
    """A 'quantized' backend that only implements dequantize_expert: the helper must use it."""

    def __init__(self, dense):
        super().__init__(dense.num_experts, dense.hidden, dense.inter)
        self.dense, self.calls = dense, []

    def dequantize_expert(self, e):
        self.calls.append(e)
        return self.dense.dequantize_expert(e)

    def resident_bytes(self):
        return 0


def test_hooks_routing_and_backend_swap():
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    m = DeepseekV4(cfg)
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            if not cfg.is_hash_layer(i):
                m.layers[i].ffn.gate.bias.normal_(0, 1.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    events = {}
    h = m.add_moe_hook(lambda i, ev: events.__setitem__(i, ev))
    with torch.no_grad():
        ref = m(ids)
    h.remove()
    assert sorted(events) == list(range(cfg.num_hidden_layers))
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    for i, ev in events.items():
        assert ev.x.shape == (24, cfg.hidden_size) and ev.scores.shape == (24, E) and ev.idx.shape == (24, k)
        gate = m.layers[i].ffn.gate
        s = F.softplus(ev.x @ gate.weight.T).sqrt()
        assert torch.allclose(ev.scores, s, atol=1e-6)
        if cfg.is_hash_layer(i):
            assert torch.equal(ev.idx, gate.tid2eid[ids.reshape(-1)])
            assert torch.equal(ev.input_ids, ids.reshape(-1))
        else:   # bias selects, unbiased scores weigh
            assert torch.equal(ev.idx.sort(-1).values, (s + gate.bias).topk(k).indices.sort(-1).values)
            assert not torch.equal(ev.idx.sort(-1).values, s.topk(k).indices.sort(-1).values)
        sel = ev.scores.gather(1, ev.idx)
        assert torch.allclose(ev.weight, sel / sel.sum(-1, keepdim=True) * cfg.routed_scaling_factor, atol=1e-6)
    # removed hook is silent; swapped backend gives the same logits and only visits routed experts
    events.clear()
    be = _CountingBackend(m.layers[2].ffn.experts)
    m.set_expert_backend(2, be)
    with torch.no_grad():
        out = m(ids)
    assert not events
    assert torch.allclose(out, ref, atol=1e-5)
    assert len(be.calls) == len(set(be.calls)) and 0 < len(be.calls) <= E


def test_mtp_layer_hook_index():
    cfg = ModelConfig.tiny()
    m = DeepseekV4(cfg)
    seen = []
    m.add_moe_hook(lambda i, ev: seen.append(i))
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        m.mtp_logits(m.forward_hidden(ids[:, :-1]), ids[:, 1:])
    assert seen == list(range(cfg.num_hidden_layers)) + [cfg.num_hidden_layers]


@torch.no_grad()
def test_prefill_shared_expert_branch_is_bit_identical(monkeypatch):
    """moe.PREFILL_SHARED_SIDE (on by default): for more than one token the shared expert is issued before the
    router (on CUDA on the side stream, concurrent with the routed experts) and joined before the sum -- the same
    operations on the same inputs, so a full forward, a chunked prefill into a cache and the decode steps after it
    give the same bits as the sequential order, and the hooks see the same routing; on CUDA the stream is used."""
    from dsv4lib.model import attention, moe
    torch.set_num_threads(1)
    cfg = ModelConfig.tiny()
    assert cfg.n_shared_experts > 0
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = DeepseekV4(cfg).eval().to(dev)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5)).to(dev)
    monkeypatch.setattr(attention, "PREFILL_SIDE_STREAM", False)     # only this branch may create the stream
    monkeypatch.setattr(attention, "_SIDE", {})

    def run():
        seen = []
        h = m.add_moe_hook(lambda layer, ev: seen.append((layer, ev.idx.clone(), ev.weight.clone())))
        full = m(ids)
        c = m.new_cache(2, 48)
        pre = torch.cat([m(ids[:, :17], c), m(ids[:, 17:30], c)], 1)
        dec = torch.cat([m(ids[:, i:i + 1], c) for i in range(30, 40)], 1)
        h.remove()
        return (full, pre, dec), seen
    monkeypatch.setattr(moe, "PREFILL_SHARED_SIDE", False)
    ref, ref_seen = run()
    assert not attention._SIDE
    monkeypatch.setattr(moe, "PREFILL_SHARED_SIDE", True)
    got, got_seen = run()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert len(got_seen) == len(ref_seen) > 0
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(got_seen, ref_seen))
    assert (dev == "cuda") == bool(attention._SIDE)
