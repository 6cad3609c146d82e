"""The benchmark scripts run end to end on CPU at tiny shapes (so they do not rot between GPU sessions):
``python -m dsv4lib bench --preset tiny`` (eager / static decode, prefill, MMLU estimate; the CUDA-graph
sections need a GPU) with the static step checked against the eager step, ``bench/sweep_fp8.py --smoke``
(each candidate config is checked against the torch reference before it is timed) and
``bench/profile_step.py --preset tiny`` (the profiler tables; on CPU they list aten ops)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fullscale_bench_tiny(tmp_path, monkeypatch):
    from dsv4lib.cli import main
    out = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "tiny", "--decode", "1x64,2x64", "--steps", "2", "--eager-steps", "1",
               "--prefill-len", "64", "--mmlu-batch", "2", "--mmlu-len", "32", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(d["batch"], d["context"]) for d in res["decode"]] == [(1, 64), (2, 64)]
    for d in res["decode"]:
        assert "error" not in d, d
        assert d["eager_tok_s"] > 0 and d["bytes_per_token"] > 0
        # the static step continues the eager prefill like the eager step (fp32 tiny model on CPU)
        assert d["static_vs_eager_max_abs"] <= 1e-3 * max(1.0, d["static_vs_eager_ref_max"])
        assert d["static_vs_eager_argmax_agree"] == 1.0
    assert res["prefill"]["tok_s"] > 0 and res["mmlu"]["est_minutes"] > 0
    p = res["prefill"]   # the target is judged on the median of every default-path run (2 without the GPU's A/B)
    assert p["default_runs"] == 2 and p["median_tok_s"] >= p["tok_s"]
    assert res["targets"]["prefill_2k_tok_s"]["value"] == p["median_tok_s"]
    assert {"prefill_2k_tok_s", "mmlu_minutes", "resident_gb"} <= set(res["targets"])   # decode ones need the GPU


def test_fullscale_bench_decode_only(tmp_path):
    """``--no-prefill``: the decode cases alone (quick A/B runs); no prefill / MMLU results or targets, and the
    table says so."""
    from dsv4lib.cli import main
    from dsv4lib.fullscale_bench import format_table
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--decode", "1x64", "--steps", "2", "--eager-steps", "1",
                 "--no-prefill", "--no-components", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "prefill" not in res and "mmlu" not in res and res["decode"][0]["eager_tok_s"] > 0
    assert not {"prefill_2k_tok_s", "mmlu_minutes"} & set(res["targets"]) and "resident_gb" in res["targets"]
    assert "prefill and MMLU: not run" in format_table(res)


def test_sweep_fp8_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("bench.sweep_fp8", None)
    from bench import sweep_fp8
    out = tmp_path / "sweep.json"
    assert sweep_fp8.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 4
    for r in res["rows"]:
        assert r["best"]["us"] <= r["default"]["us"] and len(r["sweep"]) >= 2
    out = tmp_path / "chain.json"                 # --chain: the dependent pairs, the second GEMV's candidates
    assert sweep_fp8.main(["--smoke", "--chain", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["chain"], r["tokens"]) for r in res["chains"]] == [(c, t) for c, _, _ in sweep_fp8.SMOKE_CHAINS
                                                                   for t in (1, 8)]
    for r in res["chains"]:
        assert r["best"]["pair_us"] <= r["default"]["pair_us"] and len(r["sweep"]) >= 2
    out = tmp_path / "bf16.json"                  # --bf16: the CUDA-core GEMV on the stacked bf16 projections
    assert sweep_fp8.main(["--smoke", "--bf16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["layer"] for r in res["bf16"]] == [n for n, _, _ in sweep_fp8.SMOKE_BF16]
    assert all(r["best"]["us"] <= r["default"]["us"] and len(r["sweep"]) == 2 for r in res["bf16"])
    out = tmp_path / "gemv.json"                  # --gemv-only --tokens 1: default + CUDA-core GEMV configs only
    assert sweep_fp8.main(["--smoke", "--gemv-only", "--tokens", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {r["M"] for r in res["rows"]} == {1}
    assert all(c["cfg"].startswith("GemvConfig") for r in res["rows"] for c in r["sweep"])


def test_profile_step_tiny(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("bench.profile_step", None)
    from bench import profile_step
    from dsv4lib.kernels import pdl
    monkeypatch.setattr(pdl, "ENABLED", pdl.ENABLED)          # the script switches it; restore after the test
    out = tmp_path / "p.json"
    profile_step.main(["--preset", "tiny", "--ctx", "64", "--prefill", "64", "--mmlu", "2x32", "--steps", "1",
                       "--batches", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["cases"]) >= {"static_b1", "prefill_64", "mmlu_2x32"}
    for c in res["cases"].values():
        assert c["top"] and all(r["us_per_step"] >= 0 and r["calls_per_step"] > 0 for r in c["top"])


def test_profile_timeline_of_the_last_step(monkeypatch):
    """profile_step._timeline: the last 1/steps of the device kernels by start, the time some kernel is resident
    (union of intervals) and, per kernel name, how far its end advanced the step's frontier (sums to the span)."""
    import torch
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.profile_step import _timeline

    class _Range:
        def __init__(self, a, b):
            self.start, self.end = a, b

        def elapsed_us(self):
            return self.end - self.start

    class _Ev:
        def __init__(self, name, a, b):
            self.name, self.time_range = name, _Range(a, b)
            self.device_type, self.device_resource_id = torch.autograd.DeviceType.CUDA, 7

    class _Prof:
        def events(self):   # two "steps" of three kernels; step 2: a, b overlapping a (PDL-style), then a gap, c
            return [_Ev("a", 0, 4), _Ev("b", 1, 6), _Ev("c", 8, 9),
                    _Ev("a", 100, 104), _Ev("b", 101, 106), _Ev("c", 108, 110)]
    t = _timeline(_Prof(), 2)
    assert [k["name"] for k in t["kernels"]] == ["a", "b", "c"] and t["kernels"][0]["start_us"] == 0
    assert t["span_us"] == 10 and t["busy_us"] == 8 and t["idle_us"] == 2
    assert t["frontier_us"] == {"a": 4, "b": 2, "c": 4}                  # c's 4 include the 2 us gap before it


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_ctas_per_sm_hopper_limits():
    """The profiler's occupancy column: the INT2 prefill gate/up launch (215 registers, 4 warps, 58 KB shared)
    fits 2 CTAs per H200 SM by registers, 3 with a 168-register cap (then shared memory allows 3 too); 8-warp
    tiles at 255 registers fit one; shared memory alone can be the limit."""
    sys.modules.pop("bench.profile_step", None)
    from bench.profile_step import ctas_per_sm
    assert ctas_per_sm(215, 4, 59392) == 2
    assert ctas_per_sm(168, 4, 59392) == 3
    assert ctas_per_sm(168, 4, 79872) == 2                     # 4 stages: 80 KB each -> shared-limited
    assert ctas_per_sm(255, 8, 212992) == 1
    assert ctas_per_sm(32, 1, 128) == 32                       # the per-SM CTA cap


