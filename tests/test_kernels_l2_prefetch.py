"""kernels/l2_prefetch.py: the launch covers every 128-byte line of the requested range exactly once (checked
through the kernel's RECORD mode, interpreted on CPU, compiled on CUDA); the hint itself runs on CUDA."""
import pytest
import torch

from dsv4lib.kernels.l2_prefetch import LINE, LINES, l2_prefetch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape, dtype, max_bytes", [((3, 1000), torch.float8_e4m3fn, None),     # 3000 B: partial line
                                                      ((LINES + 3, 128), torch.uint8, None),       # two programs
                                                      ((70, 300), torch.bfloat16, None),
                                                      ((64, 4096), torch.float8_e4m3fn, 100_000),  # a prefix
                                                      ((5, 7), torch.float32, 10_000)])            # cap past the end
def test_record_covers_each_line_once(shape, dtype, max_bytes):
    t = torch.zeros(shape, dtype=torch.float32).to(dtype).to(DEV)
    nbytes = t.numel() * t.element_size()
    want = nbytes if max_bytes is None else min(nbytes, max_bytes)
    rec = l2_prefetch(t, max_bytes, record=True).cpu()
    got = rec[rec >= 0]
    assert torch.equal(got, torch.arange(0, want, LINE))                 # in order, each line once
    assert rec.numel() % LINES == 0 and (rec[got.numel():] == -1).all()  # the tail of the last program is masked
    assert rec.numel() - got.numel() < LINES


def test_empty_and_bad_input():
    assert l2_prefetch(torch.zeros(0, device=DEV), record=True).numel() == 0
    assert l2_prefetch(torch.zeros(8, device=DEV), max_bytes=0) is None
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch(torch.zeros(8, 8, device=DEV).t())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hint_runs_and_changes_nothing():
    w = torch.randn(4096, 1024, device="cuda").to(torch.float8_e4m3fn)
    before = w.view(torch.uint8).clone()
    l2_prefetch(w)
    l2_prefetch(w, max_bytes=3 << 20)
    torch.cuda.synchronize()
    assert torch.equal(w.view(torch.uint8), before)
