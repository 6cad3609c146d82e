"""Issue 6 "done when": with the expert backends and FP8 linears switched to the Triton kernels on CUDA,
the embedded model's logits match the torch path (CPU) — prefill (the grouped INT2 prefill kernel, T>16)
and token-by-token decode (the INT2 decode kernel, T=2).

Stated tolerances (max |Δlogit| / max |logit|, argmax agreement), CPU path fp32 throughout:
* INT2 kernels: ≤ 2e-3, ≥ 99 %. Measured on the H200 (4 runs, cold and warm Triton cache): prefill
  2.1–2.4e-4, decode 1.0–1.3e-4, agreement 100 % (atomic-add order makes the last digits vary). Twice in
  ~8 GPU runs (two sessions) the prefill half failed with rel ~0.10 and 100 % agreement, on code that
  passed in the other runs: unexplained, see kernels/NOTES.md and bench/repro_int2_model.py.
* MXFP4 path: Triton dequantisation + **bf16** matmuls by design, so ≤ 0.1, ≥ 98 %. Measured prefill
  4.98e-2 with 99.4 % agreement; prefill and decode passed in both GPU runs of the second session.
"""
import pytest
import torch

from dsv4lib.paths import EMBEDDED_REF

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


TOL = {"int2": (2e-3, 0.99), "mxfp4": (0.1, 0.98)}


def _close(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, agree


@pytest.mark.parametrize("experts", ["int2", "mxfp4"])
def test_kernel_backed_model_matches_torch_path(tmp_path, experts):
    from dsv4lib.checkpoint import load_model
    from dsv4lib.quant.pipeline import quantize_rtn
    int2 = None
    if experts == "int2":
        int2 = tmp_path / "rtn"
        quantize_rtn(EMBEDDED_REF, int2)
    cpu = load_model(EMBEDDED_REF, int2, device="cpu")
    gpu = load_model(EMBEDDED_REF, int2, device="cuda")
    ids = torch.randint(0, cpu.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rel, agree = _close(gpu(ids.cuda()).cpu(), cpu(ids))
        print(f"{experts} prefill: rel {rel:.2e}, argmax agreement {agree:.3f}")
        assert rel <= TOL[experts][0] and agree >= TOL[experts][1], (experts, "prefill", rel, agree)
        cc, cg = cpu.new_cache(2, 80), gpu.new_cache(2, 80)
        cpu(ids[:, :72], cc)
        gpu(ids[:, :72].cuda(), cg)
        steps = [(gpu(ids[:, t:t + 1].cuda(), cg).cpu(), cpu(ids[:, t:t + 1], cc)) for t in range(72, 80)]
    rel, agree = _close(torch.cat([g for g, _ in steps], 1), torch.cat([c for _, c in steps], 1))
    print(f"{experts} decode: rel {rel:.2e}, argmax agreement {agree:.3f}")
    assert rel <= TOL[experts][0] and agree >= TOL[experts][1], (experts, "decode", rel, agree)
