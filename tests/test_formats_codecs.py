"""Exact round trips of the pure codecs (dsv4lib.formats): e8m0, fp8 blocks, mxfp4, int2 g64."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4lib.formats import e8m0, fp8, int2, mxfp4

FAST = settings(max_examples=25, deadline=None, database=None)  # no .hypothesis dir in the tree


# ---------------------------------------------------------------- e8m0
def test_e8m0_decode_matches_torch_dtype():
    b = torch.arange(0, 256, dtype=torch.uint8)
    ref = b.view(torch.float8_e8m0fnu).float()
    got = e8m0.decode(b)
    assert torch.equal(got[:255], ref[:255])
    assert torch.isnan(got[255]) and torch.isnan(ref[255])


def test_e8m0_encode_decode_roundtrip():
    b = torch.arange(0, 255, dtype=torch.uint8)
    assert torch.equal(e8m0.encode(e8m0.decode(b)), b)
    with pytest.raises(ValueError):
        e8m0.encode(torch.tensor([3.0]))
    with pytest.raises(ValueError):
        e8m0.encode(torch.tensor([0.0]))


def test_e8m0_ceil_pow2():
    r = torch.tensor([1.0, 1.5, 0.25, 0.3, 1000.0, 2.0 ** -130])
    k = e8m0.ceil_pow2_exponent(r)
    assert k.tolist() == [0, 1, -2, -1, 10, -130]
    assert (torch.ldexp(torch.ones_like(r), k) >= r).all()
    assert (torch.ldexp(torch.ones_like(r), k - 1) < r).all()


# ---------------------------------------------------------------- fp8
@FAST
@given(out=st.integers(1, 300), inp=st.integers(1, 300), seed=st.integers(0, 2**16),
       fmt=st.sampled_from(["e8m0", "f32"]), mag=st.sampled_from([1e-6, 1.0, 300.0]))
def test_fp8_quant_dequant_is_idempotent(out, inp, seed, fmt, mag):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * mag
    q, s = fp8.quantize_block(w, fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert tuple(s.shape) == (-(-out // 128), -(-inp // 128))
    assert s.dtype == (torch.float8_e8m0fnu if fmt == "e8m0" else torch.float32)
    d = fp8.dequantize_block(q, s)
    # relative error bound of e4m3 (3 mantissa bits) inside each block
    err = (d - w).abs()
    bound = fp8.expand_scale(s, (out, inp)) * 448 * 2 ** -4
    assert (err <= bound + 1e-30).all()
    if fmt == "e8m0":  # powers of two: re-quantising the dequantised weight is exact
        q2, s2 = fp8.quantize_block(d, fmt)
        assert torch.equal(fp8.dequantize_block(q2, s2), d)


@FAST
@given(out=st.integers(1, 260), inp=st.integers(1, 260), seed=st.integers(0, 2**16))
def test_fp8_exact_roundtrip_of_stored_tensors(out, inp, seed):
    """Codes with each block's max |code| in (224, 448] and E8M0 scales survive dequant->quant bit-exactly."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (out, inp), generator=g, dtype=torch.uint8)
    q = bits.view(torch.float8_e4m3fn)
    q = torch.where(torch.isnan(q.float()), torch.zeros_like(q.float()), q.float()).to(torch.float8_e4m3fn)
    go, gi = fp8.scale_grid((out, inp))
    qf = q.float()
    for bo in range(go):  # put a 448 (or -448) in each block to pin its scale
        for bi in range(gi):
            qf[bo * 128, bi * 128] = 448.0 if (bo + bi) % 2 else -448.0
    q = qf.to(torch.float8_e4m3fn)
    s = torch.randint(100, 150, (go, gi), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    q2, s2 = fp8.quantize_block(fp8.dequantize_block(q, s), "e8m0")
    assert torch.equal(s2.view(torch.uint8), s.view(torch.uint8))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) or torch.equal(q2.float(), q.float())


def test_fp8_partial_edge_blocks_use_their_own_scale():
    w = torch.zeros(130, 129)
    w[129, 128] = 1000.0  # only the corner block (1, 1) is large
    w[0, 0] = 0.01
    _, s = fp8.quantize_block(w)
    sf = fp8.scale_to_float(s)
    assert sf[1, 1] == 4.0 and sf[0, 0] == 2.0 ** -15
    d = fp8.fake_quantize(w)
    assert d[129, 128] == 1024.0  # 1000/4 = 250 rounds to the e4m3 value 256
    assert d[0, 0] == 320 * 2.0 ** -15  # 0.01/2**-15 = 327.68 rounds to 320
    assert torch.count_nonzero(d) == 2


def test_fp8_rejects_bad_input():
    with pytest.raises(ValueError):
        fp8.quantize_block(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError):
        fp8.dequantize_block(torch.zeros(200, 10, dtype=torch.float8_e4m3fn), torch.ones(1, 1))


# ---------------------------------------------------------------- mxfp4
def test_mxfp4_table_and_nibble_order():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)  # 32 values
    packed = mxfp4.pack_nibbles(codes)
    assert packed.view(torch.uint8)[0] == 0x10 and packed.view(torch.uint8)[1] == 0x32  # low nibble first
    d = mxfp4.dequantize(packed[None], torch.tensor([[128]], dtype=torch.uint8))[0]  # scale 2
    ref = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6]) * 2
    assert torch.equal(d[:8], ref) and torch.equal(d[8:16], -ref)


