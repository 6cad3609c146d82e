"""CUDA-graph decode (dsv4lib.model.graphed.GraphedDecoder) gives the eager model's greedy tokens on the
embedded model with RTN INT2 experts (GPU only)."""
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REF = Path(__file__).resolve().parents[1] / "data" / "tiny-v4"


@torch.no_grad()
def test_graphed_greedy_equals_eager(tmp_path):
    from dsv4lib.checkpoint import load_model
    from dsv4lib.model.graphed import GraphedDecoder
    from dsv4lib.model.static_cache import static_from_cache
    from dsv4lib.quant.pipeline import quantize_rtn

    int2 = quantize_rtn(REF, tmp_path / "int2")
    model = load_model(REF, int2, device="cuda", dtype=torch.float32)
    B, P, N = 2, 21, 40
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
    dec = GraphedDecoder(model, static_from_cache(model, cache, P + N + 4))
    graphed, diffs = [], []
    for i in range(N):
        tok = logits.argmax(-1, keepdim=True)
        graphed.append(tok)
        logits = dec.step(tok).clone()
        diffs.append((logits - eager_logits[i]).abs().max().item())
    assert torch.equal(torch.cat(eager, 1), torch.cat(graphed, 1))
    assert max(diffs) <= 1e-2 * max(1.0, eager_logits[0].abs().max().item())
