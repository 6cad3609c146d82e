"""Triton kernels for dsv4lib (importable as ``dsv4lib.kernels``).

Each module follows one anatomy: a docstring with the packed layout, autotune configs, the
``@triton.jit`` kernel, a typed launcher that checks its inputs, and a plain-torch reference.
"""
