"""INT2 MoE decode on the H200: the integer-dot-product kernel (kernels/int2_moe_idp.py; 16- and 8-bit
activations) against the fp16 CUDA-core loop of ``int2_moe_decode`` (the current default), over 43 distinct
layers' weights (24 experts each, 6 routed per token; CUDA-graph replay, L2 cannot hold them), with a tile
sweep at T=1 and the copy bandwidth of the same run. Prints a table, writes JSON.

    python3 bench/bench_int2_idp.py --out $OUT/int2_idp.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import Int2Layers, time_decode  # noqa: E402

from dsv4lib.fullscale import copy_bandwidth  # noqa: E402
from dsv4lib.kernels.int2_moe_decode import int2_moe_decode  # noqa: E402
from dsv4lib.kernels.int2_moe_idp import idp_configs, idp_configs_many, int2_moe_idp, pick_idp_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=43)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-t", type=int, default=8, help="also sweep the configs at this token count (0: no)")
    ap.add_argument("--quick", action="store_true", help="T=1 default and the --sweep-t sweep only")
    ap.add_argument("--split-prefill", action="store_true",
                    help="also the split-K prefill kernels (SPLIT_DECODE_CONFIG and two variants) at T=1, 8, 16 against idp")
    ap.add_argument("--experts", type=int, default=24,
                    help="experts per layer (43 x E x 7.3 MB on the GPU; the full model's 256 routed would be 80 GB: "
                         "E=128 gives ~41 distinct experts at T=8, as the model's ~44)")
    ap.add_argument("--out", default="int2_idp.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_int2_idp: needs a CUDA GPU")
        return 1
    dev = torch.device("cuda")
    E, D, I = a.experts, 4096, 2048
    L = a.layers
    res: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "layers": L, "experts": E}
    res["copy_GBps"] = copy_bandwidth(dev) / 1e9
    layers = Int2Layers(L, E, D, I, dev, seed=0)
    weights = [layers.layer(l) for l in range(L)]
    xs = torch.randn(L, 16, D, device=dev, dtype=torch.bfloat16)
    rows = []

    def case(T, shared, label, fn):
        r = dict(label=label, T=T, shared=shared,
                 **time_decode(layers, weights, xs, T, shared, None, a.reps, 100 * T, fn=fn))
        r["pct_copy"] = 100 * r["GBps"] / res["copy_GBps"]
        print(f"  {label:34s} T={T:2d}{' shared' if shared else '       '} {r['us_per_layer']:8.2f} us/layer "
              f"{r['GBps']:6.0f} GB/s ({r['pct_copy']:4.1f} %) rel {r['rel_err']:.1e}", flush=True)
        rows.append(r)
        res["rows"] = rows
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        return r

    def idp(abits, cfg):
        return lambda *args: int2_moe_idp(*args, abits=abits, config=cfg)

    cfgs = idp_configs() if not a.no_sweep else idp_configs()[:1]
    case(1, False, "fp16 loop (int2_moe_decode)", int2_moe_decode)
    sweep = []
    for i, c in enumerate(cfgs):
        try:
            sweep.append((case(1, False, f"idp16 cfg {i}", idp(16, c)), c))
        except Exception as e:  # noqa: BLE001 - a config that fails to compile/run is reported, not fatal
            print(f"  idp16 cfg {i} failed: {type(e).__name__}: {str(e)[:200]}")
            res.setdefault("failed", []).append(dict(cfg=repr(c), error=repr(e)[:300]))
    best, bc = min(sweep, key=lambda rc: rc[0]["us_per_layer"])
    res["best_idp16_T1"] = repr(bc)
    if not a.quick:
        case(1, False, "idp8 best-T1 config", idp(8, bc))
    quick_cases = ((a.sweep_t, False),) if a.sweep_t else ()
    for T, shared in ((8, False), (16, False), (16, True)) if not a.quick else quick_cases:
        case(T, shared, "fp16 loop (int2_moe_decode)", int2_moe_decode)
        case(T, shared, "idp16 best-T1 config", idp(16, bc))
        if not a.quick:
            case(T, shared, "idp8 best-T1 config", idp(8, bc))
    if a.sweep_t:
        swt = []
        for i, c in enumerate(idp_configs()[1:5] + idp_configs_many()):
            try:
                swt.append((case(a.sweep_t, False, f"idp16 T-sweep cfg {i}", idp(16, c)), c))
            except Exception as e:  # noqa: BLE001
                print(f"  idp16 cfg {i} failed at T={a.sweep_t}: {type(e).__name__}: {str(e)[:200]}")
        bt, btc = min(swt, key=lambda rc: rc[0]["us_per_layer"])
        res[f"best_idp16_T{a.sweep_t}"] = repr(btc)
        print(f"best idp16 T={a.sweep_t}: {bt['us_per_layer']:.1f} us/layer ({btc})")
    if a.split_prefill:   # the tensor-core prefill kernels split over K at decode sizes (issue 6: 16 tokens <= 2x one)
        from dsv4lib.kernels.int2_moe_prefill import SPLIT_DECODE_CONFIG, GemmConfig, PrefillConfig, int2_moe_prefill
        spl = [SPLIT_DECODE_CONFIG,
               PrefillConfig(16, GemmConfig(64, 8, 4, 3, split=4), GemmConfig(64, 8, 4, 3, split=2)),
               PrefillConfig(16, GemmConfig(64, 8, 4, 3, split=16), GemmConfig(64, 8, 4, 3, split=8))]

        def pf(cfg):
            return lambda *args: int2_moe_prefill(*args, config=cfg)
        for T, shared in ((1, False), (8, False), (16, True), (16, False)):
            case(T, shared, "idp16 default", idp(16, pick_idp_config(T)))
            for i, c in enumerate(spl):
                try:
                    case(T, shared, f"prefill split-K cfg {i}", pf(c))
                except Exception as e:  # noqa: BLE001 -- reported, not fatal
                    print(f"  prefill split-K cfg {i} failed at T={T}: {type(e).__name__}: {str(e)[:200]}")
        res["split_prefill_configs"] = [repr(c) for c in spl]
    if not a.quick:
        case(1, False, "idp16 best again (spread)", idp(16, bc))
    print(f"\ncopy {res['copy_GBps']:.0f} GB/s; best idp16 T=1: {best['us_per_layer']:.1f} us/layer = "
          f"{best['pct_copy']:.1f} % of copy ({bc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
