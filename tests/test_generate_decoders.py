"""generate(decoder=...): the static-cache step (uncaptured on CPU; the same step is what the CUDA graph
replays) continues an eager prefill exactly like the eager decode loop -- same greedy tokens, batched
and single -- and "auto" picks the eager loop when the step cannot be captured (CPU)."""
from pathlib import Path

import pytest
import torch

from dsv4lib import generate as G
from dsv4lib.checkpoint import load_model
from dsv4lib.model.graphed import graph_capturable
from dsv4lib.paths import EMBEDDED_REF
from dsv4lib.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_tok():
    torch.set_num_threads(1)
    return load_model(EMBEDDED_REF, device="cpu").eval(), load_tokenizer(Path(EMBEDDED_REF))


def test_static_decoder_matches_eager_greedy(model_tok):
    model, tok = model_tok
    prompts = ["The old city gate", "Once upon a time, in a small village by the sea,"]
    kw = dict(max_new_tokens=20, stop_ids=(), loop_repeats=None)
    eager = G.generate_batch(model, tok, prompts, decoder="eager", **kw)
    static = G.generate_batch(model, tok, prompts, decoder="static", **kw)
    assert [r.ids for r in static] == [r.ids for r in eager]
    assert all(r.n_new == 20 for r in static)
    assert not graph_capturable(model, "cpu")
    auto = G.generate(model, tok, prompts[0], decoder="auto", **kw)
    assert auto.ids == eager[0].ids


def test_decoder_argument_checked(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="decoder must be one of"):
        G.generate(model, tok, "hi", max_new_tokens=2, decoder="fast")
    with pytest.raises(ValueError, match="decoder='graph' needs"):
        G.generate(model, tok, "hi", max_new_tokens=2, decoder="graph")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_decoder_matches_eager_greedy_gpu(tmp_path, model_tok):
    """On the GPU with RTN INT2 experts (capturable): CUDA-graph decode == eager decode, greedy tokens."""
    from dsv4lib.quant.pipeline import quantize_rtn
    _, tok = model_tok
    quantize_rtn(EMBEDDED_REF, tmp_path / "rtn")
    model = load_model(EMBEDDED_REF, tmp_path / "rtn", device="cuda").eval()
    assert graph_capturable(model, "cuda")
    prompts = ["The old city gate", "Once upon a time, in a small village by the sea,"]
    kw = dict(max_new_tokens=24, stop_ids=(), loop_repeats=None)
    eager = G.generate_batch(model, tok, prompts, decoder="eager", **kw)
    graph = G.generate_batch(model, tok, prompts, decoder="auto", **kw)
    assert [r.ids for r in graph] == [r.ids for r in eager]


def test_auto_falls_back_to_eager_when_capture_fails(model_tok, monkeypatch):
    import dsv4lib.model.graphed as graphed
    model, tok = model_tok
    kw = dict(max_new_tokens=8, stop_ids=(), loop_repeats=None)
    eager = G.generate(model, tok, "The old city gate", decoder="eager", **kw)

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("capture failed")
    monkeypatch.setattr(graphed, "graph_capturable", lambda m, d: True)
    monkeypatch.setattr(graphed, "StaticDecoder", Broken)
    with pytest.warns(UserWarning, match="CUDA-graph decode unavailable"):
        auto = G.generate(model, tok, "The old city gate", decoder="auto", **kw)
    assert auto.ids == eager.ids
    with pytest.raises(RuntimeError, match="capture failed"):
        G.generate(model, tok, "The old city gate", decoder="graph", **kw)
