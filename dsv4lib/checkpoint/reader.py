"""Release reader: ``model.safetensors.index.json`` + shards, streamed one shard at a time (spec §3.1, §3.5).

Shards are opened with ``safe_open`` (memory-mapped); dtypes and shapes are read from the file
headers, so Flash (E8M0 scales) and Flash-Base (F32 scales) both load. ``validate()`` checks the
directory against ``expected_tensors(config)`` and raises one :class:`CheckpointError` listing every
missing / extra / wrong-dtype / wrong-shape tensor, missing or truncated shard, and NaN/Inf scale.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from dsv4lib.checkpoint.errors import CheckpointError, Problem
from dsv4lib.checkpoint.schema import DTYPES, TensorSpec, expected_tensors
from dsv4lib.formats import e8m0

INDEX = "model.safetensors.index.json"
# scales of FP8 block-quantized weights may be either flavour (spec §3.3: read it from the file)
_SCALE_DTYPES = {"F8_E8M0", "F32"}


def scale_finite(t: torch.Tensor) -> bool:
    """False if an E8M0 scale holds the NaN byte 255 or a float scale holds NaN/Inf."""
    if t.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return not bool((e8m0.as_bytes(t) == e8m0.NAN_BYTE).any())
    return bool(torch.isfinite(t.float()).all())


class ReleaseReader:
    """Read-only access to an upstream-format release directory.

    ``config`` defaults to the directory's ``config.json``. Names are upstream names.
    """

    def __init__(self, ref_dir: str | Path, config=None):
        self.root = Path(ref_dir)
        if config is None:
            from dsv4lib.config import ModelConfig
            try:
                config = ModelConfig.from_hf_config(self.root)
            except FileNotFoundError:
                raise CheckpointError(Problem(str(self.root / "config.json"), "", "missing config.json")) from None
        self.config = config
        index = self.root / INDEX
        if not index.is_file():
            raise CheckpointError(Problem(str(index), "", "missing index file"))
        try:
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(Problem(str(index), "", f"unreadable index ({e})")) from None
        self._open_file: str | None = None
        self._handle = None

    # ------------------------------------------------------------------ access
    @property
    def files(self) -> list[str]:
        """Shard files named by the index, in sorted order."""
        return sorted(set(self.weight_map.values()))

    def _shard(self, file: str):
        if self._open_file != file:
            self.close()
            path = self.root / file
            if not path.is_file():
                raise CheckpointError(Problem(str(path), "", "shard file missing"))
            try:
                self._handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error type for truncated headers/data
                raise CheckpointError(Problem(str(path), "", f"unreadable or truncated shard ({e})")) from None
            self._open_file = file
        return self._handle

    def close(self) -> None:
        self._handle, self._open_file = None, None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise CheckpointError(Problem(str(self.root / INDEX), name, "tensor not in the index"))
        return self.weight_map[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor (CPU, file dtype)."""
        file = self.file_of(name)
        h = self._shard(file)
        try:
            return h.get_tensor(name)
        except Exception as e:
            raise CheckpointError(Problem(str(self.root / file), name, f"cannot read tensor ({e})")) from None

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) from the shard header, without reading data."""
        file = self.file_of(name)
        try:
            sl = self._shard(file).get_slice(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(Problem(str(self.root / file), name, f"not in shard ({e})")) from None
        return sl.get_dtype(), tuple(sl.get_shape())

    def iter_shard(self, file: str, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream the tensors of one shard (all, or ``names``)."""
        names = names if names is not None else [n for n, f in self.weight_map.items() if f == file]
        for n in names:
            yield n, self.get(n)

    def iter_tensors(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors whose name starts with ``prefix``, one shard at a time."""
        by_file: dict[str, list[str]] = {}
        for n, f in self.weight_map.items():
            if n.startswith(prefix):
                by_file.setdefault(f, []).append(n)
        for f in sorted(by_file):
            yield from self.iter_shard(f, by_file[f])
        self.close()

    # ------------------------------------------------------------------ validation
    def validate(self, check_values: bool = True, include_mtp: bool | None = None) -> list[TensorSpec]:
        """Check the directory against the schema; return the schema rows or raise CheckpointError.

        ``include_mtp=None`` requires MTP tensors only if the index lists any ``mtp.*`` name.
        ``check_values`` also loads every ``.scale`` tensor to reject NaN/Inf scales.
        """
        if include_mtp is None:
            include_mtp = any(n.startswith("mtp.") for n in self.weight_map)
        rows = expected_tensors(self.config, include_mtp=include_mtp)
        expected = {r.name: r for r in rows}
        idx = str(self.root / INDEX)
        problems = [Problem(idx, n, "missing from the index (expected by the config)")
                    for n in expected if n not in self.weight_map]
        problems += [Problem(str(self.root / f), n, "unexpected tensor (not in the schema of this config)")
                     for n, f in self.weight_map.items() if n not in expected]
        by_file: dict[str, list[str]] = {}
        for n, f in self.weight_map.items():
            by_file.setdefault(f, []).append(n)
        for f in sorted(by_file):
            path = self.root / f
            try:
                h = self._shard(f)
            except CheckpointError as e:
                problems += e.problems
                continue
            in_file = set(h.keys())
            for n in by_file[f]:
                if n not in in_file:
                    problems.append(Problem(str(path), n, "listed in the index but absent from the shard"))
                    continue
                sl = h.get_slice(n)
                dt, shape = sl.get_dtype(), tuple(sl.get_shape())
                spec = expected.get(n)
                if spec is not None:
                    ok_dt = dt == spec.dtype or (n.endswith(".scale") and spec.dtype in _SCALE_DTYPES
                                                 and dt in _SCALE_DTYPES and _is_block_scale(spec, expected))
                    if not ok_dt:
                        problems.append(Problem(str(path), n, f"dtype {dt}, expected {spec.dtype}"))
                    if shape != spec.shape:
                        problems.append(Problem(str(path), n, f"shape {list(shape)}, expected {list(spec.shape)}"))
                if check_values and n.endswith(".scale") and dt in DTYPES:
                    if not scale_finite(h.get_tensor(n)):
                        problems.append(Problem(str(path), n, "scale holds NaN/Inf"))
        self.close()
        if problems:
            raise CheckpointError(problems, self.root)
        return rows


def _is_block_scale(spec: TensorSpec, expected: dict[str, TensorSpec]) -> bool:
    """A ``.scale`` whose weight is FP8 (128x128 block scale), not an MXFP4 per-32 scale."""
    w = expected.get(spec.name[: -len("scale")] + "weight")
    return w is not None and w.dtype == "F8_E4M3"
