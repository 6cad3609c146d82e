"""Kernels compile for the H200 (sm_90) at the specialisations the runtime produces, without a GPU.

Triton turns an integer argument equal to 1 into a constexpr, so a kernel that calls a tensor method on
it (``M.to(tl.int64)``) compiles for M > 1 but not for a one-token decode; the CPU interpreter does not
see this. The split-K "last" epilogue of ``fp8_linear`` failed on the H200 exactly so (2026-11-29).
Compiled with Triton's bundled ptxas (kernels/NOTES.md, offline SASS check), in a subprocess: the test
session runs with TRITON_INTERPRET=1, where ``@triton.jit`` gives interpreter objects."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsv4lib.kernels.fp8_linear import TUNED, FP8Config, _fp8_linear_kernel

cases = {(16, 64, 1, 4, 4, False), (16, 64, 4, 4, 4, False), (16, 64, 4, 4, 4, True)}
cases |= {(c.block_m, c.block_n, c.split_k, c.warps, c.stages, c.split_k > 1 and c.epilogue == "last")
          for c in TUNED.values()}
cases = [c + (False,) for c in sorted(cases)] + [(16, 128, 4, 4, 3, True, True), (16, 64, 1, 4, 3, False, True)]
out = {}


def compile_sm90(fn, sig, cons, **options):
    """With PDL on: the griddepcontrol instructions must assemble for sm_90 too."""
    sig = dict(sig, PDL="constexpr")
    cons = dict(cons, PDL=True)
    return triton.compile(ASTSource(fn, sig, cons), target=GPUTarget("cuda", 90, 32), options=options)


def check(name, fn, sig, cons, **options):
    """out[name] = "ok", or the compile error's last line."""
    try:
        out[name] = "ok" if compile_sm90(fn, sig, cons, **options).asm.get("cubin") else "no cubin"
    except Exception as e:  # noqa: BLE001 - reported per case
        out[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"

for bm, bn, split_k, warps, stages, last, grouped in cases:
    for m in ((1, 16) if bm == 16 else (64,)):
        sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32",
               "y_ptr": "*bf16" if split_k == 1 or last else "*fp32", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
               "M": "constexpr" if m == 1 else "i32", "N": "i32", "K": "i32", "KB": "i32", "G": "i32",
               "nw_ptr": "*fp32", "eps": "fp32",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "SPLIT_K": "constexpr", "LAST": "constexpr",
               "GROUPED": "constexpr", "NORM": "constexpr", "X32": "constexpr", "PREFETCH": "constexpr"}
        cons = {"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split_k, "LAST": last, "GROUPED": grouped,
                "NORM": (bm, bn, split_k) == (16, 128, 1),   # the wq_b tile also with the RMSNorm prologue
                "X32": False, "PREFETCH": 2 if bm == 16 else 0}   # decode tiles with the L2 prefetch before the wait
        if m == 1:
            cons["M"] = 1
        name = (f"fp8_linear M={m} tile={bm}x{bn} split_k={split_k} warps={warps} stages={stages} last={last} "
                f"grouped={grouped} norm={cons['NORM']}")
        check(name, _fp8_linear_kernel, sig, cons, num_warps=warps, num_stages=stages)
        if m == 16 and not grouped:   # an fp32 model's activations (hi + lo fp16 dots)
            check(name + " fp32 x", _fp8_linear_kernel, dict(sig, x_ptr="*fp32", y_ptr=sig["y_ptr"].replace("bf16", "fp32")),
                  dict(cons, X32=True), num_warps=warps, num_stages=stages)
from dsv4lib.kernels.fp8_gemv import GemvConfig, _fp8_gemv_kernel
from dsv4lib.kernels.fp8_linear import TUNED_GEMV
gsig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16", "M": "constexpr", "N": "i32",
        "K": "i32", "KB": "i32", "G": "i32", "nw_ptr": "*fp32", "eps": "fp32", "ROWS": "constexpr",
        "UNROLL": "constexpr", "STAGES": "constexpr", "GROUPED": "constexpr", "NORM": "constexpr", "EVEN": "constexpr",
        "SCALED": "constexpr"}
