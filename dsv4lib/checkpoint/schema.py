"""The upstream release schema: every tensor name, dtype, shape and shard file (spec v4_arch §3.1-§3.3).

``expected_tensors(config)`` generates the rows for any ``ModelConfig``; for ``ModelConfig.v4_flash()``
it reproduces the audited release exactly (69,187 tensors, 159,609,485,896 bytes incl. MTP).
Names carry no ``model.`` prefix; per layer ``layers.{i}.``, MTP ``mtp.{j}.``.

Release flavour (spec §1.2/§3.3) follows ``config.expert_dtype``: ``"fp4"`` (Flash; also when the key
is absent) = MXFP4 routed experts (I8 + per-32 E8M0 scales) and E8M0 FP8 block scales;
``"fp8"`` (Flash-Base) = FP8 routed experts and F32 block scales everywhere.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

BLOCK = 128
MX_BLOCK = 32
PROJS = ("w1", "w2", "w3")

# safetensors dtype string -> torch dtype (the subset the release uses, plus the INT2 store's)
DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu, "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8,
    "U32": torch.uint32, "I32": torch.int32,
}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One release tensor: ``name`` (upstream), safetensors ``dtype`` string, ``shape``, shard ``file``."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class ReleaseFormat:
    """Which flavour of the release a config describes (spec §3.3)."""
    expert: str  # "fp4" (MXFP4 I8 + E8M0 per 32) or "fp8" (e4m3 + 128x128 block scales)
    scale: str   # "e8m0" or "f32": dtype of every 128x128 block scale

    @property
    def scale_dtype(self) -> str:
        return "F8_E8M0" if self.scale == "e8m0" else "F32"


def release_format(config) -> ReleaseFormat:
    """Flash (``expert_dtype`` "fp4" or absent) or Flash-Base (``"fp8"``)."""
    ed = getattr(config, "expert_dtype", None) or "fp4"
    if ed == "fp4":
        return ReleaseFormat("fp4", "e8m0")
    if ed == "fp8":
        return ReleaseFormat("fp8", "f32")
    raise ValueError(f"config.expert_dtype={ed!r}: expected 'fp4' or 'fp8'")


def shard_name(k: int, n: int) -> str:
    """Upstream shard file name, 1-based ``k`` of ``n``."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def num_shards(config) -> int:
    """embed + one per layer + head/norm/hc_head + one per MTP layer (46 for V4-Flash)."""
    return 1 + config.num_hidden_layers + 1 + config.num_nextn_predict_layers


def layer_prefix(config, layer: int) -> str:
    """``layers.{i}.`` for main layers, ``mtp.{j}.`` for layer index ``n_layers + j``."""
    n = config.num_hidden_layers
    return f"layers.{layer}." if layer < n else f"mtp.{layer - n}."


def layer_shard(config, layer: int) -> str:
    """Shard file holding layer ``layer`` (MTP layers after the head shard)."""
    n, tot = config.num_hidden_layers, num_shards(config)
    k = 2 + layer if layer < n else 3 + layer
    return shard_name(k, tot)


def _fp8(rows: list, name: str, shape: tuple[int, int], fmt: ReleaseFormat, file: str) -> None:
    rows.append(TensorSpec(name + ".weight", "F8_E4M3", shape, file))
    rows.append(TensorSpec(name + ".scale", fmt.scale_dtype,
                           (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)), file))


def expert_shapes(config) -> dict[str, tuple[int, int]]:
    """Logical ``[out, in]`` of one routed expert's w1/w2/w3."""
    D, I = config.hidden_size, config.moe_intermediate_size
    return {"w1": (I, D), "w2": (D, I), "w3": (I, D)}


