"""Hybrid loader (spec v4_arch §3.5): non-expert weights from the release, routed experts from an
INT2 dir (``INT2Experts``) or the release's MXFP4 tensors (``MXFP4Experts``).

FP8 weights stay FP8 (``Linear.set_fp8`` with fp32 block scales), BF16/F32 tensors are copied into the
model's parameters, ``tid2eid`` stays int64. The model is built with its dense expert stacks on the
meta device, so no dense expert weight is ever materialised and nothing is dequantised up front.
Shards are streamed one at a time.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsv4lib.checkpoint.errors import CheckpointError, Problem
from dsv4lib.checkpoint.int2_store import Int2Store, layer_file
from dsv4lib.checkpoint.reader import INDEX, ReleaseReader, scale_finite
from dsv4lib.checkpoint.schema import layer_prefix, release_format
from dsv4lib.formats import fp8
from dsv4lib.formats import int2 as int2_codec


def _assign(model: nn.Module, name: str, t: torch.Tensor, file: str) -> None:
    """Copy a release tensor into the model's parameter/buffer ``name`` (model dtype, model device)."""
    mod_name, _, leaf = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
        target = getattr(mod, leaf)
    except AttributeError:
        raise CheckpointError(Problem(file, name, "no such parameter/buffer in the model")) from None
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(t.shape):
        raise CheckpointError(Problem(file, name, f"shape {list(t.shape)} does not fit the model "
                                                  f"({list(getattr(target, 'shape', []))})"))
    with torch.no_grad():
        target.copy_(t.to(target.dtype))


