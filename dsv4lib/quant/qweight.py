"""A quantized INT2 g64 weight in unpacked form (ARCHITECTURE.md "INT2 g64 on-disk format").

``QuantizedWeight`` holds codes, fp16 scales and integer zeros for a matrix ``[out, in]`` or an
expert stack ``[E, out, in]``; ``pack()`` gives the on-disk tensors via ``dsv4lib.formats.int2``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4lib.formats import int2


@dataclass(frozen=True)
class QuantizedWeight:
    """codes uint8 ``[..., out, in]`` (0..3), scale fp16 ``[..., out, in/G]``, zero uint8 ``[..., out, in/G]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int = 64

    def __post_init__(self):
        if self.codes.dtype != torch.uint8 or self.zero.dtype != torch.uint8:
            raise TypeError(f"QuantizedWeight: codes/zero must be uint8, got {self.codes.dtype}/{self.zero.dtype}")
        if self.scale.dtype != torch.float16:
            raise TypeError(f"QuantizedWeight: scale must be float16, got {self.scale.dtype}")
        if (self.codes.shape[:-1] != self.scale.shape[:-1] or self.scale.shape != self.zero.shape
                or self.codes.shape[-1] != self.scale.shape[-1] * self.group_size):
            raise ValueError(f"QuantizedWeight: shapes disagree: codes {tuple(self.codes.shape)}, "
                             f"scale {tuple(self.scale.shape)}, zero {tuple(self.zero.shape)}, "
                             f"group {self.group_size}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[..., out, in]``: ``(q − z)·s``."""
        return int2.dequantize_codes(self.codes, self.scale, self.zero, self.group_size)

    def pack(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """On-disk tensors ``{w_packed, w_scale, w_zero_packed}``, keys prefixed ``"{name}."`` if given."""
        out = int2.pack(self.codes, self.scale, self.zero)
        return {f"{name}.{k}" if name else k: v for k, v in out.items()}

    def __getitem__(self, idx) -> QuantizedWeight:
        """Select experts of a stack (``qw[3]``, ``qw[2:5]``)."""
        return QuantizedWeight(self.codes[idx], self.scale[idx], self.zero[idx], self.group_size)

    def to(self, device) -> QuantizedWeight:
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.zero.to(device),
                               self.group_size)

    @staticmethod
    def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Concatenate along the leading (expert) dim; parts must be ``[e_i, out, in]``."""
        return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                               torch.cat([p.zero for p in parts]), parts[0].group_size)

    @staticmethod
    def unpack(tensors: dict[str, torch.Tensor], name: str | None = None,
               group_size: int = 64) -> QuantizedWeight:
        """Inverse of :meth:`pack`."""
        pre = f"{name}." if name else ""
        return QuantizedWeight(int2.unpack_codes(tensors[pre + "w_packed"]), tensors[pre + "w_scale"],
                               int2.unpack_zeros(tensors[pre + "w_zero_packed"]), group_size)
