"""Per-call GPU time of the mHC decode launch (``kernels/mhc_step.py`` ``hc_post_pre_fused``: the previous
sublayer's post, the mixing GEMV, Sinkhorn and the next sublayer's normed input in one launch) at V4-Flash shapes
(hc 4, D 4096, 20 Sinkhorn iterations), batch 1 and 8, and its launch knobs.

Times are CUDA-graph replays of one call per layer over 43 layers' distinct mixing weights (fn is 1.5 MB fp32
per layer: 65 MB in all, more than L2), median of ``--reps`` replays. ``iters=1`` is not a valid V4 setting:
it is timed to show what the 20 Sinkhorn iterations cost. Prints a table, writes JSON.

    python3 bench/bench_mhc_step.py --out $OUT/mhc_step.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dsv4lib.kernels import mhc_step as M  # noqa: E402
from timing import graph_us  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=43)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=Path("mhc_step.json"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_mhc_step: needs a CUDA GPU")
        return 1
    dev, hc, D, L = "cuda", 4, 4096, a.layers
    NM, K = (2 + hc) * hc, hc * D
    g = torch.Generator(device=dev).manual_seed(0)
    fns = [torch.randn(NM, K, device=dev, generator=g) * 0.01 for _ in range(L)]
    scale = torch.rand(3, device=dev, generator=g) + 0.5
    base = torch.randn(NM, device=dev, generator=g) * 0.1
    nw = torch.rand(D, device=dev, generator=g) + 0.5
    saved = (M.PRE_ONE, M.PRE_MANY)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
           "layers": L, "defaults": {"one": saved[0], "many": saved[1]}, "rows": []}
    for B in a.batch:
        X = torch.randn(B, hc, D, device=dev, generator=g).to(torch.bfloat16)
        f = torch.randn(B, D, device=dev, generator=g).to(torch.bfloat16)
        f2 = torch.randn(B, D, device=dev, generator=g).to(torch.bfloat16)
        pin = torch.rand(B, hc, device=dev, generator=g)
        cin = torch.rand(B, hc, hc, device=dev, generator=g) / hc

        def call(i, iters=20):
            return M.hc_post_pre_fused(f, X, pin, cin, f2, fns[i % L], scale, base, iters, 1e-6, 1e-6, nw, 1e-6)
        ref = [t.float() for t in call(0)]
        defaults = M.pre_launch(B)
        knobs = [defaults] + [c for c in itertools.product((128, 64, 32, 16), (128, 512), (4, 8)) if c != defaults]
        for ns, bk, w in knobs:
            M.PRE_ONE = M.PRE_MANY = (ns, bk, w)
            try:
                diff = max((t.float() - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
                           for t, r in zip(call(0), ref))
                us = graph_us(call, L, a.reps)
                us1 = graph_us(lambda i: call(i, iters=1), L, a.reps) if (ns, bk, w) == defaults else float("nan")
            except Exception as e:  # noqa: BLE001 -- a knob setting that fails is reported
                print(f"  B{B} nsplit {ns} bk {bk} warps {w}: {type(e).__name__}: {str(e)[:160]}")
                continue
            row = {"B": B, "nsplit": ns, "bk": bk, "warps": w, "us": us, "us_iters1": us1, "rel_diff_vs_default": diff}
            res["rows"].append(row)
            print(f"B{B} nsplit {ns:3d} bk {bk:3d} warps {w}: {us:6.2f} us/call"
                  + (f"  (1 Sinkhorn iteration: {us1:6.2f})" if us1 == us1 else "") + f"  rel diff {diff:.1e}", flush=True)
        M.PRE_ONE, M.PRE_MANY = saved
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print("\n   B  nsplit  bk  warps   us/call")
    for r in sorted(res["rows"], key=lambda r: (r["B"], r["us"])):
        print(f"  {r['B']:2d}  {r['nsplit']:6d} {r['bk']:3d}  {r['warps']:5d}  {r['us']:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
