"""Tables and metrics behind the notebooks and ``python -m dsv4lib demo`` (STYLE.md §10–13).

Everything a notebook shows is computed here, from the library's own outputs:

* ``quant_stats.json`` of an INT2 dir (docs/QUANT.md) → tidy tables of reconstruction error per
  layer / projection / expert, calibration visits before and after balancing, coverage per layer
  (quant_notes.md §3.1–3.2), and the metrics dict notebook 01 records;
* one MoE layer's expert output error on held-out tokens (reference backend vs INT2 backends);
* perplexity / KL rows (:mod:`dsv4lib.eval.perplexity`) and MMLU results (:mod:`dsv4lib.eval.mmlu`)
  as tables; a fixed-prompt generation transcript (:mod:`dsv4lib.generate`).

Tables are :class:`pandas.DataFrame` in long form so :mod:`dsv4lib.plots` can draw them directly.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

PROJS = ("w1", "w3", "w2")
# Reported by the reference INT2-G64 checkpoint's card (quant_notes.md §3.2): 211 of the 256
# routed experts of each layer saw no calibration token (its router was fed proxy hidden states).
REFERENCE_COVERAGE = {"source": "reference INT2-G64 card", "experts": 256, "zero": 211}


# ------------------------------------------------------------------------------------ quant_stats
def run_folder(run_dir: str | Path | None = None) -> Path:
    """``run_dir`` or a fresh ``runs/<YYYYmmdd-HHMMSS>`` folder (created)."""
    import time

    from dsv4lib.paths import RUNS_DIR
    p = Path(run_dir) if run_dir else RUNS_DIR / time.strftime("%Y%m%d-%H%M%S")
    p.mkdir(parents=True, exist_ok=True)
    return p


def load_stats(path: str | Path | None) -> dict:
    """``quant_stats.json`` from an INT2 dir or the file itself (clear error when missing)."""
    if not path:
        raise FileNotFoundError("no INT2 dir given: pass `-p int2_dir DIR` or set DSV4_INT2 "
                                "(notebooks/01_quantize.ipynb writes one)")
    p = Path(path)
    p = p / "quant_stats.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no quant_stats.json (run notebooks/01_quantize.ipynb or "
                                f"`python -m dsv4lib quantize` first)")
    stats = json.loads(p.read_text())
    if not stats.get("layers"):
        raise ValueError(f"{p}: no per-layer entries in quant_stats.json")
    return stats


def _layers(stats: dict) -> list[tuple[int, dict]]:
    """(layer, entry) for every GPTQ-quantised layer, in order (RTN-only entries have no errors)."""
    return sorted((int(k), v) for k, v in stats["layers"].items() if "gptq_error" in v)


def layer_error_table(stats: dict) -> pd.DataFrame:
    """Long table: layer, hash_layer, proj, method (gptq / rtn), error (mean over experts)."""
    rows = [{"layer": li, "hash_layer": v["hash_layer"], "proj": p, "method": m, "error": v[f"{m}_error"][p]}
            for li, v in _layers(stats) for m in ("gptq", "rtn") for p in PROJS]
    return pd.DataFrame(rows)


def layer_summary(stats: dict) -> pd.DataFrame:
    """One row per layer: errors (mean of the three projections), fallbacks, visits, time."""
    rows = []
    for li, v in _layers(stats):
        g = [x for x in v["gptq_error"].values() if x is not None]
        r = [x for x in v["rtn_error"].values() if x is not None]
        rows.append({"layer": li, "routing": "hash" if v["hash_layer"] else "score",
                     "gptq_error": sum(g) / len(g), "rtn_error": sum(r) / len(r),
                     "gptq_over_rtn": sum(g) / sum(r), "fallbacks": v["fallback"]["count"],
                     "visits_min": v["visits"]["min"], "visits_median": v["visits"]["median"],
                     "visits_min_balanced": v["visits_balanced"]["min"], "time_s": v["time_s"]})
    return pd.DataFrame(rows)


def expert_table(stats: dict) -> pd.DataFrame:
    """Long table: layer, expert, proj, method, error, visits (routed), visits_balanced."""
    rows = []
    for li, v in _layers(stats):
        vis, bal = v["visits"]["counts"], v["visits_balanced"]["counts"]
        for m in ("gptq", "rtn"):
            for p in PROJS:
                for e, err in enumerate(v[f"{m}_error_per_expert"][p]):
                    rows.append({"layer": li, "expert": e, "proj": p, "method": m, "error": err,
                                 "visits": vis[e], "visits_balanced": bal[e]})
    return pd.DataFrame(rows)


def worst_experts(experts: pd.DataFrame, n: int = 2, method: str = "gptq") -> list[tuple[int, int]]:
    """The ``n`` (layer, expert) pairs with the largest error of ``method`` (mean over projections)."""
    d = experts[experts["method"] == method].groupby(["layer", "expert"])["error"].mean()
    return [tuple(int(i) for i in k) for k in d.sort_values(ascending=False).index[:n]]


def visit_table(stats: dict) -> pd.DataFrame:
    """Long table: layer, hash_layer, expert, visits (routed), visits_balanced."""
    return pd.DataFrame([{"layer": li, "hash_layer": v["hash_layer"], "expert": e, "visits": c,
                          "visits_balanced": v["visits_balanced"]["counts"][e]}
                         for li, v in _layers(stats) for e, c in enumerate(v["visits"]["counts"])])


def coverage_table(stats: dict, threshold: int | None = None) -> pd.DataFrame:
    """Per layer: experts, zero-visit experts, experts under ``threshold`` before / after balancing,
    min / median / max routed visits, and the coefficient of variation of the visits.
    ``threshold`` defaults to the one recorded in the stats' options."""
    thr = threshold if threshold is not None else stats.get("options", {}).get("threshold", 128)
    rows = []
    for li, v in _layers(stats):
        c = torch.tensor(v["visits"]["counts"], dtype=torch.float64)
        b = torch.tensor(v["visits_balanced"]["counts"])
        rows.append({"layer": li, "hash_layer": bool(v["hash_layer"]), "experts": c.numel(),
                     "zero": int((c == 0).sum()), "under_before": int((c < thr).sum()),
                     "under_after": int((b < thr).sum()), "min": int(c.min()), "median": float(c.median()),
                     "max": int(c.max()), "cv": float(c.std() / c.mean()) if c.mean() > 0 else float("nan"),
                     "threshold": thr})
    return pd.DataFrame(rows)


