"""The INT2 g64 expert directory (ARCHITECTURE.md "The INT2 g64 on-disk format", a fixed contract).

``layer_{NN:02d}.safetensors`` per MoE layer holds ``{p}.w_packed`` uint32 ``[E, out, in/16]``,
``{p}.w_scale`` fp16 ``[E, out, in/64]``, ``{p}.w_zero_packed`` int8 ``[E, out, in/128]`` for
p in w1, w3, w2. ``manifest.json`` records format version, group size, bit order, the config hash of
the source release, per-file sha256 and the library version; ``quant_stats.json`` collects per-layer
statistics. Every file is written atomically; a layer counts as done only once the manifest lists it
with a matching sha256, so an interrupted run resumes cleanly.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import torch
from safetensors import safe_open

from dsv4lib.checkpoint import atomic
from dsv4lib.checkpoint.errors import CheckpointError, Problem
from dsv4lib.checkpoint.schema import expert_shapes
from dsv4lib.formats import int2

FORMAT = "dsv4-int2-g64"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATS = "quant_stats.json"
PROJS = ("w1", "w3", "w2")
KEYS = ("w_packed", "w_scale", "w_zero_packed")
BIT_ORDER = "lsb-first: code j of each 16-run along K_in in bits [2j, 2j+2) of a uint32"
ZERO_ORDER = "group 2i in the low nibble, 2i+1 in the high nibble"


def layer_file(layer: int) -> str:
    return f"layer_{layer:02d}.safetensors"


def config_hash(config) -> str:
    """sha256 of the canonical (sorted-keys) HF config dict."""
    return hashlib.sha256(json.dumps(config.to_hf_dict(), sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def library_version() -> str:
    try:
        return metadata.version("dsv4lib")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def expected_layer_shapes(config, group_size: int = int2.GROUP) -> dict[str, dict[str, tuple]]:
    """``{p: {key: (shape, dtype)}}`` of one layer file for ``config``."""
    E = config.n_routed_experts
    return {p: int2.packed_shapes(*expert_shapes(config)[p], group_size, (E,)) for p in PROJS}


def _find(keys: set[str], p: str, k: str) -> str | None:
    """``{p}.{k}`` or ``{p}_{k}``; else a unique key ending in one of them after a prefix
    (e.g. ``layers.3.ffn.experts.w1.w_packed``)."""
    for cand in (f"{p}.{k}", f"{p}_{k}"):
        if cand in keys:
            return cand
    hits = [n for n in keys if any(n.endswith(sep + c) for c in (f"{p}.{k}", f"{p}_{k}") for sep in "._")]
    return hits[0] if len(hits) == 1 else None


class Int2Store:
    """Reader/writer of one INT2 directory for one source config."""

    def __init__(self, root: str | Path, config, group_size: int = int2.GROUP):
        self.root = Path(root)
        self.config = config
        self.group_size = group_size
        self.hash = config_hash(config)

    # ------------------------------------------------------------------ manifest / stats
    def manifest(self) -> dict | None:
        p = self.root / MANIFEST
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(Problem(str(p), "", f"unreadable manifest ({e})")) from None

    def _new_manifest(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "group_size": self.group_size, "bits": 2,
                "bit_order": BIT_ORDER, "zero_order": ZERO_ORDER, "config_hash": self.hash,
                "num_layers": self.config.num_hidden_layers, "num_experts": self.config.n_routed_experts,
                "library_version": library_version(), "files": {}}

    def _checked_manifest(self) -> dict | None:
        m = self.manifest()
        if m is None:
            return None
        path = str(self.root / MANIFEST)
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(Problem(path, "", f"format {m.get('format')!r} v{m.get('format_version')}, "
                                                    f"expected {FORMAT!r} v{FORMAT_VERSION}"))
        if m.get("group_size") != self.group_size:
            raise CheckpointError(Problem(path, "", f"group_size {m.get('group_size')}, expected {self.group_size}"))
        if m.get("config_hash") != self.hash:
            raise CheckpointError(Problem(path, "", "config_hash does not match this config "
                                                    "(INT2 dir made from a different release)"))
        return m

    def stats(self) -> dict:
        p = self.root / STATS
        return json.loads(p.read_text()) if p.is_file() else {"layers": {}}

    # ------------------------------------------------------------------ write
    def has_layer(self, layer: int) -> bool:
        """True if the layer file exists and matches the sha256 recorded in the manifest."""
        m = self._checked_manifest()
        f = layer_file(layer)
        entry = (m or {}).get("files", {}).get(f)
        path = self.root / f
        return entry is not None and path.is_file() and file_sha256(path) == entry["sha256"]

    def write_layer(self, layer: int, tensors: dict[str, dict[str, torch.Tensor]],
                    stats: dict | None = None) -> Path:
        """Atomically write ``layer_NN.safetensors`` from ``{p: {w_packed, w_scale, w_zero_packed}}``,
        then record its sha256 in the manifest and merge ``stats`` into ``quant_stats.json``."""
        self._check_tensors(layer, tensors, str(self.root / layer_file(layer)))
        flat = {f"{p}.{k}": tensors[p][k].detach().cpu().contiguous() for p in PROJS for k in KEYS}
        path = atomic.save_safetensors(self.root / layer_file(layer), flat,
                                       metadata={"format": "pt"})  # one key: safetensors orders metadata randomly
        m = self._checked_manifest() or self._new_manifest()
        m["library_version"] = library_version()
        m["files"][path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size, "layer": layer}
        m["files"] = dict(sorted(m["files"].items()))
        atomic.write_json(self.root / MANIFEST, m)
        if stats is not None:
            s = self.stats()
            s.setdefault("layers", {})[str(layer)] = stats
            s["layers"] = dict(sorted(s["layers"].items(), key=lambda kv: int(kv[0])))
            atomic.write_json(self.root / STATS, s)
        return path

    # ------------------------------------------------------------------ read
    def layers(self) -> list[int]:
        """Layer indices with a file in the directory."""
        out = []
        for p in self.root.glob("layer_*.safetensors"):
            try:
                out.append(int(p.stem.split("_", 1)[1]))
            except ValueError:
                continue
        return sorted(out)

    def read_layer(self, layer: int, verify_sha: bool = True,
                   device: str | torch.device = "cpu") -> dict[str, dict[str, torch.Tensor]]:
        """Load and check one layer file; returns ``{p: {w_packed, w_scale, w_zero_packed}}``."""
        path = self.root / layer_file(layer)
        if not path.is_file():
            raise CheckpointError(Problem(str(path), "", "INT2 layer file missing"))
        m = self._checked_manifest()
        if verify_sha and m is not None:
            entry = m.get("files", {}).get(path.name)
            if entry is None:
                raise CheckpointError(Problem(str(path), "", "not listed in manifest.json (incomplete write?)"))
            if file_sha256(path) != entry["sha256"]:
                raise CheckpointError(Problem(str(path), "", "sha256 does not match manifest.json"))
        try:
            f = safe_open(str(path), framework="pt", device=str(device))
            keys = set(f.keys())
        except Exception as e:
            raise CheckpointError(Problem(str(path), "", f"unreadable or truncated file ({e})")) from None
        out: dict[str, dict[str, torch.Tensor]] = {}
        problems = []
        for p in PROJS:
            out[p] = {}
            for k in KEYS:
                name = _find(keys, p, k)
                if name is None:
                    problems.append(Problem(str(path), f"{p}.{k}",
                                            f"missing (also tried {p}_{k}); file has {sorted(keys)[:12]}"))
                    continue
                t = f.get_tensor(name)
                if k == "w_packed" and t.dtype == torch.int32:
                    t = t.view(torch.uint32)
                if k == "w_zero_packed" and t.dtype == torch.uint8:
                    t = t.view(torch.int8)
                out[p][k] = t
        if problems:
            raise CheckpointError(problems)
        self._check_tensors(layer, out, str(path))
        return out

    def _check_tensors(self, layer: int, tensors: dict, where: str) -> None:
        problems = []
        exp = expected_layer_shapes(self.config, self.group_size)
        for p in PROJS:
            for k, (shape, dtype) in exp[p].items():
                t = tensors.get(p, {}).get(k)
                if t is None:
                    problems.append(Problem(where, f"{p}.{k}", "missing"))
                    continue
                if t.dtype != dtype or tuple(t.shape) != shape:
                    problems.append(Problem(where, f"{p}.{k}", f"{t.dtype}{list(t.shape)}, expected "
                                                               f"{dtype}{list(shape)} (layer {layer})"))
                elif k == "w_scale" and not bool(torch.isfinite(t).all()):
                    problems.append(Problem(where, f"{p}.{k}", "scale holds NaN/Inf"))
        if problems:
            raise CheckpointError(problems)


def write_int2_layer(root: str | Path, config, layer: int, tensors: dict, stats: dict | None = None,
                     group_size: int = int2.GROUP) -> Path:
    """Functional form of :meth:`Int2Store.write_layer`."""
    return Int2Store(root, config, group_size).write_layer(layer, tensors, stats)


def read_int2_layer(root: str | Path, config, layer: int, verify_sha: bool = True,
                    group_size: int = int2.GROUP) -> dict[str, dict[str, torch.Tensor]]:
    """Functional form of :meth:`Int2Store.read_layer`."""
    return Int2Store(root, config, group_size).read_layer(layer, verify_sha)