for (gn, gk), c in sorted(TUNED_GEMV.items()) + [((0, 0), GemvConfig()), ((1, 1), GemvConfig(2, 4, 2, 2))]:
    for grouped, norm, even in ((gn == 8192 and gk == 4096, gn == 32768, True), (False, False, False)):
        check(f"fp8_gemv {gn}x{gk} {c} grouped={grouped} norm={norm} even={even}", _fp8_gemv_kernel, gsig,
              dict(M=1, ROWS=c.rows, UNROLL=c.unroll, STAGES=c.stages, GROUPED=grouped, NORM=norm, EVEN=even, SCALED=True),
              num_warps=c.warps, num_stages=1)
from dsv4lib.kernels.fp8_gemv import BF16_DEFAULT, TUNED_BF16
for c in sorted(set(TUNED_BF16.values()) | {BF16_DEFAULT}, key=str):
    check(f"bf16_gemv {c} even", _fp8_gemv_kernel, dict(gsig, w_ptr="*bf16", s_ptr="*bf16", nw_ptr="*bf16"),
          dict(M=1, ROWS=c.rows, UNROLL=c.unroll, STAGES=c.stages, GROUPED=False, NORM=False, EVEN=True, SCALED=False),
          num_warps=c.warps, num_stages=1)
from dsv4lib.kernels.mhc_step import PRE_MANY, PRE_ONE, _hc_pre_kernel
for (has_norm, post, defer), (nsplit, bk, warps) in zip(
        ((False, False, False), (True, False, False), (True, True, False), (True, True, False), (True, True, True),
         (True, True, True)), (PRE_ONE, PRE_ONE, PRE_ONE, PRE_MANY, PRE_ONE, PRE_MANY)):
    sig = {"x_ptr": "*bf16", "fn_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32", "scale_ptr": "*fp32",
           "base_ptr": "*fp32", "nw_ptr": "*fp32", "y_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32",
           "mix_ptr": "*fp32", "f_ptr": "*fp32", "f2_ptr": "*bf16", "res_ptr": "*bf16", "pin_ptr": "*fp32", "cin_ptr": "*fp32",
           "K": "i32", "D": "i32", "NM": "i32", "per": "i32", "norm_eps": "fp32", "hc_eps": "fp32",
           "out_eps": "fp32", "NMP": "constexpr", "SB": "constexpr", "HC": "constexpr", "ITERS": "constexpr",
           "BD": "constexpr", "BK": "constexpr", "HAS_NORM": "constexpr", "SINGLE": "constexpr",
           "POST": "constexpr", "HAS_F2": "constexpr", "DEFER": "constexpr"}
    cons = dict(NMP=32, SB=min(nsplit, 16384 // bk), HC=4, ITERS=20, BD=4096, BK=bk, HAS_NORM=has_norm, SINGLE=True,
                POST=post, HAS_F2=post, DEFER=defer)
    name = f"hc_pre norm={has_norm} post={post} defer={defer} bk={bk} warps={warps}"
    check(name, _hc_pre_kernel, sig, cons, num_warps=warps)
from dsv4lib.kernels.moe_step import _router_fused_kernel
for T, hsh, tb, be in ((1, False, 2, 2), (1, True, 2, 2), (8, False, 8, 2), (8, False, 2, 2), (8, False, 2, 4)):
    sig = {"x_ptr": "*bf16", "gw_ptr": "*bf16", "lg_ptr": "*fp32", "cnt_ptr": "*i32", "bias_ptr": "*fp32",
           "hidx_ptr": "*i64", "idx_ptr": "*i64", "w_ptr": "*fp32", "T": "constexpr" if T == 1 else "i32",
           "E": "i32", "D": "i32", "route_scale": "fp32", "TP": "constexpr", "TB": "constexpr", "BE": "constexpr",
           "DP": "constexpr", "EP": "constexpr", "K": "constexpr", "KP": "constexpr", "HASH": "constexpr",
           "RENORM": "constexpr"}
    cons = dict(TP=max(2, T), TB=tb, BE=be, DP=4096, EP=256, K=6, KP=8, HASH=hsh, RENORM=True)
    if T == 1:
        cons["T"] = 1
    name = f"router_fused T={T} tokens per program={tb} rows={be} hash={hsh}"
    check(name, _router_fused_kernel, sig, cons, num_warps=4)
from dsv4lib.kernels.rmsnorm_rope import _rmsnorm_rope_kernel
from dsv4lib.kernels.decode_attention import COMBINE, _attn_combine_kernel
more = [("rmsnorm_rope scatter", _rmsnorm_rope_kernel,
         {"x_ptr": "*bf16", "x_stride": "i32", "w_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
          "out_ptr": "*bf16", "out_stride": "i32", "slot_ptr": "*i64", "eps": "fp32", "cs_stride": "i32",
          "rows_per_pos": "i32", "npos": "i32", "D": "constexpr",
          "HALF_B": "constexpr", "MODE": "constexpr", "ROPE": "constexpr", "SCATTER": "constexpr"},
         dict(D=512, HALF_B=256, MODE=0, ROPE=64, SCATTER=True), 1),
        ("attn_combine rope", _attn_combine_kernel,
         {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "sink_ptr": "*fp32", "cos_ptr": "*fp32",
          "sin_ptr": "*fp32", "out_ptr": "*bf16", "H": "i32", "S": "i32", "out_sb": "i32", "C": "constexpr",
          "CB": "constexpr", "SB": "constexpr", "ROPE": "constexpr"},
         dict(C=512, CB=min(512, COMBINE[0]), SB=8, ROPE=64), COMBINE[1])]
from dsv4lib.kernels.decode_attention import LOWP_CFG, _attn_partial_kernel
asig = {"q_ptr": "*bf16", "win_ptr": "*bf16", "ent_ptr": "*bf16", "sel_ptr": "*i64", "pos_ptr": "*i64",
        "thr_ptr": "*i64", "scr_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "scale": "fp32",
        "H": "i32", "W": "i32", "N": "i32", "T": "i32", "win_sb": "i32", "ent_sb": "i32", "q_sb": "i32",
        "sel_sb": "i32", "NB": "i32", "S": "i32", "C": "constexpr", "HP": "constexpr", "BNc": "constexpr",
        "BCc": "constexpr", "HAS_SEL": "constexpr", "LOWP": "constexpr", "ONE": "constexpr", "HPT": "constexpr"}
for hp, one in ((64, True), (16, True), (16, False)):   # all heads in one program; 4 groups of 16 (V4 at b1)
    more.append((f"attn_partial heads per program={hp} one block={one}", _attn_partial_kernel, asig,
                 dict(C=512, HP=hp, BNc=LOWP_CFG[0], BCc=LOWP_CFG[1] if one else 64, HAS_SEL=True, LOWP=True, ONE=one,
                      HPT=64), LOWP_CFG[2]))
for name, fn, sig, cons, warps in more:
    check(name, fn, sig, cons, num_warps=warps)
from dsv4lib.kernels import mhc_prefill as mp


def check_plain(name, fn, sig, cons, **options):
    """No PDL parameter: the prefill kernels."""
    try:
        k = triton.compile(ASTSource(fn, sig, cons), target=GPUTarget("cuda", 90, 32), options=options)
        out[name] = "ok" if k.asm.get("cubin") else "no cubin"
    except Exception as e:  # noqa: BLE001 - reported per case
        out[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"

# bulk L2 prefetch (graphed.L2_PREFETCH): the inline cp.async.bulk.prefetch.L2 must assemble for sm_90
from dsv4lib.kernels import l2_prefetch as l2p
check_plain("l2 bulk prefetch", l2p._l2_bulk_prefetch_kernel, {"base_ptr": "*u8", "nbytes": "i64", "rec_ptr": "*u8",
            "CHUNK": "constexpr", "LANES": "constexpr", "RECORD": "constexpr"},
            dict(CHUNK=l2p.CHUNK, LANES=l2p.LANES, RECORD=False), num_warps=1)
# INT2 prefill routing align (opt-in ALIGN_KERNEL): histogram, one planning program, stable scatter
from dsv4lib.kernels import int2_moe_prefill as ip
check_plain("int2 align hist", ip._align_hist_kernel, {"idx_ptr": "*i64", "hist_ptr": "*i32", "tot_ptr": "*i32",
            "S": "i32", "E": "i32", "CH": "constexpr", "EP": "constexpr"}, dict(CH=ip.ALIGN_CHUNK, EP=256), num_warps=4)
for pp in (64, 256):   # T = 2048 and 6144 at top-6: 48 and 144 chunks of 256 pairs
    check_plain(f"int2 align plan PP={pp}", ip._align_plan_kernel, {"hist_ptr": "*i32", "tot_ptr": "*i32", "base_ptr": "*i32",
                "bexp_ptr": "*i32", "P": "i32", "E": "i32", "NB": "i32", "NBP": "i32", "BM": "constexpr", "EP": "constexpr",
                "EC": "constexpr", "PP": "constexpr", "NBC": "constexpr"},
                dict(BM=64, EP=256, EC=32, PP=pp, NBC=16), num_warps=4)
check_plain("int2 align scatter", ip._align_scatter_kernel, {"idx_ptr": "*i64", "base_ptr": "*i32", "sorted_ptr": "*i32",
            "S": "i32", "CH": "constexpr", "EP": "constexpr"}, dict(CH=ip.ALIGN_CHUNK, EP=256), num_warps=4)

# mHC prefill (the launcher's configs): split-K mixing, finish (Sinkhorn), collapse (+ RMSNorm); T = 1 and SPLIT = 1
# are specialised to constexprs at run time
for T in (1, 2048):
    sig = {"x_ptr": "*bf16", "fnt_ptr": "*fp32", "part_ptr": "*fp32", "T": "constexpr" if T == 1 else "i32",
           "K": "i32", "NM": "i32", "KS": "i32", "BM": "constexpr", "NP": "constexpr", "BK": "constexpr",
           "STAGES": "constexpr", "PLANES": "constexpr", "DOT16": "constexpr"}
    cons = dict(BM=mp.MIX_BM, NP=32, BK=mp.MIX_BK, STAGES=mp.MIX_STAGES, PLANES=False, DOT16=False,
                **({"T": 1} if T == 1 else {}))
    check_plain(f"hc_pre_prefill mix T={T}", mp._mix_partial_kernel, sig, cons, num_warps=mp.MIX_WARPS)
    check_plain(f"hc_pre_prefill mix bf16 planes T={T}", mp._mix_partial_kernel, dict(sig, fnt_ptr="*bf16"),
                dict(cons, BM=mp.MIX_BM_PLANES, BK=mp.MIX_BK_PLANES, STAGES=mp.MIX_STAGES_PLANES, PLANES=True,
                     DOT16=True), num_warps=mp.MIX_WARPS)
    for split in (1, 8, 64):
        sig = {"part_ptr": "*fp32", "scale_ptr": "*fp32", "base_ptr": "*fp32", "pre_ptr": "*fp32", "post_ptr": "*fp32",
               "comb_ptr": "*fp32", "T": "constexpr" if T == 1 else "i32", "K": "i32", "NM": "i32",
               "SPLIT": "constexpr" if split == 1 else "i32", "norm_eps": "fp32", "hc_eps": "fp32",
               "BM": "constexpr", "SP": "constexpr", "NP": "constexpr", "HC": "constexpr", "ITERS": "constexpr"}
        cons = dict(BM=mp.FINISH_BM, SP=split, NP=32, HC=4, ITERS=20, **({"T": 1} if T == 1 else {}),
                    **({"SPLIT": 1} if split == 1 else {}))
        check_plain(f"hc_pre_prefill finish T={T} split={split}", mp._mix_finish_kernel, sig, cons,
                    num_warps=mp.FINISH_WARPS)
for single, has_norm in ((True, False), (True, True), (False, True)):
    sig = {"x_ptr": "*bf16", "pre_ptr": "*fp32", "nw_ptr": "*fp32", "y_ptr": "*bf16", "K": "i32", "D": "i32",
           "out_eps": "fp32", "HC": "constexpr", "BD": "constexpr", "SINGLE": "constexpr", "HAS_NORM": "constexpr"}
    cons = dict(HC=4, BD=4096 if single else 2048, SINGLE=single, HAS_NORM=has_norm)
    check_plain(f"hc_pre_prefill collapse single={single} norm={has_norm}", mp._collapse_kernel, sig, cons,
                num_warps=mp.COLLAPSE_WARPS)
from dsv4lib.kernels.int2_moe_idp import _down_kernel, _gate_up_kernel, _prep_kernel, idp_configs, idp_configs_many
# INT2 idp decode (inline dp2a/dp4a: the interpreter runs their emulation, only this compiles the assembly)
gu = {"xa_ptr": "*i32", "sx_ptr": "*fp32", "qs_ptr": "*i32", "idx_ptr": "*i64", "rw_ptr": "*fp32", "TOPK": "i32",
      "w1_ptr": "*i32", "s1_ptr": "*fp16", "z1_ptr": "*i8", "w3_ptr": "*i32", "s3_ptr": "*fp16", "z3_ptr": "*i8",
      "gu_ptr": "*fp32", "cnt_ptr": "*fp32", "ha_ptr": "*i32", "hsx_ptr": "*fp32", "hqs_ptr": "*i32",
      "I": "i32", "KW": "i32", "limit": "fp32", "BLOCK_N": "constexpr", "W": "constexpr", "SPLIT_K": "constexpr",
      "QMAX": "constexpr", "NA": "constexpr", "A16": "constexpr", "PREFETCH": "constexpr", "EARLY": "constexpr"}
dn = {"ha_ptr": "*i32", "hsx_ptr": "*fp32", "hqs_ptr": "*i32", "TOPK": "i32", "idx_ptr": "*i64", "w2_ptr": "*i32",
      "s2_ptr": "*fp16", "z2_ptr": "*i8", "y_ptr": "*fp32", "D": "i32", "KW": "i32", "BLOCK_N": "constexpr",
      "W": "constexpr", "SPLIT_K": "constexpr", "NA": "constexpr", "A16": "constexpr", "PREFETCH": "constexpr",
      "EARLY": "constexpr"}
pr = {"x_ptr": "*bf16", "xa_ptr": "*i32", "sx_ptr": "*fp32", "qs_ptr": "*i32", "ws_ptr": "*fp32", "NZ": "i32",
      "KW": "i32", "NX": "i32", "GW": "constexpr", "BLOCK_Z": "constexpr", "QMAX": "constexpr", "NA": "constexpr",
      "A16": "constexpr"}
for a16 in (True, False):
    q = dict(QMAX=32767.0 if a16 else 127.0, NA=8 if a16 else 4, A16=a16)
    check(f"prep a16={a16}", _prep_kernel, pr, dict(GW=16, BLOCK_Z=1024, **q), num_warps=4)
    for i, c in enumerate(idp_configs()[:3] + idp_configs_many()[:1]):   # the T=1 and T>=4 defaults + two
        g, d = c.gate_up, c.down
        check(f"gate_up a16={a16} cfg {i}", _gate_up_kernel, gu,
              dict(BLOCK_N=g.block_n, W=g.w, SPLIT_K=g.split, PREFETCH=g.prefetch, EARLY=g.prefetch, **q),
              num_warps=g.warps)
        q2 = {k: v for k, v in q.items() if k != "QMAX"}
        check(f"down a16={a16} cfg {i}", _down_kernel, dn,
              dict(BLOCK_N=d.block_n, W=d.w, SPLIT_K=d.split, PREFETCH=d.prefetch, EARLY=d.prefetch, **q2),
              num_warps=d.warps)
from dsv4lib.kernels.int2_moe_prefill import _gate_up_kernel as _pf_gate_up
# INT2 prefill gate/up (inline lop3 + f16x2 in the tile dequant), the T=2048 launch config
gsig = {"x_ptr": "*fp16", "sorted_ptr": "*i32", "bexp_ptr": "*i32", "S": "i32", "TOPK": "i32", "rw_ptr": "*fp32",
        "w1_ptr": "*i32", "s1_ptr": "*fp16", "z1_ptr": "*i8", "w3_ptr": "*i32", "s3_ptr": "*fp16", "z3_ptr": "*i8",
        "h_ptr": "*fp16", "I": "i32", "D": "i32", "KW": "i32", "limit": "fp32", "E0": "i32", "EC": "i32",
        "ws_ptr": "*fp32", "cnt_ptr": "*i32", "KS": "i32",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "W": "constexpr", "SWAP": "constexpr", "EXPAND": "constexpr",
        "DEQ": "constexpr", "H_PAIRS": "constexpr", "SPLIT": "constexpr"}
check_plain("int2 prefill gate_up", _pf_gate_up, gsig, dict(BLOCK_M=64, BLOCK_N=64, W=8, SWAP=True, EXPAND=3, DEQ=False,
                                                          H_PAIRS=True, SPLIT=1),
            num_warps=4, num_stages=3)
from dsv4lib.kernels.indexer_scores import _indexer_scores_kernel
# indexer scores: bf16 q and keys (DOT16), and bf16 q against fp32 keys in 3xTF32 (the bf16 model's case)
for kdt, dot16, prec in (("*bf16", True, "ieee"), ("*fp32", False, "tf32x3")):
    check_plain(f"indexer scores keys={kdt} {prec}", _indexer_scores_kernel,
                {"q_ptr": "*bf16", "k_ptr": kdt, "w_ptr": "*fp32", "pos_ptr": "*i64", "o_ptr": "*fp32", "S": "i32",
                 "T": "i32", "NH": "i32", "ratio": "i32", "q_sb": "i32", "q_ss": "i32", "k_sb": "i32", "w_sb": "i32",
                 "w_ss": "i32", "o_sb": "i32", "o_ss": "i32", "CI": "constexpr", "BT": "constexpr", "BE": "constexpr",
                 "DOT16": "constexpr", "PREC": "constexpr"},
                dict(CI=128, BT=64, BE=64, DOT16=dot16, PREC=prec), num_warps=4, num_stages=3)
from dsv4lib.kernels.fp8_linear import CHAINED_CONFIG, _fp8_gemm_chained_kernel
# chained FP8 prefill GEMM (opt-in): bf16 operands, the default tile
bm, bn, warps, stages, group_m = CHAINED_CONFIG
csig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32", "N": "i32",
        "K": "i32", "KB": "i32", "G": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "GROUP_M": "constexpr",
        "DOT16": "constexpr"}
check_plain("fp8 gemm chained", _fp8_gemm_chained_kernel, csig,
            dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m, DOT16=True), num_warps=warps, num_stages=stages)
import torch
from dsv4lib.kernels.prefill_attention import _prefill_attn_kernel, pick_attn_config
# prefill attention: head dim 512 (full scale; bf16 score product, p in TF32 or bf16) and 64 (fp32 model, IEEE)
for C, prec, dot16, p16 in ((512, "tf32", True, False), (512, "tf32", True, True), (64, "ieee", False, False)):
    cfg = pick_attn_config(C, torch.bfloat16 if dot16 and p16 else torch.float32)
    sig = {"q_ptr": "*bf16", "wk_ptr": "*bf16", "ek_ptr": "*bf16", "eb_ptr": "*fp32", "sink_ptr": "*fp32",
           "o_ptr": "*bf16", "S": "i32", "NW": "i32", "NE": "i32", "H": "i32", "qpos0": "i32", "wpos0": "i32",
           "window": "i32", "scale": "fp32", "q_sb": "i32", "q_ss": "i32", "wk_sb": "i32", "ek_sb": "i32",
           "eb_sb": "i32", "eb_ss": "i32", "o_sb": "i32", "o_ss": "i32", "C": "constexpr", "BM": "constexpr",
           "BN": "constexpr", "PREC": "constexpr", "DOT16": "constexpr", "P16": "constexpr"}
    check_plain(f"prefill attention C={C} {prec} p16={p16}", _prefill_attn_kernel, sig,
                dict(C=C, BM=cfg.bm, BN=cfg.bn, PREC=prec, DOT16=dot16, P16=p16),
                num_warps=cfg.warps, num_stages=cfg.stages)
