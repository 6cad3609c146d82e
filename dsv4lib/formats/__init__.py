"""Pure tensor codecs of the upstream release and of the INT2 store (spec v4_arch §3.3, ARCHITECTURE.md).

No I/O here: ``e8m0`` (power-of-two scale bytes), ``fp8`` (e4m3 weights with 128x128 block scales),
``mxfp4`` (packed e2m1 with one E8M0 scale per 32 inputs) and ``int2`` (g64 codes/scales/zeros).
"""
