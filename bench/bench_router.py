"""Per-call GPU time of the fused decode router (``kernels/moe_step.py`` ``router_fused``: logits GEMV + top-6 of
256 in one launch) at V4-Flash shapes (D 4096, bf16 weights), batch 1 and 8, by tokens per program
(``ROUTER_TOKENS``). CUDA-graph replays of one call per layer over 43 layers' distinct router weights (2 MB each),
median of ``--reps``; the routing is checked against the default setting. Prints a table, writes JSON.

    python3 bench/bench_router.py --out $OUT/router.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dsv4lib.kernels import moe_step as MS  # noqa: E402
from timing import graph_us  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=43)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=Path("router.json"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_router: needs a CUDA GPU")
        return 1
    dev, E, D, L, k = "cuda", 256, 4096, a.layers, 6
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [(torch.randn(E, D, device=dev, generator=g) * 0.02).to(torch.bfloat16) for _ in range(L)]
    bias = torch.randn(E, device=dev, generator=g) * 0.01
    saved = MS.ROUTER_TOKENS
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": L, "default": saved, "rows": []}
    for B in a.batch:
        x = torch.randn(B, D, device=dev, generator=g).to(torch.bfloat16)
        ref = MS.router_fused(x, ws[0], bias, k, 2.5, True)
        for tb in sorted({saved, 8, 4, 2, 1}, reverse=True):
            if tb > B and tb != saved:
                continue
            MS.ROUTER_TOKENS = tb
            got = MS.router_fused(x, ws[0], bias, k, 2.5, True)
            same = bool(torch.equal(got[0], ref[0])) and (got[1] - ref[1]).abs().max().item() <= 1e-6
            us = graph_us(lambda i: MS.router_fused(x, ws[i % L], bias, k, 2.5, True), L, a.reps)
            res["rows"].append({"B": B, "tokens_per_program": tb, "us": us, "same_routing": same})
            print(f"B{B} tokens per program {tb:2d}: {us:6.2f} us/call  same routing {same}", flush=True)
        MS.ROUTER_TOKENS = saved
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
