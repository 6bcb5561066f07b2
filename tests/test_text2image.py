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
    w, h = items[0][1].size
    assert grid.size == (3 * w + 4 * 2, h + 2 * 2)
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
    assert ui.image is None, "nothing is generated before the click"
    ui.prompt.value, ui.seed.value, ui.cfg_scale.value = "一只狗", 5, 2.0    # what a learner types
    ui.button.click()
    expected = generate(tiny_pipe, "一只狗", negative_prompt=ui.negative_prompt.value, seed=5, cfg_scale=2.0,
                        steps=ui.steps.value)
    assert np.array_equal(np.asarray(ui.image), np.asarray(expected)), "the click uses the controls' values"
    capsys.readouterr()
    ui.prompt.value = "  "
    ui.button.click()            # headless, the output widget's text goes to stdout
    assert "Write a prompt first" in capsys.readouterr().out


# --- the kit's pipeline object -------------------------------------------------------------
def test_cached_prompt_embeddings_give_the_same_image_bit_for_bit(tiny):
    from kolors_course.models.loading import load_pipeline

    pipe = load_pipeline(tiny)
    first = generate(pipe, "一个红色的圆形", seed=2)            # encodes both prompts, caches them
    assert ("一个红色的圆形", True) in pipe.prompt_cache
    calls = []
    hook = pipe.text_encoder_kolors.register_forward_hook(lambda *_: calls.append(1))
    try:
        again = generate(pipe, "一个红色的圆形", seed=2)
        generate(pipe, "一个蓝色的圆形", seed=2)          # a new prompt is encoded (its negative is cached)
    finally:
        hook.remove()
    assert len(calls) == 1, "a cached prompt is not encoded again; a new one is"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    fresh = generate(load_pipeline(tiny), "一个红色的圆形", seed=2)
    assert np.array_equal(np.asarray(first), np.asarray(fresh)), "the cache changes nothing in the image"


def test_the_kit_pipeline_refuses_what_it_does_not_own(tiny_pipe):
    with pytest.raises(TypeError, match="kc.load_pipeline"):
        generate(tiny_pipe.diffsynth, "x")         # a bare DiffSynth pipeline has no profile
    with pytest.raises(AttributeError, match="pipe.diffsynth"):
        tiny_pipe.cfg_scale = 9                   # a typo'd setting is not silently stored
    assert tiny_pipe.unet is tiny_pipe.diffsynth.unet    # models read through
    assert "tiny" in repr(tiny_pipe)


def test_the_profile_decides_the_image_size_and_steps():
    from kolors_course.core.profiles import choose_profile
    from kolors_course.models.loading import load_pipeline

    pipe = load_pipeline(choose_profile("tiny", height=128, width=64, steps=1))
    assert generate(pipe, "x").size == (64, 128)
    assert generate(pipe, "x", height=64).size == (64, 64)
