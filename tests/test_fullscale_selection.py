"""Static decode: when the cache's entry slots fit the indexer's top-k (T <= topk) the step skips the
indexer's scoring and sort (every visible entry is selected); both regimes must equal the eager path."""
import pytest
import torch

from dsv4lib.config import ModelConfig
from dsv4lib.model import DeepseekV4
from dsv4lib.model.graphed import selects_all, static_decode_step
from dsv4lib.model.static_cache import new_static_cache


@pytest.mark.parametrize("max_len, N, expect_all", [(16, 15, True), (40, 34, False)])
@torch.no_grad()
def test_select_all_and_sorted_topk_match_eager(max_len, N, expect_all):
    torch.set_num_threads(1)
    cfg = ModelConfig.tiny()                                            # index_topk 4, CSA layers ratio 4
    torch.manual_seed(3)
    m = DeepseekV4(cfg).eval()
    B = 2
    ids = torch.randint(0, cfg.vocab_size, (B, N), generator=torch.Generator().manual_seed(4))
    c = m.new_cache(B, max_len)
    ref = torch.stack([m(ids[:, i:i + 1], c)[:, 0] for i in range(N)], 1)          # [B, N, V]
    sc = new_static_cache(m, B, max_len)
    csa = [i for i, layer in enumerate(m.layers) if layer.attn.indexer is not None]
    assert csa and all(selects_all(m.layers[i].attn, sc.layers[i]) == expect_all for i in csa)
    got = torch.stack([static_decode_step(m, sc, ids[:, i:i + 1]) for i in range(N)], 1)
    # select-all: up to 3 visible entries of 4 slots; sorted: up to 8 visible entries, top-4 really drops some
    assert (ref - got).abs().max() <= 1e-4
