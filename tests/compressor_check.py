"""Shared by the CPU and GPU compressor-step tests: step the torch reference and the fused kernel side by
side and compare their states after every step."""
import torch


def step_and_compare(comp, ref, got, positions, B: int, dtype, dev, tol: float) -> int:
    """Feed random tokens at ``positions`` through ``compressor_step_torch`` (state ``ref``) and
    ``compressor_step_fused`` (state ``got``); after each step the buffers and CSA prev must agree within
    ``tol``, entries only where visible (index < (pos+1)//r): the torch step rewrites a partial entry every
    step, the kernel writes an entry only when its window completes, so the kernel's not-yet-visible rows
    must still be untouched. Returns the number of visible entries after the last step."""
    from dsv4lib.kernels.compressor_step import compressor_step_fused
    from dsv4lib.model.graphed import compressor_step_torch
    from dsv4lib.model.rope import cos_sin
    r = comp.ratio
    vis = 0
    for pos in positions:
        x = torch.randn(B, 1, comp.wkv.weight.shape[1], device=dev).to(dtype)
        p = torch.tensor(pos, device=dev)
        cos, sin = (t[0] for t in cos_sin(comp.freqs, torch.tensor([pos // r * r], device=dev)))
        compressor_step_torch(comp, x, p, ref, cos, sin)
        kv, gate = comp.wkv(x)[:, 0], comp.wgate(x)[:, 0]
        compressor_step_fused(kv, gate, p, got.buf_kv, got.buf_gate, got.prev_kv, got.prev_gate,
                              comp.ape, comp.norm.weight, cos, sin, got.entries, comp.norm.eps)
        vis = (pos + 1) // r
        for name in ("buf_kv", "buf_gate", "prev_kv", "prev_gate", "entries"):
            a, b = getattr(ref, name).float(), getattr(got, name).float()
            if name == "entries":
                assert not b[:, vis:].any(), pos                          # no partial entry written
                a, b = a[:, :vis], b[:, :vis]
            if a.numel():
                assert torch.equal(a.isinf(), b.isinf()), (pos, name)
                assert (a - b).nan_to_num(posinf=0, neginf=0).abs().max() <= tol, (pos, name)
    return vis
