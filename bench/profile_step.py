"""Where the time goes: torch.profiler kernel tables for the full-scale decode step and prefill.

Builds the synthetic V4-Flash (dsv4lib.fullscale.synthetic_model), fills a static cache at
``--ctx`` positions with synthetic entries, and profiles

* ``graphed_b{B}``: replays of the whole decode step captured in one CUDA graph,
* ``static_b{B}``: the same step uncaptured (GPU kernel times are the same kernels; wall is host-bound),
* ``attention_b1``: the 43 attention steps alone (their own graph),
* ``prefill_{S}``: one eager prefill of S tokens (last-position logits), and ``mmlu_{B}x{L}``.

For every case: GPU time per step summed over kernels, kernel count, and the top kernels by total
time. Prints a short table last; writes everything to ``--out`` (JSON).

    python3 bench/profile_step.py --out $OUT/profile.json            # H200, ~2 min (--unfused: torch step)
    python3 bench/profile_step.py --single-stream --out p.json       # per-kernel times that add up to the step
    python3 bench/profile_step.py --preset tiny --ctx 64 --prefill 64 --out /tmp/p.json   # CPU smoke
    python3 bench/profile_step.py --batches "" --by-module --out p.json   # prefill/MMLU time per submodule
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if not torch.cuda.is_available():   # CPU smoke runs: the Triton step kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4lib.config import ModelConfig  # noqa: E402
from dsv4lib.fullscale import synthetic_model, without_mtp  # noqa: E402
from dsv4lib.model.graphed import (GraphedDecoder, attention_step, stack_projections, static_decode_step,  # noqa: E402
                                   step_context)
from dsv4lib.model.static_cache import fill_synthetic, new_static_cache  # noqa: E402


def _kernel_table(prof, steps: int, top: int) -> dict:
    """Sum device-side kernel/memcpy/memset events by name -> per-step microseconds and counts
    (on a CPU-only run: the aten ops' self CPU time)."""
    tot, cnt = defaultdict(float), defaultdict(int)
    cuda = any(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    for e in prof.events():
        if e.name.startswith("mod:"):        # --by-module ranges, not kernels
            continue
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name] += e.time_range.elapsed_us()
        elif not cuda and e.name.startswith("aten::"):   # CPU runs: ops' self time instead
            tot[e.name] += e.self_cpu_time_total
        else:
            continue
        cnt[e.name] += 1
    rows = sorted(tot, key=tot.get, reverse=True)
    return {"gpu_us_per_step": sum(tot.values()) / steps,
            "kernels_per_step": sum(cnt.values()) / steps,
            "top": [{"name": n[:160], "us_per_step": tot[n] / steps, "calls_per_step": cnt[n] / steps}
                    for n in rows[:top]]}


def _module_ranges(model, depth: int = 4):
    """Wrap the forward of every submodule down to ``depth`` dotted levels in a ``record_function`` range
    named ``mod:<path without layer indices>`` (e.g. ``mod:layers.attn.indexer``); returns the hook handles."""
    from torch.autograd.profiler import record_function
    handles = []
    for name, m in model.named_modules():
        if not name or name.count(".") >= depth:
            continue
        tag = "mod:" + ".".join(p for p in name.split(".") if not p.isdigit())

        def pre(mod, args, tag=tag):
            mod._prof_range = record_function(tag)
            mod._prof_range.__enter__()

        def post(mod, args, out):
            mod._prof_range.__exit__(None, None, None)
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def _module_table(prof, steps: int) -> dict:
    """Device time per innermost ``mod:`` range (``_module_ranges``). On CUDA every kernel is charged to the
    innermost range of the ranges' GPU-side spans (the profiler's user annotations) that contains its start;
    CPU-only runs charge the aten ops' self CPU time to the innermost range open at their start (one
    "kernel" per op)."""
    evs = prof.events()
    cuda = any(e.device_type == torch.autograd.DeviceType.CUDA for e in evs)
    dev = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    ranges = sorted((e.time_range.start, e.time_range.end, e.name[4:]) for e in evs
                    if e.name.startswith("mod:") and e.device_type == dev)
    tot, cnt = defaultdict(float), defaultdict(int)
    per = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))   # module -> kernel -> [us, calls]
    for e in evs:
        if e.device_type != dev or e.name.startswith("mod:") or (not cuda and not e.name.startswith("aten::")):
            continue
        t0, owner = e.time_range.start, "(outside modules)"
        for a, b, n in ranges:   # innermost = the latest-starting range that contains t0
            if a > t0:
                break
            if b >= t0:
                owner = n
        us = e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
        tot[owner] += us
        cnt[owner] += 1
        k = per[owner][e.name[:100]]
        k[0] += us
        k[1] += 1
    return {n: {"us_per_step": tot[n] / steps, "kernels_per_step": cnt[n] / steps,
                "kernels": [{"name": k, "us_per_step": v[0] / steps, "calls_per_step": v[1] / steps}
                            for k, v in sorted(per[n].items(), key=lambda kv: -kv[1][0])[:8]]}
            for n in sorted(tot, key=tot.get, reverse=True)}


