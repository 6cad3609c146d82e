"""Where an eager decode step's time goes (GPU script; runs on the CPU with the tiny preset): per-step wall times
of ``model(tok, cache)`` after a chunked prefill, then Python's cProfile of one more step (cumulative top) and
the Triton kernels compiled during the timed steps. Prints a table, writes JSON.

    python3 bench/profile_eager.py --ctx 1024 --steps 4 --out eager.json          # H200, full V4-Flash shapes
    python3 bench/profile_eager.py --preset tiny --ctx 64 --steps 2 --out /tmp/e.json

Why: the full-scale bench's eager column (``eager_tok_s``) read 0.1-0.2 tok/s at batch 1 and ~3 at batch 8
(2026-11-29) -- far below what the kernels it calls should give; this script says whether that is compilation,
host synchronisation or the torch paths.
"""
from __future__ import annotations

import argparse
import cProfile
import io
from collections import Counter
import json
import os
import pstats
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dsv4lib.config import ModelConfig  # noqa: E402
from dsv4lib.fullscale import synthetic_model, without_mtp  # noqa: E402
from dsv4lib.fullscale_bench import _sync  # noqa: E402


def compiled_kernels() -> list[str]:
    """Names of the Triton kernels compiled so far in this process (their JIT caches)."""
    import triton
    out = []
    for obj in list(sys.modules.values()):
        for v in list(getattr(obj, "__dict__", {}).values()) if obj is not None else []:
            if isinstance(v, triton.runtime.jit.JITFunction):
                caches = getattr(v, "device_caches", {}).values()   # per device: (kernel cache dict, ...)
                out += [v.fn.__name__] * sum(len(c[0] if isinstance(c, tuple) else c) for c in caches)
    return sorted(out)


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="v4_flash")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = without_mtp(ModelConfig.v4_flash() if a.preset == "v4_flash" else getattr(ModelConfig, a.preset)())
    model = synthetic_model(cfg, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, seed=0)
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.ctx), device=dev, generator=g)
    cache = model.new_cache(a.batch, a.ctx + a.steps + 8)
    for i in range(0, a.ctx, a.chunk):
        model.forward_hidden(ids[:, i:i + a.chunk], cache)
    tok = ids[:, -1:]
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "args": vars(a), "step_s": []}
    before = compiled_kernels()
    for _ in range(a.steps):
        _sync(dev)
        t = time.perf_counter()
        tok = model(tok, cache)[:, -1:].argmax(-1)
        _sync(dev)
        res["step_s"].append(time.perf_counter() - t)
        print(f"eager step {len(res['step_s'])}: {res['step_s'][-1] * 1e3:.1f} ms", flush=True)
    new = sorted((Counter(compiled_kernels()) - Counter(before)).elements())
    res["compiled_during_steps"] = new
    prof = cProfile.Profile()
    _sync(dev)
    t = time.perf_counter()
    prof.enable()
    tok = model(tok, cache)[:, -1:].argmax(-1)
    _sync(dev)
    prof.disable()
    res["profiled_step_s"] = time.perf_counter() - t
    s = io.StringIO()
    pstats.Stats(prof, stream=s).strip_dirs().sort_stats("cumulative").print_stats(a.top)   # no machine paths
    res["cprofile_top"] = s.getvalue()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(res["cprofile_top"][-6000:])
    print(f"kernels compiled during the timed steps: {new}")
    print("| step | ms |\n|---|---|\n" + "\n".join(f"| {i + 1} | {t * 1e3:.1f} |" for i, t in enumerate(res["step_s"]))
          + f"\n| profiled | {res['profiled_step_s'] * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
