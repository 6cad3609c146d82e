"""The shipped embedded release (data/tiny-v4) as load_model reads it: a trained model, not noise."""
import json

import pytest

from dsv4lib.config import ModelConfig
from dsv4lib.paths import EMBEDDED_REF


def test_release_is_the_embedded_config_and_small():
    cfg = ModelConfig.from_hf_config(EMBEDDED_REF / "config.json")
    assert cfg == ModelConfig.embedded()
    size = sum(p.stat().st_size for p in EMBEDDED_REF.iterdir())
    assert size <= 25 * 2**20, size
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json", "training.json"):
        assert (EMBEDDED_REF / f).is_file(), f
    hist = json.loads((EMBEDDED_REF / "training.json").read_text())["history"]
    assert hist[-1]["valid_ppl"] < 100


@pytest.fixture(scope="module")
def report():
    from dsv4lib.eval.embedded_report import embedded_report
    return embedded_report(EMBEDDED_REF, n_windows=4)


@pytest.mark.slow
def test_heldout_perplexity_far_below_random_weights(report):
    assert report["ppl"] < 80, report["ppl"]
    assert report["ppl"] < 0.05 * report["ppl_random_weights"]


@pytest.mark.slow
def test_every_expert_used_and_routing_not_uniform(report):
    for r in report["routing"]:
        assert r.n_used == len(r.counts), f"layer {r.layer}: only {r.n_used} experts used"
    assert max(r.max_over_mean for r in report["routing"] if not r.hash_layer) > 1.2


@pytest.mark.slow
def test_greedy_continuations_are_english(report):
    for s in report["samples"]:
        assert s["english_fraction"] >= 0.8, s
    assert report["random_sample"]["english_fraction"] < min(s["english_fraction"] for s in report["samples"])