def coverage_by_routing(cov: pd.DataFrame) -> pd.DataFrame:
    """Hash-routed vs score-routed layers: mean fractions of zero / under-threshold experts, mean CV."""
    d = cov.assign(routing=cov["hash_layer"].map({True: "hash", False: "score"}),
                   zero_fraction=cov["zero"] / cov["experts"], under_fraction=cov["under_before"] / cov["experts"])
    return d.groupby("routing", as_index=False)[["zero_fraction", "under_fraction", "cv"]].mean()


def coverage_comparison(tables: Mapping[str, pd.DataFrame], reference: Mapping | None = REFERENCE_COVERAGE) -> pd.DataFrame:
    """Per source: mean fraction of zero-visit experts and of under-threshold experts per layer;
    ``reference`` (zero-visit count only) is appended as its own row."""
    rows = [{"source": name, "experts": int(t["experts"].iloc[0]), "zero_per_layer": float(t["zero"].mean()),
             "zero_fraction": float((t["zero"] / t["experts"]).mean()),
             "under_fraction": float((t["under_before"] / t["experts"]).mean())} for name, t in tables.items()]
    if reference is not None:
        rows.append({"source": reference["source"], "experts": reference["experts"],
                     "zero_per_layer": float(reference["zero"]),
                     "zero_fraction": reference["zero"] / reference["experts"], "under_fraction": float("nan")})
    return pd.DataFrame(rows)


