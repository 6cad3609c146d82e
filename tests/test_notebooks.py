"""The five notebooks: committed clean (valid nbformat, no outputs, one literal `parameters` cell),
and executed headless through papermill with smoke parameters into tmp_path, asserting the
metrics they record (STYLE.md §10–13). 01 runs once per module and feeds 02–05."""
from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # absent on GPU images; the notebooks need the pinned venv

from dsv4lib.paths import REPO_ROOT
from dsv4lib.report import is_finite_tree

NB_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ("01_quantize", "02_routing_coverage", "03_error_inspection", "04_generate", "05_mmlu")
SMOKE_CALIB = 4096
THRESHOLD = 256          # above the mean visits of 4096 tokens × top-4 / 32 experts = 512 for some experts


def _param_cell(nb) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged `parameters`"
    return cells[0]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_committed_clean(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: committed outputs"
    assert "widgets" not in nb.metadata, f"{name}: widget state committed"
    # fixed order: title markdown -> imports -> parameters (annotated literals only)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    imports = ast.parse(nb.cells[1].source).body
    assert imports and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in imports)
    pcell = _param_cell(nb)
    assert nb.cells.index(pcell) == 2
    body = ast.parse(pcell.source).body
    assert body and all(isinstance(s, ast.AnnAssign) for s in body), "parameters are annotated assignments"
    for s in body:
        ast.literal_eval(s.value)                         # raises on anything but a literal
    # every parameter is listed by `papermill --help-notebook` with its type and a comment
    import papermill as pm
    inferred = pm.inspect_notebook(str(NB_DIR / f"{name}.ipynb"))
    assert list(inferred) == [s.target.id for s in body]
    assert all(p["inferred_type_name"] != "None" and p["help"] for p in inferred.values()), inferred


# ---------------------------------------------------------------------------------------- execution
def _execute(name: str, out_dir: Path, **params) -> dict:
    import papermill as pm
    pm.execute_notebook(str(NB_DIR / f"{name}.ipynb"), str(out_dir / f"{name}.ipynb"), parameters=params,
                        kernel_name="python3", cwd=str(REPO_ROOT), progress_bar=False)
    m = json.loads((out_dir / f"{name[:2]}_metrics.json").read_text())
    assert is_finite_tree(m), f"{name}: non-finite metric"
    return m


@pytest.fixture(scope="module")
def run01(tmp_path_factory):
    """Notebook 01 once (smoke size); its run folder, figures folder and metrics."""
    with pytest.MonkeyPatch.context() as mp:
        # the kernel imports dsv4lib from this checkout; model dirs come from parameters only
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        mp.delenv("DSV4_INT2", raising=False)
        mp.delenv("DSV4_REF", raising=False)
        run = tmp_path_factory.mktemp("run")
        figs = run / "figures"
        m = _execute("01_quantize", run, run_dir=str(run), figures_dir=str(figs), calib_tokens=SMOKE_CALIB,
                     threshold=THRESHOLD)
        yield run, figs, m


@pytest.mark.notebooks
def test_01_quantize(run01):
    run, figs, m = run01
    assert set(m["layers"]) == {str(i) for i in range(6)}
    for li, v in m["layers"].items():
        for p in ("w1", "w3", "w2"):
            assert 0 < v["gptq_error"][p] < v["rtn_error"][p], (li, p, v)   # GPTQ beats RTN on every layer
    assert m["calibration_tokens"] == SMOKE_CALIB and m["threshold"] == THRESHOLD
    assert m["under_threshold_after"] == 0 and m["visits_min_balanced"] >= THRESHOLD
    assert m["routed_expert_bytes"]["int2"] < m["routed_expert_bytes"]["mxfp4_release"]
    assert (Path(m["int2_dir"]) / "quant_stats.json").is_file() and (Path(m["rtn_dir"]) / "manifest.json").is_file()
    assert (figs / "01_layer_error.png").stat().st_size > 10_000 and (figs / "01_layer_error.csv").is_file()


