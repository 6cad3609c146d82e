"""The release schema reproduces the audited DeepSeek-V4-Flash checkpoint (spec v4_arch §0, §3)."""
from __future__ import annotations

from collections import Counter

from dsv4lib.checkpoint import expected_tensors
from dsv4lib.checkpoint.schema import dtype_histogram, total_bytes
from dsv4lib.config import ModelConfig


def test_v4_flash_counts_bytes_histogram():
    rows = expected_tensors(ModelConfig.v4_flash())
    assert len(rows) == 69_187
    assert len({r.name for r in rows}) == 69_187
    assert total_bytes(rows) == 159_609_485_896
    assert dtype_histogram(rows) == {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34_167,
                                     "I64": 3, "I8": 33_792}
    main = [r for r in rows if not r.name.startswith("mtp.")]
    mtp = [r for r in rows if r.name.startswith("mtp.")]
    assert len(main) == 67_612 and len(mtp) == 1_575
    assert total_bytes(mtp) == 3_593_787_756
    assert total_bytes(main) == 156_015_698_140


def test_v4_flash_shard_map_and_spot_shapes():
    rows = expected_tensors(ModelConfig.v4_flash())
    by = {r.name: r for r in rows}
    files = Counter(r.file for r in rows)
    assert len(files) == 46
    assert by["embed.weight"].file == "model-00001-of-00046.safetensors"
    assert by["layers.0.attn_norm.weight"].file == "model-00002-of-00046.safetensors"
    assert by["layers.42.ffn.gate.bias"].file == "model-00044-of-00046.safetensors"
    assert {by[n].file for n in ("head.weight", "norm.weight", "hc_head_fn")} == {"model-00045-of-00046.safetensors"}
    assert files["model-00046-of-00046.safetensors"] == 1_575
    expect = {
        "layers.0.hc_attn_fn": ("F32", (24, 16384)), "layers.0.attn.wq_b.scale": ("F8_E8M0", (256, 8)),
        "layers.0.attn.wo_a.weight": ("F8_E4M3", (8192, 4096)), "layers.0.ffn.gate.tid2eid": ("I64", (129280, 6)),
        "layers.2.attn.compressor.ape": ("F32", (4, 1024)), "layers.3.attn.compressor.ape": ("F32", (128, 512)),
        "layers.2.attn.indexer.wq_b.scale": ("F8_E8M0", (64, 8)),
        "layers.3.ffn.experts.255.w2.weight": ("I8", (4096, 1024)),
        "layers.3.ffn.experts.0.w1.scale": ("F8_E8M0", (2048, 128)),
        "mtp.0.e_proj.scale": ("F8_E8M0", (32, 32)), "mtp.0.ffn.gate.bias": ("F32", (256,)),
        "hc_head_scale": ("F32", (1,)),
    }
    for name, (dt, shape) in expect.items():
        assert (by[name].dtype, by[name].shape) == (dt, shape), name
    assert "layers.3.attn.indexer.wq_b.weight" not in by and "layers.3.ffn.gate.tid2eid" not in by
    assert "mtp.0.attn.compressor.ape" not in by


def test_flash_base_flavour_uses_fp8_experts_and_f32_scales():
    rows = expected_tensors(ModelConfig.v4_flash().with_(expert_dtype="fp8"), include_mtp=False)
    by = {r.name: r for r in rows}
    assert (by["layers.5.ffn.experts.7.w1.weight"].dtype, by["layers.5.ffn.experts.7.w1.weight"].shape) == \
        ("F8_E4M3", (2048, 4096))
    assert (by["layers.5.ffn.experts.7.w2.scale"].dtype, by["layers.5.ffn.experts.7.w2.scale"].shape) == \
        ("F32", (32, 16))
    assert by["layers.5.attn.wq_a.scale"].dtype == "F32"
    assert "F8_E8M0" not in dtype_histogram(rows) and len(rows) == 67_612


def test_tiny_schema_partial_blocks_and_layer_kinds():
    cfg = ModelConfig.tiny()
    rows = expected_tensors(cfg)
    by = {r.name: r for r in rows}
    assert len({r.file for r in rows}) == cfg.num_hidden_layers + 3
    # every FP8 weight has a scale of ceil(out/128) x ceil(in/128)
    for r in rows:
        if r.dtype == "F8_E4M3":
            s = by[r.name[: -len("weight")] + "scale"]
            assert s.shape == tuple(-(-d // 128) for d in r.shape)
    for i, ratio in enumerate(cfg.compress_ratios[: cfg.num_hidden_layers]):
        assert (f"layers.{i}.attn.compressor.ape" in by) == (ratio > 0)
        assert (f"layers.{i}.attn.indexer.wq_b.weight" in by) == (ratio == 4)
