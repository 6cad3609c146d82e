"""verify: INT2 dir vs release; finds the packing convention and flags mis-packed files."""
from __future__ import annotations

import json

import pytest
import torch

from dsv4lib.checkpoint import load_model, save_release
from dsv4lib.checkpoint.int2_store import Int2Store
from dsv4lib.checkpoint.verify import CONTRACT, verify_int2
from dsv4lib.cli import main
from dsv4lib.config import ModelConfig
from dsv4lib.formats import int2
from dsv4lib.model import DeepseekV4


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.tiny().with_(num_hidden_layers=2, compress_ratios=(0, 4, 0), num_hash_layers=1)


@pytest.fixture(scope="module")
def release(tmp_path_factory, cfg):
    m = DeepseekV4(cfg)
    m.reset_parameters(seed=0)
    return save_release(m, tmp_path_factory.mktemp("rel"))


@pytest.fixture(scope="module")
def rtn_layers(release, cfg):
    """RTN INT2 codes/scales/zeros of the release's (MXFP4-decoded) experts, per main layer."""
    model = load_model(release)
    out = {}
    for li in range(cfg.num_hidden_layers):
        ex = model.layers[li].ffn.experts
        ws = [torch.stack(t) for t in zip(*(ex.dequantize_expert(e) for e in range(ex.num_experts)))]
        out[li] = {p: int2.quantize_rtn(w) for p, w in zip(("w1", "w3", "w2"), ws)}
    return out


def _write(root, cfg, layers, order="lsb", zero_order="low"):
    store = Int2Store(root, cfg)
    for li, projs in layers.items():
        store.write_layer(li, {p: {"w_packed": int2.pack_codes(q, order), "w_scale": s,
                                   "w_zero_packed": int2.pack_zeros(z, zero_order)}
                               for p, (q, s, z) in projs.items()})
    return root


def test_correct_dir_passes(release, rtn_layers, cfg, tmp_path):
    d = _write(tmp_path / "ok", cfg, rtn_layers)
    rep = verify_int2(release, d, experts_per_layer=4)
    assert rep.ok and rep.best == CONTRACT
    assert all(m.rel_err < 0.7 and m.corr > 0.7 for m in rep.rows())
    assert sorted({m.layer for m in rep.matches}) == [0, 1] and rep.experts[0] == [0, 5, 10, 15]
    # the wrong code order looks like noise
    wrong = [m for m in rep.matches if m.convention.order == "msb" and m.convention.zero_offset == 0]
    assert all(m.corr < 0.3 for m in wrong)


@pytest.mark.parametrize("order,zero_order", [("msb", "low"), ("lsb", "high"), ("msb", "high")])
def test_mispacked_dir_is_flagged_and_convention_found(release, rtn_layers, cfg, tmp_path, order, zero_order):
    d = _write(tmp_path / "bad", cfg, rtn_layers, order, zero_order)
    rep = verify_int2(release, d, experts_per_layer=4)
    assert not rep.ok
    assert (rep.best.order, rep.best.zero_order, rep.best.zero_offset) == (order, zero_order, 0)
    assert "MISMATCH" in rep.table()


def test_cli_exit_codes_and_json(release, rtn_layers, cfg, tmp_path, capsys):
    good = _write(tmp_path / "good", cfg, rtn_layers)
    bad = _write(tmp_path / "bad", cfg, {0: rtn_layers[0]}, order="msb")
    js = tmp_path / "r.json"
    assert main(["verify", "--ref", str(release), "--int2", str(good), "--layers", "0-1",
                 "--experts-per-layer", "3", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "codes lsb-first" in out
    assert json.loads(js.read_text())["ok"] is True
    assert main(["verify", "--ref", str(release), "--int2", str(bad)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["verify", "--ref", str(release), "--int2", str(tmp_path / "empty")]) == 2
