"""No state left behind: every context manager in ``core.state`` puts back what it changed,
on success and on error, and the kit's calls that change process-wide state (data-juicer's
run, image decoding, LoRA training, random-weight pipelines, the stand-in scorer, the
notebook runner) leave the process as they found it."""
import os

import pytest
import torch
from PIL import ImageFile

from kolors_course.core import state


def snapshot() -> dict:
    """Everything the kit might change for the whole process."""
    import warnings

    return {
        "environ": dict(os.environ),
        "cwd": os.getcwd(),
        "pillow_truncated": ImageFile.LOAD_TRUNCATED_IMAGES,
        "loguru": state.loguru_handler_ids(),
        "torch_rng": torch.random.get_rng_state(),
        "torch_dtype": torch.get_default_dtype(),
        "torch_threads": torch.get_num_threads(),
        "warning_filters": len(warnings.filters),
    }


def assert_same(before: dict, after: dict) -> None:
    env_b, env_a = before["environ"], after["environ"]
    changed = {k for k in set(env_b) | set(env_a) if env_b.get(k) != env_a.get(k)}
    assert not changed, f"environment variables changed: {sorted(changed)}"
    assert after["cwd"] == before["cwd"]
    assert after["pillow_truncated"] == before["pillow_truncated"]
    assert after["loguru"] == before["loguru"], "loguru handlers added or removed"
    assert torch.equal(after["torch_rng"], before["torch_rng"]), "torch's global generator was reseeded"
    assert after["torch_dtype"] == before["torch_dtype"]
    assert after["torch_threads"] == before["torch_threads"]


class Boom(Exception):
    pass


@pytest.mark.parametrize("fail", [False, True])
def test_environ_sets_removes_and_restores(monkeypatch, fail):
    monkeypatch.setenv("KC_TEST_A", "old")
    monkeypatch.delenv("KC_TEST_B", raising=False)
    before = snapshot()
    try:
        with state.environ(KC_TEST_A=None, KC_TEST_B="new"):
            assert "KC_TEST_A" not in os.environ and os.environ["KC_TEST_B"] == "new"
            if fail:
                raise Boom
    except Boom:
        pass
    assert_same(before, snapshot())


def test_environ_default_keeps_the_learners_value(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with state.environ_default(HF_HUB_OFFLINE="1", KC_TEST_C="x"):
        assert os.environ["HF_HUB_OFFLINE"] == "0" and os.environ["KC_TEST_C"] == "x"
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "KC_TEST_C" not in os.environ


def test_working_directory_comes_back_after_an_error(tmp_path):
    before = os.getcwd()
    with pytest.raises(Boom):
        with state.working_directory(tmp_path):
            assert os.getcwd() == str(tmp_path)
            raise Boom
    assert os.getcwd() == before


def test_pillow_flag_is_strict_inside_and_restored():
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True       # as data-juicer leaves it
    try:
        with state.pillow_strict_decoding():
            assert ImageFile.LOAD_TRUNCATED_IMAGES is False
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def test_torch_global_seed_is_reproducible_and_leaves_the_sequence_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)            # what the learner's next draw is without the kit
    torch.manual_seed(123)
    with state.torch_global_seed(5):
        inside = torch.rand(2)
    with state.torch_global_seed(5):
        assert torch.equal(torch.rand(2), inside)
    assert torch.equal(torch.rand(3), expected)


def test_loguru_handlers_added_inside_are_removed(tmp_path):
    from loguru import logger

    before = state.loguru_handler_ids()
    with state.loguru_handlers_scoped():
        logger.add(str(tmp_path / "x.log"))
    assert state.loguru_handler_ids() == before


# --- the kit's own calls ------------------------------------------------------------------
def test_a_data_juicer_build_leaves_no_state(tmp_path, monkeypatch):
    from kolors_course.data.build import build_training_set
    from kolors_course.data.recipe import Recipe

    # what data-juicer's modules do when first imported (set their own environment variables,
    # flip Pillow's flag) is theirs, once per process; what the kit's run leaves is tested here
    import data_juicer.config  # noqa: F401
    import data_juicer.core  # noqa: F401
    build_training_set("synthetic", tmp_path / "warm-up", recipe=Recipe(min_width=48, min_height=48), limit=2)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)     # the kit sets it for the run only
    monkeypatch.delenv("RAY_JOB", raising=False)
    before = snapshot()
    build_training_set("synthetic", tmp_path / "ds", recipe=Recipe(min_width=48, min_height=48), limit=6)
    assert_same(before, snapshot())


def test_training_and_random_pipelines_leave_torch_alone(tiny, tmp_path):
    from kolors_course.data.build import build_training_set
    from kolors_course.data.recipe import Recipe
    from kolors_course.lora.config import TrainConfig
    from kolors_course.lora.train import train_lora
    from kolors_course.models.random_weights import random_pipeline

    ds = build_training_set("synthetic", tmp_path / "ds", recipe=Recipe(min_width=48, min_height=48), limit=4)
    # a first run imports what accelerate and torch import once per process (torch's compiler
    # sets TORCHINDUCTOR_CACHE_DIR then); what every later run leaves is the kit's
    train_lora(tiny, ds.folder, tmp_path / "warm-up", TrainConfig.for_profile(tiny, max_steps=1, validate_every=None))
    before = snapshot()
    train_lora(tiny, ds.folder, tmp_path / "run", TrainConfig.for_profile(tiny, max_steps=2, validate_every=None))
    random_pipeline(tiny, "tiny", "cpu", folder=tmp_path / "random")
    assert_same(before, snapshot())


def test_the_stand_in_scorer_leaves_torch_alone(tmp_path):
    from kolors_course.story import stand_in_scorer

    before = snapshot()
    stand_in_scorer.new_model(seed=3)                  # its initial weights come from a seeded draw
    assert_same(before, snapshot())


def test_saving_a_plot_leaves_the_plot_backend_alone(tmp_path):
    """The loss curve (saved during training) and the data report's plots are written without
    pyplot: they once switched matplotlib to Agg, which hid every later figure of the notebook."""
    import matplotlib
    from types import SimpleNamespace

    from PIL import Image

    from kolors_course.data.report import plot_histograms
    from kolors_course.lora.lessons import plot_loss

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_loss([1.0, 0.6, 0.4, 0.3, 0.25, 0.2], tmp_path / "loss.png")
        items = [SimpleNamespace(width=w, height=h) for w, h in ((64, 64), (128, 96), (200, 100))]
        plot_histograms(items, items[1:], tmp_path / "sizes.png")
        # an image grid outside a notebook (a script, a terminal): no switch either, and no
        # figure left open in pyplot's list
        import matplotlib.pyplot as plt
        from kolors_course.core.images import show_grid

        open_before = plt.get_fignums()
        fig = show_grid([("a", Image.new("RGB", (8, 8), "red")), ("b", Image.new("RGB", (8, 8), "blue"))],
                        title="two", save_to=tmp_path / "grid.png")
        assert len(fig.axes) == 2
        from kolors_course.lora.lessons import plot_parameter_counts

        plot_parameter_counts(1000, {1: 10, 4: 40}, tmp_path / "counts.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == open_before
    finally:
        matplotlib.use(before)
    for name in ("loss.png", "sizes.png", "grid.png", "counts.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 100
