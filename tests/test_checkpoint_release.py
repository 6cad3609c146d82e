"""save_release -> ReleaseReader -> load_model on the tiny config (spec v4_arch §3): exact format,
identical logits after the same FP8/MXFP4 rounding, INT2 experts, and a clear error for bad input."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv4lib.checkpoint import expected_tensors, load_model, model_memory_report, save_release
from dsv4lib.checkpoint.errors import CheckpointError
from dsv4lib.checkpoint.int2_store import Int2Store
from dsv4lib.checkpoint.reader import INDEX, ReleaseReader
from dsv4lib.checkpoint.writer import apply_release_rounding
from dsv4lib.config import ModelConfig
from dsv4lib.model import DeepseekV4
from dsv4lib.model.quantized_experts import INT2Experts, MXFP4Experts


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.tiny()


@pytest.fixture(scope="module")
def model(cfg):
    m = DeepseekV4(cfg)
    m.reset_parameters(seed=0)
    with torch.no_grad():  # give norms/biases/mHC non-trivial values so every tensor matters
        for n, p in m.named_parameters():
            if p.dim() == 1 or n.endswith("ape"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory, model):
    return save_release(model, tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def rounded(model):
    return apply_release_rounding(copy.deepcopy(model))


@pytest.fixture(scope="module")
def ids(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))


def test_release_files_match_upstream_layout(release, cfg):
    rows = expected_tensors(cfg)
    shards = sorted(p.name for p in release.glob("model-*.safetensors"))
    assert shards == [f"model-{k:05d}-of-{cfg.num_hidden_layers + 3:05d}.safetensors"
                      for k in range(1, cfg.num_hidden_layers + 4)]
    index = json.loads((release / INDEX).read_text())
    assert index["weight_map"] == {r.name: r.file for r in rows}
    assert index["metadata"]["total_size"] == sum(r.nbytes for r in rows)
    assert ModelConfig.from_hf_config(release) == cfg
    with safe_open(str(release / rows[-1].file), "pt") as f:  # dtypes as written in the file headers
        assert f.get_slice("mtp.0.ffn.experts.3.w2.weight").get_dtype() == "I8"
        assert f.get_slice("mtp.0.ffn.experts.3.w2.scale").get_dtype() == "F8_E8M0"
        assert f.get_slice("mtp.0.e_proj.weight").get_dtype() == "F8_E4M3"
    assert ReleaseReader(release).validate() == rows
    assert not list(release.glob(".*tmp*"))


def test_loaded_model_gives_identical_logits(release, rounded, ids):
    loaded = load_model(release)
    assert isinstance(loaded.layers[0].ffn.experts, MXFP4Experts)
    assert loaded.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert loaded.layers[0].ffn.gate.tid2eid.dtype == torch.int64
    with torch.no_grad():
        assert torch.equal(loaded(ids), rounded(ids))
        h = rounded.forward_hidden(ids)
        assert torch.equal(loaded.mtp_logits(h, ids), rounded.mtp_logits(h, ids))
    rep = model_memory_report(loaded)
    cfg = loaded.config
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert rep["routed_experts"] == cfg.num_hidden_layers * 3 * E * (I * D // 2 + I * D // 32)  # 4.25 bit
    assert rep["total"] == sum(v for k, v in rep.items() if k != "total")
    assert rep["routed_experts"] < model_memory_report(rounded)["routed_experts"] / 7


def test_resave_is_byte_identical(release, tmp_path):
    again = save_release(load_model(release), tmp_path / "again")
    for p in release.glob("*.safetensors"):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


def test_int2_dir_loads_and_runs(release, rounded, tmp_path, ids, cfg):
    store = Int2Store(tmp_path / "int2", cfg)
    ref = copy.deepcopy(rounded)
    for li in range(cfg.num_hidden_layers):
        ex = ref.layers[li].ffn.experts
        backend = INT2Experts.from_dense_rtn(ex.w1, ex.w3, ex.w2)
        store.write_layer(li, backend.layer_tensors(), stats={"method": "rtn"})
        ref.set_expert_backend(li, backend)
    ref.set_expert_backend(cfg.num_hidden_layers, load_model(release).mtp[0].ffn.experts)
    loaded = load_model(release, tmp_path / "int2")
    assert all(isinstance(b.ffn.experts, INT2Experts) for b in loaded.layers)
    assert isinstance(loaded.mtp[0].ffn.experts, MXFP4Experts)  # no INT2 file for the MTP layer
    with torch.no_grad():
        out = loaded(ids)
        assert torch.isfinite(out).all()
        assert torch.equal(out, ref(ids))
    rep = model_memory_report(loaded)
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    per_layer = 3 * E * (I * D // 4 + I * D // 64 * 2 + I * D // 128)
    assert rep["routed_experts"] == cfg.num_hidden_layers * per_layer
    sim = load_model(release, tmp_path / "int2", lowp_sim=True)
    assert sim.lowp_sim and sim.layers[1].ffn.experts.lowp
    with torch.no_grad():
        assert torch.isfinite(sim(ids)).all()
    (tmp_path / "int2" / "layer_02.safetensors").unlink()
    with pytest.raises(CheckpointError, match="layer_02.safetensors"):
        load_model(release, tmp_path / "int2")


def test_flash_base_flavour_roundtrip(tmp_path, cfg, ids):
    base = cfg.with_(expert_dtype="fp8")
    m = DeepseekV4(base)
    m.reset_parameters(seed=1)
    out = save_release(m, tmp_path / "base")
    with safe_open(str(out / expected_tensors(base)[-1].file), "pt") as f:
        assert f.get_slice("mtp.0.ffn.experts.0.w1.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("mtp.0.ffn.experts.0.w1.scale").get_dtype() == "F32"
        assert f.get_slice("mtp.0.attn.wq_a.scale").get_dtype() == "F32"
    apply_release_rounding(m)
    with torch.no_grad():
        assert torch.allclose(load_model(out)(ids), m(ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input -> one clear error
def _rewrite(path, fn):
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})


def _index_edit(d, fn):
    idx = json.loads((d / INDEX).read_text())
    fn(idx["weight_map"])
    (d / INDEX).write_text(json.dumps(idx))


SHARD2 = "model-00002-of-00008.safetensors"  # layer 0 of the tiny config
SHARD3 = "model-00003-of-00008.safetensors"


def _drop_tensor(d):
    _rewrite(d / SHARD2, lambda t: t.pop("layers.0.attn.kv_norm.weight"))
    return SHARD2, "layers.0.attn.kv_norm.weight", "absent from the shard"


def _drop_from_index(d):
    _rewrite(d / SHARD2, lambda t: t.pop("layers.0.attn.kv_norm.weight"))
    _index_edit(d, lambda wm: wm.pop("layers.0.attn.kv_norm.weight"))
    return INDEX, "layers.0.attn.kv_norm.weight", "missing from the index"


def _extra(d):
    _rewrite(d / SHARD2, lambda t: t.__setitem__("layers.0.attn.bogus", torch.zeros(3)))
    _index_edit(d, lambda wm: wm.__setitem__("layers.0.attn.bogus", SHARD2))
    return SHARD2, "layers.0.attn.bogus", "unexpected tensor"


def _wrong_dtype(d):
    _rewrite(d / SHARD2, lambda t: t.__setitem__("layers.0.ffn_norm.weight", t["layers.0.ffn_norm.weight"].float()))
    return SHARD2, "layers.0.ffn_norm.weight", "dtype F32, expected BF16"


def _wrong_shape(d):
    _rewrite(d / SHARD3, lambda t: t.__setitem__("layers.1.ffn.experts.4.w2.weight",
                                                 t["layers.1.ffn.experts.4.w2.weight"][:, :-1].contiguous()))
    return SHARD3, "layers.1.ffn.experts.4.w2.weight", "shape"


def _missing_shard(d):
    (d / SHARD3).unlink()
    return SHARD3, "", "shard file missing"


def _truncated_shard(d):
    data = (d / SHARD3).read_bytes()
    (d / SHARD3).write_bytes(data[: len(data) - 1000])
    return SHARD3, "", "truncated"


def _nan_scale(d):
    def f(t):
        s = t["layers.1.attn.wq_b.scale"].view(torch.uint8).clone()
        s[0, 0] = 255
        t["layers.1.attn.wq_b.scale"] = s.view(torch.float8_e8m0fnu)
    _rewrite(d / SHARD3, f)
    return SHARD3, "layers.1.attn.wq_b.scale", "NaN"


@pytest.mark.parametrize("defect", [_drop_tensor, _drop_from_index, _extra, _wrong_dtype, _wrong_shape,
                                    _missing_shard, _truncated_shard, _nan_scale], ids=lambda f: f.__name__[1:])
def test_bad_release_raises_one_clear_error(release, tmp_path, defect):
    d = tmp_path / "bad"
    shutil.copytree(release, d)
    file, tensor, what = defect(d)
    for call in (lambda: ReleaseReader(d).validate(), lambda: load_model(d)):
        with pytest.raises(CheckpointError) as ei:
            call()
        msg = str(ei.value)
        assert file in msg and tensor in msg and what in msg, msg


def test_release_without_mtp_shard_loads_without_mtp(release, rounded, tmp_path, ids, cfg):
    d = tmp_path / "nomtp"
    shutil.copytree(release, d)
    mtp_file = expected_tensors(cfg)[-1].file
    (d / mtp_file).unlink()
    _index_edit(d, lambda wm: [wm.pop(n) for n in [k for k in wm if k.startswith("mtp.")]])
    loaded = load_model(d)
    assert len(loaded.mtp) == 0 and "mtp" not in model_memory_report(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(ids), rounded(ids))


def test_unvalidated_load_still_names_missing_tensor(release, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(release, d)
    _drop_from_index(d)
    with pytest.raises(CheckpointError, match="layers.0.attn.kv_norm.weight"):
        load_model(d, validate=False)


def test_model_builds_dense_experts_on_meta(cfg):
    m = DeepseekV4(cfg, expert_device="meta")          # what the loader does: no dense expert memory
    assert all(p.is_meta for b in list(m.layers) + list(m.mtp) for p in b.ffn.experts.parameters())
    assert not any(p.is_meta for n, p in m.named_parameters() if ".ffn.experts." not in n)


def test_load_without_experts_leaves_them_on_meta(release, rounded, ids, cfg):
    m = load_model(release, load_experts=False)
    assert all(p.is_meta for b in m.layers for p in b.ffn.experts.parameters())
    assert "routed_experts" not in model_memory_report(m)
    for li in range(cfg.num_hidden_layers + 1):
        m.set_expert_backend(li, rounded.moe_layer(li).experts)
    with torch.no_grad():
        assert torch.equal(m(ids), rounded(ids))