def ctas_per_sm(regs: int, warps: int, shared: int, *, sm_regs: int = 65536, sm_shared: int = 233472,
                max_warps: int = 64, max_ctas: int = 32) -> int:
    """Resident CTAs of one kernel per Hopper SM (H100/H200 limits by default): registers are allocated per warp
    in units of 256 (8 per thread), each CTA reserves 1 KB of shared memory on top of its own."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = sm_regs // (per_warp * warps)
    by_shared = sm_shared // (shared + 1024) if shared else max_ctas
    return max(0, min(by_regs, by_shared, max_warps // warps, max_ctas))


def kernel_resources() -> list[dict]:
    """Registers, spills, shared memory and warps of every Triton kernel specialisation launched so far in
    this process (the JIT caches of ``dsv4lib.kernels``; GPU only -- register counts come from the loaded
    module). Read it before changing a tile: a config at 255 registers with spills is the first suspect."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction
    import dsv4lib.kernels as kpkg
    from dsv4lib.kernels.ptxas_check import wgmma_serialized
    rows = []
    for info in pkgutil.iter_modules(kpkg.__path__):
        mod = importlib.import_module(f"dsv4lib.kernels.{info.name}")
        for name, fn in vars(mod).items():
            if not isinstance(fn, JITFunction) or fn.__module__ != mod.__name__:
                continue
            for cache in getattr(fn, "device_caches", {}).values():
                for k in (cache[0] if isinstance(cache, tuple) else {}).values():
                    md = k.metadata
                    ttgir = (getattr(k, "asm", None) or {}).get("ttgir", "")
                    waits = [ln.split("pendings = ")[1].split()[0] for ln in ttgir.splitlines()
                             if "warp_group_dot_wait" in ln and "pendings = " in ln]
                    serial = wgmma_serialized((getattr(k, "asm", None) or {}).get("ptx", "")) if waits else ""
                    regs, warps = getattr(k, "n_regs", None), getattr(md, "num_warps", None)
                    shared = getattr(md, "shared", None)
                    occ = ctas_per_sm(regs, warps, shared) if None not in (regs, warps, shared) else None
                    rows.append({"kernel": f"{info.name}.{name}", "warps": warps, "ctas_per_sm": occ,
                                 "stages": getattr(md, "num_stages", None), "shared": shared,
                                 "regs": regs, "spills": getattr(k, "n_spills", None),
                                 # wgmma groups left in flight at each wait (0 everywhere: MMA never overlaps)
                                 "wgmma_waits": ",".join(waits),
                                 # ptxas may still serialise them all (C7515): kernels/ptxas_check.py
                                 "wgmma_serialized": serial})
    return rows


