"""``python -m dsv4lib quantize --ref DIR --out DIR``: self-calibrated GPTQ INT2 g64 of the routed experts.

A thin shell over :func:`dsv4lib.quant.pipeline.quantize` (and ``quantize_rtn`` with ``--rtn-only``).
Re-running on the same ``--out`` resumes at the first unfinished layer.
"""
from __future__ import annotations

import argparse
import json
import os

from dsv4lib.quant.coverage import STRATEGIES
from dsv4lib.quant.fallback import METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", default=None, help="upstream-format release dir (default: $DSV4_REF or data/tiny-v4)")
    p.add_argument("--out", required=True, help="INT2 output dir (resumable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib-tokens", type=int, default=262144)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chat-fraction", type=float, default=0.25, help="share of chat-formatted calibration rows")
    p.add_argument("--coverage", choices=STRATEGIES, default="balanced")
    p.add_argument("--threshold", type=int, default=128, help="balanced: minimum tokens per expert")
    p.add_argument("--min-tokens", type=int, default=16, help="fewer visits than this -> fallback, not GPTQ")
    p.add_argument("--fallback", choices=sorted(METHODS), default="mse")
    p.add_argument("--routing-weighted", action="store_true", help="Hessians weighted by routing weight^2")
    p.add_argument("--act-order", action="store_true", help="act-order with static groups (format unchanged)")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--no-grid-search", action="store_true", help="reference min-max grid (no clip/zero search)")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--hessian-fp64", action="store_true")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--layers", default=None, help="comma list of layer indices (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtn-only", action="store_true", help="write an RTN INT2 dir (no calibration)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dsv4lib.paths import resolve_model_dirs
    from dsv4lib.quant import pipeline

    ref, _ = resolve_model_dirs(args.ref, None, os.environ)
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    if args.rtn_only:
        out = pipeline.quantize_rtn(ref, args.out, device=args.device, layers=layers)
        print(f"RTN INT2 dir written: {out}")
        return 0
    gptq = {"act_order": args.act_order, "static_groups": args.static_groups or args.act_order,
            "damp": args.damp}
    if args.no_grid_search:
        gptq["grid_search"] = None
    pipeline.quantize(
        ref, args.out, device=args.device, progress=not args.quiet, calib_tokens=args.calib_tokens,
        seq_len=args.seq_len, chat_fraction=args.chat_fraction, coverage=args.coverage,
        threshold=args.threshold, min_tokens=args.min_tokens, fallback=args.fallback,
        routing_weighted=args.routing_weighted, hessian_dtype="float64" if args.hessian_fp64 else "float32",
        batch_size=args.batch_size, layers=layers, seed=args.seed, **gptq)
    summary = {li: {"gptq": v["gptq"], "rtn": v["rtn"], "fallbacks": v["fallbacks"]}
               for li, v in pipeline.layer_errors(args.out).items()}
    print(json.dumps({"out": str(args.out), "layers": summary}, indent=1))
    return 0
