"""Correctness sweep of INT2 prefill launch configs against the fp32 torch reference at several shapes
(GPU; a config that compiles but computes wrong values at some shape is found here, not in the model).

    python3 bench/check_prefill_configs.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4lib.kernels.int2_dequant import random_int2  # noqa: E402
from dsv4lib.kernels.int2_moe_decode import int2_moe_reference  # noqa: E402
from dsv4lib.kernels.int2_moe_prefill import GemmConfig, PrefillConfig, int2_moe_prefill, pick_prefill_config  # noqa: E402


def main() -> int:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(32, 256, 128, 4, 160), (32, 256, 128, 4, 40), (8, 512, 256, 2, 300), (256, 4096, 2048, 6, 1024)]
    for E, D, I, k, T in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        w = [t for p in (random_int2(E, I, D, dev, g), random_int2(E, I, D, dev, g), random_int2(E, D, I, dev, g))
             for t in p]
        x = torch.randn(T, D, device=dev).bfloat16().float()
        gc = torch.Generator().manual_seed(1)
        idx = torch.stack([torch.randperm(E, generator=gc)[:k] for _ in range(T)]).to(dev)
        wt = (torch.rand(T, k, generator=gc) + 0.25).to(dev)
        ref = int2_moe_reference(x, idx, wt, *w, 10.0)
        cands = [("default", pick_prefill_config(T, k, E))]
        small = E * I < 100000
        for bm, ex, bn_d, st in itertools.product((16, 64), (0, 2, 3), (64, 128), (1, 3)):
            if not small and (st == 1 or bn_d == 64):
                continue
            cands.append((f"bm{bm} expand{ex} down_bn{bn_d} stages{st}",
                          PrefillConfig(bm, GemmConfig(64, 8, 4, st, expand=ex), GemmConfig(bn_d, 8, 8 if bn_d == 128 else 4, st))))
        for name, cfg in cands:
            try:
                y = int2_moe_prefill(x, idx, wt, *w, 10.0, config=cfg)
                rel = ((y - ref).norm() / ref.norm()).item()
            except Exception as e:  # noqa: BLE001
                rel = float("nan")
                name += f" ERROR {type(e).__name__}"
            flag = "" if rel < 1e-3 else "   <-- WRONG"
            print(f"E{E} D{D} I{I} k{k} T{T}  {name:40s} rel {rel:.2e}{flag}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