def test_mxfp4_matches_torch_float4_view():
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("torch without float4")
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 256, (4, 16), generator=g, dtype=torch.uint8)
    codes = mxfp4.unpack_nibbles(p)
    # reference decoding of each nibble by bit arithmetic: sign | exp(2) | mantissa(1)
    sign = 1 - 2 * ((codes >> 3) & 1).float()
    ex, m = ((codes >> 1) & 3).float(), (codes & 1).float()
    ref = sign * torch.where(ex == 0, m * 0.5, (1 + m / 2) * 2 ** (ex - 1))
    got = mxfp4.dequantize(p, torch.full((4, 1), 127, dtype=torch.uint8))
    assert torch.equal(got, ref)


@FAST
@given(lead=st.sampled_from([(), (3,)]), out=st.integers(1, 40), nb=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_mxfp4_exact_roundtrip(lead, out, nb, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, lead + (out, nb * 32), generator=g, dtype=torch.uint8)
    codes[codes == 8] = 0  # -0 re-encodes as +0
    codes[..., ::32] = torch.where(torch.rand(codes[..., ::32].shape, generator=g) < .5, 7, 15).to(torch.uint8)
    scale = torch.randint(90, 140, lead + (out, nb), generator=g, dtype=torch.uint8)
    packed = mxfp4.pack_nibbles(codes)
    assert packed.dtype == torch.int8 and packed.shape[-1] == nb * 16
    assert torch.equal(mxfp4.unpack_nibbles(packed), codes)
    p2, s2 = mxfp4.quantize(mxfp4.dequantize(packed, scale))
    assert torch.equal(s2, scale) and torch.equal(p2, packed)


@FAST
@given(out=st.integers(1, 30), nb=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_mxfp4_quantizer_nearest_and_idempotent(out, nb, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, nb * 32, generator=g) * 0.05
    p, s = mxfp4.quantize(w)
    d = mxfp4.dequantize(p, s)
    assert torch.equal(mxfp4.fake_quantize(d), d)
    # nearest: no other representable value of the block grid is closer
    grid = mxfp4.E2M1_VALUES[:8].unique()
    sc = e8m0.decode(s).repeat_interleave(32, -1)
    cand = torch.cat([grid, -grid]) * sc.unsqueeze(-1)  # [out, in, 16]
    best = (cand - w.unsqueeze(-1)).abs().amin(-1)
    assert torch.allclose((d - w).abs(), best, rtol=0, atol=1e-7)


def test_mxfp4_ties_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -0.1])
    assert mxfp4.quantize_codes(x).tolist() == [0, 2, 2, 4, 4, 6, 6, 10, 0]


# ---------------------------------------------------------------- int2
@FAST
@given(lead=st.sampled_from([(), (2,), (2, 3)]), rows=st.integers(1, 20), ng=st.integers(1, 4),
       seed=st.integers(0, 2**16), order=st.sampled_from(int2.CODE_ORDERS),
       zorder=st.sampled_from(int2.ZERO_ORDERS))
def test_int2_pack_roundtrip(lead, rows, ng, seed, order, zorder):
    g = torch.Generator().manual_seed(seed)
    k = ng * 128
    q = torch.randint(0, 4, lead + (rows, k), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 16, lead + (rows, k // 64), generator=g, dtype=torch.uint8)
    pq, pz = int2.pack_codes(q, order), int2.pack_zeros(z, zorder)
    assert pq.dtype == torch.uint32 and pq.shape[-1] == k // 16
    assert pz.dtype == torch.int8 and pz.shape[-1] == k // 128
    assert torch.equal(int2.unpack_codes(pq, order), q)
    assert torch.equal(int2.unpack_zeros(pz, zorder), z)
    assert torch.equal(int2.pack_codes(int2.unpack_codes(pq, order), order), pq)


def test_int2_bit_layout_is_the_contract():
    q = torch.zeros(16, dtype=torch.uint8)
    q[0], q[1], q[15] = 1, 2, 3
    word = int(int2.pack_codes(q).to(torch.int64))
    assert word == 1 | (2 << 2) | (3 << 30)
    z = torch.tensor([5, 10], dtype=torch.uint8)
    assert int(int2.pack_zeros(z).view(torch.uint8)) == 5 | (10 << 4)


def test_int2_dequantize_formula_and_rtn():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 8, 256, generator=g)
    q, s, z = int2.quantize_rtn(w)
    t = int2.pack(q, s, z)
    d = int2.dequantize(t["w_packed"], t["w_scale"], t["w_zero_packed"])
    ref = (q.float() - z.float().repeat_interleave(64, -1)) * s.float().repeat_interleave(64, -1)
    assert torch.equal(d, ref)
    # RTN error is at most half a step per group (plus clamping of the zero point, none here)
    step = s.float().repeat_interleave(64, -1)
    assert ((d - w).abs() <= step * 0.5 + 1e-3 * step).all()
    shapes = int2.packed_shapes(8, 256, lead=(2,))
    for k, v in t.items():
        assert (tuple(v.shape), v.dtype) == shapes[k]


def test_int2_rejects_bad_codes():
    with pytest.raises(ValueError):
        int2.pack_codes(torch.full((16,), 4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        int2.pack_codes(torch.zeros(15, dtype=torch.uint8))
    with pytest.raises(TypeError):
        int2.unpack_codes(torch.zeros(3, dtype=torch.int64))


def test_int2_rtn_degenerate_groups():
    w = torch.zeros(2, 128)
    w[1, 64:] = 1e-9  # constant / subnormal-range group
    q, s, z = int2.quantize_rtn(w)
    assert torch.isfinite(s.float()).all() and (s.float() > 0).all()
    d = int2.dequantize_codes(q, s, z)
    assert torch.isfinite(d).all() and d.abs().max() < 1e-4