def load_model(ref_dir: str | Path, int2_dir: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, lowp_sim: bool = False, config=None,
               validate: bool = True, verify_sha: bool = True, load_experts: bool = True):
    """Build a ``DeepseekV4`` from a release dir (+ optional INT2 expert dir).

    ``dtype``: compute dtype of the non-FP8 parameters. ``validate`` checks the release against the
    schema first (headers only; scales are checked for NaN/Inf as they load). With ``int2_dir`` every
    main MoE layer must have an INT2 file; MTP layers without one fall back to the release's MXFP4.
    ``load_experts=False`` reads no routed expert at all and leaves each layer's dense expert stack
    on the meta device (for callers that install their own backends layer by layer, e.g. GPTQ).
    Raises :class:`CheckpointError` on bad input.
    """
    from dsv4lib.model import DeepseekV4
    from dsv4lib.model.experts import DenseExperts
    from dsv4lib.model.quantized_experts import INT2Experts, MXFP4Experts

    reader = ReleaseReader(ref_dir, config)
    cfg = reader.config
    fmt = release_format(cfg)
    if validate:
        reader.validate(check_values=False)
    store = Int2Store(int2_dir, cfg) if int2_dir is not None else None
    int2_layers = set(store.layers()) if store is not None else set()
    if store is not None:
        missing = [i for i in range(cfg.num_hidden_layers) if i not in int2_layers]
        if missing:
            raise CheckpointError([Problem(str(Path(int2_dir) / layer_file(i)), "", "INT2 layer file missing")
                                   for i in missing])

    model = DeepseekV4(cfg, dtype=dtype, device=device, expert_device="meta")
    if not any(n.startswith("mtp.") for n in reader.weight_map):
        model.mtp = nn.ModuleList()  # release without the MTP shard (e.g. Flash-Base): no MTP module
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    backends: dict[str, tuple[int, nn.Module]] = {}
    for li in range(cfg.num_hidden_layers + len(model.mtp)) if load_experts else ():
        if li in int2_layers:
            t = store.read_layer(li, verify_sha=verify_sha, device=device)
            backends[layer_prefix(cfg, li)] = (li, INT2Experts.from_tensors(t, int2_codec.GROUP))
        elif fmt.expert == "fp4":
            backends[layer_prefix(cfg, li)] = (li, MXFP4Experts(E, D, I, device=device))
        else:  # Flash-Base FP8 experts: dequantised per expert into a dense stack (small models only)
            backends[layer_prefix(cfg, li)] = (li, DenseExperts(E, D, I, dtype, device))

    names = set(reader.weight_map)
    int2_prefixes = {p for p, (_, b) in backends.items() if isinstance(b, INT2Experts)}

    def needed(name: str) -> bool:  # routed experts replaced by INT2 are never read
        if ".ffn.experts." not in name:
            return True
        return load_experts and name.split("ffn.experts.")[0] not in int2_prefixes

    loaded: set[str] = set()
    for file in reader.files:
        shard = dict(reader.iter_shard(file, [n for n, f in reader.weight_map.items() if f == file and needed(n)]))
        path = str(reader.root / file)
        for name, t in shard.items():
            if name.endswith(".scale"):
                if not scale_finite(t):
                    raise CheckpointError(Problem(path, name, "scale holds NaN/Inf"))
                continue  # consumed with its weight
            if ".ffn.experts." in name:
                prefix, rest = name.split("ffn.experts.")
                e, proj = int(rest.split(".")[0]), rest.split(".")[1]
                li, backend = backends[prefix]
                sc = shard.get(name[: -len("weight")] + "scale")
                if isinstance(backend, MXFP4Experts):
                    backend.set_expert(e, proj, t.to(device), sc.to(device))
                else:
                    w = fp8.dequantize_block(t, sc).to(device, dtype)  # [out, in]
                    with torch.no_grad():
                        getattr(backend, proj)[e].copy_(w)
                continue
            if t.dtype == torch.float8_e4m3fn:
                sname = name[: -len("weight")] + "scale"
                if sname not in names:
                    raise CheckpointError(Problem(path, sname, "FP8 weight without its scale"))
                sc = shard[sname] if sname in shard else reader.get(sname)
                lin = model.get_submodule(name[: -len(".weight")])
                lin.set_fp8(t.to(device), fp8.scale_to_float(sc).to(device))
                loaded.add(name)
                continue
            _assign(model, name, t.to(device), path)
            loaded.add(name)
        del shard
    reader.close()
    for prefix, (li, backend) in backends.items():
        model.set_expert_backend(li, backend)
    state_names = {n for n in model.state_dict() if ".ffn.experts." not in n and not n.endswith(".scale")}
    if state_names - loaded:
        left = sorted(state_names - loaded)
        raise CheckpointError([Problem(str(reader.root / INDEX), n, "model tensor not found in the release")
                               for n in left])
    for p in model.parameters():
        p.requires_grad_(False)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.is_meta and (load_experts or ".ffn.experts." not in n)]
    if left:
        raise CheckpointError(Problem(str(reader.root), left[0], f"not loaded ({len(left)} tensors left on meta)"))
    if lowp_sim:
        model.set_lowp_sim(True)
    return model.eval()


_COMPONENTS = (  # (substring test in order, component)
    (".ffn.experts.", "routed_experts"), (".ffn.shared_experts.", "shared_experts"), (".ffn.gate.", "router"),
    (".attn.indexer.", "indexers"), (".attn.compressor.", "compressors"), (".attn.", "attention"),
    ("hc_", "mhc"), ("norm", "norms"), ("e_proj", "mtp_proj"), ("h_proj", "mtp_proj"),
)


def _component(name: str) -> str:
    if name.startswith("embed."):
        return "embed"
    if name.startswith("head."):
        return "head"
    for key, comp in _COMPONENTS:
        if key in name or name.startswith(key.lstrip(".")):
            return comp
    return "other"


def model_memory_report(model: nn.Module) -> dict[str, int]:
    """Resident bytes per component (parameters and buffers, each storage counted once);
    main-model components plus ``mtp`` (everything under ``mtp.``) and ``total``."""
    out: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        comp = "mtp" if name.startswith("mtp.") else _component(name)
        out[comp] = out.get(comp, 0) + t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out
