"""FP8 block-scaled prefill GEMMs at V4-Flash shapes (M = --tokens rows): the per-block kernel of
``fp8_linear`` (one dot per 128-wide K block times its scale), dequant to bf16 + cuBLAS (``fp8_gemm_dequant``, the
many-token default; the dequant pass is timed with it), the chained kernel (power-of-two scales
folded into bf16 weight tiles, one accumulator; ``--configs``; grouped for wo_a), and cuBLAS bf16 on a pre-dequantised weight
(what a plain GEMM reaches; not a usable path: it needs the bf16 weights resident). CUDA events, median of
--reps; TFLOP/s per case; max relative error of each kernel against the bf16 GEMM.

    python3 bench/bench_fp8_prefill.py --out $OUT/fp8_prefill.json
    python3 bench/bench_fp8_prefill.py --reps 1 --configs c128x128 --out /tmp/f.json   # CPU smoke (interpreter)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():   # CPU smoke run: small shapes through the Triton interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4lib.fullscale import time_cuda  # noqa: E402

from dsv4lib.kernels.fp8_linear import (FP8Config, dequantize_fp8_reference, fp8_gemm_chained,  # noqa: E402
                                         fp8_gemm_dequant, fp8_linear, random_fp8)

SHAPES = {"wq_a|wkv": (1536, 4096, 1), "wq_b": (32768, 1024, 1), "wo_b": (4096, 8192, 1),
          "shared w1|w3": (4096, 4096, 1), "shared w2": (4096, 2048, 1), "indexer wq_b": (8192, 1024, 1),
          "wo_a (8 groups)": (8192, 4096, 8)}     # grouped: x [M, 8, 4096], group g -> rows [1024 g, 1024 (g+1))
CONFIGS = {"c128x128": (128, 128, 8, 3, 8), "c128x256": (128, 256, 8, 3, 8), "c128x128s4": (128, 128, 8, 4, 8),
           "c64x256": (64, 256, 4, 3, 8), "c128x64": (128, 64, 4, 4, 8)}


def _time(fn, reps: int) -> float:
    """Median microseconds per call (CUDA events, one warm-up call)."""
    return time_cuda(fn, reps) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default="fp8_prefill.json")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SHAPES if dev.type == "cuda" else {k: (n // 32, kk // 16, G) for k, (n, kk, G) in SHAPES.items()}
    if dev.type != "cuda":
        a.tokens = min(a.tokens, 80)
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__, "tokens": a.tokens, "cases": {}}
    names = a.configs.split(",")
    for name, (N, K, G) in shapes.items():
        w, s = random_fp8(N, K, dev, g)
        x = torch.randn(a.tokens, G, K, device=dev, generator=g).to(torch.bfloat16)
        wb = dequantize_fp8_reference(w, s).to(torch.bfloat16)
        wg = wb.view(G, N // G, K)
        ref = torch.einsum("mgk,gnk->mgn", x, wg).reshape(a.tokens, N)   # block-diagonal (G = 1: x @ W^T)
        x2 = x.reshape(-1, K)
        flop = 2.0 * a.tokens * N * K

        def rel(y):
            return ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        row = {"bf16_cublas_us": _time(lambda: torch.einsum("mgk,gnk->mgn", x, wg), a.reps)}
        per_block = lambda: fp8_linear(x, w, s, config=FP8Config(128, 128, warps=8, stages=3), groups=G).reshape(a.tokens, N)  # noqa: E731
        row["per_block_us"] = _time(per_block, a.reps)
        row["per_block_rel"] = rel(per_block())
        row["dequant_cublas_us"] = _time(lambda: fp8_gemm_dequant(x2, w, s, groups=G), a.reps)   # dequant included
        row["dequant_cublas_rel"] = rel(fp8_gemm_dequant(x2, w, s, groups=G))
        for c in names:
            try:
                row[c] = {"us": _time(lambda: fp8_gemm_chained(x2, w, s, CONFIGS[c], groups=G), a.reps),
                          "rel": rel(fp8_gemm_chained(x2, w, s, CONFIGS[c], groups=G))}
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                row[c] = {"error": repr(e)[:200]}
        row["tflops"] = {k: flop / (v if isinstance(v, float) else v.get("us", float("nan"))) / 1e6
                         for k, v in row.items() if k.endswith("_us") or isinstance(v, dict)}
        res["cases"][name] = row
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"M = {a.tokens} tokens; us per call (TFLOP/s)")
    print("| projection (N x K) | bf16 cuBLAS | dequant + cuBLAS | per-block | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for name, row in res["cases"].items():
        t = row["tflops"]
        cells = [f"{row[c]['us']:.0f} ({t[c]:.0f})" if "us" in row[c] else "err" for c in names]
        print(f"| {name} {shapes[name][0]}x{shapes[name][1]} | {row['bf16_cublas_us']:.0f} ({t['bf16_cublas_us']:.0f}) | "
              f"{row['dequant_cublas_us']:.0f} ({t['dequant_cublas_us']:.0f}) | "
              f"{row['per_block_us']:.0f} ({t['per_block_us']:.0f}) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