def test_ab_rounds_alternates_and_restores():
    """The prefill switch A/B (fullscale_bench.ab_rounds, also bench/prefill_ab.py): default and toggled runs
    alternate round by round, each timed side sees its own flag value, and the flag is restored -- also when the
    timed function raises."""
    import types

    import torch

    from dsv4lib.fullscale_bench import ab_rounds
    mod = types.SimpleNamespace(FLAG=True)
    seen = []
    times = ab_rounds(lambda: seen.append(mod.FLAG), mod, "FLAG", torch.device("cpu"), 3)
    assert seen == [True, False] * 3 and mod.FLAG is True
    assert {k: len(v) for k, v in times.items()} == {"default": 3, "toggled": 3}

    def boom():
        if not mod.FLAG:
            raise RuntimeError("toggled path failed")
    with pytest.raises(RuntimeError):
        ab_rounds(boom, mod, "FLAG", torch.device("cpu"), 2)
    assert mod.FLAG is True


def test_decode_variants_toggle_restore_and_tabulate():
    """The full-scale bench's decode A/B switches: ``fp8_prefetchN`` sets kernels.fp8_linear.PREFETCH_STEPS to N
    (0 when N is already the default) only inside the block, an unknown name is an error, and the table has one
    column per variant the results hold (old result files with other variants still format)."""
    from dsv4lib.fullscale_bench import _variant, format_table
    from dsv4lib.kernels import fp8_linear
    base = fp8_linear.PREFETCH_STEPS
    with _variant("fp8_prefetch2"):
        assert fp8_linear.PREFETCH_STEPS == (0 if base == 2 else 2)
    assert fp8_linear.PREFETCH_STEPS == base
    from dsv4lib.kernels import decode_attention, int2_moe_idp
    from dsv4lib.model import graphed
    for name, mod, flag in (("defer_comb", graphed, "DEFER_COMB"), ("early_int2", int2_moe_idp, "EARLY_LOAD"),
                            ("attn_groups", decode_attention, "GROUP_HEADS"), ("second_side", graphed, "SECOND_SIDE")):
        before = getattr(mod, flag)
        with _variant(name):
            assert getattr(mod, flag) is (not before)
        assert getattr(mod, flag) is before
    import importlib

    from dsv4lib.fullscale_bench import DECODE_SWITCHES
    for name, (path, attr, _) in DECODE_SWITCHES.items():   # every switch names a real flag and changes it
        mod = importlib.import_module(f"dsv4lib.{path}")
        before = getattr(mod, attr)
        with _variant(name):
            assert getattr(mod, attr) != before, name
        assert getattr(mod, attr) == before, name
    with pytest.raises(ValueError, match="unknown bench variant"):
        with _variant("fp8_prefetchX"):
            pass
    case = {"batch": 1, "context": 64, "context_fill": "x", "graphed_ms": 2.0, "graphed_fp8_prefetch2_ms": 1.5,
            "graphed_q_norm_prologue_ms": 2.5, "bytes_per_token": 1e9}
    res = {"device": "d", "torch": "t", "date": "now", "resident_GB": {"total": 1.0},
           "bytes_per_token_b1_1k": {"per_token": 1e9}, "decode": [case],
           "prefill": {"tokens": 8, "tok_s": 1.0, "mhc_planes_toggled_tok_s": 2.0, "mhc_planes_default_tok_s": 1.0,
                       "mhc_planes_toggled_min_s": 2.0, "mhc_planes_default_min_s": 4.0}, "targets": {},
           "mmlu": {"batch": 2, "prompt_len": 8, "tok_s": 1.0, "tokens": 10, "est_minutes": 1.0}}
    assert "(mHC mixing as bf16 planes toggled: 2 vs 1 tok/s; fastest rounds 4 vs 2)" in format_table(res)
    head, sep, row = format_table(res).splitlines()[2:5]
    assert "FP8 prefetch 2 ms" in head and "q_norm prologue toggled ms" in head and "1-stream" not in head
    assert head.count("|") == sep.count("|") == row.count("|") and "| 1.50 | 2.50 |" in row


