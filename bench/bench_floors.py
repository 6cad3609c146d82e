"""Two floors of the b1 decode step: the cost of one kernel boundary, and one kernel's HBM read ceiling. (GPU
script; prints a table, writes JSON.)

    python3 bench/bench_floors.py --out $OUT/floors.json          # H200: ~15 s (12 s measured)
    python3 bench/bench_floors.py --smoke --out /tmp/floors.json  # tiny shapes, CPU interpreter (no PDL, no graphs)

1. **Kernel boundary**: a chain of ``--chain`` launches (default 256) of one tiny Triton kernel on one stream,
   captured in ONE CUDA graph and replayed; us per launch. Each program loads one int32 ``src[pid % n]``, adds 1
   and stores it to ``dst[pid]``; src and dst swap every launch, so launch i reads what launch i-1 wrote (a real
   dependency; under PDL the load follows ``pdl_wait``). Variants (``CHAIN_VARIANTS``; every program one warp):
   1 program without / with PDL, one program per SM (132 on the H200) without / with PDL, and 32 one-warp
   programs per SM (4224: the shape of the project's one-row GEMV) with PDL.
2. **Read ceiling**: ``read_xor`` -- program p reads a contiguous tile of TILE bytes as int32 words laid out
   ``[UNROLL, BLOCK]`` (BLOCK = warps * 32 * 4 words: 16 contiguous bytes per thread and row), XOR-reduces it and
   stores one int32 -- over buffers of 4, 8, 32 and 256 MiB, rotated inside the graph body over distinct buffers
   totalling >= 512 MiB (so the 50 MB L2 cannot keep them; 2 buffers of 256 MiB); us per read = body / buffers.
   Swept: TILE in 2-16 KiB x warps in 1-8 (PDL on); the best config per size is the ceiling. Same run, same
   rotation: torch's ``dst.copy_(src)`` of the same size (GB/s counting read + write), ``copy_bandwidth`` (2 GiB
   copy, the project's roofline ceiling) once, and the project's FP8 one-row GEMVs (``fp8_linear``, default
   configs) at the 32 MB shapes and the 6 MB ``wq_a|wkv``: GB/s of weight bytes, % of ``copy_bandwidth`` and %
   of the read ceiling of the nearest measured size (nearest on a log scale: 8 MiB for the 6 MB one).

Measured (H200, torch 2.11, Triton 3.6; `bench/results/h200_floors_v16.*`, kernels/BENCHMARKS.md "Thirteenth
session"): 4224 one-warp programs cost 5.44 us per launch even with PDL (the GPU dispatches ~780 programs per us; one
program 0.54, one per SM 0.84), so programs of 2 / 4 KiB cap a read at ~1.65 / ~3.2 TB/s at any size and 8 KiB+ reach
4.37 TB/s; a whole read of 4 / 8 / 32 MiB in one kernel reaches 47 / 65 / 92 % of copy. The 32 MB one-row GEMVs run
at 77-80 % of that ceiling, the 6 MB one at 67 %.

Both instrument kernels live here (they are not library kernels); each has a torch / numpy reference
(``read_xor_reference``, ``chain_reference``) that tests/test_bench_smoke.py checks, and every config is checked
against it on the device before it is timed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.bench_kernels import us_each  # noqa: E402
from dsv4lib.fullscale import copy_bandwidth  # noqa: E402
from dsv4lib.kernels.fp8_linear import fp8_linear, random_fp8  # noqa: E402
from dsv4lib.kernels.pdl import launch_args, pdl_wait  # noqa: E402

MiB = 1 << 20
ROTATION_BYTES = 512 * MiB                         # per size, the rotated buffers total at least this (L2: 50 MB)
READ_SIZES = [4 * MiB, 8 * MiB, 32 * MiB, 256 * MiB]
SMOKE_READ_SIZES = [64 << 10]
READ_CONFIGS = [(t << 10, w) for t in (2, 4, 8, 16) for w in (1, 2, 4, 8)]   # (tile bytes, warps); UNROLL < 1 skipped
SMOKE_READ_CONFIGS = [(2 << 10, 1), (4 << 10, 2)]
# (label, programs: int or "sm" / "32sm" = per SM, warps, pdl)
CHAIN_VARIANTS = [("1 prog", 1, 1, False), ("1 prog PDL", 1, 1, True), ("SM progs", "sm", 1, False),
                  ("SM progs PDL", "sm", 1, True), ("32/SM 1-warp PDL", "32sm", 1, True)]
# (name, N, K, groups): the decode step's FP8 one-row GEMVs (bench/sweep_fp8.py SHAPES)
GEMV_SHAPES = [("wq_a|wkv", 1536, 4096, 1), ("wq_b", 32768, 1024, 1), ("wo_a (8 groups)", 8192, 4096, 8),
               ("wo_b", 4096, 8192, 1)]
SMOKE_GEMV_SHAPES = [("a", 256, 512, 2), ("b", 128, 256, 1)]


# ----------------------------------------------------------------------------- kernel boundary: the chain
@triton.jit
def _chain_kernel(src, dst, n, PDL: tl.constexpr):
    pdl_wait(PDL)
    pid = tl.program_id(0)
    v = tl.load(src + pid % n)
    tl.store(dst + pid, v + 1)


def chain_step(src: torch.Tensor, dst: torch.Tensor, programs: int, warps: int = 1, pdl: bool = False) -> bool:
    """One launch of ``programs`` programs: ``dst[pid] = src[pid % src.numel()] + 1`` (int32). ``pdl``: launch with
    PDL where the device has it (``kernels.pdl.launch_args``); returns whether it did."""
    if src.dtype != torch.int32 or dst.dtype != torch.int32 or dst.numel() < programs:
        raise ValueError(f"chain_step: int32 src and dst of >= {programs} elements, got {src.dtype} {src.numel()}, "
                         f"{dst.dtype} {dst.numel()}")
    la = launch_args(src.device) if pdl else {"PDL": False}
    _chain_kernel[(programs,)](src, dst, src.numel(), num_warps=warps, num_stages=1, **la)
    return la["PDL"]


def chain_reference(src: torch.Tensor, programs: int) -> torch.Tensor:
    """``chain_step``'s output: ``src[pid % n] + 1`` for pid < programs."""
    return src[torch.arange(programs, device=src.device) % src.numel()] + 1


