"""``python -m dsv4lib bench``: full-scale synthetic V4-Flash benchmark (dsv4lib.fullscale_bench):
memory, decode eager / static / CUDA-graph tok/s, prefill, per-component step time, MMLU estimate."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="v4_flash", choices=["v4_flash", "tiny", "embedded"],
                   help="model shape (tiny/embedded: CPU smoke runs)")
    p.add_argument("--decode", default="1x1024,8x1024,1x16384,8x16384",
                   help="decode cases BATCHxCONTEXT, comma-separated")
    p.add_argument("--steps", type=int, default=64, help="timed graphed decode steps per case")
    p.add_argument("--eager-steps", type=int, default=5)
    p.add_argument("--prefill-ctx-max", type=int, default=1024,
                   help="contexts up to this are prefilled eagerly, longer ones filled synthetically")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--mmlu-batch", type=int, default=32)
    p.add_argument("--mmlu-len", type=int, default=192)
    p.add_argument("--no-components", action="store_true")
    p.add_argument("--no-prefill", action="store_true",
                   help="decode cases only: skip the 2K prefill (and its switches' A/B) and the MMLU estimate")
    p.add_argument("--unfused", action="store_true",
                   help="static/graphed step on the torch path instead of the Triton step kernels (docs/FULLSCALE_NOTES.md)")
    p.add_argument("--variants", default=None,
                   help="comma-separated decode A/B switches timed beside the default (dsv4lib.fullscale_bench."
                        "DECODE_SWITCHES, fp8_prefetchN; default: fullscale_bench.VARIANTS, '' for none)")
    p.add_argument("--out", default=None, help="write the results JSON here (after every section)")


def run(args: argparse.Namespace) -> int:
    from dsv4lib.checkpoint.atomic import write_json
    from dsv4lib.fullscale_bench import DECODE_SWITCHES, BenchOptions, _switch, format_table, run_benchmark

    unknown = []
    for v in filter(None, (args.variants or "").split(",")):
        try:
            _switch(v)
        except ValueError:
            unknown.append(v)
    if unknown:
        raise SystemExit(f"bench --variants: unknown {unknown}; known: {', '.join(DECODE_SWITCHES)}, fp8_prefetchN")
    cases = tuple(tuple(int(v) for v in c.split("x")) for c in args.decode.split(",") if c)
    opts = BenchOptions(preset=args.preset, decode=cases, decode_steps=args.steps, eager_steps=args.eager_steps,
                        prefill_ctx_max=args.prefill_ctx_max, prefill_len=args.prefill_len,
                        mmlu_batch=args.mmlu_batch, mmlu_len=args.mmlu_len, components=not args.no_components,
                        prefill=not args.no_prefill, fused=not args.unfused,
                        variants=None if args.variants is None else tuple(v for v in args.variants.split(",") if v))
    write = (lambda r: write_json(args.out, r)) if args.out else (lambda r: None)
    res = run_benchmark(opts, write, log=lambda s: print(s, flush=True))
    print(format_table(res))
    if not args.out:
        print(json.dumps(res.get("targets", {}), indent=1))
    return 0
