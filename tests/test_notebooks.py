"""Notebook hygiene, and the whole course run headless through the kit's runner.

nbval also executes every notebook (see ``addopts`` in pyproject.toml): this
file checks what nbval does not, the runner and the files the course leaves.
"""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_exist_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names[:2] == ["00_setup", "01_text_to_image"]
    assert names == sorted(names)


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_parameterised(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        "commit notebooks without outputs (make strip)"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    first = params[0].source.strip().splitlines()[0]
    assert first.startswith("profile ="), "the first parameter is the profile"
    assert any("out_dir" in line for line in params[0].source.splitlines())
    # cells stay short: logic belongs in the package
    assert max(len(c.source.splitlines()) for c in code) <= 15


@pytest.mark.notebook
def test_course_runs_headless_with_the_cli(tmp_path):
    out = tmp_path / "course"
    proc = subprocess.run([sys.executable, "-m", "kolors_course.cli", "run", "--profile", "tiny",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "notebooks ran" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["ok"] * len(NOTEBOOKS)
    for nb in NOTEBOOKS:
        executed = nbformat.read(out / "notebooks" / nb.name, as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        assert (out / nb.stem / "summary.json").exists()
    assert (out / "00_setup" / "first_image.png").exists()
    for grid in ("anatomy", "negative", "seeds", "cfg_scale"):
        assert (out / "01_text_to_image" / f"{grid}.png").exists()
