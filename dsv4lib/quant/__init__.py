"""Quantization of the routed experts to INT2 g64 (quant_notes.md §1–3, §7; ARCHITECTURE.md).

hessian (per-expert Σ x xᵀ) → gptq (batched GPTQ solve) / fallback (data-free grids) → qweight
(codes/scales/zeros, packing); coverage and pipeline drive the layer-by-layer self-calibration.
"""
from dsv4lib.quant.fallback import fallback_quantize
from dsv4lib.quant.gptq import GPTQConfig, GPTQResult, gptq_batched, output_error, quantize_weight
from dsv4lib.quant.grid import GridSearch
from dsv4lib.quant.hessian import ExpertHessians, accumulate, accumulate_all
from dsv4lib.quant.qweight import QuantizedWeight

__all__ = ["ExpertHessians", "GPTQConfig", "GPTQResult", "GridSearch", "QuantizedWeight", "accumulate",
           "accumulate_all", "fallback_quantize", "gptq_batched", "output_error", "quantize_weight"]
