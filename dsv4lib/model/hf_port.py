"""``from_hf_transformers``: a transformers ``DeepseekV4ForCausalLM`` -> our DeepseekV4 (spec §3.6).

Renames HF parameters to upstream checkpoint names and splits the fused ``gate_up_proj``
(gate rows first) into stacked ``w1``/``w3``. HF has no MTP, so the returned config has
``num_nextn_predict_layers = 0``.
"""
from __future__ import annotations

import re

import torch

from ..config import ModelConfig, RopeScaling
from .transformer import DeepseekV4

_LAYER_TYPE_CSA = "compressed_sparse_attention"
_LAYER_TYPE_HCA = "heavily_compressed_attention"

# HF suffix (after model.layers.{i}.) -> ours (after layers.{i}.)
_LAYER_RENAMES = [
    ("self_attn.compressor.indexer.kv_proj.weight", "attn.indexer.compressor.wkv.weight"),
    ("self_attn.compressor.indexer.gate_proj.weight", "attn.indexer.compressor.wgate.weight"),
    ("self_attn.compressor.indexer.position_bias", "attn.indexer.compressor.ape"),
    ("self_attn.compressor.indexer.kv_norm.weight", "attn.indexer.compressor.norm.weight"),
    ("self_attn.compressor.indexer.q_b_proj.weight", "attn.indexer.wq_b.weight"),
    ("self_attn.compressor.indexer.scorer.weights_proj.weight", "attn.indexer.weights_proj.weight"),
    ("self_attn.compressor.kv_proj.weight", "attn.compressor.wkv.weight"),
    ("self_attn.compressor.gate_proj.weight", "attn.compressor.wgate.weight"),
    ("self_attn.compressor.position_bias", "attn.compressor.ape"),
    ("self_attn.compressor.kv_norm.weight", "attn.compressor.norm.weight"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("self_attn.q_a_norm.weight", "attn.q_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("self_attn.kv_proj.weight", "attn.wkv.weight"),
    ("self_attn.kv_norm.weight", "attn.kv_norm.weight"),
    ("self_attn.o_a_proj.weight", "attn.wo_a.weight"),
    ("self_attn.o_b_proj.weight", "attn.wo_b.weight"),
    ("self_attn.sinks", "attn.attn_sink"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("attn_hc.fn", "hc_attn_fn"), ("attn_hc.base", "hc_attn_base"), ("attn_hc.scale", "hc_attn_scale"),
    ("ffn_hc.fn", "hc_ffn_fn"), ("ffn_hc.base", "hc_ffn_base"), ("ffn_hc.scale", "hc_ffn_scale"),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.gate.tid2eid", "ffn.gate.tid2eid"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
    ("mlp.experts.down_proj", "ffn.experts.w2"),
]
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "head.weight",
    "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def config_from_hf(hf_config) -> ModelConfig:
    """Our ModelConfig from a transformers ``DeepseekV4Config`` (MTP dropped: HF has none)."""
    c = hf_config
    rates = c.compress_rates
    ratio_of = {"sliding_attention": 0, _LAYER_TYPE_CSA: rates[_LAYER_TYPE_CSA], _LAYER_TYPE_HCA: rates[_LAYER_TYPE_HCA]}
    if ratio_of[_LAYER_TYPE_CSA] != 4 or ratio_of[_LAYER_TYPE_HCA] == 4:
        raise ValueError(f"HF compress_rates {rates}: CSA must be 4 and HCA != 4 (DeepSeek's overlap rule)")
    mlp = list(c.mlp_layer_types)
    n_hash = mlp.count("hash_moe")
    if mlp != ["hash_moe"] * n_hash + ["moe"] * (len(mlp) - n_hash):
        raise ValueError(f"HF mlp_layer_types {mlp}: hash layers must come first")
    comp = c.rope_parameters["compress"]
    yarn = None
    if comp.get("rope_type", "default") == "yarn":
        if comp.get("attention_factor", 1.0) != 1.0:
            raise ValueError("HF yarn attention_factor != 1 (V4 applies no mscale)")
        yarn = RopeScaling(float(comp["factor"]), int(comp["original_max_position_embeddings"]),
                           float(comp.get("beta_fast", 32)), float(comp.get("beta_slow", 1)))
    return ModelConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, head_dim=c.head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        q_lora_rank=c.q_lora_rank, o_groups=c.o_groups, o_lora_rank=c.o_lora_rank, sliding_window=c.sliding_window,
        compress_ratios=tuple(ratio_of[t] for t in c.layer_types), compress_rope_theta=float(comp["rope_theta"]),
        rope_theta=float(c.rope_parameters["main"]["rope_theta"]), rope_scaling=yarn,
        max_position_embeddings=c.max_position_embeddings, index_n_heads=c.index_n_heads,
        index_head_dim=c.index_head_dim, index_topk=c.index_topk, n_routed_experts=c.n_routed_experts,
        n_shared_experts=c.n_shared_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size, num_hash_layers=n_hash,
        routed_scaling_factor=c.routed_scaling_factor, swiglu_limit=c.swiglu_limit, hc_mult=c.hc_mult,
        hc_sinkhorn_iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps, num_nextn_predict_layers=0,
        rms_norm_eps=c.rms_norm_eps, num_key_value_heads=c.num_key_value_heads, scoring_func=c.scoring_func,
        norm_topk_prob=c.norm_topk_prob, hidden_act=c.hidden_act, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id if c.bos_token_id is not None else 0,
        eos_token_id=c.eos_token_id if isinstance(c.eos_token_id, int) else 1,
        initializer_range=c.initializer_range,
    )


def hf_state_dict_to_ours(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename an HF state dict to upstream names (rotary buffers dropped)."""
    out: dict[str, torch.Tensor] = {}
    I = cfg.moe_intermediate_size
    for name, t in sd.items():
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            if "rotary_emb" in name:
                continue
            raise KeyError(f"from_hf_transformers: unmapped HF tensor {name}")
        i, rest = m.group(1), m.group(2)
        if "rotary_emb" in rest:
            continue
        if rest == "mlp.experts.gate_up_proj":                              # [E, 2I, D] gate rows first
            out[f"layers.{i}.ffn.experts.w1"] = t[:, :I]
            out[f"layers.{i}.ffn.experts.w3"] = t[:, I:]
            continue
        for hf, ours in _LAYER_RENAMES:
            if rest == hf:
                out[f"layers.{i}.{ours}"] = t
                break
        else:
            raise KeyError(f"from_hf_transformers: unmapped HF tensor {name}")
    return out


@torch.no_grad()
def from_hf_transformers(hf_model, dtype: torch.dtype | None = None) -> DeepseekV4:
    """Our DeepseekV4 holding the same weights as a transformers ``DeepseekV4ForCausalLM``."""
    cfg = config_from_hf(hf_model.config)
    sd = hf_state_dict_to_ours(hf_model.state_dict(), cfg)
    if dtype is None:
        dtype = hf_model.lm_head.weight.dtype
    model = DeepseekV4(cfg, dtype=dtype, device="meta")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise KeyError(f"from_hf_transformers: missing {missing[:8]} unexpected {extra[:8]}")
    for k, t in sd.items():
        if own[k].shape != t.shape:
            raise ValueError(f"from_hf_transformers: {k} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
    model = model.to_empty(device=hf_model.lm_head.weight.device)
    model.load_state_dict({k: t.to(own[k].dtype) for k, t in sd.items()}, strict=False)
    model.reinit_buffers()
    return model
