"""kernels/l2_prefetch.py: the bulk L2 prefetch launch's addressing (RECORD mode under the CPU interpreter, which
cannot run the PTX): every 16-byte granule of the hinted range exactly once, nothing past it; and its guards."""
import pytest
import torch

from dsv4lib.kernels.l2_prefetch import LANES, l2_prefetch


def _covered(rec: torch.Tensor) -> list[tuple[int, int]]:
    return sorted((int(o), int(s)) for o, s in rec.tolist() if o >= 0)


@pytest.mark.parametrize("nbytes,chunk,cap", [(4096, 64, None), (4096 + 48, 64, None), (100_000, 1024, 30_016),
                                              (32 * 1024 + 16, 16, None), (48, 4096, None)])
def test_prefetch_covers_the_range_once(nbytes, chunk, cap):
    t = torch.empty(nbytes, dtype=torch.uint8)
    rec = l2_prefetch(t, cap, record=True, chunk=chunk)
    want = min(nbytes, cap if cap is not None else nbytes)
    want -= want % 16
    spans = _covered(rec)
    assert rec.shape[0] % LANES == 0 and rec.shape[0] >= len(spans)
    assert all(s > 0 and s <= chunk and s % 16 == 0 and o % 16 == 0 for o, s in spans)
    pos = 0
    for o, s in spans:                                                   # contiguous, no overlap, no gap
        assert o == pos
        pos += s
    assert pos == want
    idle = [(o, s) for o, s in rec.tolist() if o < 0]
    assert all(s == 0 for _, s in idle)


def test_prefetch_of_a_typed_weight_counts_bytes():
    w = torch.empty(96, 40, dtype=torch.bfloat16)                         # 7680 bytes
    spans = _covered(l2_prefetch(w, record=True, chunk=256))
    assert sum(s for _, s in spans) == 96 * 40 * 2


def test_prefetch_guards():
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch(torch.empty(8, 8)[:, ::2])
    with pytest.raises(ValueError, match="multiple of 16"):
        l2_prefetch(torch.empty(64), chunk=24)
    assert l2_prefetch(torch.empty(64)) is None                           # CPU: a no-op
    assert l2_prefetch(torch.empty(0), record=True).shape == (0, 2)
