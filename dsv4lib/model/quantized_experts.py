"""Quantized routed-expert backends: MXFP4 (as released) and INT2 g64 (this project's format).

Both hold the compact tensors stacked over experts and implement ``dequantize_expert(e)`` and
``resident_bytes()`` on top of :class:`ExpertBackend`, which groups tokens by expert (CONTRACTS
"Experts"). Attribute names follow the file formats so kernels can bind to them:

* ``MXFP4Experts``: ``{p}_blocks`` uint8 ``[E, out, in/2]`` (low nibble = even input),
  ``{p}_scales`` uint8 E8M0 ``[E, out, in/32]`` (spec v4_arch §3.3);
* ``INT2Experts``: ``{p}_packed`` uint32 ``[E, out, in/16]``, ``{p}_scale`` fp16 ``[E, out, in/G]``,
  ``{p}_zero_packed`` int8 ``[E, out, in/(2G)]`` (ARCHITECTURE.md INT2 g64 format)

for ``p`` in w1 (gate, ``[I, D]``), w3 (up, ``[I, D]``), w2 (down, ``[D, I]``).
"""
from __future__ import annotations

import torch

from dsv4lib.formats import int2, mxfp4

from .experts import ExpertBackend

PROJS = ("w1", "w3", "w2")


def _proj_shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {"w1": (inter, hidden), "w3": (inter, hidden), "w2": (hidden, inter)}


class MXFP4Experts(ExpertBackend):
    """Routed experts kept as MXFP4 (packed e2m1 + one E8M0 scale per 32 inputs)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, device=None) -> None:
        super().__init__(num_experts, hidden, inter)
        for p, (o, i) in _proj_shapes(hidden, inter).items():
            if i % mxfp4.BLOCK:
                raise ValueError(f"MXFP4Experts: {p} input dim {i} is not a multiple of {mxfp4.BLOCK}")
            self.register_buffer(f"{p}_blocks", torch.zeros(num_experts, o, i // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{p}_scales", torch.zeros(num_experts, o, i // mxfp4.BLOCK, dtype=torch.uint8,
                                                            device=device))

    def set_expert(self, e: int, proj: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        """Copy one expert's release tensors (I8 ``[out, in/2]``, E8M0 ``[out, in/32]``) in place."""
        dst_b, dst_s = getattr(self, f"{proj}_blocks"), getattr(self, f"{proj}_scales")
        if tuple(blocks.shape) != tuple(dst_b.shape[1:]) or tuple(scales.shape) != tuple(dst_s.shape[1:]):
            raise ValueError(f"MXFP4Experts.set_expert({e}, {proj}): shapes {tuple(blocks.shape)}/"
                             f"{tuple(scales.shape)}, expected {tuple(dst_b.shape[1:])}/{tuple(dst_s.shape[1:])}")
        dst_b[e].copy_(blocks.view(torch.uint8))
        dst_s[e].copy_(scales.view(torch.uint8))

    @classmethod
    def from_dense(cls, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> "MXFP4Experts":
        """Quantize stacked float experts (w1/w3 ``[E, I, D]``, w2 ``[E, D, I]``) to MXFP4."""
        E, I, D = w1.shape
        m = cls(E, D, I, device=w1.device)
        for p, w in zip(PROJS, (w1, w3, w2)):
            b, s = mxfp4.quantize(w.detach())
            getattr(m, f"{p}_blocks").copy_(b.view(torch.uint8))
            getattr(m, f"{p}_scales").copy_(s)
        return m

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, limit: float) -> torch.Tensor:
        if x.is_cuda and not self.lowp:   # Triton dequant of the routed experts + bf16 matmuls
            from dsv4lib.kernels.dispatch import mxfp4_moe
            return mxfp4_moe(x, idx, weight, self.w1_blocks, self.w1_scales, self.w3_blocks, self.w3_scales,
                             self.w2_blocks, self.w2_scales, limit)
        return super().forward(x, idx, weight, limit)

    def dequantize_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(mxfp4.dequantize(getattr(self, f"{p}_blocks")[e], getattr(self, f"{p}_scales")[e])
                     for p in PROJS)  # fp32 (w1 [I,D], w3 [I,D], w2 [D,I])

    def resident_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class INT2Experts(ExpertBackend):
    """Routed experts in the INT2 g64 format (codes, fp16 scales, 4-bit zeros), stacked over experts."""

    def __init__(self, num_experts: int, hidden: int, inter: int, group_size: int = int2.GROUP,
                 device=None) -> None:
        super().__init__(num_experts, hidden, inter)
        self.group_size = group_size
        for p, (o, i) in _proj_shapes(hidden, inter).items():
            for key, (shape, dtype) in int2.packed_shapes(o, i, group_size, (num_experts,)).items():
                name = f"{p}_{key[2:]}"  # w_packed -> w1_packed, w_scale -> w1_scale, …
                self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def from_tensors(cls, tensors: dict[str, dict[str, torch.Tensor]], group_size: int = int2.GROUP,
                     device=None) -> "INT2Experts":
        """From ``{p: {"w_packed", "w_scale", "w_zero_packed"}}`` (one layer file's content)."""
        E, I, Dq = tensors["w1"]["w_packed"].shape
        m = cls(E, Dq * int2.CODES_PER_WORD, I, group_size, device="meta")
        for p in PROJS:
            for key in ("w_packed", "w_scale", "w_zero_packed"):
                name = f"{p}_{key[2:]}"
                ref = getattr(m, name)
                t = tensors[p][key]
                if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
                    raise ValueError(f"INT2Experts: {p}.{key} is {t.dtype}{list(t.shape)}, "
                                     f"expected {ref.dtype}{list(ref.shape)}")
                setattr(m, name, t.to(device) if device is not None else t)
        return m

    @classmethod
    def from_dense_rtn(cls, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                       group_size: int = int2.GROUP) -> "INT2Experts":
        """Round-to-nearest INT2 of stacked float experts (a test/baseline path; GPTQ is in ``quant``)."""
        packed = {p: int2.pack(*int2.quantize_rtn(w.detach(), group_size)) for p, w in zip(PROJS, (w1, w3, w2))}
        return cls.from_tensors(packed, group_size, device=w1.device)

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{p: {"w_packed", "w_scale", "w_zero_packed"}}`` views of the stored tensors."""
        return {p: {k: getattr(self, f"{p}_{k[2:]}") for k in ("w_packed", "w_scale", "w_zero_packed")}
                for p in PROJS}

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, limit: float) -> torch.Tensor:
        if x.is_cuda and not self.lowp and self.group_size == 64:   # fused INT2 kernels (decode / prefill)
            from dsv4lib.kernels.dispatch import int2_moe
            return int2_moe(x, idx, weight, self.w1_packed, self.w1_scale, self.w1_zero_packed,
                            self.w3_packed, self.w3_scale, self.w3_zero_packed,
                            self.w2_packed, self.w2_scale, self.w2_zero_packed, limit)
        return super().forward(x, idx, weight, limit)

    def dequantize_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(int2.dequantize(getattr(self, f"{p}_packed")[e], getattr(self, f"{p}_scale")[e],
                                     getattr(self, f"{p}_zero_packed")[e], self.group_size)
                     for p in PROJS)  # fp32 (w1 [I,D], w3 [I,D], w2 [D,I])

    def resident_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