def quant_metrics(stats: dict, seconds: float | None = None) -> dict:
    """JSON-ready summary of a GPTQ INT2 dir: per-layer errors, fallbacks, visits, times, means."""
    s = layer_summary(stats)
    cov = coverage_table(stats)
    return {"layers": {int(r.layer): {"gptq_error": _layer(stats, r.layer, "gptq_error"),
                                      "rtn_error": _layer(stats, r.layer, "rtn_error"),
                                      "fallbacks": int(r.fallbacks), "time_s": float(r.time_s)}
                       for r in s.itertuples()},
            "gptq_error_mean": float(s["gptq_error"].mean()), "rtn_error_mean": float(s["rtn_error"].mean()),
            "fallbacks_total": int(s["fallbacks"].sum()),
            "visits_min_routed": int(cov["min"].min()), "visits_min_balanced": int(s["visits_min_balanced"].min()),
            "under_threshold_after": int(cov["under_after"].sum()), "threshold": int(cov["threshold"].iloc[0]),
            "calibration_tokens": stats.get("calibration", {}).get("tokens"),
            "seconds": seconds}


def _layer(stats: dict, li: int, key: str) -> dict:
    return dict(stats["layers"][str(li)][key])


# ------------------------------------------------------------------------------------ weights / outputs
def expert_weight_errors(ref_dir: str | Path, int2_dirs: Mapping[str, str | Path], layer: int, expert: int,
                         max_values: int = 20000) -> pd.DataFrame:
    """Long table label, kind (``weight`` / ``error_<name>``), value: the release's weights of one
    expert (all projections) and ``W_int2 − W_ref`` for each INT2 dir (a seeded subsample of
    ``max_values`` entries, the same entries for every kind)."""
    from dsv4lib.checkpoint import Int2Store, ReleaseReader
    from dsv4lib.model.quantized_experts import INT2Experts
    from dsv4lib.quant.pipeline import read_layer_experts

    reader = ReleaseReader(ref_dir)
    ref = torch.cat([w[expert].flatten() for w in read_layer_experts(reader, layer)])         # [3·I·D]
    pick = torch.randperm(ref.numel(), generator=torch.Generator().manual_seed(0))[:max_values]
    label = f"layer {layer} expert {expert}"
    rows = [pd.DataFrame({"label": label, "kind": "weight", "value": ref[pick].numpy()})]
    for name, d in int2_dirs.items():
        be = INT2Experts.from_tensors(Int2Store(d, reader.config).read_layer(layer))
        q = torch.cat([w.flatten() for w in be.dequantize_expert(expert)])                    # [3·I·D]
        rows.append(pd.DataFrame({"label": label, "kind": f"error_{name}", "value": (q - ref)[pick].numpy()}))
    reader.close()
    return pd.concat(rows, ignore_index=True)


class MoEOutputProbe:
    """While active (``with probe: run the model``), compares the routed-expert output of MoE
    ``layer`` with each backend in ``backends`` on exactly the inputs and routing the model's own
    backend sees: relative error ‖y_b − y_ref‖² / ‖y_ref‖² over all tokens (:meth:`table`).
    The model's forward is unchanged (a MoE hook only observes)."""

    def __init__(self, model, layer: int, backends: Mapping[str, object]) -> None:
        self.model, self.layer, self.backends = model, layer, dict(backends)
        self.num = {k: 0.0 for k in backends}
        self.den, self.tokens, self._handle = 0.0, 0, None

    @torch.inference_mode()
    def _hook(self, li: int, ev) -> None:
        if li != self.layer:
            return
        limit = self.model.config.swiglu_limit
        y = self.model.moe_layer(li).experts(ev.x, ev.idx, ev.weight, limit)                  # [T, D]
        self.den += float(y.double().square().sum())
        self.tokens += ev.x.shape[0]
        for k, be in self.backends.items():
            self.num[k] += float((be(ev.x, ev.idx, ev.weight, limit) - y).double().square().sum())

    def __enter__(self) -> "MoEOutputProbe":
        self._handle = self.model.add_moe_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.model, self.backends = None, {}      # the probe keeps only its sums (no model stays alive)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"layer": self.layer, "method": k, "tokens": self.tokens,
                              "rel_output_error": v / self.den if self.den else float("nan")}
                             for k, v in self.num.items()])


def int2_backend(int2_dir: str | Path, config, layer: int):
    """The ``INT2Experts`` of one layer of an INT2 dir."""
    from dsv4lib.checkpoint import Int2Store
    from dsv4lib.model.quantized_experts import INT2Experts
    return INT2Experts.from_tensors(Int2Store(int2_dir, config).read_layer(layer))