# ----------------------------------------------------------------------------- read ceiling: read_xor
@triton.jit
def _read_xor_kernel(buf, out, TILE_WORDS: tl.constexpr, UNROLL: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_wait(PDL)
    pid = tl.program_id(0)
    offs = pid * TILE_WORDS + tl.arange(0, UNROLL)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    v = tl.load(buf + offs)
    tl.store(out + pid, tl.xor_sum(tl.xor_sum(v, axis=1), axis=0))


def read_shape(tile_bytes: int, warps: int) -> tuple[int, int]:
    """(UNROLL, BLOCK) of a read_xor config: BLOCK = warps * 32 threads * 4 words; UNROLL rows of BLOCK words make
    one tile. ValueError when the tile is not a power of two or smaller than one row."""
    block = warps * 32 * 4
    if tile_bytes <= 0 or tile_bytes & (tile_bytes - 1) or warps <= 0 or warps & (warps - 1):
        raise ValueError(f"read_xor: tile_bytes ({tile_bytes}) and warps ({warps}) must be powers of two")
    if tile_bytes // 4 < block:
        raise ValueError(f"read_xor: a tile of {tile_bytes} bytes is smaller than one row of {warps} warps "
                         f"({block * 4} bytes)")
    return tile_bytes // 4 // block, block


def read_xor(buf: torch.Tensor, tile_bytes: int, warps: int, out: torch.Tensor | None = None,
             pdl: bool = True) -> torch.Tensor:
    """XOR of every int32 tile of ``tile_bytes`` bytes of the contiguous int32 ``buf``: out[p] = xor of
    buf[p * tile_words : (p + 1) * tile_words], one program per tile (``pdl``: PDL launch where available)."""
    if buf.dtype != torch.int32 or not buf.is_contiguous():
        raise ValueError(f"read_xor: buf must be contiguous int32, got {buf.dtype}")
    nbytes = buf.numel() * 4
    unroll, block = read_shape(tile_bytes, warps)
    if nbytes % tile_bytes:
        raise ValueError(f"read_xor: the buffer's {nbytes} bytes are not a multiple of the tile's {tile_bytes} bytes")
    programs = nbytes // tile_bytes
    if out is None:
        out = torch.empty(programs, dtype=torch.int32, device=buf.device)
    _read_xor_kernel[(programs,)](buf, out, TILE_WORDS=tile_bytes // 4, UNROLL=unroll, BLOCK=block,
                                  num_warps=warps, num_stages=1,
                                  **(launch_args(buf.device) if pdl else {"PDL": False}))
    return out[:programs]


def read_xor_reference(buf: torch.Tensor, tile_bytes: int) -> torch.Tensor:
    """numpy ``bitwise_xor.reduce`` of each tile."""
    a = buf.detach().cpu().numpy().reshape(-1, tile_bytes // 4)
    return torch.from_numpy(np.bitwise_xor.reduce(a, axis=1).astype(np.int32))


# ----------------------------------------------------------------------------- measurements
def bench_chain(dev, sms: int, n: int, reps: int) -> list[dict]:
    rows = []
    for label, programs, warps, pdl in CHAIN_VARIANTS:
        p = {"sm": sms, "32sm": 32 * sms}.get(programs, programs)
        bufs = [torch.zeros(p, dtype=torch.int32, device=dev) for _ in range(2)]
        used = []

        def body():
            for i in range(n):
                used.append(chain_step(bufs[i % 2], bufs[(i + 1) % 2], p, warps, pdl))

        body()                                               # check: n launches from zeros -> n everywhere
        got = bufs[n % 2]
        if not torch.equal(got.cpu(), torch.full((p,), n, dtype=torch.int32)):
            raise AssertionError(f"chain {label}: after {n} launches expected {n}, got {got[:8].tolist()}")
        us = us_each(body, n, reps)
        rows.append({"variant": label, "programs": p, "warps": warps, "pdl": pdl, "pdl_effective": bool(used[-1]),
                     "launches": n, "us_per_launch": us})
    return rows


def _rotation(nbytes: int, smoke: bool) -> int:
    return 2 if smoke else max(2, math.ceil(ROTATION_BYTES / nbytes))


def bench_read(dev, sizes, configs, reps, smoke) -> tuple[list[dict], list[dict]]:
    """Every (size, config) of read_xor, then per size the best one and torch's copy in the same rotation."""
    pool_bytes = max(_rotation(s, smoke) * s for s in sizes)
    g = torch.Generator(device=dev).manual_seed(0)
    pool = torch.randint(-2**31, 2**31 - 1, (pool_bytes // 4,), dtype=torch.int32, device=dev, generator=g)
    dst_pool = torch.empty_like(pool)
    out = torch.empty(max(sizes) // min(t for t, _ in configs), dtype=torch.int32, device=dev)
    rows, best = [], []
    for tile, warps in configs:
        try:
            unroll, block = read_shape(tile, warps)
        except ValueError:
            continue
        small = pool[: min(sizes) // 4]                      # check the config once against numpy
        if not torch.equal(read_xor(small, tile, warps, out).cpu(), read_xor_reference(small, tile)):
            raise AssertionError(f"read_xor tile={tile} warps={warps} differs from its numpy reference")
        for size in sizes:
            k = _rotation(size, smoke)
            bufs = [pool[i * size // 4:(i + 1) * size // 4] for i in range(k)]
            us = us_each(lambda: [read_xor(b, tile, warps, out) for b in bufs], k, reps)
            rows.append({"MiB": size / MiB, "bytes": size, "buffers": k, "tile": tile, "warps": warps,
                         "unroll": unroll, "block_words": block, "us": us, "GBps": size / us / 1e3})
    for size in sizes:
        k = _rotation(size, smoke)
        src = [pool[i * size // 4:(i + 1) * size // 4] for i in range(k)]
        dst = [dst_pool[i * size // 4:(i + 1) * size // 4] for i in range(k)]
        cus = us_each(lambda: [d.copy_(s) for d, s in zip(dst, src)], k, reps)
        b = max((r for r in rows if r["bytes"] == size), key=lambda r: r["GBps"])
        best.append({"MiB": size / MiB, "bytes": size, "buffers": k, "tile": b["tile"], "warps": b["warps"],
                     "us": b["us"], "GBps": b["GBps"], "torch_copy_us": cus, "torch_copy_GBps": 2 * size / cus / 1e3})
    del pool, dst_pool
    return rows, best


def nearest_size(nbytes: int, best: list[dict]) -> dict:
    """The read-ceiling row whose size is nearest to ``nbytes`` on a log scale."""
    return min(best, key=lambda r: abs(math.log(r["bytes"] / nbytes)))


def bench_gemv(dev, shapes, best, copy_GBps, reps, smoke) -> list[dict]:
    rows = []
    g = torch.Generator(device=dev).manual_seed(1)
    for name, N, K, G in shapes:
        nb = N * K
        k = _rotation(nb, smoke)
        ws = [random_fp8(N, K, dev, g) for _ in range(k)]
        x = torch.randn(1, *((G,) if G > 1 else ()), K, device=dev, dtype=torch.bfloat16)
        us = us_each(lambda: [fp8_linear(x, w, s, groups=G) for w, s in ws], k, reps)
        gbps = nb / us / 1e3
        ceil = nearest_size(nb, best)
        rows.append({"shape": name, "N": N, "K": K, "groups": G, "MB": nb / MiB, "copies": k, "us": us,
                     "GBps": gbps, "pct_copy": 100 * gbps / copy_GBps, "ceiling_MiB": ceil["MiB"],
                     "pct_read_ceiling": 100 * gbps / ceil["GBps"]})
        del ws
    return rows


def format_table(res: dict) -> str:
    ln = [f"{res['device']}  torch {res['torch']}  triton {res['triton']}  {res['sms']} SMs  "
          f"copy_bandwidth {res['copy_GBps']:.4g} GB/s (read+write)",
          f"kernel boundary: chain of {res['chain_len']} launches in one graph, us per launch"]
    ln += [f"  {r['variant']:<18}{r['programs']:>6} progs {r['us_per_launch']:>9.4g}"
           + ("" if r["pdl_effective"] == r["pdl"] else "  (PDL unavailable)") for r in res["chain"]]
    ln.append(f"read ceiling (read_xor, best of {len(res['read']) // max(1, len(res['read_best']))} configs) vs "
              "torch copy, us per buffer")
    ln.append(f"  {'MiB':>6} {'bufs':>4} {'tile':>5} {'warps':>5} {'us':>9} {'GB/s':>6} {'copy us':>9} {'GB/s':>6}")
    ln += [f"  {r['MiB']:>6.4g} {r['buffers']:>4} {r['tile'] >> 10:>4}K {r['warps']:>5} {r['us']:>9.4g} "
           f"{r['GBps']:>6.4g} {r['torch_copy_us']:>9.4g} {r['torch_copy_GBps']:>6.4g}" for r in res["read_best"]]
    ln.append("FP8 one-row GEMVs (fp8_linear), weights rotated the same way")
    ln.append(f"  {'shape':<16} {'MB':>5} {'us':>9} {'GB/s':>6} {'%copy':>6} {'%read':>6}  (ceiling of)")
    ln += [f"  {r['shape']:<16} {r['MB']:>5.3g} {r['us']:>9.4g} {r['GBps']:>6.4g} {r['pct_copy']:>6.1f} "
           f"{r['pct_read_ceiling']:>6.1f}  {r['ceiling_MiB']:.4g} MiB" for r in res["gemv"]]
    return "\n".join(ln)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--chain", type=int, default=256, help="launches per chain (one CUDA graph)")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    reps = 1 if a.smoke else a.reps
    n = 3 if a.smoke else a.chain
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if cuda and not a.smoke else 4
    res = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "sms": sms, "smoke": a.smoke, "reps": reps, "chain_len": n,
           "rotation_bytes": ROTATION_BYTES}
    res["copy_bytes"] = 2 << 30 if cuda else 1 << 20
    res["copy_GBps"] = copy_bandwidth(dev, res["copy_bytes"]) / 1e9
    res["chain"] = bench_chain(dev, sms, n, reps)
    res["read"], res["read_best"] = bench_read(dev, SMOKE_READ_SIZES if a.smoke else READ_SIZES,
                                               SMOKE_READ_CONFIGS if a.smoke else READ_CONFIGS, reps, a.smoke)
    res["gemv"] = bench_gemv(dev, SMOKE_GEMV_SHAPES if a.smoke else GEMV_SHAPES, res["read_best"], res["copy_GBps"],
                             reps, a.smoke)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(format_table(res))
    return res


if __name__ == "__main__":
    main()
