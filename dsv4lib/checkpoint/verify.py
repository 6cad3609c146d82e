"""Check an INT2 dir against the upstream release (ARCHITECTURE.md: the published INT2 card does not
pin the bit order, so we measure which packing convention reproduces the release's experts).

For sampled experts of each layer the INT2 weights are dequantised under every plausible convention
(code order inside the uint32: LSB-first = contract / MSB-first; zero nibble order: even group in
the low = contract / high nibble; zero offset 0 = contract / +1 as in some GPTQ exports) and compared
with the same experts decoded from the release (MXFP4, or FP8 for Flash-Base): relative Frobenius
error and Pearson correlation per layer and projection. The convention with the lowest mean error wins.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv4lib.checkpoint.int2_store import PROJS, Int2Store
from dsv4lib.checkpoint.reader import ReleaseReader
from dsv4lib.checkpoint.schema import layer_prefix, release_format
from dsv4lib.formats import fp8, int2, mxfp4


@dataclass(frozen=True)
class Convention:
    """How the INT2 tensors are to be read: code order, zero nibble order, zero offset."""
    order: str = "lsb"
    zero_order: str = "low"
    zero_offset: int = 0

    @property
    def label(self) -> str:
        return f"codes {self.order}-first, zeros {self.zero_order}-nibble-first, zero+{self.zero_offset}"


CONTRACT = Convention()
CONVENTIONS = tuple(Convention(o, z, k) for o, z, k in
                    itertools.product(int2.CODE_ORDERS, int2.ZERO_ORDERS, (0, 1)))


@dataclass(frozen=True)
class Match:
    """Error of one (layer, projection) under one convention, over the sampled experts."""
    layer: int
    proj: str
    convention: Convention
    rel_err: float
    corr: float


@dataclass
class VerifyReport:
    matches: list[Match]
    experts: dict[int, list[int]]
    max_rel_err: float
    scores: dict[Convention, float] = field(init=False)

    def __post_init__(self) -> None:
        acc: dict[Convention, list[float]] = {}
        for m in self.matches:
            acc.setdefault(m.convention, []).append(m.rel_err)
        self.scores = {c: sum(v) / len(v) for c, v in acc.items()}

    @property
    def best(self) -> Convention:
        return min(self.scores, key=self.scores.get)

    def rows(self, convention: Convention | None = None) -> list[Match]:
        c = convention or self.best
        return [m for m in self.matches if m.convention == c]

    @property
    def ok(self) -> bool:
        """The contract convention fits best and every layer/projection is within ``max_rel_err``."""
        return self.best == CONTRACT and all(m.rel_err <= self.max_rel_err for m in self.rows(CONTRACT))

    def table(self) -> str:
        lines = ["convention                                           mean rel.err"]
        for c, s in sorted(self.scores.items(), key=lambda kv: kv[1]):
            mark = "  <- best" if c == self.best else ""
            lines.append(f"  {c.label:<50} {s:8.4f}{mark}")
        lines.append(f"per layer/projection under the best convention ({self.best.label}):")
        lines.append("  layer proj   rel.err    corr")
        for m in self.rows():
            flag = "" if m.rel_err <= self.max_rel_err else "  !"
            lines.append(f"  {m.layer:5d} {m.proj:4s} {m.rel_err:9.4f} {m.corr:7.4f}{flag}")
        verdict = "OK: INT2 dir matches the release under the contract convention" if self.ok else \
            "MISMATCH: " + ("best convention is not the contract" if self.best != CONTRACT
                            else f"relative error above {self.max_rel_err}")
        lines.append(verdict)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "best": self.best.label, "max_rel_err": self.max_rel_err,
                "scores": {c.label: s for c, s in self.scores.items()},
                "experts": {str(k): v for k, v in self.experts.items()},
                "rows": [{"layer": m.layer, "proj": m.proj, "convention": m.convention.label,
                          "rel_err": m.rel_err, "corr": m.corr} for m in self.matches]}


def dequantize_as(t: dict[str, torch.Tensor], e: int, conv: Convention, group_size: int) -> torch.Tensor:
    """Expert ``e`` of one projection's INT2 tensors read under ``conv`` -> fp32 ``[out, in]``."""
    q = int2.unpack_codes(t["w_packed"][e], conv.order)
    z = int2.unpack_zeros(t["w_zero_packed"][e], conv.zero_order).float() + conv.zero_offset
    return int2.dequantize_codes(q, t["w_scale"][e], z, group_size)


def _release_expert(reader: ReleaseReader, prefix: str, e: int, proj: str, expert_fmt: str) -> torch.Tensor:
    base = f"{prefix}ffn.experts.{e}.{proj}"
    w, s = reader.get(base + ".weight"), reader.get(base + ".scale")
    return mxfp4.dequantize(w, s) if expert_fmt == "fp4" else fp8.dequantize_block(w, s)


def _metrics(w: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    rel = float((w - ref).norm() / ref.norm().clamp_min(1e-30))
    a, b = w.flatten() - w.mean(), ref.flatten() - ref.mean()
    corr = float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))
    return rel, corr


def sample_experts(num_experts: int, n: int) -> list[int]:
    """``n`` evenly spaced expert indices (all when ``n >= num_experts``)."""
    if n >= num_experts:
        return list(range(num_experts))
    return sorted({round(i * (num_experts - 1) / max(n - 1, 1)) for i in range(n)})


def verify_int2(ref_dir: str | Path, int2_dir: str | Path, layers: list[int] | None = None,
                experts_per_layer: int = 8, max_rel_err: float = 0.8, group_size: int = int2.GROUP,
                conventions: tuple[Convention, ...] = CONVENTIONS) -> VerifyReport:
    """Compare INT2 experts with the release's experts; see the module docstring."""
    reader = ReleaseReader(ref_dir)
    cfg = reader.config
    expert_fmt = release_format(cfg).expert
    store = Int2Store(int2_dir, cfg, group_size)
    layers = store.layers() if layers is None else list(layers)
    if not layers:
        raise ValueError(f"{int2_dir}: no INT2 layer files to verify")
    matches: list[Match] = []
    experts: dict[int, list[int]] = {}
    for li in layers:
        tensors = store.read_layer(li, verify_sha=True)
        prefix = layer_prefix(cfg, li)
        es = sample_experts(cfg.n_routed_experts, experts_per_layer)
        experts[li] = es
        for proj in PROJS:
            refs = [_release_expert(reader, prefix, e, proj, expert_fmt) for e in es]
            ref = torch.stack(refs)  # [n, out, in]
            for conv in conventions:
                w = torch.stack([dequantize_as(tensors[proj], e, conv, group_size) for e in es])
                rel, corr = _metrics(w, ref)
                matches.append(Match(li, proj, conv, rel, corr))
        reader.close()
    return VerifyReport(matches, experts, max_rel_err)