def _timeline(prof, steps: int) -> dict:
    """The last step's kernels in start order (graph replays run back to back: the last ``1/steps`` of the
    kernels): start offset, duration and stream of each, and the step's span, the time some kernel is resident
    (with PDL a kernel is resident while it waits on its predecessor) and the time none is (launch gaps)."""
    ks = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                 and not e.name.startswith("mod:")), key=lambda e: e.time_range.start)
    ks = ks[len(ks) - len(ks) // steps:]
    if not ks:
        return {}
    t0 = ks[0].time_range.start
    busy, cur_a, cur_b = 0.0, None, None
    for e in ks:   # union of [start, end) intervals
        a, b = e.time_range.start, e.time_range.end
        if cur_b is None or a > cur_b:
            busy += 0 if cur_b is None else cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    busy += cur_b - cur_a
    span = max(e.time_range.end for e in ks) - t0
    # the step's frontier (latest end so far, in end order) advanced by each kernel: its share of the critical path
    front, frontier = t0, defaultdict(float)
    for e in sorted(ks, key=lambda e: e.time_range.end):
        if e.time_range.end > front:
            frontier[e.name[:60]] += e.time_range.end - front
            front = e.time_range.end
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy,
            "frontier_us": dict(sorted(frontier.items(), key=lambda kv: -kv[1])),
            "kernels": [{"name": e.name[:60], "start_us": round(e.time_range.start - t0, 2),
                         "us": round(e.time_range.elapsed_us(), 2), "stream": getattr(e, "device_resource_id", -1)}
                        for e in ks]}


