"""Issue 6 "done when": with the expert backends and FP8 linears switched to the Triton kernels on CUDA,
the embedded model's logits match the torch path (CPU) — prefill (the grouped INT2 prefill kernel, T>16)
and token-by-token decode (the INT2 decode kernel, T=2).

The router's top-k is a discontinuous function: two expert scores within ~1e-4 of each other swap order
under the last-digit differences between the CPU and GPU paths, and the swapped expert changes that token's
output by O(1). That is what made this test fail twice in ~8 GPU runs (rel ~0.10, argmax 100 %):
`bench/repro_int2_model.py` on the H200 (2026-11-29) found the first diverging layer with input rel 3.7e-4,
a different routing, and the expert kernel on the CPU's inputs at rel 3.6e-4. So the comparison is split:
1. routing, free-running: per MoE call >= 99 % of tokens select the same expert set, and every token that
   does not has a near-tie (gap between its k-th and (k+1)-th biased scores < 5e-3 relative) on the CPU
   (MXFP4, a bf16 path: 95 % and 5e-2, ``ROUTING_TOL``);
2. logits with the GPU's routers pinned to the CPU's decisions (forward hooks replay them in call order),
   so the tolerance below measures the kernels, not the tie-breaking.

Stated tolerances (max |Δlogit| / max |logit|, argmax agreement), CPU path fp32 throughout:
* INT2 kernels: ≤ 2e-3, ≥ 99 %. Measured on the H200 (4 runs, cold and warm Triton cache): prefill
  2.1–2.4e-4, decode 1.0–1.3e-4, agreement 100 % (atomic-add order makes the last digits vary).
* MXFP4 path: Triton dequantisation + **bf16** matmuls by design, so ≤ 0.1, ≥ 98 %. Measured prefill
  4.98e-2 with 99.4 % agreement.
"""
import pytest
import torch

from dsv4lib.paths import EMBEDDED_REF

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


TOL = {"int2": (2e-3, 0.99), "mxfp4": (0.1, 0.98)}
# free-running routing: (min fraction of tokens with the same expert set per MoE call, max relative score
# gap of the others). The MXFP4 path runs bf16 matmuls (logits rel ~5e-2), so its ties are wider:
# on the H200 2 of 160 tokens changed one expert in layer 5 (2026-11-29).
# INT2: one token of layer 5 changed its set at a 1.8e-3 gap on the H200 (2026-11-29, session 7, after the FP8
# GEMV kept fp32 activations exact): a relative input difference of ~4e-4 (the prefill kernel's fp16 activations)
# moves a score by several times that where the dot cancels, so 5e-3 is still a near-tie.
ROUTING_TOL = {"int2": (0.99, 5e-3), "mxfp4": (0.95, 5e-2)}


def _close(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, agree


def _routing_checks(cpu_calls: list, gpu_calls: list, min_same: float, max_gap: float) -> None:
    """Free-running routers: >= ``min_same`` of the tokens select the same expert set per call, and
    the others had a near-tie (relative gap < ``max_gap``) on the CPU (see the module docstring)."""
    assert len(cpu_calls) == len(gpu_calls) > 0
    for n, ((s, idx, _, bias), (_, gidx, _, _)) in enumerate(zip(cpu_calls, gpu_calls)):
        same = (idx.sort(-1).values == gidx.sort(-1).values).all(-1)           # [T]
        assert same.float().mean() >= min_same, (n, same.float().mean().item())
        if not same.all():
            assert bias is not None, ("hash-routed layer differs", n)
            top = (s + bias).topk(idx.shape[1] + 1, -1).values                  # [T, k+1]
            gap = (top[:, -2] - top[:, -1]) / top[:, 0].abs()
            assert (gap[~same] < max_gap).all(), (n, gap[~same].tolist())


def _record_gates(model, calls: list) -> None:
    for layer in model.layers:
        g = layer.ffn.gate
        g.register_forward_hook(lambda mod, args, out, g=g: calls.append(
            [t.detach().cpu() for t in out] + [None if g.bias is None else g.bias.detach().float().cpu()]))


def _pin_gates(model, queue: list) -> None:
    """Replace each gate's output by the next recorded CPU output (call order)."""
    for layer in model.layers:
        layer.ffn.gate.register_forward_hook(
            lambda mod, args, out: tuple(t.to(out[0].device) for t in queue.pop(0)[:3]))


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
    cpu_calls, gpu_calls = [], []
    _record_gates(cpu, cpu_calls)
    _record_gates(gpu, gpu_calls)
    with torch.no_grad():
        ref = cpu(ids)
        gpu(ids.cuda())
        _routing_checks(cpu_calls, gpu_calls, *ROUTING_TOL[experts])
        queue = list(cpu_calls)                       # replay the CPU's routing: every gate call, in order
        _pin_gates(gpu, queue)
        rel, agree = _close(gpu(ids.cuda()).cpu(), ref)
        print(f"{experts} prefill: rel {rel:.2e}, argmax agreement {agree:.3f}")
        assert rel <= TOL[experts][0] and agree >= TOL[experts][1], (experts, "prefill", rel, agree)
        cpu_calls.clear()
        cc, cg = cpu.new_cache(2, 80), gpu.new_cache(2, 80)
        cpu(ids[:, :72], cc)
        queue.extend(cpu_calls)
        gpu(ids[:, :72].cuda(), cg)
        steps = []
        for t in range(72, 80):
            c = cpu(ids[:, t:t + 1], cc)
            queue.extend(cpu_calls[len(cpu_calls) - len(cpu.layers):])
            steps.append((gpu(ids[:, t:t + 1].cuda(), cg).cpu(), c))
        assert not queue
    rel, agree = _close(torch.cat([g for g, _ in steps], 1), torch.cat([c for _, c in steps], 1))
    print(f"{experts} decode: rel {rel:.2e}, argmax agreement {agree:.3f}")
    assert rel <= TOL[experts][0] and agree >= TOL[experts][1], (experts, "decode", rel, agree)
