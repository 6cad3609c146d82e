"""Prefill + token-by-token decode == one full forward (spec §2.4 decode state, §2.10).

Sim off runs in fp32. Sim on runs in float64: the FP8/FP4 rounding of the simulation turns the
1-ulp fp32 differences between prefill and decode GEMM shapes into occasional rounding flips
(measured ~2e-1 max relative logit error in fp32 after ~80 steps), so the cache logic is checked
where those flips cannot happen; the same code path serves both dtypes.
"""
import pytest
import torch

from dsv4lib import DeepseekV4, ModelConfig


def _model(cfg, dtype, sim, seed=0):
    torch.manual_seed(seed)
    m = DeepseekV4(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norms, biases, sinks, ape, hc base/scale
        for n, p in m.named_parameters():
            if p.dim() < 2 or n.endswith("ape"):
                p.add_(0.3 * torch.randn_like(p))
    m.set_lowp_sim(sim)
    return m


@pytest.mark.parametrize("dtype, sim", [(torch.float32, False), (torch.float64, True)])
def test_prefill_then_decode_matches_full_forward(dtype, sim):
    cfg = ModelConfig.tiny()
    m = _model(cfg, dtype, sim)
    ids = torch.randint(0, cfg.vocab_size, (2, 98), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 128)
        parts = [m(ids[:, :13], cache), m(ids[:, 13:18], cache)]          # two prefill chunks
        parts += [m(ids[:, t:t + 1], cache) for t in range(18, 98)]       # 80 decoded tokens
    got = torch.cat(parts, 1)
    assert cache.pos == 98
    rel = ((got - full).abs().max() / full.abs().max()).item()
    assert rel <= 1e-4, rel


def test_lowp_sim_changes_logits_but_not_much():
    cfg = ModelConfig.tiny()
    m = _model(cfg, torch.float32, False)
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = m(ids)
        m.set_lowp_sim(True)
        b = m(ids)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert 1e-4 < rel < 0.5, rel


def test_mtp_logits_and_cache():
    cfg = ModelConfig.tiny()
    m = _model(cfg, torch.float32, False)
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        X = m.forward_hidden(ids[:, :-1])
        full = m.mtp_logits(X, ids[:, 1:])
        cache = m.new_cache(2, 64)
        Xc = m.forward_hidden(ids[:, :-1], cache)
        a = m.mtp_logits(Xc[:, :20], ids[:, 1:21], 0, cache)
        b = m.mtp_logits(Xc[:, 20:], ids[:, 21:], 20, cache)
    assert full.shape == (2, 29, cfg.vocab_size)
    assert torch.allclose(torch.cat([a, b], 1), full, rtol=0, atol=1e-4 * full.abs().max().item())
    # MTP really depends on the next-token embedding
    with torch.no_grad():
        other = m.mtp_logits(X, (ids[:, 1:] + 1) % cfg.vocab_size)
    assert not torch.allclose(other, full)


@pytest.mark.parametrize("prefill", [5, 16, 20, 30, 31, 40])
def test_decode_after_prefill_shorter_than_the_window(prefill):
    """Regression: a prefill shorter than sliding_window−1 once kept only its *last* few window
    entries (negative slice start), so the next decode step lost keys (embedded config, window 32)."""
    cfg = ModelConfig.embedded()
    m = _model(cfg, torch.float32, False)
    ids = torch.randint(0, cfg.vocab_size, (1, prefill + 3), generator=torch.Generator().manual_seed(prefill))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(1, prefill + 3)
        parts = [m(ids[:, :prefill], cache)] + [m(ids[:, t:t + 1], cache) for t in range(prefill, prefill + 3)]
    got = torch.cat(parts, 1)
    rel = ((got - full).abs().max() / full.abs().max()).item()
    assert rel <= 1e-4, rel