# ------------------------------------------------------------------------------------ perplexity
def eval_table(rows_by_model: Mapping[str, Sequence]) -> pd.DataFrame:
    """Long table set, model, tokens, ppl, kl, top1, ppl_increase_pct (vs the reference on the same
    set) from ``compare_pass`` rows per model name, plus the reference model's own rows (model
    ``ref``) and a token-weighted ``ALL`` row per model."""
    from dsv4lib.eval.perplexity import overall
    out = []
    first = next(iter(rows_by_model.values()))
    for r in [*first, overall(first)]:
        out.append({"set": r.name, "model": "ref", "tokens": r.n_tokens, "ppl": r.ppl_a, "kl": 0.0, "top1": 1.0})
    for name, rows in rows_by_model.items():
        for r in [*rows, overall(rows)]:
            out.append({"set": r.name, "model": name, "tokens": r.n_tokens, "ppl": r.ppl_b, "kl": r.kl,
                        "top1": r.top1})
    df = pd.DataFrame(out)
    ref_ppl = df[df["model"] == "ref"].set_index("set")["ppl"]
    return df.assign(ppl_increase_pct=100 * (df["ppl"] / df["set"].map(ref_ppl) - 1))


# ------------------------------------------------------------------------------------ MMLU
def mmlu_tables(results: Mapping[str, object]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-subject table: run, subject, n, correct, acc, ci_low, ci_high; overall table per run)."""
    subj = [{"run": run, "subject": s.subject, "n": s.n, "correct": s.correct, "acc": s.acc,
             "ci_low": s.ci_low, "ci_high": s.ci_high} for run, r in results.items() for s in r.subjects.values()]
    overall = [{"run": run, "shots": r.shots, "n": r.n, "correct": r.correct, "acc": r.acc, "ci_low": r.ci_low,
                "ci_high": r.ci_high, "macro_acc": r.macro_acc, "seconds": r.seconds} for run, r in results.items()]
    return pd.DataFrame(subj), pd.DataFrame(overall)


# ------------------------------------------------------------------------------------ generation
def run_prompts(model, tokenizer, prompts: Sequence[str], **generate_kwargs) -> list[dict]:
    """Each prompt as one user turn through :func:`dsv4lib.generate.generate`; transcript rows."""
    from dsv4lib.chat import parse_completion
    from dsv4lib.generate import generate
    rows = []
    for p in prompts:
        r = generate(model, tokenizer, [{"role": "user", "content": p}], **generate_kwargs)
        rows.append({"prompt": p, "completion": r.text,
                     "parsed": parse_completion(r.text, generate_kwargs.get("thinking", False)),
                     "n_prompt": r.n_prompt, "n_new": r.n_new, "stop_reason": r.stop_reason,
                     "tokens_per_s": r.tokens_per_s, "prefill_s": r.prefill_s})
    return rows


def transcript_markdown(rows: Sequence[dict], title: str = "Transcript") -> str:
    """The transcript rows as Markdown (one section per prompt)."""
    parts = [f"# {title}\n"]
    for i, r in enumerate(rows, 1):
        parts.append(f"## {i}. {r['prompt']}\n\n```text\n{r['completion']}\n```\n\n"
                     f"*{r['n_new']} tokens, stop: {r['stop_reason']}, {r['tokens_per_s']:.1f} tok/s*\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ files
def write_json(path: str | Path, obj) -> Path:
    """Atomic JSON write (NaN/Inf refused: metrics must be finite or null)."""
    from dsv4lib.checkpoint import atomic
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(p, json.loads(json.dumps(obj, allow_nan=False, default=_jsonable)))
    return p


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def is_finite_tree(obj) -> bool:
    """True when every number in a nested dict/list is finite (None allowed)."""
    if isinstance(obj, Mapping):
        return all(is_finite_tree(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(is_finite_tree(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def records(df: pd.DataFrame) -> list[dict]:
    """Rows of ``df`` as JSON-ready dicts (NaN → None)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in df.to_dict("records")]