@pytest.mark.notebooks
def test_02_routing_coverage(run01):
    run, figs, m1 = run01
    m = _execute("02_routing_coverage", run, run_dir=str(run), figures_dir=str(figs), int2_dir=m1["int2_dir"],
                 external_stats=str(Path(m1["int2_dir"]) / "quant_stats.json"), external_name="same file")
    assert m["threshold"] == THRESHOLD and len(m["layers"]) == 6
    assert m["under_before_total"] > 0, "smoke threshold should leave some experts under it before balancing"
    assert m["under_after_total"] == 0 and m["min_visits_balanced"] >= THRESHOLD   # balancing covers every expert
    assert {r["routing"] for r in m["by_routing"]} == {"hash", "score"}
    ours, ext, refc = m["comparison"]
    assert ours["zero_fraction"] == ext["zero_fraction"] and ours["under_fraction"] == ext["under_fraction"]
    assert math.isclose(refc["zero_fraction"], 211 / 256)
    for f in ("02_visits_heatmap", "02_visit_distribution", "02_under_threshold", "02_coverage_comparison"):
        assert (figs / f"{f}.png").is_file() and (figs / f"{f}.csv").is_file()


@pytest.mark.notebooks
def test_03_error_inspection(run01):
    run, figs, m1 = run01
    m = _execute("03_error_inspection", run, run_dir=str(run), figures_dir=str(figs), int2_dir=m1["int2_dir"],
                 rtn_dir=m1["rtn_dir"], n_windows=2, n_chats=4, seq_len=128, n_worst=1)
    assert set(m["ppl"]) == {"ref", "gptq", "rtn"} and m["tokens"] > 500
    assert m["kl"]["ref"] == 0 and m["kl"]["gptq"] > 0 and m["kl"]["rtn"] > 0
    assert m["ppl"]["ref"] > 1
    # one MoE layer on held-out tokens: the GPTQ experts' output is closer to the release's than RTN's
    assert 0 < m["moe_output_error"]["gptq"] < m["moe_output_error"]["rtn"]
    for p in ("w1", "w3", "w2"):
        assert m["error_by_proj"][p]["gptq"] < m["error_by_proj"][p]["rtn"]
    assert len(m["worst_experts"]) == 1
    for f in ("03_expert_error", "03_error_vs_visits", "03_worst_experts", "03_ppl", "03_kl"):
        assert (figs / f"{f}.png").is_file() and (figs / f"{f}.csv").is_file()


@pytest.mark.notebooks
def test_04_generate(run01):
    run, _, m1 = run01
    m = _execute("04_generate", run, run_dir=str(run), int2_dir=m1["int2_dir"], max_new_tokens=8,
                 prompts=["Hello!", "Name a colour."])
    assert [r["prompt"] for r in m["transcript"]] == ["Hello!", "Name a colour."]
    assert all(1 <= r["n_new"] <= 8 and r["completion"] for r in m["transcript"])
    assert m["experts"] == m1["int2_dir"]
    md = (run / "04_transcript.md").read_text()
    assert "Name a colour." in md and m["transcript"][1]["completion"].strip() in md


@pytest.mark.notebooks
def test_05_mmlu(run01):
    run, figs, m1 = run01
    m = _execute("05_mmlu", run, run_dir=str(run), figures_dir=str(figs), int2_dir=m1["int2_dir"], mmlu_limit=6,
                 models=["ref", "int2"], shots=[0])
    assert [r["run"] for r in m["runs"]] == ["ref 0-shot", "int2 0-shot"]
    for r in m["runs"]:
        assert r["n"] == 6 and 0 <= r["ci_low"] <= r["acc"] <= r["ci_high"] <= 1
    assert sum(s["n"] for s in m["subjects"]) == 12
    assert (figs / "05_mmlu_subjects.png").is_file()


def test_demo_parameters_chain_and_exist(tmp_path):
    """The demo passes only parameters the notebooks declare, and chains 01's INT2 dir into 02–05."""
    import papermill as pm

    from dsv4lib.cli import build_parser
    from dsv4lib.commands import demo
    args = build_parser("demo").parse_args(["demo"])
    params = demo.notebook_parameters(tmp_path, tmp_path / "figs", args)
    assert list(params) == list(NOTEBOOKS)
    for name, p in params.items():
        declared = pm.inspect_notebook(str(NB_DIR / f"{name}.ipynb"))
        assert set(p) <= set(declared), (name, set(p) - set(declared))
        assert p["run_dir"] == str(tmp_path)
    int2 = params["01_quantize"]["int2_dir"]
    assert all(params[n]["int2_dir"] == int2 for n in NOTEBOOKS[1:])
    assert params["03_error_inspection"]["rtn_dir"] == params["01_quantize"]["rtn_dir"]
    demo.check_kernel(args.kernel)                   # the kernel runs this interpreter
