"""Where the embedded model and data live, and how model directories are resolved.

The library never reads environment variables on its own; callers (CLI, notebooks) pass
``environ`` explicitly to :func:`resolve_model_dirs`.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
EMBEDDED_REF = DATA_DIR / "tiny-v4"
FIGURES_DIR = REPO_ROOT / "figures"
RUNS_DIR = REPO_ROOT / "runs"


def resolve_model_dirs(ref: str | Path | None = None, int2: str | Path | None = None,
                       environ: Mapping[str, str] | None = None) -> tuple[Path, Path | None]:
    """Explicit argument > ``DSV4_REF`` / ``DSV4_INT2`` in ``environ`` > the embedded default."""
    environ = environ or {}
    ref = ref or environ.get("DSV4_REF") or EMBEDDED_REF
    int2 = int2 or environ.get("DSV4_INT2") or None
    return Path(ref), (Path(int2) if int2 else None)
