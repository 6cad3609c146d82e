"""Repeat the kernel-backed embedded-model comparison (tests/test_kernels_model_gpu.py, INT2 RTN experts)
several times in one process to see whether its rare failure (rel ~0.1, seen twice) is nondeterministic,
and which part it sits in (prefill kernel v2 / v1, decode path)."""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsv4lib.kernels.dispatch as dispatch  # noqa: E402
from dsv4lib.checkpoint import load_model  # noqa: E402
from dsv4lib.kernels.int2_moe_prefill import int2_moe_prefill, int2_moe_prefill_v1  # noqa: E402
from dsv4lib.paths import EMBEDDED_REF  # noqa: E402
from dsv4lib.quant.pipeline import quantize_rtn  # noqa: E402

d = Path(tempfile.mkdtemp()) / "rtn"
quantize_rtn(EMBEDDED_REF, d)
cpu = load_model(EMBEDDED_REF, d, device="cpu")
gpu = load_model(EMBEDDED_REF, d, device="cuda")
ids = torch.randint(0, cpu.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ref = cpu(ids)
    for name, fn in (("v2", int2_moe_prefill), ("v1", int2_moe_prefill_v1), ("v2 again", int2_moe_prefill)):
        dispatch.int2_moe_prefill = fn
        for i in range(4):
            out = gpu(ids.cuda()).cpu()
            rel = ((out - ref).abs().max() / ref.abs().max()).item()
            print(f"{name} run {i}: rel {rel:.2e} nan {torch.isnan(out).any().item()}", flush=True)
