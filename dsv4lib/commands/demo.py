"""``python -m dsv4lib demo``: the main job — the five notebooks, headless through papermill.

Runs ``notebooks/01_quantize`` … ``05_mmlu`` on the embedded model (or ``$DSV4_REF``), executed
copies into ``runs/<timestamp>/``, 01's INT2 dir chained into 02–05, figures into ``figures/``;
then prints where everything is and a summary (GPTQ vs RTN error and perplexity, coverage, MMLU).
Sizes are parameters (defaults: a few minutes on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

NOTEBOOKS = ("01_quantize", "02_routing_coverage", "03_error_inspection", "04_generate", "05_mmlu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", default=None, help="release dir (default: $DSV4_REF or the embedded data/tiny-v4)")
    p.add_argument("--run-dir", default=None, help="executed notebooks + metrics (default: runs/<timestamp>)")
    p.add_argument("--figures-dir", default=None, help="figures (default: the repo's figures/)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--threshold", type=int, default=512,
                   help="balanced coverage: minimum tokens per expert (above the tiny model's rarest experts, "
                        "so the demo shows balancing at work; the full-scale default is 128)")
    p.add_argument("--windows", type=int, default=32, help="held-out text windows per source (notebook 03)")
    p.add_argument("--chats", type=int, default=64, help="held-out chats (notebook 03)")
    p.add_argument("--per-subject", type=int, default=2, help="MMLU questions per subject (notebook 05)")
    p.add_argument("--shots", default="0,5", help="MMLU shots, comma list")
    p.add_argument("--only", default=None, help="comma list of notebook numbers to run (e.g. 01,03)")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name")


def notebook_parameters(run: Path, figures: Path, args: argparse.Namespace) -> dict[str, dict]:
    """papermill parameters per notebook; 01's INT2 / RTN dirs feed 02–05."""
    common = {"run_dir": str(run), "figures_dir": str(figures), "ref_dir": args.ref or ""}
    int2, rtn = str(run / "int2"), str(run / "int2_rtn")
    dev = {"device": args.device}
    return {
        "01_quantize": {**common, **dev, "int2_dir": int2, "rtn_dir": rtn, "calib_tokens": args.calib_tokens,
                        "threshold": args.threshold},
        "02_routing_coverage": {**common, "int2_dir": int2},
        "03_error_inspection": {**common, **dev, "int2_dir": int2, "rtn_dir": rtn, "n_windows": args.windows,
                                "n_chats": args.chats},
        "04_generate": {k: v for k, v in common.items() if k != "figures_dir"} | dev | {"int2_dir": int2},
        "05_mmlu": {**common, **dev, "int2_dir": int2, "per_subject": args.per_subject,
                    "shots": [int(s) for s in args.shots.split(",")]},
    }


def execute(name: str, run: Path, params: dict, kernel: str) -> float:
    """Execute one notebook into ``run/<name>.ipynb``; returns seconds."""
    import papermill as pm

    from dsv4lib.paths import REPO_ROOT
    t0 = time.perf_counter()
    pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"), str(run / f"{name}.ipynb"),
                        parameters=params, kernel_name=kernel, cwd=str(REPO_ROOT), progress_bar=False)
    return time.perf_counter() - t0


def summary(run: Path) -> str:
    """Short text table from the notebooks' metrics JSONs (whichever exist)."""
    def load(n):
        p = run / f"{n}_metrics.json"
        return json.loads(p.read_text()) if p.is_file() else None

    lines = []
    if (m := load("01")) is not None:
        lines.append(f"quantize   mean expert error  GPTQ {m['gptq_error_mean']:.4f}  RTN {m['rtn_error_mean']:.4f}  "
                     f"(x{m['rtn_error_mean'] / m['gptq_error_mean']:.2f}), {m['fallbacks_total']} fallbacks, "
                     f"{m['calibration_tokens']} calib tokens, {m['seconds']:.0f} s")
    if (m := load("02")) is not None:
        lines.append(f"coverage   zero-visit experts {m['zero_total']}, under {m['threshold']} before/after "
                     f"balancing {m['under_before_total']}/{m['under_after_total']}, "
                     f"min visits after {m['min_visits_balanced']}")
    if (m := load("03")) is not None:
        p, k, d = m["ppl"], m["kl"], m["ppl_increase_pct"]
        lines.append(f"held-out   ppl ref {p['ref']:.3f}  GPTQ {p['gptq']:.3f} (+{d['gptq']:.2f}%)  RTN {p['rtn']:.3f} "
                     f"(+{d['rtn']:.2f}%)   KL GPTQ {k['gptq']:.4f}  RTN {k['rtn']:.4f}  ({m['tokens']} tokens)")
    if (m := load("04")) is not None:
        lines.append(f"generate   {len(m['transcript'])} prompts, {sum(m['n_new'])} tokens, transcript "
                     f"{run / '04_transcript.md'}")
    if (m := load("05")) is not None:
        for r in m["runs"]:
            lines.append(f"MMLU       {r['run']:14s} acc {r['acc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
                         f"n={r['n']} (chance 0.25)")
    return "\n".join(lines)


def check_kernel(name: str) -> None:
    """Fail early unless kernel ``name`` runs this interpreter (jupyter_client maps a bare
    ``python``/``python3`` in the spec's argv to ``sys.executable``)."""
    from jupyter_client.kernelspec import KernelSpecManager
    argv0 = KernelSpecManager().get_kernel_spec(name).argv[0]
    mine = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    if argv0 not in mine and Path(argv0).resolve() != Path(sys.executable).resolve():
        raise SystemExit(f"demo: Jupyter kernel {name!r} runs {argv0}, not {sys.executable}; install this "
                         f"environment's kernel with `{sys.executable} -m ipykernel install --sys-prefix --name {name}`")


def run(args: argparse.Namespace) -> int:
    from dsv4lib.paths import FIGURES_DIR, REPO_ROOT
    from dsv4lib.report import run_folder

    check_kernel(args.kernel)

    run_dir = run_folder(args.run_dir)
    figures = Path(args.figures_dir) if args.figures_dir else FIGURES_DIR
    # the kernel imports dsv4lib from the checkout even when the package is not installed
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    params = notebook_parameters(run_dir, figures, args)
    only = set(args.only.split(",")) if args.only else None
    for name in NOTEBOOKS:
        if only is not None and name[:2] not in only:
            continue
        print(f"[demo] {name} ...", file=sys.stderr, flush=True)
        print(f"[demo] {name} done in {execute(name, run_dir, params[name], args.kernel):.0f} s",
              file=sys.stderr, flush=True)
    print(f"executed notebooks and metrics: {run_dir}\nfigures: {figures}\n")
    print(summary(run_dir))
    return 0
