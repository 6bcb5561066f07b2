"""Notebook hygiene, and the whole course run headless through the kit's runner.

nbval also executes every notebook (see ``addopts`` in pyproject.toml): this
file checks what nbval does not, the runner and the files the course leaves.
"""
import json
import re
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
def test_course_runs_headless_with_the_cli(course_run):
    proc, out = course_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "notebooks ran" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["ok"] * len(NOTEBOOKS)
    for nb in NOTEBOOKS:
        executed = nbformat.read(out / "notebooks" / nb.name, as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        assert (out / nb.stem / "summary.json").exists()
    assert (out / "00_setup" / "first_image.png").exists()
    for grid in ("anatomy", "negative", "seeds", "cfg_scale", "steps"):
        assert (out / "01_text_to_image" / f"{grid}.png").exists()


# --- clean outputs (issue 10, part 7) -------------------------------------------------
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_WARNING_TEXT = re.compile(r"Warning|deprecated", re.IGNORECASE)
# tqdm's widget bar shows its text form as text/plain: "desc:  40%|####  | 2/5 [...]"
_BAR_TEXT = re.compile(r"\d+%\||\d+/\d+ \[|examples/s|it/s")


#: a headless bar prints its first and last line and one at most every 30 seconds
MAX_BAR_LINES = 6


def output_problems(nb) -> list[str]:
    """What a learner would see that a clean lesson does not show: warnings printed
    in a cell, a headless progress bar printed line after line, and widget views that
    reopen broken (their state is not saved with the notebook) or that are library
    progress bars (never saved by Jupyter)."""
    saved = set(((nb.metadata.get("widgets") or {}).get(WIDGET_STATE) or {}).get("state") or {})
    problems = []
    for i, cell in enumerate(nb.cells):
        bar_lines = [line for o in cell.get("outputs", []) if o.output_type == "stream"
                     for line in o.text.splitlines() if _BAR_TEXT.search(line)]
        if len(bar_lines) > MAX_BAR_LINES:
            problems.append(f"cell {i}: {len(bar_lines)} progress-bar lines (a headless bar updates at most "
                            f"every 30 s): {bar_lines[len(bar_lines) // 2][:80]!r}")
        for o in cell.get("outputs", []):
            if o.output_type == "stream" and o.name == "stderr" and _WARNING_TEXT.search(o.text):
                problems.append(f"cell {i}: a warning on stderr: {o.text.strip()[:300]}")
            elif o.output_type == "stream" and re.search(r"\w+Warning: ", o.text):
                problems.append(f"cell {i}: a warning on {o.name}: {o.text.strip()[:300]}")
            elif o.output_type in ("display_data", "execute_result") and WIDGET_VIEW in o.data:
                model = o.data[WIDGET_VIEW].get("model_id")
                text = str(o.data.get("text/plain", ""))
                if model not in saved:
                    problems.append(f"cell {i}: widget view {model} ({text[:60]!r}) whose state is not saved")
                elif _BAR_TEXT.search(text):
                    problems.append(f"cell {i}: a progress-bar widget ({text[:60]!r}); a headless run "
                                    "shows text bars, and Jupyter does not save a bar's state")
    return problems


def test_output_problems_sees_warnings_and_broken_widgets():
    from nbformat.v4 import new_code_cell, new_output
    nb = nbformat.v4.new_notebook()
    cell = new_code_cell("x")
    cell.outputs = [
        new_output("stream", name="stderr", text="/x/torch/cuda/__init__.py:68: FutureWarning: pynvml\n"),
        new_output("stream", name="stderr", text="`torch_dtype` is deprecated! Use `dtype` instead!\n"),
        new_output("stream", name="stdout", text="fine\n"),
        new_output("display_data", data={WIDGET_VIEW: {"model_id": "gone"}, "text/plain": "HBox()"}),
        new_output("display_data", data={WIDGET_VIEW: {"model_id": "kept"},
                                         "text/plain": "Map:  40%|####      | 2/5 [00:01<00:01]"}),
        new_output("display_data", data={WIDGET_VIEW: {"model_id": "ok"}, "text/plain": "Button()"}),
    ]
    nb.cells.append(cell)
    # a bar that printed at every step (set_postfix refreshes past tqdm's mininterval)
    flood = new_code_cell("y")
    flood.outputs = [new_output("stream", name="stdout", text=f"training LoRA:  {k}%|#  | {k}/80 [00:01<00:09]\n")
                     for k in range(1, 21)]
    nb.cells.append(flood)
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": {"kept": {}, "ok": {}}}}
    problems = output_problems(nb)
    assert len(problems) == 5, problems
    assert "FutureWarning" in problems[0] and "deprecated" in problems[1]
    assert "gone" in problems[2] and "progress-bar" in problems[3]
    assert "20 progress-bar lines" in problems[4]


@pytest.mark.notebook
@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_notebook_outputs_are_clean(course_run, nb_path):
    proc, out = course_run
    executed = out / "notebooks" / nb_path.name
    assert executed.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    problems = output_problems(nbformat.read(executed, as_version=4))
    assert not problems, "\n".join(problems)


@pytest.mark.notebook
def test_course_run_prints_no_kernel_warnings(course_run):
    proc, _ = course_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "without encryption" in line or _WARNING_TEXT.search(line)]
    assert not noise, "\n".join(noise[:10])


def test_a_course_run_leaves_nothing_beside_the_notebooks(course_run):
    """The kernels' IPC sockets once landed in notebooks/ (their relative default path) and stayed."""
    proc, _ = course_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    strays = [p.name for p in (ROOT / "notebooks").iterdir() if p.suffix != ".ipynb"]
    assert not strays, strays


@pytest.mark.notebook
def test_course_run_exports_valid_comfyui_workflows_and_the_condition_grid(course_run):
    from kolors_course.comfyui.validate import validate_workflow

    _, out = course_run
    step = out / "05_control_and_comfyui"
    assert (step / "conditions.png").stat().st_size > 1000
    for name in ("scene_01_api", "scene_01_controlnet_api", "scene_01", "scene_01_controlnet"):
        workflow = json.loads((step / "comfyui" / f"{name}.json").read_text(encoding="utf-8"))
        assert validate_workflow(workflow) == [], name


@pytest.mark.notebook
def test_course_run_steers_pictures_with_the_reference(course_run):
    """Notebook 05's controlled pictures exist, and its summary records that they follow the
    reference more closely at the highest strength than with the prompt alone."""
    _, out = course_run
    step = out / "05_control_and_comfyui"
    assert (step / "controlled.png").stat().st_size > 1000
    assert (step / "controlled_lora.png").stat().st_size > 1000       # notebook 03's LoRA, with the ControlNet
    summary = json.loads((step / "summary.json").read_text(encoding="utf-8"))
    canny = dict(kv.split(": ") for kv in summary["canny follows"].split(", "))
    colour = dict(kv.split(": ") for kv in summary["colour follows"].split(", "))
    assert float(canny["1"]) > float(canny["0"]) and float(colour["1"]) < float(colour["0"])
