"""Figures for the notebooks (STYLE.md §13): one :func:`save_fig` writing ``figures/NN_name.png``
with the plotted data beside it as ``NN_name.csv``, and one small function per figure kind.

Every ``plot_*`` function takes a tidy :class:`pandas.DataFrame` (built by :mod:`dsv4lib.report`)
and returns ``(figure, data)``, where ``data`` is exactly what was drawn, so the notebook cell is
``save_fig(*plot_x(df), "01_layer_error", figures_dir)``. No backend is chosen here (inline in a
notebook kernel, matplotlib's headless default elsewhere); nothing here reads the environment.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from dsv4lib.paths import FIGURES_DIR

DPI = 110
COLORS = {"gptq": "#1f77b4", "rtn": "#d62728", "ref": "#2ca02c", "int2": "#1f77b4", "int2_rtn": "#d62728"}


def save_fig(fig, data: pd.DataFrame, name: str, figures_dir: str | Path | None = None,
             close: bool = False) -> Path:
    """Write ``<figures_dir>/<name>.png`` and the plotted ``data`` as ``<name>.csv``.

    ``name`` is ``NN_what`` (NN = notebook number); ``figures_dir`` defaults to the repo's
    ``figures/``. The figure stays open (a notebook shows it at the end of the cell) unless
    ``close``. Returns the PNG path.
    """
    out = Path(figures_dir) if figures_dir else FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    data.to_csv(out / f"{name}.csv", index=False, float_format="%.6g")
    if close:
        plt.close(fig)
    return png


def _grouped_bars(ax, df: pd.DataFrame, x: str, hue: str, y: str, lo: str | None = None, hi: str | None = None):
    """Bars of ``y`` per ``x``, one colour per ``hue`` value, optional error bars from ``lo``/``hi``."""
    xs = list(dict.fromkeys(df[x]))
    hues = list(dict.fromkeys(df[hue]))
    w = 0.8 / len(hues)
    for j, h in enumerate(hues):
        d = df[df[hue] == h].set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + (j - (len(hues) - 1) / 2) * w
        err = None if lo is None else np.vstack([d[y] - d[lo], d[hi] - d[y]]).clip(min=0)
        ax.bar(pos, d[y], w, yerr=err, capsize=2 if err is not None else 0, label=str(h),
               color=COLORS.get(str(h)))
    ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs])
    ax.legend(frameon=False, fontsize=8)


# ---------------------------------------------------------------------------------- 01 / 03: errors
def plot_layer_errors(df: pd.DataFrame, title: str = "Expert reconstruction error per layer"):
    """``df``: layer, proj, method (gptq/rtn), error → one panel per projection, bars per layer."""
    projs = list(dict.fromkeys(df["proj"]))
    fig, axes = plt.subplots(1, len(projs), figsize=(4.2 * len(projs), 3.4), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], projs):
        _grouped_bars(ax, df[df["proj"] == p], "layer", "method", "error")
        ax.set_title(p)
        ax.set_xlabel("MoE layer")
    axes[0][0].set_ylabel("relative output error tr(ΔHΔᵀ)/tr(WHWᵀ)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig, df


def _layer_expert_heatmap(m: pd.DataFrame, values, cmap: str, label: str, title: str):
    """Heatmap of a layers × experts pivot ``m`` showing ``values`` (same shape)."""
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.25 * m.shape[1]), 1.2 + 0.45 * m.shape[0]))
    im = ax.imshow(values, aspect="auto", cmap=cmap)
    ax.set_yticks(range(m.shape[0]), [str(i) for i in m.index])
    ax.set_xlabel("expert index")
    ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_error_by_expert(df: pd.DataFrame, title: str = "GPTQ error per expert (mean over w1, w3, w2)"):
    """``df``: layer, expert, error → heatmap layers × experts."""
    m = df.pivot_table(index="layer", columns="expert", values="error", aggfunc="mean")
    return _layer_expert_heatmap(m, m.to_numpy(), "viridis", "relative output error", title), df


def plot_error_vs_visits(df: pd.DataFrame, title: str = "Reconstruction error vs calibration visits"):
    """``df``: visits, error, method (one point per layer × expert × projection)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, d in df.groupby("method", sort=False):
        ax.scatter(d["visits"], d["error"], s=8, alpha=0.6, label=str(m), color=COLORS.get(str(m)))
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("calibration tokens routed to the expert (count, log scale)")
    ax.set_ylabel("relative output error")
    ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig, df


def plot_weight_histograms(df: pd.DataFrame, title: str = "Worst experts: weights and quantization error",
                           bins: int = 80):
    """``df``: label, kind (weight / error_gptq / error_rtn), value → one row of panels per label.
    Returns the histogram counts (label, kind, bin_low, bin_high, count), i.e. what is drawn."""
    labels = list(dict.fromkeys(df["label"]))
    fig, axes = plt.subplots(len(labels), 2, figsize=(9, 2.3 * len(labels)), squeeze=False)
    drawn = []
    for row, lab in zip(axes, labels):
        d = df[df["label"] == lab]
        err = d[d["kind"].str.startswith("error_")]["value"]
        panels = ((row[0], d["kind"] == "weight", np.linspace(d[d["kind"] == "weight"]["value"].min(),
                                                              d[d["kind"] == "weight"]["value"].max(), bins + 1)),
                  (row[1], d["kind"].str.startswith("error_"), np.linspace(err.min(), err.max(), bins + 1)))
        for ax, sel, edges in panels:
            for kind, v in d[sel].groupby("kind", sort=False)["value"]:
                counts, _ = np.histogram(v, edges)
                name = kind.split("_")[-1]
                ax.stairs(counts, edges, fill=True, alpha=0.55 if kind != "weight" else 1.0,
                          color=COLORS.get(name, "0.4"), label=None if kind == "weight" else name)
                drawn.append(pd.DataFrame({"label": lab, "kind": kind, "bin_low": edges[:-1], "bin_high": edges[1:],
                                           "count": counts}))
            ax.set_yscale("log")
            ax.set_ylabel("count")
        row[0].set_title(f"{lab}: reference weight", fontsize=9)
        row[1].set_title(f"{lab}: W_int2 − W_ref", fontsize=9)
        row[1].legend(frameon=False, fontsize=8)
    axes[-1][0].set_xlabel("weight value")
    axes[-1][1].set_xlabel("weight error")
    fig.suptitle(title)
    fig.tight_layout()
    return fig, pd.concat(drawn, ignore_index=True)