def layer_tensors(config, layer: int, fmt: ReleaseFormat | None = None,
                  file: str | None = None) -> list[TensorSpec]:
    """Rows of one transformer block (main layer or MTP layer ``n_layers + j``), spec §3.2."""
    fmt = fmt or release_format(config)
    file = file or layer_shard(config, layer)
    L = layer_prefix(config, layer)
    D, H, c = config.hidden_size, config.num_attention_heads, config.head_dim
    hc, E = config.hc_mult, config.n_routed_experts
    n_hc = (2 + hc) * hc
    r = config.compress_ratios[layer]
    rows: list[TensorSpec] = []
    add = lambda n, dt, sh: rows.append(TensorSpec(L + n, dt, tuple(sh), file))  # noqa: E731
    add("attn_norm.weight", "BF16", (D,))
    add("ffn_norm.weight", "BF16", (D,))
    for part in ("attn", "ffn"):
        add(f"hc_{part}_fn", "F32", (n_hc, hc * D))
        add(f"hc_{part}_base", "F32", (n_hc,))
        add(f"hc_{part}_scale", "F32", (3,))
    add("attn.attn_sink", "F32", (H,))
    _fp8(rows, L + "attn.wq_a", (config.q_lora_rank, D), fmt, file)
    add("attn.q_norm.weight", "BF16", (config.q_lora_rank,))
    _fp8(rows, L + "attn.wq_b", (H * c, config.q_lora_rank), fmt, file)
    _fp8(rows, L + "attn.wkv", (config.num_key_value_heads * c, D), fmt, file)
    add("attn.kv_norm.weight", "BF16", (c,))
    og = config.o_groups * config.o_lora_rank
    _fp8(rows, L + "attn.wo_a", (og, H * c // config.o_groups), fmt, file)
    _fp8(rows, L + "attn.wo_b", (D, og), fmt, file)
    if r:
        coff = 2 if r == 4 else 1  # CSA compresses overlapping windows (two halves)
        add("attn.compressor.wkv.weight", "BF16", (coff * c, D))
        add("attn.compressor.wgate.weight", "BF16", (coff * c, D))
        add("attn.compressor.ape", "F32", (r, coff * c))
        add("attn.compressor.norm.weight", "BF16", (c,))
    if r == 4:
        ci, hi = config.index_head_dim, config.index_n_heads
        _fp8(rows, L + "attn.indexer.wq_b", (hi * ci, config.q_lora_rank), fmt, file)
        add("attn.indexer.weights_proj.weight", "BF16", (hi, D))
        add("attn.indexer.compressor.wkv.weight", "BF16", (2 * ci, D))
        add("attn.indexer.compressor.wgate.weight", "BF16", (2 * ci, D))
        add("attn.indexer.compressor.ape", "F32", (r, 2 * ci))
        add("attn.indexer.compressor.norm.weight", "BF16", (ci,))
    add("ffn.gate.weight", "BF16", (E, D))
    if layer < config.num_hidden_layers and layer < config.num_hash_layers:
        add("ffn.gate.tid2eid", "I64", (config.vocab_size, config.num_experts_per_tok))
    else:
        add("ffn.gate.bias", "F32", (E,))
    if config.n_shared_experts:
        Is = config.moe_intermediate_size * config.n_shared_experts
        _fp8(rows, L + "ffn.shared_experts.w1", (Is, D), fmt, file)
        _fp8(rows, L + "ffn.shared_experts.w2", (D, Is), fmt, file)
        _fp8(rows, L + "ffn.shared_experts.w3", (Is, D), fmt, file)
    shapes = expert_shapes(config)
    for e in range(E):
        for p in PROJS:
            out, inp = shapes[p]
            name = f"{L}ffn.experts.{e}.{p}"
            if fmt.expert == "fp4":
                rows.append(TensorSpec(name + ".weight", "I8", (out, inp // 2), file))
                rows.append(TensorSpec(name + ".scale", "F8_E8M0", (out, inp // MX_BLOCK), file))
            else:
                _fp8(rows, name, (out, inp), fmt, file)
    if layer >= config.num_hidden_layers:  # MTP extras (spec §2.9)
        _fp8(rows, L + "e_proj", (D, D), fmt, file)
        _fp8(rows, L + "h_proj", (D, D), fmt, file)
        for nm in ("enorm", "hnorm", "norm"):
            add(f"{nm}.weight", "BF16", (D,))
        add("hc_head_fn", "F32", (hc, hc * D))
        add("hc_head_base", "F32", (hc,))
        add("hc_head_scale", "F32", (1,))
    return rows


def expected_tensors(config, include_mtp: bool = True) -> list[TensorSpec]:
    """All release tensors of ``config`` as ``TensorSpec(name, dtype, shape, file)`` rows, in shard order."""
    fmt = release_format(config)
    n, tot = config.num_hidden_layers, num_shards(config)
    D, V, hc = config.hidden_size, config.vocab_size, config.hc_mult
    rows = [TensorSpec("embed.weight", "BF16", (V, D), shard_name(1, tot))]
    for i in range(n):
        rows += layer_tensors(config, i, fmt)
    head = shard_name(n + 2, tot)
    rows += [TensorSpec("head.weight", "BF16", (V, D), head), TensorSpec("norm.weight", "BF16", (D,), head),
             TensorSpec("hc_head_fn", "F32", (hc, hc * D), head), TensorSpec("hc_head_base", "F32", (hc,), head),
             TensorSpec("hc_head_scale", "F32", (1,), head)]
    if include_mtp:
        for j in range(config.num_nextn_predict_layers):
            rows += layer_tensors(config, n + j, fmt)
    return rows


def total_bytes(rows: list[TensorSpec]) -> int:
    return sum(r.nbytes for r in rows)


def dtype_histogram(rows: list[TensorSpec]) -> dict[str, int]:
    return dict(Counter(r.dtype for r in rows))


def is_routed_expert(name: str) -> bool:
    """True for ``….ffn.experts.{e}.w{1,2,3}.{weight,scale}`` (not the shared expert)."""
    return ".ffn.experts." in name