from dsv4lib.kernels.ptxas_check import wgmma_serialized
from dsv4lib.kernels.int2_moe_prefill import _down_kernel as _pf_down, pick_prefill_config


def check_async(name, fn, sig, cons, **options):
    """Compiled with the runtime's divisibility-16 specialisation of pointers and sizes: ptxas must keep the
    wgmma instructions asynchronous (no C7515 serialisation; kernels/ptxas_check.py)."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if n.endswith("_ptr") or n in ("I", "D", "KW", "KS", "K", "N")}
    try:
        k = triton.compile(ASTSource(fn, sig, cons, attrs), target=GPUTarget("cuda", 90, 32), options=options)
        why = wgmma_serialized(k.asm["ptx"])
        out[name] = f"wgmma serialized: {why}" if why else "ok"
    except Exception as e:  # noqa: BLE001 - reported per case
        out[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"


dsig = {"h_ptr": "*fp16", "sorted_ptr": "*i32", "bexp_ptr": "*i32", "S": "i32", "TOPK": "i32", "w2_ptr": "*i32",
        "s2_ptr": "*fp16", "z2_ptr": "*i8", "y_ptr": "*fp32", "I": "i32", "D": "i32", "KW": "i32", "E0": "i32",
        "EC": "i32", "KS": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "W": "constexpr", "R": "constexpr",
        "SWAP": "constexpr", "EXPAND": "constexpr", "DEQ": "constexpr", "SPLIT": "constexpr"}
from dsv4lib.kernels.int2_moe_prefill import SPLIT_DECODE_CONFIG
# the 2K prefill and the MMLU batch launch configs, and the split-K config for decode-size token counts
for T, c in ((2048, pick_prefill_config(2048, 6, 256)), (6144, pick_prefill_config(6144, 6, 256)),
             ("decode split", SPLIT_DECODE_CONFIG)):
    g, d = c.gate_up, c.down
    dbm = c.down_block_m or c.block_m
    check_async(f"int2 prefill T={T} gate_up async", _pf_gate_up, gsig,
                dict(BLOCK_M=c.block_m, BLOCK_N=g.block_n, W=g.w, SWAP=g.swap, EXPAND=g.expand, DEQ=False,
                     H_PAIRS=True, SPLIT=g.split),
                num_warps=g.warps, num_stages=g.stages)
    check_async(f"int2 prefill T={T} down async", _pf_down, dsig,
                dict(BLOCK_M=dbm, BLOCK_N=d.block_n, W=d.w, R=c.block_m // dbm, SWAP=d.swap, EXPAND=d.expand,
                     DEQ=False, SPLIT=d.split), num_warps=d.warps, num_stages=d.stages)
check_async("fp8 gemm chained async", _fp8_gemm_chained_kernel, csig,
            dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m, DOT16=True), num_warps=warps, num_stages=stages)
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90():
    """fp8_linear: the fallback configs and every tuned one (TUNED), at M = 1 and M > 1; the CUDA-core FP8 GEMV at
    its tuned configs (TUNED_GEMV); mHC pre; fused router;
    RMSNorm+RoPE scattered into the window; attention combine with the output RoPE; the mHC prefill kernels;
    the INT2 idp decode kernels, the INT2 prefill gate/up and the bulk L2 prefetch (their inline PTX never runs in the interpreter); and
    the prefill GEMM kernels at their launch configs keep their wgmma instructions asynchronous in ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    if p.returncode != 0 and "No module named 'triton.backends" in p.stderr:
        pytest.skip("this Triton has no offline compile entry points")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res) >= 6
    bad = {k: v for k, v in res.items() if v != "ok"}
    assert not bad, bad
