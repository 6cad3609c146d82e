"""The training script of the embedded model: a CPU smoke run end to end, and its pieces."""
import json

import pytest
import torch

from dsv4lib.config import ModelConfig
from dsv4lib.train_tiny import TrainConfig, balanced_tid2eid, lr_at, run_training, update_router_bias


def test_balanced_tid2eid_rows_distinct_and_loads_even():
    t = balanced_tid2eid(1000, 32, 4, seed=3)
    assert t.shape == (1000, 4)
    assert all(len(set(r.tolist())) == 4 for r in t)
    counts = torch.bincount(t.flatten(), minlength=32)
    assert counts.max() - counts.min() <= 1
    assert not torch.equal(t, balanced_tid2eid(1000, 32, 4, seed=4))


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_bias_update_moves_toward_underloaded_experts():
    from dsv4lib import DeepseekV4
    m = DeepseekV4(ModelConfig.tiny())
    layer = m.config.num_hash_layers            # first score-routed layer
    E = m.config.n_routed_experts
    counts = torch.zeros(E, dtype=torch.long)
    counts[0] = 100                                # expert 0 overloaded, the rest idle
    before = m.moe_layer(layer).gate.bias.detach().clone()
    update_router_bias(m, {layer: counts}, 0.01)
    d = m.moe_layer(layer).gate.bias.detach() - before
    assert d[0].item() == pytest.approx(-0.01)
    assert torch.allclose(d[1:], torch.full((E - 1,), 0.01))


@pytest.mark.slow
def test_training_cpu_smoke_exports_a_loadable_release(tmp_path):
    from dsv4lib.checkpoint import load_model
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, warmup_steps=1, log_every=1, eval_every=0,
                      eval_windows=2, chat_repeat=1)
    model, history = run_training(tmp_path / "rel", cfg, model_config=ModelConfig.embedded(), device="cpu",
                                  log=lambda s: None)
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert history[-1]["valid_ppl"] > 1.0
    rel = tmp_path / "rel"
    size = sum(p.stat().st_size for p in rel.glob("*.safetensors"))
    assert size <= 25 * 2**20, size
    assert json.loads((rel / "training.json").read_text())["train_config"]["steps"] == 3
    loaded = load_model(rel)
    ids = torch.randint(0, 4096, (1, 40))
    assert torch.isfinite(loaded(ids)).all()
