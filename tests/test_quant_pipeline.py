"""Coverage strategies and the layer-by-layer self-calibration pipeline on ModelConfig.tiny()."""
from __future__ import annotations

import json

import pytest
import torch

from dsv4lib import DeepseekV4, ModelConfig
from dsv4lib.checkpoint import Int2Store, load_model, save_release
from dsv4lib.formats import int2
from dsv4lib.quant import coverage as cov
from dsv4lib.quant.pipeline import layer_errors, make_options, quantize

LAYERS = (0, 1, 2)  # hash layers 0, 1 and a top-k layer


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    cfg = ModelConfig.tiny()
    model = DeepseekV4(cfg)
    model.reset_parameters(seed=0)
    ref = tmp_path_factory.mktemp("tiny") / "ref"
    save_release(model, ref)
    ids = torch.randint(0, cfg.vocab_size, (4, 40), generator=torch.Generator().manual_seed(1))
    return cfg, ref, ids


def _run(release, out, **kw):
    cfg, ref, ids = release
    opts = dict(calib_ids=ids, calib_tokens=160, seq_len=40, threshold=24, min_tokens=6, layers=LAYERS,
                progress=False)
    opts.update(kw)
    return quantize(ref, out, **opts)


def _layer_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".safetensors"} | {
        "manifest.json": (d / "manifest.json").read_bytes()}


def test_coverage_strategies_on_skewed_routing():
    g = torch.Generator().manual_seed(0)
    T, E, k = 400, 12, 2
    scores = torch.rand(T, E, generator=g)
    scores[:, :4] += 2.0  # experts 0..3 dominate the routing
    idx = scores.topk(k, -1).indices
    w = scores.gather(1, idx)
    routed = cov.plan_visits("routed", scores, idx, w, threshold=30)
    bal = cov.plan_visits("balanced", scores, idx, w, threshold=30, route_scale=1.5)
    every = cov.plan_visits("all", scores, idx, w)
    assert int(routed.counts().min()) < 30 and int(routed.counts()[4:].max()) == 0
    assert int(bal.counts().min()) >= 30
    assert torch.equal(bal.counts()[:4], routed.counts()[:4])  # experts above threshold unchanged
    assert torch.equal(every.counts(), torch.full((E,), T))
    # extra visits are the highest-affinity tokens not routed there, with weights in (0, 1.5)
    tok5, w5 = bal.of(5)
    assert set(tok5.tolist()) == set(scores[:, 5].topk(30).indices.tolist())
    assert bool(((w5 > 0) & (w5 < 1.5)).all())
    assert cov.summary(routed.counts())["zero"] == E - 4
    with pytest.raises(ValueError, match="coverage strategy"):
        cov.plan_visits("nope", scores, idx, w)


@pytest.mark.slow
def test_pipeline_balanced_vs_routed_resume_and_fallbacks(release, tmp_path):
    cfg, ref, ids = release
    # balanced: every expert reaches the threshold, GPTQ beats RTN, no fallback
    full = _run(release, tmp_path / "full")
    for li in LAYERS:
        s = full["layers"][str(li)]
        assert s["visits_balanced"]["min"] >= 24 and s["fallback"]["count"] == 0
        assert s["hash_layer"] == (li < cfg.num_hash_layers)
        for p in ("w1", "w3", "w2"):
            assert s["gptq_error"][p] < 0.6 * s["rtn_error"][p]
        assert len(s["visits"]["counts"]) == cfg.n_routed_experts
    # kill after the first layer (exception injected), then resume: byte-identical files
    def boom(li, stats):
        if li == 0:
            raise RuntimeError("simulated kill")
    with pytest.raises(RuntimeError, match="simulated kill"):
        _run(release, tmp_path / "resumed", on_layer=boom)
    assert Int2Store(tmp_path / "resumed", cfg).layers() == [0]
    _run(release, tmp_path / "resumed")
    assert _layer_bytes(tmp_path / "resumed") == _layer_bytes(tmp_path / "full")
    a = json.loads((tmp_path / "resumed" / "quant_stats.json").read_text())["layers"]
    for li in LAYERS:  # same statistics apart from the wall time
        x, y = dict(a[str(li)]), dict(full["layers"][str(li)])
        x.pop("time_s"), y.pop("time_s")
        assert x == y
    # routed only: some experts stay under the threshold; the starved ones fall back, never zeroed
    routed = _run(release, tmp_path / "routed", coverage="routed", layers=(2,), min_tokens=12)
    s = routed["layers"]["2"]
    assert s["visits"]["min"] < 24 and s["visits_balanced"] == s["visits"]
    starved = [e for e, c in enumerate(s["visits"]["counts"]) if c < 12]
    assert starved and sorted(int(e) for e in s["fallback"]["experts"]) == starved
    assert all("tokens < min_tokens" in r[0] for r in s["fallback"]["experts"].values())
    t = Int2Store(tmp_path / "routed", cfg).read_layer(2)
    for p in ("w1", "w3", "w2"):
        w = int2.dequantize(t[p]["w_packed"], t[p]["w_scale"], t[p]["w_zero_packed"])  # [E, out, in]
        assert bool((w.flatten(1).abs().sum(1) > 0).all())  # no expert zeroed


@pytest.mark.slow
def test_rtn_dir_and_loading(release, tmp_path):
    cfg, ref, ids = release
    from dsv4lib.cli import main
    assert main(["quantize", "--ref", str(ref), "--out", str(tmp_path / "rtn"), "--rtn-only"]) == 0
    t = Int2Store(tmp_path / "rtn", cfg).read_layer(3)
    dense = load_model(ref).moe_layer(3).experts.dequantize_expert(5)[2]  # w2 of expert 5
    deq = int2.dequantize(t["w2"]["w_packed"][5], t["w2"]["w_scale"][5], t["w2"]["w_zero_packed"][5])
    half_step = t["w2"]["w_scale"][5].float().repeat_interleave(64, -1) / 2
    assert bool(((deq - dense).abs() <= half_step * 1.001).all())  # min-max grid: every weight within ½ step
    q, s, z = int2.quantize_rtn(dense)  # same grid; rounding of exact MXFP4 ties may differ
    assert torch.equal(s, t["w2"]["w_scale"][5])
    assert (deq == int2.dequantize_codes(q, s, z)).float().mean() > 0.9
    model = load_model(ref, tmp_path / "rtn")
    logits = model(ids[:1, :8])
    assert logits.shape == (1, 8, cfg.vocab_size) and torch.isfinite(logits).all()
    assert set(layer_errors(tmp_path / "rtn")) == set(range(cfg.num_hidden_layers))


def test_options():
    o = make_options(act_order=True, threshold=7, layers=[1, 2])
    assert o.gptq.act_order and o.gptq.static_groups and o.threshold == 7 and o.layers == (1, 2)
    assert o.fingerprint() != make_options().fingerprint()
    with pytest.raises(TypeError, match="unknown options"):
        make_options(bogus=1)
    with pytest.raises(ValueError, match="coverage"):
        make_options(coverage="everything")


def test_cli_help():
    from dsv4lib.cli import build_parser
    p = build_parser(only="quantize")
    args = p.parse_args(["quantize", "--out", "x", "--act-order", "--coverage", "routed"])
    assert args.act_order and args.coverage == "routed" and args.threshold == 128
