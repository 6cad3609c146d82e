"""ModelConfig: DeepSeek-V4 hyper-parameters under their HF ``config.json`` names (spec §1).

Field names are the upstream ``config.json`` keys (spec §1.1), so ``from_hf_config`` /
``to_hf_dict`` are plain renames-free copies plus validation. Presets: ``v4_flash()`` (exact
release values), ``tiny()`` (CPU tests, every code path alive) and ``embedded()`` (the small
model this project trains and ships).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# HF bookkeeping keys that carry no architecture information; accepted and dropped.
TOLERATED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "use_cache", "torch_dtype", "dtype",
    "pad_token_id", "auto_map", "_name_or_path", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "mlp_bias", "partial_rotary_factor", "layer_types", "mlp_layer_types",
    "compress_rates", "rope_parameters", "name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "tf_legacy_loss", "use_bfloat16",
})
_SCALAR_TYPES = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (spec §2.6); applied only on compressed (CSA/HCA) layers."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    type: str = "yarn"

    @classmethod
    def from_dict(cls, d: dict) -> "RopeScaling":
        kind = d.get("type", d.get("rope_type", "yarn"))
        if kind != "yarn":
            raise ValueError(f"config.json: rope_scaling.type must be 'yarn', got {kind!r}")
        for k in ("factor", "original_max_position_embeddings"):
            if k not in d:
                raise ValueError(f"config.json: rope_scaling lacks {k!r}")
        return cls(float(d["factor"]), int(d["original_max_position_embeddings"]),
                   float(d.get("beta_fast", 32)), float(d.get("beta_slow", 1)), "yarn")

    def to_dict(self) -> dict:
        return {"type": self.type, "factor": self.factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow}


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V4 architecture config; keys and meanings as in spec §1.1."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    compress_rope_theta: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_hash_layers: int
    routed_scaling_factor: float
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    num_nextn_predict_layers: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int = 1
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    initializer_range: float = 0.02
    quantization_config: tuple[tuple[str, Any], ...] | None = None  # frozen view of the HF dict
    expert_dtype: str | None = None

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        n, m = self.num_hidden_layers, self.num_nextn_predict_layers
        errs = []
        if len(self.compress_ratios) != n + m:
            errs.append(f"len(compress_ratios)={len(self.compress_ratios)} != num_hidden_layers + "
                        f"num_nextn_predict_layers = {n} + {m}")
        for i, r in enumerate(self.compress_ratios):
            if r < 0 or r == 1:
                errs.append(f"compress_ratios[{i}]={r}: must be 0 (sliding) or >= 2")
            if i >= n and r != 0:
                errs.append(f"compress_ratios[{i}]={r}: the MTP layer is sliding-only (must be 0)")
        if self.num_key_value_heads != 1:
            errs.append(f"num_key_value_heads={self.num_key_value_heads}: V4 uses one shared K=V head")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            errs.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and > 0")
        if self.head_dim <= self.qk_rope_head_dim:
            errs.append(f"head_dim={self.head_dim} must exceed qk_rope_head_dim={self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            errs.append(f"index_head_dim={self.index_head_dim} < qk_rope_head_dim={self.qk_rope_head_dim}")
        if self.num_attention_heads % self.o_groups:
            errs.append(f"num_attention_heads={self.num_attention_heads} not divisible by o_groups={self.o_groups}")
        if not 0 <= self.num_hash_layers <= n:
            errs.append(f"num_hash_layers={self.num_hash_layers} outside [0, {n}]")
        if self.num_hash_layers and self.vocab_size <= 0:
            errs.append("hash layers need a tid2eid table of vocab_size rows")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            errs.append(f"num_experts_per_tok={self.num_experts_per_tok} outside [1, n_routed_experts="
                        f"{self.n_routed_experts}]")
        if self.scoring_func != "sqrtsoftplus":
            errs.append(f"scoring_func={self.scoring_func!r}: only 'sqrtsoftplus' is implemented")
        if self.topk_method != "noaux_tc":
            errs.append(f"topk_method={self.topk_method!r}: only 'noaux_tc' is implemented")
        if self.hidden_act != "silu":
            errs.append(f"hidden_act={self.hidden_act!r}: only 'silu' is implemented")
        if self.attention_bias:
            errs.append("attention_bias=true is not part of V4")
        if self.n_shared_experts < 0:
            errs.append(f"n_shared_experts={self.n_shared_experts} < 0")
        if any(r > 0 for r in self.compress_ratios) and self.index_topk < 1:
            errs.append(f"index_topk={self.index_topk} must be >= 1")
        if self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            errs.append("hc_mult and hc_sinkhorn_iters must be >= 1")
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
                  "o_lora_rank", "sliding_window", "index_n_heads", "moe_intermediate_size"):
            if getattr(self, k) <= 0:
                errs.append(f"{k}={getattr(self, k)} must be > 0")
        if errs:
            raise ValueError("invalid DeepSeek-V4 config: " + "; ".join(errs))

    # ------------------------------------------------------------------ derived
    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    def ratio(self, layer: int) -> int:
        """Compression ratio of layer ``layer`` (0 sliding, 4 CSA, other HCA; MTP = n_layers)."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    def lowp_problems(self) -> list[str]:
        """Shape constraints of the demo's low-precision simulation (spec §2.8, §5)."""
        p = []
        nope = self.head_dim - self.qk_rope_head_dim
        if nope % 64:
            p.append(f"head_dim - qk_rope_head_dim = {nope} not divisible by 64 (FP8 KV blocks)")
        d = self.index_head_dim
        if d < 32 or d & (d - 1):
            p.append(f"index_head_dim={d} must be a power of two >= 32 (Hadamard + FP4 blocks)")
        ins = {"hidden_size": self.hidden_size, "q_lora_rank": self.q_lora_rank,
               "o_groups*o_lora_rank": self.o_groups * self.o_lora_rank,
               "moe_intermediate_size": self.moe_intermediate_size}
        for k, v in ins.items():
            if v % 128:
                p.append(f"{k}={v} (a linear in-features) is not a multiple of 128 (FP8 activation blocks)")
        return p

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | dict) -> "ModelConfig":
        """Read an HF ``config.json`` (file, directory holding one, or dict)."""
        src = "config dict"
        if isinstance(path_or_dict, dict):
            d = dict(path_or_dict)
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            src = str(p)
            if not p.is_file():
                raise FileNotFoundError(f"{src}: no such config file")
            d = json.loads(p.read_text())
        try:
            return cls._from_dict(d)
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None

    @classmethod
    def _from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in TOLERATED_KEYS)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        required = [f.name for f in fields(cls) if f.default is _MISSING_DEFAULT and
                    f.default_factory is _MISSING_DEFAULT]  # type: ignore[misc]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"missing config keys {missing}")
        kw = {k: v for k, v in d.items() if k in names}
        rs = kw.get("rope_scaling")
        kw["rope_scaling"] = RopeScaling.from_dict(rs) if isinstance(rs, dict) else None
        qc = kw.get("quantization_config")
        kw["quantization_config"] = _freeze(qc) if qc is not None else None
        kw["compress_ratios"] = tuple(kw["compress_ratios"])
        if isinstance(kw.get("eos_token_id"), list):
            raise ValueError("eos_token_id lists are not supported")
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """The HF ``config.json`` dict (architectures/model_type added)."""
        d: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "rope_scaling":
                v = v.to_dict() if v is not None else None
            elif f.name == "quantization_config":
                if v is None:
                    continue
                v = _thaw(v)
            elif f.name == "expert_dtype" and v is None:
                continue
            elif f.name == "compress_ratios":
                v = list(v)
            d[f.name] = v
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def with_(self, **kw) -> "ModelConfig":
        """A copy with some fields replaced (validated again)."""
        return replace(self, **kw)

    # ------------------------------------------------------------------ parameter counts
    def param_counts(self, include_mtp: bool = False) -> dict[str, int]:
        """Parameter count per component (spec §1.4); tid2eid tables are routing state, not counted."""
        D, H, c, E = self.hidden_size, self.num_attention_heads, self.head_dim, self.n_routed_experts
        I, hc = self.moe_intermediate_size, self.hc_mult
        n_hc = (2 + hc) * hc
        out = dict(routed_experts=0, attention=0, shared_experts=0, compressors=0, indexers=0, router=0,
                   mhc=0, norms=0)
        layers = list(range(self.num_hidden_layers))
        if include_mtp:
            layers += [self.num_hidden_layers + j for j in range(self.num_nextn_predict_layers)]
        for li in layers:
            r = self.compress_ratios[li]
            out["routed_experts"] += E * 3 * I * D
            out["attention"] += (D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * c + D * c + c
                                 + self.o_groups * self.o_lora_rank * (H * c // self.o_groups)
                                 + D * self.o_groups * self.o_lora_rank + H)
            out["shared_experts"] += self.n_shared_experts * 3 * I * D
            if r:
                coff = 2 if r == 4 else 1
                out["compressors"] += 2 * coff * c * D + r * coff * c + c
            if r == 4:
                ci = self.index_head_dim
                out["indexers"] += (self.index_n_heads * ci * self.q_lora_rank + self.index_n_heads * D
                                    + 2 * 2 * ci * D + r * 2 * ci + ci)
            out["router"] += E * D + (0 if (li < self.num_hidden_layers and self.is_hash_layer(li)) else E)
            out["mhc"] += 2 * (n_hc * hc * D + n_hc + 3)
            out["norms"] += 2 * D
            if li >= self.num_hidden_layers:  # MTP extras: e_proj, h_proj, enorm, hnorm, norm, hc_head
                out["mtp_extra"] = out.get("mtp_extra", 0) + 2 * D * D + 3 * D + hc * hc * D + hc + 1
        out["embed"] = self.vocab_size * D
        out["head"] = 0 if self.tie_word_embeddings else self.vocab_size * D
        out["mhc"] += hc * hc * D + hc + 1
        out["norms"] += D
        out["total"] = sum(out.values())
        return out

    def num_parameters(self, include_mtp: bool = False) -> int:
        return self.param_counts(include_mtp)["total"]

    def num_active_parameters(self) -> int:
        """Parameters touched per token (main model): one embedding row, top-k of the routed experts."""
        pc = self.param_counts(False)
        per_expert = 3 * self.moe_intermediate_size * self.hidden_size
        inactive = (self.n_routed_experts - self.num_experts_per_tok) * per_expert * self.num_hidden_layers
        return pc["total"] - inactive - pc["embed"] + self.hidden_size

    # ------------------------------------------------------------------ presets
    @classmethod
    def v4_flash(cls) -> "ModelConfig":
        """DeepSeek-V4-Flash exactly as released (spec §1.1, current revision)."""
        return cls(
            vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
            qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128,
            compress_ratios=(0, 0) + (4, 128) * 20 + (4, 0), compress_rope_theta=160000.0, rope_theta=10000.0,
            rope_scaling=RopeScaling(16.0, 65536, 32.0, 1.0), max_position_embeddings=1048576,
            index_n_heads=64, index_head_dim=128, index_topk=512, n_routed_experts=256, n_shared_experts=1,
            num_experts_per_tok=6, moe_intermediate_size=2048, num_hash_layers=3, routed_scaling_factor=1.5,
            swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, num_nextn_predict_layers=1,
            rms_norm_eps=1e-6, quantization_config=_freeze({
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
                "weight_block_size": [128, 128]}),
            expert_dtype="fp4",
        )

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """Small CPU config with every path alive: sliding / CSA (4) / HCA (8) layers, 2 hash layers,
        shared expert, 16 experts, mHC 4 streams, 1 MTP layer; satisfies ``lowp_problems() == []``."""
        return cls(
            vocab_size=512, hidden_size=256, num_hidden_layers=5, num_attention_heads=4, head_dim=128,
            qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128, sliding_window=8,
            compress_ratios=(0, 4, 8, 4, 8, 0), compress_rope_theta=160000.0, rope_theta=10000.0,
            rope_scaling=RopeScaling(4.0, 256, 32.0, 1.0), max_position_embeddings=1024,
            index_n_heads=4, index_head_dim=64, index_topk=4, n_routed_experts=16, n_shared_experts=1,
            num_experts_per_tok=2, moe_intermediate_size=128, num_hash_layers=2, routed_scaling_factor=1.5,
            swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, num_nextn_predict_layers=1,
        )

    @classmethod
    def embedded(cls) -> "ModelConfig":
        """The small model this project trains and ships in ``data/tiny-v4`` (upstream format,
        MXFP4 experts + FP8 attention, < 25 MB)."""
        return cls(
            vocab_size=4096, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, head_dim=128,
            qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128, sliding_window=32,
            compress_ratios=(0, 0, 4, 16, 4, 16, 0), compress_rope_theta=160000.0, rope_theta=10000.0,
            rope_scaling=RopeScaling(4.0, 1024, 32.0, 1.0), max_position_embeddings=4096,
            index_n_heads=4, index_head_dim=64, index_topk=16, n_routed_experts=32, n_shared_experts=1,
            num_experts_per_tok=4, moe_intermediate_size=128, num_hash_layers=2, routed_scaling_factor=1.5,
            swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, num_nextn_predict_layers=1,
            quantization_config=_freeze({
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
                "weight_block_size": [128, 128]}),
            expert_dtype="fp4",
        )


from dataclasses import MISSING as _MISSING_DEFAULT  # noqa: E402


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple((k, _freeze(x)) for k, x in v.items())
    if isinstance(v, list):
        return ("__list__",) + tuple(_freeze(x) for x in v)
    if not isinstance(v, _SCALAR_TYPES):
        raise ValueError(f"unsupported value {v!r} in quantization_config")
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple):
        if v and v[0] == "__list__":
            return [_thaw(x) for x in v[1:]]
        return {k: _thaw(x) for k, x in v}
    return v
