"""Scratch for kernels whose last program finishes the work (split-K "last" epilogues): fp32 partials
and int32 arrival counters that are zero on entry and reset to zero by the finishing program.

One set per (device, stream): kernels on one stream run one after another, so they can share the
counters; concurrent streams (the fused step's side branch) get their own. Grown by doubling; replaced
buffers stay referenced, because a captured CUDA graph keeps using the memory it captured."""
from __future__ import annotations

import torch

_WORKSPACES: dict = {}


def _stream_key(device: torch.device) -> tuple[str, int]:
    """(device, id of its current stream): kernels on one stream run in order, so per-stream scratch is safe."""
    return str(device), torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0


def split_workspace(device: torch.device, n_partial: int, n_counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials >= n_partial, int32 zeroed counters >= n_counters) for the current stream of ``device``."""
    device = torch.device(device)
    bufs = _WORKSPACES.setdefault(_stream_key(device), [])
    if not bufs or bufs[-1][0].numel() < n_partial or bufs[-1][1].numel() < n_counters:
        old = bufs[-1] if bufs else (torch.empty(0), torch.empty(0))
        p = max(n_partial, 2 * old[0].numel(), 1 << 16)
        t = max(n_counters, 2 * old[1].numel(), 1024)
        bufs.append((torch.empty(p, dtype=torch.float32, device=device),
                     torch.zeros(t, dtype=torch.int32, device=device)))
    return bufs[-1]


_ZEROED: dict = {}


def zeroed_workspace(device: torch.device, numel: int) -> torch.Tensor:
    """A flat fp32 buffer of >= numel elements per (device, stream) that is all zero between kernel calls: its
    users (split-K partial sums added atomically) zero what they used before they finish. Grown by doubling;
    replaced buffers stay referenced (captured CUDA graphs keep using them)."""
    device = torch.device(device)
    bufs = _ZEROED.setdefault(_stream_key(device), [])
    if not bufs or bufs[-1].numel() < numel:
        bufs.append(torch.zeros(max(numel, 2 * (bufs[-1].numel() if bufs else 0), 1 << 16), dtype=torch.float32,
                                device=device))
    return bufs[-1]


_WEIGHTS: dict = {}


def weight_workspace(device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat ``dtype`` buffer of >= numel elements per (device, stream) for a weight dequantised right before its
    GEMM (``fp8_linear``'s many-token path). Grown by replacement: only eager calls use it (never captured in a
    graph), and each call finishes with the buffer before the next one on the same stream overwrites it."""
    device = torch.device(device)
    key = (*_stream_key(device), dtype)
    buf = _WEIGHTS.get(key)
    if buf is None or buf.numel() < numel:
        _WEIGHTS[key] = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf
