import numpy as np
import pytest

from kolors_course.generation.text2image import PromptParts, generate, sweep
from kolors_course.core.images import image_grid, save_images, show_grid


def test_prompt_parts_compose_in_course_order():
    p = PromptParts(subject="一只狗", details="棕色", modifiers="可爱", style="水彩画", artist="梵高")
    assert p.compose() == "水彩画，一只狗，棕色，可爱，梵高风格"
    steps = p.steps()
    assert [s[0] for s in steps] == ["subject", "details", "modifiers", "style", "artist"]
    assert steps[0][1] == "一只狗" and steps[-1][1] == p.compose()


def test_generate_rejects_bad_settings(tiny_pipe):
    with pytest.raises(ValueError, match="multiple of 64"):
        generate(tiny_pipe, "x", height=100)
    with pytest.raises(ValueError, match="seed"):
        generate(tiny_pipe, "x", seed=-1)
    with pytest.raises(ValueError, match="steps"):
        generate(tiny_pipe, "x", steps=0)


def test_sweep_changes_only_the_swept_knob(tiny_pipe):
    items = sweep(tiny_pipe, "一只猫", "cfg_scale", [1.0, 7.0], seed=3)
    assert [label for label, _ in items] == ["cfg_scale=1.0", "cfg_scale=7.0"]
    a, b = (np.asarray(im, dtype=float) for _, im in items)
    assert np.abs(a - b).mean() > 0.5
    same = generate(tiny_pipe, "一只猫", seed=3, cfg_scale=7.0)
    assert np.array_equal(np.asarray(same), np.asarray(items[1][1]))


def test_grids_and_saving(tiny_pipe, tmp_path):
    items = sweep(tiny_pipe, "一只猫", "seed", [0, 1, 2])
    grid = image_grid([im for _, im in items], rows=1, cols=3, pad=2)
    assert grid.size == (3 * 64 + 4 * 2, 64 + 2 * 2)
    fig = show_grid(items, title="t", save_to=tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000 and len(fig.axes) == 3
    paths = save_images(items, tmp_path / "imgs")
    assert [p.name for p in paths] == ["00_seed=0.png", "01_seed=1.png", "02_seed=2.png"]
    with pytest.raises(ValueError):
        image_grid([im for _, im in items], rows=1, cols=2)


def test_playground_builds_headless_and_generates_on_click(tiny_pipe, capsys):
    from kolors_course.generation.playground import prompt_playground
    ui = prompt_playground(tiny_pipe, prompt="一只猫")
    assert "headless" in capsys.readouterr().out
    ui.kit_generate()    # what a click does; must not raise
