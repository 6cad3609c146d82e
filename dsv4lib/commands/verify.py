"""``python -m dsv4lib verify``: check an INT2 dir against the upstream release (bit/nibble order, error)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _layers(spec: str | None) -> list[int] | None:
    """'0,3,5-7' -> [0, 3, 5, 6, 7]."""
    if not spec:
        return None
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ref", help="upstream-format release dir (default: $DSV4_REF or the embedded model)")
    parser.add_argument("--int2", help="INT2 dir with layer_NN.safetensors (default: $DSV4_INT2)")
    parser.add_argument("--layers", help="layers to check, e.g. '0,3,5-7' (default: all INT2 files)")
    parser.add_argument("--experts-per-layer", type=int, default=8, help="experts sampled per layer (default 8)")
    parser.add_argument("--max-rel-err", type=float, default=0.8,
                        help="largest acceptable relative Frobenius error per layer/projection (default 0.8)")
    parser.add_argument("--json", help="also write the full report as JSON to this path")


def run(args: argparse.Namespace) -> int:
    from dsv4lib.checkpoint.errors import CheckpointError
    from dsv4lib.checkpoint.verify import verify_int2
    from dsv4lib.paths import resolve_model_dirs

    ref, int2 = resolve_model_dirs(args.ref, args.int2, environ=os.environ)
    if int2 is None:
        print("verify: no INT2 dir (pass --int2 or set DSV4_INT2)")
        return 2
    try:
        report = verify_int2(ref, int2, layers=_layers(args.layers), experts_per_layer=args.experts_per_layer,
                             max_rel_err=args.max_rel_err)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"verify: {e}")
        return 2
    print(f"release {ref}\nINT2    {int2}")
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1
