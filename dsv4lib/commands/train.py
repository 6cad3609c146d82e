"""``python -m dsv4lib train``: reproduce the embedded release ``data/tiny-v4`` from the corpus."""
from __future__ import annotations

import argparse
from dataclasses import fields


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsv4lib.paths import EMBEDDED_REF
    from dsv4lib.train_tiny import TrainConfig
    p.add_argument("--out", default=str(EMBEDDED_REF), help="release directory to write (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--config", choices=["embedded", "tiny"], default="embedded", help="model config preset")
    for f in fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"(default: {f.default})")


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields as _fields

    from dsv4lib.config import ModelConfig
    from dsv4lib.train_tiny import TrainConfig, run_training
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in _fields(TrainConfig)})
    model_config = getattr(ModelConfig, args.config)()
    _, history = run_training(args.out, cfg, model_config=model_config, device=args.device)
    ppl = [h["valid_ppl"] for h in history if "valid_ppl" in h]
    print(f"wrote {args.out}; final valid ppl {ppl[-1] if ppl else float('nan'):.2f}")
    return 0
