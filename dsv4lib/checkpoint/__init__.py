"""Checkpoint I/O (spec v4_arch §3): release schema, reader, writer, INT2 store, hybrid loader, verify.

Public entry points (ARCHITECTURE.md): ``expected_tensors(config)``, ``save_release(model, out_dir)``,
``load_model(ref_dir, int2_dir=None, device=...)``. Heavy submodules are imported on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "expected_tensors": "schema", "TensorSpec": "schema", "release_format": "schema",
    "ReleaseReader": "reader", "CheckpointError": "errors",
    "save_release": "writer",
    "Int2Store": "int2_store", "write_int2_layer": "int2_store", "read_int2_layer": "int2_store",
    "load_model": "loader", "model_memory_report": "loader",
    "verify_int2": "verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dsv4lib.checkpoint.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dsv4lib.checkpoint' has no attribute {name!r}")