def plot_eval_bars(df: pd.DataFrame, metric: str, ylabel: str, title: str):
    """``df``: set, model, <metric> → grouped bars per evaluation set."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    _grouped_bars(ax, df, "set", "model", metric)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("held-out set")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    return fig, df[["set", "model", metric]]


# ---------------------------------------------------------------------------------- 02: coverage
def plot_visit_heatmap(df: pd.DataFrame, title: str = "Calibration visits per expert (routed, before balancing)"):
    """``df``: layer, expert, visits → heatmap (log10 colour scale; zero visits shown as 0)."""
    m = df.pivot_table(index="layer", columns="expert", values="visits", aggfunc="sum")
    return _layer_expert_heatmap(m, np.log10(1 + m.to_numpy()), "magma", "log10(1 + routed tokens)", title), df


def plot_visit_distribution(df: pd.DataFrame, threshold: int, title: str = "Distribution of visits per expert"):
    """``df``: layer, expert, visits, visits_balanced, hash_layer → histograms before/after balancing."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    hi = max(1, int(df[["visits", "visits_balanced"]].to_numpy().max()))
    bins = np.unique(np.logspace(0, math.log10(hi + 1), 40).astype(int))
    ax.hist(df["visits"].clip(lower=1), bins=bins, alpha=0.55, label="routed")
    ax.hist(df["visits_balanced"].clip(lower=1), bins=bins, alpha=0.55, label="after balancing")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold = {threshold}")
    ax.set_xscale("log")
    ax.set_xlabel("calibration tokens per expert (count, log scale; 0 shown at 1)")
    ax.set_ylabel("experts (count, all layers)")
    ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig, df


def plot_under_threshold(df: pd.DataFrame, title: str = "Experts under the calibration threshold"):
    """``df`` (coverage table): layer, hash_layer, under_before, under_after, zero → bars per layer."""
    names = {"zero": "zero visits", "under_before": "under threshold (routed)",
             "under_after": "under threshold (after balancing)"}
    long = df.melt(id_vars=["layer"], value_vars=list(names), var_name="measure", value_name="n_experts")
    long["measure"] = long["measure"].map(names)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    _grouped_bars(ax, long, "layer", "measure", "n_experts")
    ax.set_xticks(range(len(df)), [f"{r.layer}\n({'hash' if r.hash_layer else 'score'})" for r in df.itertuples()])
    ax.set_xlabel("MoE layer (routing type)")
    ax.set_ylabel("experts (count)")
    ax.set_title(title)
    fig.tight_layout()
    return fig, long


def plot_coverage_comparison(df: pd.DataFrame,
                             title: str = "Experts without enough calibration data: this run vs the reference"):
    """``df``: source, zero_fraction, under_fraction → bars per source (values written on the bars)."""
    names = {"zero_fraction": "zero visits", "under_fraction": "under threshold (routed)"}
    long = df.melt(id_vars=["source"], value_vars=list(names), var_name="measure", value_name="fraction").dropna()
    long["measure"] = long["measure"].map(names)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    _grouped_bars(ax, long, "source", "measure", "fraction")
    for c in ax.containers:
        ax.bar_label(c, labels=[f"{v:.2f}" if np.isfinite(v) else "" for v in c.datavalues], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of experts per layer (mean)")
    ax.set_title(title)
    fig.tight_layout()
    return fig, long


# ---------------------------------------------------------------------------------- 05: MMLU
def plot_mmlu_subjects(df: pd.DataFrame, chance: float = 0.25, title: str = "MMLU accuracy per subject (95% Wilson CI)"):
    """``df``: subject, run, acc, ci_low, ci_high, n → horizontal grouped bars, chance line."""
    subjects = sorted(dict.fromkeys(df["subject"]))
    runs = list(dict.fromkeys(df["run"]))
    h = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.1 * len(subjects) * max(1, len(runs)) ** 0.5))
    for j, r in enumerate(runs):
        d = df[df["run"] == r].set_index("subject").reindex(subjects)
        pos = np.arange(len(subjects)) + (j - (len(runs) - 1) / 2) * h
        err = np.vstack([d["acc"] - d["ci_low"], d["ci_high"] - d["acc"]]).clip(min=0)     # [2, S]
        ax.barh(pos, d["acc"], h, xerr=err,
                capsize=1.5, label=r, error_kw={"lw": 0.6})
    ax.axvline(chance, color="k", ls="--", lw=1, label=f"chance ({chance:.0%})")
    ax.set_yticks(np.arange(len(subjects)), [s.replace("_", " ") for s in subjects], fontsize=7)
    ax.set_ylim(len(subjects) - 0.5, -0.5)                                         # first subject on top
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (fraction correct)")
    ax.legend(frameon=False, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(runs) + 1)
    ax.set_title(title, pad=24)
    fig.tight_layout()
    return fig, df
