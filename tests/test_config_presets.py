"""ModelConfig: presets, HF config.json round trip, validation, parameter counts (spec §1)."""
import json

import pytest
import torch

from dsv4lib.config import ModelConfig


def test_v4_flash_param_counts_match_spec():
    c = ModelConfig.v4_flash()
    assert c.num_parameters() == 284_332_240_471                       # spec §1.4 main total
    assert c.num_active_parameters() == 13_270_105_687
    assert c.num_parameters(include_mtp=True) - c.num_parameters() == 6_610_048_891
    pc = c.param_counts()
    assert pc["routed_experts"] == 277_025_390_592 and pc["mhc"] == 33_884_439


@pytest.mark.parametrize("name", ["v4_flash", "tiny", "embedded"])
def test_param_count_equals_model_parameters(name):
    c = getattr(ModelConfig, name)()
    m = __import__("dsv4lib").DeepseekV4(c, device="meta")
    main = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("mtp."))
    assert main == c.num_parameters()
    assert sum(p.numel() for p in m.parameters()) == c.num_parameters(include_mtp=True)


def test_v4_flash_schedule():
    c = ModelConfig.v4_flash()
    assert len(c.compress_ratios) == 44 and c.compress_ratios[:4] == (0, 0, 4, 128)
    assert c.compress_ratios[-2:] == (4, 0)
    assert sum(r == 4 for r in c.compress_ratios[:43]) == 21 and sum(r == 128 for r in c.compress_ratios) == 20


@pytest.mark.parametrize("name", ["v4_flash", "tiny", "embedded"])
def test_round_trip_through_json(tmp_path, name):
    c = getattr(ModelConfig, name)()
    c.save(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "deepseek_v4"
    assert ModelConfig.from_hf_config(tmp_path) == c
    assert ModelConfig.from_hf_config(d).to_hf_dict() == d


def test_tiny_and_embedded_keep_every_path_alive():
    for c in (ModelConfig.tiny(), ModelConfig.embedded()):
        r = c.compress_ratios[: c.num_hidden_layers]
        assert 0 in r and 4 in r and any(x not in (0, 4) for x in r)
        assert c.num_hash_layers >= 2 and c.n_shared_experts >= 1 and c.hc_mult == 4
        assert c.num_nextn_predict_layers == 1 and c.lowp_problems() == []
    e = ModelConfig.embedded()
    assert e.n_routed_experts >= 32 and e.num_experts_per_tok >= 4


def test_hf_transformers_accepts_our_dict():
    from transformers import DeepseekV4Config
    d = ModelConfig.tiny().to_hf_dict()
    d["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}
    d["compress_ratios"] = [{0: 0, 4: 4, 8: 128}[r] for r in d["compress_ratios"]]
    hc = DeepseekV4Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "rope_scaling")})
    assert hc.qk_rope_head_dim == 64 and hc.mlp_layer_types[:3] == ["hash_moe", "hash_moe", "moe"]


def _base():
    return ModelConfig.tiny().to_hf_dict()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("hidden_size"), "missing config keys"),
    (lambda d: d.update(frobnicate=1), "unknown config keys"),
    (lambda d: d.update(compress_ratios=[0, 4, 8]), "len(compress_ratios)"),
    (lambda d: d.update(compress_ratios=[0, 4, 8, 4, 8, 4]), "MTP layer is sliding-only"),
    (lambda d: d.update(num_hash_layers=9), "num_hash_layers"),
    (lambda d: d.update(head_dim=64), "head_dim=64 must exceed"),
    (lambda d: d.update(o_groups=3), "o_groups"),
    (lambda d: d.update(num_experts_per_tok=99), "num_experts_per_tok"),
    (lambda d: d.update(scoring_func="softmax"), "scoring_func"),
    (lambda d: d.update(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
])
def test_validation_errors(mutate, message):
    d = _base()
    mutate(d)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf_config(d)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf_config(tmp_path)


def test_lowp_problems_and_switch():
    c = ModelConfig.tiny().with_(head_dim=96, index_head_dim=96)
    assert len(c.lowp_problems()) == 2
    from dsv4lib import DeepseekV4
    with pytest.raises(ValueError, match="low-precision"):
        DeepseekV4(c, device="meta", lowp_sim=True)
