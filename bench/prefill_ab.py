"""Interleaved A/B of one prefill switch on the full-size synthetic model (H200): the 2K prefill timed
``--rounds`` times with the switch at its default and toggled, alternating, so slow drift and one-off
stalls hit both sides. Prints the per-round times, the medians and their ratio; writes JSON.

    python3 bench/prefill_ab.py --switch kernels.fp8_linear.DEQUANT_PREFILL --rounds 5 --out $OUT/ab.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4lib.config import ModelConfig  # noqa: E402
from dsv4lib.fullscale import synthetic_model, without_mtp  # noqa: E402
from dsv4lib.fullscale_bench import ab_rounds, prefill_last_logits  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--switch", required=True,
                    help="module.path.FLAG under dsv4lib, e.g. kernels.fp8_linear.DEQUANT_PREFILL")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="prefill_ab.json")
    a = ap.parse_args(argv)
    mod_name, flag = a.switch.rsplit(".", 1)
    mod = importlib.import_module(f"dsv4lib.{mod_name}")
    dev = torch.device("cuda")
    model = synthetic_model(without_mtp(ModelConfig.v4_flash()), dev)
    ids = torch.randint(0, model.config.vocab_size, (1, a.tokens), device=dev,
                        generator=torch.Generator(dev).manual_seed(0))
    default = getattr(mod, flag)
    with torch.no_grad():
        for value in (default, not default):        # compile / warm both sides
            setattr(mod, flag, value)
            prefill_last_logits(model, ids)
        setattr(mod, flag, default)
        times = ab_rounds(lambda: prefill_last_logits(model, ids), mod, flag, dev, a.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"switch": a.switch, "default_value": default, "tokens": a.tokens, "times_s": times,
           "median_tok_s": {k: a.tokens / v for k, v in med.items()},
           "toggled_over_default": med["toggled"] / med["default"]}
    Path(a.out).write_text(json.dumps(res, indent=1))
    for k, v in times.items():
        print(f"{k:8s} " + " ".join(f"{t * 1e3:7.1f}" for t in v) + f"   median {a.tokens / med[k]:7.0f} tok/s")
    print(f"toggled / default time: {res['toggled_over_default']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
