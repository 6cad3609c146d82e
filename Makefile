# The README's two commands: `make demo` (main job on the embedded model) and `make test`.
# Both create/reuse .venv/ and install the pinned dependencies first.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PYTHONHASHSEED := 0
PY := .venv/bin/python

.PHONY: setup demo test test-fast
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m dsv4lib demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not notebooks"
