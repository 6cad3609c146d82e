"""GPTQ solve time for one full-shape V4-Flash MoE layer (synthetic weights), plus Hessian accumulation.

One layer = 256 experts; w1/w3 [2048, 4096] share the expert input x, so they are solved as one
stacked problem [256, 4096, 4096] with H [256, 4096, 4096]; w2 [4096, 2048] with H [256, 2048, 2048].
Hessians come from random correlated data (X = Z·A per expert, low rank + identity), synthetic
weights ~ N(0, 0.02). Experts are processed ``--chunk`` at a time to bound memory.

Also: Hessian accumulation of ``--tokens`` calibration tokens routed top-6 of 256 (fp32, TF32 off)
for the 4096-wide expert input, and the same for the 2048-wide w2 input.

Prints a table and writes JSON to ``--out``. Usage (GPU):
    python bench/bench_gptq.py --out bench/out/gptq.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from dsv4lib.quant.gptq import GPTQConfig, gptq_batched, output_error
from dsv4lib.quant.grid import GridSearch
from dsv4lib.quant.hessian import ExpertHessians, accumulate


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def synthetic_hessians(E: int, D: int, dev, rank_frac: float = 0.25, n: int | None = None, seed: int = 0):
    """H_e = X_eᵀX_e with X_e = Z·(B1·B2/√D + 0.1·I), generated per expert chunk on the device."""
    g = torch.Generator(device=dev).manual_seed(seed)
    n = n or D
    r = max(1, int(D * rank_frac))
    H = torch.empty(E, D, D, device=dev)
    for e in range(E):
        A = torch.randn(D, r, device=dev, generator=g) @ torch.randn(r, D, device=dev, generator=g) / D ** 0.5
        A.diagonal().add_(0.1)
        X = torch.randn(n, D, device=dev, generator=g) @ A
        H[e] = X.T @ X
    return H


def time_solve(W, H, cfg, dev):
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    res = gptq_batched(W, H, cfg)
    _sync(dev)
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")
    return res, dt, peak


def time_hessian(tokens: int, D: int, E: int, k: int, dev, token_chunk: int, batch: int = 32768):
    acc = ExpertHessians.zeros(E, D, device=dev)
    g = torch.Generator(device=dev).manual_seed(1)
    _sync(dev)
    total = 0.0
    for t0 in range(0, tokens, batch):
        b = min(batch, tokens - t0)
        x = torch.randn(b, D, device=dev, generator=g)
        idx = torch.rand(b, E, device=dev, generator=g).topk(k, dim=-1).indices  # [b, k]
        w = torch.rand(b, k, device=dev, generator=g)
        _sync(dev)
        t = time.perf_counter()
        accumulate(acc, x, idx, w.square(), token_chunk=token_chunk)
        _sync(dev)
        total += time.perf_counter() - t
    assert int(acc.count.sum()) == tokens * k
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=64, help="experts per batched solve")
    ap.add_argument("--tokens", type=int, default=262144, help="calibration tokens for the Hessian timing")
    ap.add_argument("--token-chunk", type=int, default=65536)
    ap.add_argument("--variants", default="default,reference,actorder", help="comma list")
    ap.add_argument("--skip-hessian", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/out/gptq.json"))
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # synthetic data only; timed code runs with TF32 off
    E, D, I = args.experts, args.hidden, args.inter
    variants = {
        "default": GPTQConfig(expert_chunk=args.chunk),
        "reference": GPTQConfig.reference(expert_chunk=args.chunk),
        "actorder": GPTQConfig(act_order=True, static_groups=True, expert_chunk=args.chunk),
        "noclip": GPTQConfig(grid_search=None, expert_chunk=args.chunk),
        "clip8": GPTQConfig(grid_search=GridSearch(n_shrink=8), expert_chunk=args.chunk),
    }
    rows, result = [], {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                        "torch": torch.__version__, "experts": E, "hidden": D, "inter": I,
                        "chunk": args.chunk, "solves": {}, "hessian": {}}
    gen = torch.Generator(device=dev).manual_seed(0)
    t = time.perf_counter()
    H13 = synthetic_hessians(E, D, dev, seed=1)
    H2 = synthetic_hessians(E, I, dev, seed=2)
    W13 = torch.randn(E, 2 * I, D, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02  # w1 ‖ w3
    W2 = torch.randn(E, D, I, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02
    _sync(dev)
    result["setup_s"] = time.perf_counter() - t
    print(f"setup {result['setup_s']:.1f} s", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in [v for v in args.variants.split(",") if v]:
        base, _, chunk = name.partition("@")  # "default@64": another expert chunk
        cfg = variants[base] if not chunk else replace(variants[base], expert_chunk=int(chunk))
        layer_t, peak, rel = 0.0, 0.0, {}
        for proj, W, H in (("w1w3", W13, H13), ("w2", W2, H2)):
            res, dt, pk = time_solve(W, H, cfg, dev)
            layer_t += dt
            peak = max(peak, pk)
            sub = slice(0, min(8, E))  # error on a few experts (relative to ‖W X‖²)
            num = output_error(W[sub].float(), res.qweight[sub].dequantize(), H[sub])
            den = output_error(W[sub].float(), torch.zeros_like(W[sub], dtype=torch.float32), H[sub])
            rel[proj] = float((num / den).mean())
            rows.append((name, proj, dt, pk, rel[proj], int(res.damp_retries.sum())))
            print(*rows[-1], flush=True)
            del res
        result["solves"][name] = {"layer_s": layer_t, "peak_gib": peak, "rel_err": rel}
        _write(args.out, result)  # partial results survive a timeout
    if not args.skip_hessian:
        for D_in in (D, I):
            dt = time_hessian(args.tokens, D_in, E, min(6, E), dev, args.token_chunk)
            result["hessian"][f"in{D_in}"] = dt
            rows.append(("hessian", f"in={D_in}", dt, float("nan"), float("nan"), 0))
            print(*rows[-1], flush=True)

    print(f"{'variant':<10} {'proj':<9} {'time s':>8} {'peak GiB':>9} {'rel err':>8} {'retries':>7}")
    for r in rows:
        print(f"{r[0]:<10} {r[1]:<9} {r[2]:8.2f} {r[3]:9.1f} {r[4]:8.4f} {r[5]:7d}")
    for name, v in result["solves"].items():
        print(f"{name}: {v['layer_s']:.2f} s per layer (w1+w3 stacked, w2), peak {v['peak_gib']:.1f} GiB")
    _write(args.out, result)
    return 0


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
