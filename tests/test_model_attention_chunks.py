"""Prefill attention in query chunks (model.attention.QUERY_CHUNK): each chunk only scores the window keys
inside its span and the entries complete by its last query. Must equal one chunk over all keys (the
dense formulation) -- full forward, and a chunked prefill into a cache followed by decode steps."""
import pytest
import torch

import dsv4lib.model.attention as attention
from dsv4lib.config import ModelConfig
from dsv4lib.model import DeepseekV4


@pytest.mark.parametrize("chunk", [1, 7, 16])
@torch.no_grad()
def test_query_chunks_equal_dense(monkeypatch, chunk):
    torch.set_num_threads(1)
    cfg = ModelConfig.tiny()                                            # window 8; CSA, HCA and sliding layers
    torch.manual_seed(0)
    m = DeepseekV4(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))
    dense = m(ids)                                                      # QUERY_CHUNK 512 > 70: one chunk
    c = m.new_cache(2, 80)
    dense_pre = m(ids[:, :45], c)
    dense_dec = torch.cat([m(ids[:, i:i + 1], c) for i in range(45, 70)], 1)
    monkeypatch.setattr(attention, "QUERY_CHUNK", chunk)
    got = m(ids)
    assert (got - dense).abs().max() <= 1e-5 * dense.abs().max()
    c = m.new_cache(2, 80)
    got_pre = torch.cat([m(ids[:, :20], c), m(ids[:, 20:45], c)], 1)     # chunked prefill across windows/entries
    got_dec = torch.cat([m(ids[:, i:i + 1], c) for i in range(45, 70)], 1)
    assert (got_pre - dense_pre).abs().max() <= 1e-4 * dense_pre.abs().max()
    assert (got_dec - dense_dec).abs().max() <= 1e-4 * dense_dec.abs().max()


def test_apply_rope_inplace_equals_copy():
    """``apply_rope(..., inplace=True)`` (the eager attention's q and output) writes exactly the values of
    the copying version into its argument, for fp32 (views of x feed the rotation) and bf16; with autograd
    recording x it falls back to the copy."""
    import torch
    from dsv4lib.model.rope import apply_rope, cos_sin, rope_freqs
    cos, sin = cos_sin(rope_freqs(16, 10000.0, None), torch.arange(5))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 3, 24).to(dtype)
        ref = apply_rope(x, cos, sin, inverse=True)
        y = x.clone()
        out = apply_rope(y, cos, sin, inverse=True, inplace=True)
        assert out.data_ptr() == y.data_ptr() and torch.equal(out, ref)
    x = torch.randn(2, 5, 3, 24, requires_grad=True)
    out = apply_rope(x, cos, sin, inplace=True)
    out.sum().backward()
    assert out.data_ptr() != x.data_ptr() and x.grad is not None


@torch.no_grad()
def test_prefill_side_stream_branch_is_bit_identical(monkeypatch):
    """attention.PREFILL_SIDE_STREAM (on by default): the compressor steps and the indexer's x-only parts run before the
    query path (on CUDA on a second stream) and are joined before use -- the same operations on the same inputs,
    so a full forward, a chunked prefill into a cache (windows / entries / indexer states crossing chunk ends) and
    the decode steps after it give the same bits as the default order; on CUDA the stream is really used."""
    torch.set_num_threads(1)
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = DeepseekV4(cfg).eval().to(dev)
    ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(3)).to(dev)

    def run():
        full = m(ids)
        c = m.new_cache(2, 80)
        pre = torch.cat([m(ids[:, :23], c), m(ids[:, 23:50], c)], 1)
        dec = torch.cat([m(ids[:, i:i + 1], c) for i in range(50, 70)], 1)
        return full, pre, dec
    monkeypatch.setattr(attention, "PREFILL_SIDE_STREAM", False)
    ref = run()
    monkeypatch.setattr(attention, "PREFILL_SIDE_STREAM", True)
    got = run()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert (dev == "cuda") == bool(attention._SIDE)