def _profiled(fn, steps: int, dev, top: int, by_module: bool = False, timeline: bool = False) -> dict:
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    out = _kernel_table(prof, steps, top)
    out["wall_ms_per_step_profiled"] = wall * 1e3
    if by_module:
        out["by_module"] = _module_table(prof, steps)
    if timeline:
        out["timeline"] = _timeline(prof, steps)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="v4_flash")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--mmlu", default="32x192")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--unfused", action="store_true", help="torch static step instead of the Triton step kernels")
    ap.add_argument("--single-stream", action="store_true",
                    help="no concurrent side-stream branches (per-kernel times then add up to the step)")
    ap.add_argument("--pdl", action="store_true",
                    help="keep programmatic dependent launch on (default off here: with it a kernel's time includes "
                         "its early-launched programs' wait, and the table no longer attributes the step)")
    ap.add_argument("--fused-mhc-prefill", action="store_true",
                    help="prefill with the opt-in mHC prefill kernels (model.transformer.FUSED_MHC_PREFILL)")
    ap.add_argument("--by-module", action="store_true",
                    help="prefill/MMLU cases: also charge device time to the innermost model submodule")
    ap.add_argument("--resources", action="store_true",
                    help="at the end: registers / spills / shared memory of every launched Triton kernel (GPU)")
    ap.add_argument("--timeline", action="store_true",
                    help="graphed cases: the last step's kernels in start order (JSON) and one middle layer printed")
    ap.add_argument("--out", default="profile.json")
    a = ap.parse_args(argv)
    a.fused = not a.unfused
    if a.single_stream:
        from dsv4lib.model import graphed
        graphed.CONCURRENT = False
    from dsv4lib.kernels import pdl
    pdl.ENABLED = a.pdl
    if a.fused_mhc_prefill:
        from dsv4lib.model import transformer
        transformer.FUSED_MHC_PREFILL = True
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = without_mtp(getattr(ModelConfig, a.preset)())
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = synthetic_model(cfg, dev, dtype)
    if a.fused:
        stack_projections(model)
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "args": vars(a), "cases": {}}
    out = Path(a.out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))

    g = torch.Generator(device=dev).manual_seed(0)
    for B in [int(b) for b in a.batches.split(",") if b]:   # --batches "": prefill cases only
        cache = new_static_cache(model, B, a.ctx + 64)
        fill_synthetic(cache, a.ctx, g)
        tok = torch.randint(0, cfg.vocab_size, (B, 1), device=dev, generator=g)
        saved = [t.clone() for t in cache.small_state()]

        def uncaptured():
            static_decode_step(model, cache, tok, a.fused)
            for t_, v in zip(cache.small_state(), saved):
                t_.copy_(v)
        res["cases"][f"static_b{B}"] = _profiled(uncaptured, a.steps, dev, a.top)
        save()
        if dev.type == "cuda":
            dec = GraphedDecoder(model, cache, fused=a.fused)
            res["cases"][f"graphed_b{B}"] = _profiled(lambda: dec.step(tok), a.steps, dev, a.top,
                                                      timeline=a.timeline)
            del dec
            if B == 1:
                x = torch.randn(B, 1, cfg.hidden_size, device=dev, generator=g).to(dtype)

                def attn():
                    ctx = step_context(model, cache, a.fused)
                    for i, layer in enumerate(model.layers):
                        attention_step(layer.attn, layer.attn_norm(x), ctx, cache.layers[i])
                attn()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    attn()
                res["cases"]["attention_b1_graphed"] = _profiled(graph.replay, a.steps, dev, a.top)
                del graph
                for t_, v in zip(cache.small_state(), saved):
                    t_.copy_(v)
            save()
        del cache

    def prefill(ids):
        with torch.no_grad():
            X = model.forward_hidden(ids)
            return model.logits_from_hidden(X[:, -1:])
    hooks = _module_ranges(model) if a.by_module else []
    ids = torch.randint(0, cfg.vocab_size, (1, a.prefill), device=dev, generator=g)
    res["cases"][f"prefill_{a.prefill}"] = _profiled(lambda: prefill(ids), 1, dev, a.top, a.by_module)
    save()
    mb, ml = (int(v) for v in a.mmlu.split("x"))
    ids = torch.randint(0, cfg.vocab_size, (mb, ml), device=dev, generator=g)
    res["cases"][f"mmlu_{a.mmlu}"] = _profiled(lambda: prefill(ids), 1, dev, a.top, a.by_module)
    save()
    for h in hooks:
        h.remove()

    if a.resources and dev.type == "cuda":
        res["kernel_resources"] = kernel_resources()
        save()
        print("\n== kernel resources (registers, spills, shared bytes, warps, stages, resident CTAs per SM)")
        for r in sorted(res["kernel_resources"], key=lambda r: (-(r["spills"] or 0), -(r["regs"] or 0))):
            print(f"  {r['regs']!s:>4} regs {r['spills']!s:>5} spills {r['shared']!s:>7} B "
                  f"{r['warps']!s:>2}w {r['stages']!s:>2}s {r['ctas_per_sm']!s:>2} CTA/SM  {r['kernel']}  "
                  f"wgmma waits [{r['wgmma_waits']}]"
                  + (f"  SERIALIZED by ptxas: {r['wgmma_serialized'][:80]}" if r.get("wgmma_serialized") else ""))
    for name, c in res["cases"].items():
        tl_ = c.get("timeline")
        if tl_:
            ks = tl_["kernels"]
            per = len(ks) // max(cfg.num_hidden_layers, 1)
            mid = ks[(cfg.num_hidden_layers // 2) * per:(cfg.num_hidden_layers // 2 + 1) * per + 2]
            print(f"\n== {name} timeline: span {tl_['span_us']:.0f} us, some kernel resident {tl_['busy_us']:.0f} us, "
                  f"none {tl_['idle_us']:.0f} us; the step's end advanced by (us): "
                  + ", ".join(f"{n[:28]} {v:.0f}" for n, v in list(tl_["frontier_us"].items())[:8]))
            print(f"   ~{per} kernels per layer, a middle layer:")
            for i, k in enumerate(mid):
                prev_end = max((m["start_us"] + m["us"] for m in mid[:i]), default=k["start_us"])
                print(f"  +{k['start_us'] - mid[0]['start_us']:7.1f} us {k['us']:6.1f} us  gap {k['start_us'] - prev_end:6.1f}"
                      f"  s{k['stream']}  {k['name'][:50]}")
        print(f"\n== {name}: GPU {c['gpu_us_per_step'] / 1e3:.2f} ms/step, {c['kernels_per_step']:.0f} kernels, "
              f"wall {c['wall_ms_per_step_profiled']:.2f} ms (profiled)")
        for r in c["top"][:12]:
            print(f"  {r['us_per_step']:9.1f} us {r['calls_per_step']:7.1f}x  {r['name'][:90]}")
        for n, r in list(c.get("by_module", {}).items())[:16]:
            print(f"  {r['us_per_step']:9.1f} us {r['kernels_per_step']:7.1f} kernels  module {n}")
        for n, r in list(c.get("by_module", {}).items())[:10]:   # where each module's time goes
            print(f"  -- {n}: " + "; ".join(f"{k['name'][:48]} {k['us_per_step']:.0f} us x{k['calls_per_step']:.0f}"
                                            for k in r.get("kernels", [])[:6]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
