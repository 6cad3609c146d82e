"""INT2 store: atomic layer files, manifest/sha256, stats merge, reader checks (ARCHITECTURE.md format)."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from dsv4lib.checkpoint.errors import CheckpointError
from dsv4lib.checkpoint.int2_store import MANIFEST, STATS, Int2Store, config_hash, layer_file
from dsv4lib.config import ModelConfig
from dsv4lib.formats import int2
from dsv4lib.model.quantized_experts import INT2Experts


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.tiny()


def rtn_layer(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    w1, w3, w2 = (torch.randn(E, I, D, generator=g), torch.randn(E, I, D, generator=g),
                  torch.randn(E, D, I, generator=g))
    return INT2Experts.from_dense_rtn(w1, w3, w2).layer_tensors()


def test_write_read_roundtrip_manifest_stats(tmp_path, cfg):
    store = Int2Store(tmp_path, cfg)
    t0, t1 = rtn_layer(cfg, 0), rtn_layer(cfg, 1)
    store.write_layer(1, t1, stats={"err": {"w1": 0.5}})
    store.write_layer(0, t0, stats={"err": {"w1": 0.25}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [layer_file(0), layer_file(1), MANIFEST, STATS]
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert m["group_size"] == 64 and m["format_version"] == 1 and m["config_hash"] == config_hash(cfg)
    assert "bits [2j, 2j+2)" in m["bit_order"] and set(m["files"]) == {layer_file(0), layer_file(1)}
    assert all(len(v["sha256"]) == 64 for v in m["files"].values())
    st = json.loads((tmp_path / STATS).read_text())
    assert st["layers"] == {"0": {"err": {"w1": 0.25}}, "1": {"err": {"w1": 0.5}}}
    back = store.read_layer(0)
    for p in ("w1", "w3", "w2"):
        for k in ("w_packed", "w_scale", "w_zero_packed"):
            assert back[p][k].dtype == t0[p][k].dtype and torch.equal(back[p][k], t0[p][k])
    assert store.has_layer(0) and store.has_layer(1) and not store.has_layer(2)
    # byte-identical on rewrite (resumable runs produce the same files)
    sha = m["files"][layer_file(0)]["sha256"]
    store.write_layer(0, t0)
    assert json.loads((tmp_path / MANIFEST).read_text())["files"][layer_file(0)]["sha256"] == sha


def test_reader_accepts_underscore_spelling_and_int32(tmp_path, cfg):
    t = rtn_layer(cfg, 2)
    flat = {}
    for p, d in t.items():
        flat[f"{p}_w_packed"] = d["w_packed"].view(torch.int32)
        flat[f"{p}_w_scale"] = d["w_scale"]
        flat[f"{p}_w_zero_packed"] = d["w_zero_packed"]
    save_file(flat, str(tmp_path / layer_file(3)))  # no manifest: a foreign INT2 dir
    back = Int2Store(tmp_path, cfg).read_layer(3)
    assert back["w2"]["w_packed"].dtype == torch.uint32
    assert torch.equal(back["w2"]["w_packed"], t["w2"]["w_packed"])
    prefixed = {f"layers.4.ffn.experts.{p}.{k}": v for p, d in t.items() for k, v in d.items()}
    save_file(prefixed, str(tmp_path / layer_file(4)))
    assert torch.equal(Int2Store(tmp_path, cfg).read_layer(4)["w3"]["w_scale"], t["w3"]["w_scale"])


@pytest.mark.parametrize("defect", ["shape", "dtype", "nan", "missing"])
def test_reader_rejects_bad_tensors(tmp_path, cfg, defect):
    t = rtn_layer(cfg, 3)
    flat = {f"{p}.{k}": v for p, d in t.items() for k, v in d.items()}
    if defect == "shape":
        flat["w3.w_scale"] = flat["w3.w_scale"][:, :, :1].contiguous()
    elif defect == "dtype":
        flat["w3.w_scale"] = flat["w3.w_scale"].float()
    elif defect == "nan":
        flat["w3.w_scale"][0, 0, 0] = float("nan")
    else:
        del flat["w3.w_scale"]
    save_file(flat, str(tmp_path / layer_file(0)))
    with pytest.raises(CheckpointError) as ei:
        Int2Store(tmp_path, cfg).read_layer(0)
    msg = str(ei.value)
    assert layer_file(0) in msg and "w3.w_scale" in msg
    if defect == "nan":
        assert "NaN" in msg


def test_sha_mismatch_and_config_mismatch(tmp_path, cfg):
    store = Int2Store(tmp_path, cfg)
    t = rtn_layer(cfg, 4)
    store.write_layer(0, t)
    t["w1"]["w_scale"][0, 0, 0] += 1  # a different, valid file under the same name
    save_file({f"{p}.{k}": v for p, d in t.items() for k, v in d.items()}, str(tmp_path / layer_file(0)))
    with pytest.raises(CheckpointError, match="sha256"):
        store.read_layer(0)
    assert not store.has_layer(0)
    assert store.read_layer(0, verify_sha=False)["w1"]["w_scale"][0, 0, 0] == t["w1"]["w_scale"][0, 0, 0]
    other = Int2Store(tmp_path, cfg.with_(swiglu_limit=7.0))
    with pytest.raises(CheckpointError, match="config_hash"):
        other.read_layer(0)


def test_truncated_file_is_a_clear_error(tmp_path, cfg):
    store = Int2Store(tmp_path, cfg)
    path = store.write_layer(0, rtn_layer(cfg, 5))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="layer_00.safetensors"):
        store.read_layer(0, verify_sha=False)


def test_interrupted_write_leaves_no_partial_file(tmp_path, cfg, monkeypatch):
    store = Int2Store(tmp_path, cfg)
    real = safetensors.torch.save_file

    def dying_save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half-written, then the process "dies"
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        store.write_layer(0, rtn_layer(cfg, 6))
    assert list(tmp_path.iterdir()) == []  # neither the layer, a temp file, nor a manifest
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert not store.has_layer(0)
    store.write_layer(0, rtn_layer(cfg, 6))
    assert store.has_layer(0)


def test_writer_validates_before_writing(tmp_path, cfg):
    t = rtn_layer(cfg, 7)
    t["w2"]["w_packed"] = t["w2"]["w_packed"][:1]
    with pytest.raises(CheckpointError, match="w2.w_packed"):
        Int2Store(tmp_path, cfg).write_layer(0, t)
    assert not any(tmp_path.iterdir())


def test_int2_experts_backend_matches_dequantized_dense(cfg):
    t = rtn_layer(cfg, 8)
    m = INT2Experts.from_tensors(t)
    w1, w3, w2 = m.dequantize_expert(5)
    assert torch.equal(w2, int2.dequantize(t["w2"]["w_packed"][5], t["w2"]["w_scale"][5],
                                           t["w2"]["w_zero_packed"][5]))
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert m.resident_bytes() == 3 * E * I * D // 4 + 3 * E * I * D // 64 * 2 + 3 * E * I * D // 128
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, D, generator=g)
    idx = torch.randint(0, E, (7, 2), generator=g)
    wt = torch.rand(7, 2, generator=g)
    y = m(x, idx, wt, cfg.swiglu_limit)
    ref = torch.zeros(7, D)
    for t_ in range(7):
        for j in range(2):
            a, b, c = m.dequantize_expert(int(idx[t_, j]))
            h = torch.nn.functional.silu((a @ x[t_]).clamp(max=10)) * (b @ x[t_]).clamp(-10, 10)
            ref[t_] += c @ (h * wt[t_, j])
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))  # fp32 summation order


def test_v4_flash_layer_shapes_match_the_contract():
    from dsv4lib.checkpoint.int2_store import expected_layer_shapes
    s = expected_layer_shapes(ModelConfig.v4_flash())
    assert s["w1"]["w_packed"] == ((256, 2048, 256), torch.uint32)
    assert s["w3"]["w_scale"] == ((256, 2048, 64), torch.float16)
    assert s["w2"]["w_zero_packed"] == ((256, 4096, 16), torch.int8)
    nbytes = sum(torch.Size(sh).numel() * torch.empty((), dtype=dt).element_size()
                 for p in s.values() for sh, dt in p.values())
    assert nbytes * 43 == 277_025_390_592 * 2.3125 / 8  # 2 bits + fp16 scale/64 + 4-bit zero/64
