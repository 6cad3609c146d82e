"""``save_release``: write a model in the exact upstream release format (spec v4_arch §3.1-§3.3).

Names and dtypes come from :func:`expected_tensors`; FP8 tensors are block-quantized (E8M0 scales for
Flash, F32 for Base), routed experts become per-expert MXFP4 tensors ``layers.i.ffn.experts.{e}.w1.weight``
(I8) + ``.scale`` (E8M0), BF16/F32 tensors are cast, ``tid2eid`` stays I64. Shards follow the upstream
layout (embed / one per layer / head+norm+hc_head / MTP), plus ``model.safetensors.index.json`` and
``config.json``. Every file is written atomically.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dsv4lib.checkpoint import atomic
from dsv4lib.checkpoint.reader import INDEX
from dsv4lib.checkpoint.schema import DTYPES, TensorSpec, expected_tensors, release_format
from dsv4lib.formats import e8m0, fp8, mxfp4

ShardLayout = str | Callable[[TensorSpec], str]


def _file_for(layout: ShardLayout, row: TensorSpec) -> str:
    if callable(layout):
        return layout(row)
    if layout == "upstream":
        return row.file
    if layout == "single":
        return "model-00001-of-00001.safetensors"
    raise ValueError(f"unknown shard_layout {layout!r} (use 'upstream', 'single' or a callable)")


def _fp8_pair(w: torch.Tensor, scale: torch.Tensor | None, scale_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, release scale) from a model weight that is float or already FP8 + fp32 scale."""
    if w.dtype == torch.float8_e4m3fn and scale is not None:
        if scale_format == "f32":
            return w, scale.float()
        try:  # FP8 weight with power-of-two scales: store bit-exactly
            return w, e8m0.encode(scale.float()).view(torch.float8_e8m0fnu)
        except ValueError:
            return fp8.quantize_block(fp8.dequantize_block(w, scale), scale_format)
    return fp8.quantize_block(w.float(), scale_format)


def _expert_tensors(backend: nn.Module, prefix: str, fmt) -> dict[str, torch.Tensor]:
    """Per-expert release tensors of one MoE layer's backend (quantised as one stack per projection)."""
    out: dict[str, torch.Tensor] = {}
    E = backend.num_experts
    for proj in ("w1", "w3", "w2"):
        if fmt.expert == "fp4" and hasattr(backend, f"{proj}_blocks"):  # MXFP4 already: copy bit-exactly
            blocks = getattr(backend, f"{proj}_blocks").view(torch.int8)  # [E, out, in/2]
            scales = getattr(backend, f"{proj}_scales")  # [E, out, in/32]
        else:
            if isinstance(getattr(backend, proj, None), torch.Tensor):
                w = getattr(backend, proj).detach().float()  # [E, out, in]
            else:
                k = ("w1", "w3", "w2").index(proj)
                w = torch.stack([backend.dequantize_expert(e)[k] for e in range(E)])
            if fmt.expert == "fp4":
                blocks, scales = mxfp4.quantize(w)
            else:
                pairs = [fp8.quantize_block(w[e], fmt.scale) for e in range(E)]
                blocks, scales = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        if fmt.expert == "fp4":
            scales = scales.view(torch.float8_e8m0fnu)
        for e in range(E):
            out[f"{prefix}.ffn.experts.{e}.{proj}.weight"] = blocks[e].clone()  # own storage (safetensors)
            out[f"{prefix}.ffn.experts.{e}.{proj}.scale"] = scales[e].clone()
    return out


def release_tensors(model: nn.Module, config=None) -> dict[str, torch.Tensor]:
    """Every release tensor of ``model`` (name -> tensor in release dtype), in schema order."""
    config = config or model.config
    fmt = release_format(config)
    state = model.state_dict()
    rows = expected_tensors(config)
    out: dict[str, torch.Tensor] = {}
    done_layers: set[str] = set()
    for row in rows:
        n = row.name
        if n in out:
            continue
        if ".ffn.experts." in n:
            prefix = n.split(".ffn.experts.")[0]
            if prefix not in done_layers:
                out.update(_expert_tensors(model.get_submodule(prefix + ".ffn.experts"), prefix, fmt))
                done_layers.add(prefix)
            continue
        if row.dtype == "F8_E4M3":
            base = n[: -len(".weight")]
            if n not in state:
                raise KeyError(f"save_release: model has no parameter {n!r} (needed by the release schema)")
            out[n], out[base + ".scale"] = _fp8_pair(state[n], state.get(base + ".scale"), fmt.scale)
            continue
        if n not in state:
            raise KeyError(f"save_release: model has no parameter/buffer {n!r} (needed by the release schema)")
        out[n] = state[n].detach().to(DTYPES[row.dtype])
    for row in rows:  # shapes must match the schema exactly
        if tuple(out[row.name].shape) != row.shape:
            raise ValueError(f"save_release: {row.name} has shape {tuple(out[row.name].shape)}, "
                             f"schema says {row.shape}")
    return out


def save_release(model: nn.Module, out_dir: str | Path, shard_layout: ShardLayout = "upstream",
                 config=None) -> Path:
    """Write ``model`` as an upstream-format release into ``out_dir`` (created); returns the dir."""
    config = config or model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = expected_tensors(config)
    tensors = release_tensors(model, config)
    files: dict[str, dict[str, torch.Tensor]] = {}
    weight_map: dict[str, str] = {}
    for row in rows:
        f = _file_for(shard_layout, row)
        files.setdefault(f, {})[row.name] = tensors[row.name].cpu()
        weight_map[row.name] = f
    for f, ts in files.items():
        atomic.save_safetensors(out_dir / f, ts, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic.write_json(out_dir / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic.write_json(out_dir / "config.json", config.to_hf_dict())
    return out_dir


@torch.no_grad()
def apply_release_rounding(model: nn.Module, config=None) -> nn.Module:
    """Round ``model``'s float weights in place exactly as a ``save_release`` round trip would
    (FP8 block quantisation, MXFP4 routed experts, BF16 casts), keeping them in float.

    Afterwards ``load_model(save_release(model))`` computes the same function as ``model``.
    Requires dense routed experts (``DenseExperts``).
    """
    config = config or model.config
    fmt = release_format(config)
    tensors = release_tensors(model, config)
    state = model.state_dict()
    for row in expected_tensors(config):
        n, t = row.name, tensors[row.name]
        if n.endswith(".scale"):
            continue
        if ".ffn.experts." in n:
            prefix, rest = n.split(".ffn.experts.")
            e, proj = int(rest.split(".")[0]), rest.split(".")[1]
            sc = tensors[n[: -len("weight")] + "scale"]
            w = mxfp4.dequantize(t, sc) if fmt.expert == "fp4" else fp8.dequantize_block(t, sc)
            getattr(model.get_submodule(prefix + ".ffn.experts"), proj)[e].copy_(w)
        elif row.dtype == "F8_E4M3":
            w = fp8.dequantize_block(t, tensors[n[: -len("weight")] + "scale"])
            if state[n].dtype == torch.float8_e4m3fn:
                continue  # already FP8 in the model: stored bit-exactly
            state[n].copy_(w)
        else:
            state[n].copy_(t)
    return model
