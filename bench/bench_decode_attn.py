"""Per-call GPU time of the fused decode-step kernels (kernels/decode_attention.py,
kernels/compressor_step.py) at V4-Flash shapes, against the torch reference and (``--old DIR``) the
previous kernel versions (files ``DIR/decode_attention.py`` and ``DIR/compressor_step.py``).

Times are CUDA-graph replays of ``--calls`` back-to-back calls (what a captured decode step sees:
no host launch cost, but every kernel's own start), CUDA events, median of ``--reps`` replays / calls.

* attention: CSA (window 128 + top-512 of T = ctx/4 gathered entries), HCA (window + T = ctx/128
  entries), sliding (window only); 64 heads x 512, bf16; batch 1 and 8; contexts ``--ctx``
  (cache ``max_seq_len = ctx + 64``, as bench/profile_step.py). ``--sweep`` times tuning configs.
* compressor step: average per call over r consecutive positions (one graph of r calls, each reading
  its own position tensor) for CSA main (r 4, hd 512, overlap), CSA indexer (r 4, hd 128, fp32
  entries), HCA (r 128, hd 512); plus the completion call (pos % r == r - 1) alone.

    python3 bench/bench_decode_attn.py --old .bench_old --sweep --out $OUT/decode_attn.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4lib.kernels import compressor_step as new_cs  # noqa: E402
from dsv4lib.kernels import decode_attention as new_da  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import graph_us, kernel_us  # noqa: E402


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def attn_inputs(kind: str, B: int, ctx: int, g: torch.Generator):
    H, C, W = 64, 512, 128
    L = ctx + 64
    dev, bf = "cuda", torch.bfloat16
    q = (torch.randn(B, H, C, device=dev, generator=g) * 0.05).to(bf)
    win = torch.randn(B, W, C, device=dev, generator=g).to(bf)
    sink = torch.randn(H, device=dev, generator=g)
    pos = torch.tensor(ctx, device=dev)
    ent = sel = thr = None
    if kind == "csa":
        T = -(-L // 4)
        ent = torch.randn(B, T, C, device=dev, generator=g).to(bf)
        sel = torch.argsort(torch.rand(B, T, device=dev, generator=g), -1)[:, :min(512, T)]
        thr = torch.tensor((ctx + 1) // 4, device=dev)
    elif kind == "hca":
        T = -(-L // 128)
        ent = torch.randn(B, T, C, device=dev, generator=g).to(bf)
        thr = torch.tensor((ctx + 1) // 128, device=dev)
    return q, win, ent, sel, pos, thr, sink, C ** -0.5


def bench_attention(a, old) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for ctx in a.ctx:
        for B in a.batch:
            for kind in ("csa", "hca", "sliding"):
                args = attn_inputs(kind, B, ctx, g)
                ref = new_da.decode_attention_reference(*args).float()
                out = new_da.decode_attention(*args).float()
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                row = {"kind": kind, "B": B, "ctx": ctx, "rel_err_new": err,
                       "new_us": graph_us(lambda i: new_da.decode_attention(*args), a.calls, a.reps),
                       "torch_us": graph_us(lambda i: new_da.decode_attention_reference(*args), a.calls, a.reps)}
                # as the model calls it: the inverse RoPE of the output's trailing 64 channels in the combine
                rope = (torch.rand(32, device="cuda", generator=g), -torch.rand(32, device="cuda", generator=g))
                row["new_rope_us"] = graph_us(lambda i: new_da.decode_attention(*args, rope=rope), a.calls, a.reps)
                # all heads in one program (before session 11's head groups), same run
                row["one_group_rope_us"] = graph_us(lambda i: new_da.decode_attention(*args, rope=rope, groups=1),
                                                    a.calls, a.reps)
                row["one_group_max_diff"] = (new_da.decode_attention(*args, rope=rope, groups=1).float()
                                             - new_da.decode_attention(*args, rope=rope).float()).abs().max().item()
                if old is not None:
                    row["old_us"] = graph_us(lambda i: old.decode_attention(*args), a.calls, a.reps)
                    row["old_rope_us"] = graph_us(lambda i: old.decode_attention(*args, rope=rope), a.calls, a.reps)
                    row["rope_max_diff_new_old"] = (new_da.decode_attention(*args, rope=rope).float()
                                                    - old.decode_attention(*args, rope=rope).float()).abs().max().item()
                if a.kernels:   # GPU time per launch of each kernel of the call (partial / combine)
                    row["kernels_us"] = kernel_us(lambda: new_da.decode_attention(*args, rope=rope), a.calls)
                rows.append(row)
                print(f"attn {kind:8s} B{B} ctx{ctx:6d}: new {row['new_us']:7.1f} us  old "
                      f"{row.get('old_us', float('nan')):7.1f} us  torch {row['torch_us']:7.1f} us  rel err {err:.1e}"
                      f"  | with RoPE: new {row['new_rope_us']:7.1f} one head group {row['one_group_rope_us']:7.1f}"
                      f" (max diff {row['one_group_max_diff']:.1e}) old {row.get('old_rope_us', float('nan')):7.1f} us"
                      f" max|new-old| {row.get('rope_max_diff_new_old', float('nan')):.1e}"
                      + (f"  kernels {row['kernels_us']}" if a.kernels else ""), flush=True)
    return rows


def sweep_attention(a) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(1)
    cfgs = [dict(bn=64, bc=64, num_warps=4), dict(bn=32, bc=64, num_warps=4), dict(bn=64, bc=128, num_warps=4),
            dict(bn=32, bc=128, num_warps=4), dict(bn=64, bc=64, num_warps=8), dict(bn=16, bc=128, num_warps=4),
            dict(bn=64, bc=64, num_warps=4, max_programs=64), dict(bn=32, bc=64, num_warps=4, max_programs=64)]
    rows = []
    for kind, B, ctx in (("csa", 1, 1024), ("csa", 8, 1024), ("csa", 1, 16384), ("csa", 8, 16384),
                         ("hca", 8, 16384)):
        args = attn_inputs(kind, B, ctx, g)
        ref = new_da.decode_attention_reference(*args).float()
        line = []
        for cfg in cfgs:
            try:
                err = ((new_da.decode_attention(*args, **cfg).float() - ref).abs().max() / ref.abs().max()).item()
                us = graph_us(lambda i: new_da.decode_attention(*args, **cfg), a.calls, a.reps)
            except Exception as e:  # noqa: BLE001 -- a config that does not compile/launch is reported
                err, us = float("nan"), float("nan")
                print("  sweep error", cfg, repr(e)[:200])
            rows.append({"kind": kind, "B": B, "ctx": ctx, **cfg, "us": us, "rel_err": err})
            line.append(f"{us:6.1f}")
        print(f"sweep {kind} B{B} ctx{ctx}: " + " ".join(line), flush=True)
    print("sweep configs:", cfgs)
    return rows


def sweep_combine(a) -> list[dict]:
    """The combine launch's knobs (``decode_attention.COMBINE``), per kernel (profiler), with the model's RoPE."""
    g = torch.Generator(device="cuda").manual_seed(3)
    saved, rows = new_da.COMBINE, []
    rope = (torch.rand(32, device="cuda", generator=g), -torch.rand(32, device="cuda", generator=g))
    for kind, B, ctx in (("csa", 1, 1024), ("csa", 8, 1024), ("hca", 8, 1024), ("sliding", 8, 1024)):
        args = attn_inputs(kind, B, ctx, g)
        ref = new_da.decode_attention(*args, rope=rope).float()
        for cfg in ((128, 4), (512, 4), (512, 8), (256, 2), (64, 2), (128, 1), (512, 16)):
            new_da.COMBINE = cfg
            try:
                diff = (new_da.decode_attention(*args, rope=rope).float() - ref).abs().max().item()
                ks = kernel_us(lambda: new_da.decode_attention(*args, rope=rope), a.calls)
                us = graph_us(lambda i: new_da.decode_attention(*args, rope=rope), a.calls, a.reps)
            except Exception as e:  # noqa: BLE001
                print("  combine sweep error", cfg, repr(e)[:200])
                continue
            comb = next((v for k, v in ks.items() if "combine" in k), float("nan"))
            rows.append({"kind": kind, "B": B, "ctx": ctx, "cb": cfg[0], "warps": cfg[1], "combine_us": comb,
                         "call_us": us, "max_diff": diff})
            print(f"combine {kind:8s} B{B} cb {cfg[0]:3d} warps {cfg[1]:2d}: combine {comb:6.2f} us, call {us:6.2f} us, "
                  f"max diff {diff:.1e}", flush=True)
    new_da.COMBINE = saved
    return rows


def comp_inputs(kind: str, B: int, g: torch.Generator):
    from dsv4lib.model.static_cache import _comp_state
    r, hd, ent_dtype = {"csa": (4, 512, torch.bfloat16), "csa_index": (4, 128, torch.float32),
                        "hca": (128, 512, torch.bfloat16)}[kind]
    coff = 2 if r == 4 else 1
    st = _comp_state(B, r, hd, 16384 + 256, ent_dtype, "cuda")
    for t in (st.buf_kv, st.buf_gate, st.prev_kv, st.prev_gate):
        t.copy_(torch.randn(t.shape, device="cuda", generator=g))
    y = torch.randn(B, 2 * coff * hd, device="cuda", generator=g).to(torch.bfloat16)
    kv, gate = y[:, :coff * hd], y[:, coff * hd:]                       # column slices of one projection
    ape = torch.randn(r, coff * hd, device="cuda", generator=g) * 0.3
    nw = torch.rand(hd, device="cuda", generator=g) + 0.5
    cos, sin = torch.rand(32, device="cuda", generator=g), torch.rand(32, device="cuda", generator=g)
    return r, st, kv, gate, ape, nw, cos, sin


def bench_compressor(a, old) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(2)
    rows = []
    mods = {"new": new_cs} if old is None else {"new": new_cs, "old": old}
    for B in a.batch:
        for kind in ("csa", "csa_index", "hca"):
            r, st, kv, gate, ape, nw, cos, sin = comp_inputs(kind, B, g)
            base = 16384 - 16384 % r
            poss = [torch.tensor(base + i, device="cuda") for i in range(r)]
            done = torch.tensor(base + r - 1, device="cuda")
            row = {"kind": kind, "B": B, "ratio": r}
            for name, mod in mods.items():
                def step(p, mod=mod):
                    mod.compressor_step_fused(kv, gate, p, st.buf_kv, st.buf_gate, st.prev_kv, st.prev_gate,
                                              ape, nw, cos, sin, st.entries, 1e-6)
                row[f"{name}_avg_us"] = graph_us(lambda i: step(poss[i % r]), max(r, a.calls), a.reps)
                row[f"{name}_complete_us"] = graph_us(lambda i: step(done), a.calls, a.reps)
                row[f"{name}_partial_us"] = graph_us(lambda i: step(poss[0]), a.calls, a.reps)
            if old is None:
                for nwarps in (2, 4, 8, 16):
                    def step2(p, nwarps=nwarps):
                        new_cs.compressor_step_fused(kv, gate, p, st.buf_kv, st.buf_gate, st.prev_kv, st.prev_gate,
                                                     ape, nw, cos, sin, st.entries, 1e-6, num_warps=nwarps)
                    row[f"complete_us_w{nwarps}"] = graph_us(lambda i: step2(done), a.calls, a.reps)
            rows.append(row)
            print(f"comp {kind:9s} B{B} r{r:3d}: " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()
                                                             if k.endswith("us") or "_us_" in k), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 16384])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--old", type=Path, default=None, help="folder with the previous kernel files")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-compressor", action="store_true", help="attention only")
    ap.add_argument("--kernels", action="store_true", help="also each kernel's GPU time per launch (profiler)")
    ap.add_argument("--combine-sweep", action="store_true", help="time the combine launch's (channels, warps)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    old_da = _load(a.old / "decode_attention.py", "old_decode_attention") if a.old else None
    old_cs = _load(a.old / "compressor_step.py", "old_compressor_step") if a.old else None
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "calls": a.calls,
           "defaults": {"lowp": new_da.LOWP_CFG, "max_programs": new_da.MAX_PROGRAMS}}
    if not a.no_compressor:
        res["compressor"] = bench_compressor(a, old_cs)
    res["attention"] = bench_attention(a, old_da)
    if a.combine_sweep:
        res["combine_sweep"] = sweep_combine(a)
    if a.sweep:
        res["sweep"] = sweep_attention(a)
        res["compressor_warps"] = bench_compressor(a, None)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(a.out)


if __name__ == "__main__":
    main()