def test_b8_target_reports_the_equal_bandwidth_ratio():
    """targets(): b8 / b1 throughput against the ratio of their bytes per token (what equal streaming speed would
    give) and how much faster than b1 the b8 step must stream for the target."""
    from dsv4lib.fullscale_bench import BenchOptions, targets
    GB = 1e9
    res = {"decode": [{"batch": 1, "context": 1024, "graphed_tok_s": 180.0, "bytes_per_token": 9.6 * GB},
                      {"batch": 8, "context": 1024, "graphed_tok_s": 720.0, "bytes_per_token": 2.4 * GB}],
           "prefill": {"tok_s": 1.0}, "mmlu": {"est_minutes": 1.0}, "resident_GB": {"total": 1.0}}
    t = targets(res, BenchOptions(decode=((1, 1024), (8, 1024))))["b8_over_b1"]
    assert t["value"] == pytest.approx(4.0) and not t["met"]
    assert t["equal_bandwidth_ratio"] == pytest.approx(4.0)            # 9.6 / 2.4 GB per token
    assert t["b8_bandwidth_over_b1"] == pytest.approx(1.0)
    assert t["b8_bandwidth_over_b1_needed"] == pytest.approx(5.0 / 4.0)


def test_bench_variants_option_checks_names(capsys):
    """``bench --variants`` picks the A/B switches of a run; a name the bench does not know stops it before the
    model is built, naming the name."""
    from dsv4lib.cli import main
    with pytest.raises(SystemExit, match=r"unknown \['nope'\]"):
        main(["bench", "--preset", "tiny", "--variants", "pdl,nope"])


