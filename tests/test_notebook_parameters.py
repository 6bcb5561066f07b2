"""Every assignment in a notebook's parameters cell is a parameter papermill sees.

papermill's inspector skips a line holding more than one ``=`` (a comment such
as ``# (1.0 = as trained)`` is enough), and the runner passes a notebook only the
parameters papermill declared: such a parameter could not be set from
``kolors-course run -p`` or a batch file.
"""
import ast
import json

import pytest

from kolors_course.runner import declared_parameters, resolve_notebooks

NOTEBOOKS = resolve_notebooks(None)


def _assigned(nb_path):
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: one cell tagged parameters"
    tree = ast.parse("".join(cells[0]["source"]))
    return {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)}


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_parameter_is_declared(nb_path):
    assigned = _assigned(nb_path)
    assert {"profile", "out_dir"} <= assigned
    missing = sorted(assigned - set(declared_parameters(nb_path)))
    assert not missing, (f"{nb_path.name}: papermill does not see {missing} (a second '=' on the line, "
                         "e.g. in its comment?)")


def test_a_story_strength_can_be_set_from_the_command_line():
    from kolors_course.runner import run_notebooks

    with pytest.raises(ValueError, match="declared by none") as err:          # a typo is still refused
        run_notebooks(["04"], parameters={"lora_scal": 0.5}, quiet=True)
    assert "lora_scal'" in str(err.value)
    story = next(p for p in NOTEBOOKS if p.stem.startswith("04"))
    assert "lora_scale" in declared_parameters(story)