def test_bench_l2_prefetch_smoke(tmp_path):
    """bench/bench_l2_prefetch.py --smoke runs on the CPU (the prefetch is a no-op there) and writes every column."""
    sys.path.insert(0, str(ROOT))
    from bench.bench_l2_prefetch import main
    res = main(["--smoke", "--out", str(tmp_path / "l2.json")])
    row = res["rows"][0]
    assert {"cold", "bulk_side", "bulk_inline", "gemv", "warm"} <= set(row)
    assert all(row[k] > 0 for k in ("cold", "bulk_side", "bulk_inline", "gemv", "warm"))


def test_bench_floors_smoke(tmp_path):
    """bench/bench_floors.py --smoke runs on the CPU (no PDL, no graphs) and writes every table: the five chain
    variants, each read config and the best per size with torch's copy, and the GEMVs against both ceilings."""
    sys.path.insert(0, str(ROOT))
    from bench.bench_floors import CHAIN_VARIANTS, SMOKE_GEMV_SHAPES, SMOKE_READ_CONFIGS, main
    out = tmp_path / "floors.json"
    res = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert {"device", "torch", "triton", "copy_GBps", "chain", "read", "read_best", "gemv"} <= set(res)
    assert [r["variant"] for r in res["chain"]] == [v[0] for v in CHAIN_VARIANTS]
    assert all(r["us_per_launch"] > 0 and r["launches"] == 3 and not r["pdl_effective"] for r in res["chain"])
    assert [(r["tile"], r["warps"]) for r in res["read"]] == SMOKE_READ_CONFIGS
    (best,) = res["read_best"]
    assert best["buffers"] == 2 and best["GBps"] > 0 and best["torch_copy_GBps"] > 0
    assert [r["shape"] for r in res["gemv"]] == [s[0] for s in SMOKE_GEMV_SHAPES]
    assert all(r["us"] > 0 and r["pct_copy"] > 0 and r["pct_read_ceiling"] > 0 for r in res["gemv"])


@pytest.mark.parametrize("tile,warps", [(2048, 1), (4096, 2)])
def test_bench_floors_read_xor_matches_numpy(tile, warps):
    """read_xor: one int32 XOR per tile, equal to numpy's bitwise_xor.reduce of the tile."""
    import torch
    sys.path.insert(0, str(ROOT))
    from bench.bench_floors import read_xor, read_xor_reference
    g = torch.Generator().manual_seed(tile + warps)
    buf = torch.randint(-2**31, 2**31 - 1, (4 * tile // 4,), dtype=torch.int32, generator=g)
    got = read_xor(buf, tile, warps, pdl=False)
    assert got.shape == (4,) and torch.equal(got, read_xor_reference(buf, tile))


def test_bench_floors_read_xor_checks_sizes():
    """A buffer that is not a whole number of tiles, or a tile smaller than one row of the warps, is refused with
    the sizes named."""
    import torch
    sys.path.insert(0, str(ROOT))
    from bench.bench_floors import read_xor
    with pytest.raises(ValueError, match=r"6144 bytes are not a multiple of the tile's 4096 bytes"):
        read_xor(torch.zeros(1536, dtype=torch.int32), 4096, 1)
    with pytest.raises(ValueError, match=r"2048 bytes is smaller than one row of 8 warps \(4096 bytes\)"):
        read_xor(torch.zeros(1024, dtype=torch.int32), 2048, 8)


def test_bench_floors_chain_adds_one_per_launch():
    """Three chained launches (src and dst swapped each time, PDL off on the CPU) give src + 3; one launch equals
    chain_reference, which wraps src when there are more programs than elements."""
    import torch
    sys.path.insert(0, str(ROOT))
    from bench.bench_floors import chain_reference, chain_step
    src = torch.arange(5, dtype=torch.int32) * 7
    bufs = [src.clone(), torch.zeros(5, dtype=torch.int32)]
    for i in range(3):
        assert chain_step(bufs[i % 2], bufs[(i + 1) % 2], 5, pdl=True) is False
    assert torch.equal(bufs[1], src + 3)
    dst = torch.zeros(8, dtype=torch.int32)
    chain_step(src[:3], dst, 8)
    assert torch.equal(dst, chain_reference(src[:3], 8)) and dst.tolist() == [1, 8, 15, 1, 8, 15, 1, 8]
