"""The tiny profile's stand-in aesthetic scorer: shipped as trained, and its ratings mean what the
lesson says (clean pictures of the tiny world above damaged ones, the gate at 6 between them)."""
import json
import random

import numpy as np
import pytest

from kolors_course.story import stand_in_scorer as S


def test_the_shipped_files_match_their_manifest():
    folder = S.check_shipped()
    info = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert info["clean_above_its_damaged_copy"] >= 0.8, info
    assert {"seed", "steps", "seconds", "command", "sha256"} <= set(info)


def test_a_changed_file_is_refused(tmp_path):
    import shutil

    copy = tmp_path / "scorer"
    shutil.copytree(S.check_shipped(), copy)
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    with pytest.raises(ValueError, match="does not match its manifest"):
        S.check_shipped(copy)


@pytest.fixture(scope="module")
def scorer():
    from kolors_course.core.profiles import choose_profile
    from kolors_course.story.scoring import AestheticScorer

    return AestheticScorer(choose_profile("tiny"))


def test_clean_pictures_outscore_their_damaged_copies(scorer):
    """On scenes the training never drew (another seed): most clean pictures beat their own
    damaged copy, and badly damaged ones fall below the gate on average."""
    pairs = S.pairs(40, seed=999)
    clean = scorer.score([c for c, _, _, _ in pairs]).per_image
    damaged = scorer.score([d for _, d, _, _ in pairs]).per_image
    assert np.mean([a > b for a, b in zip(clean, damaged)]) >= 0.75
    from kolors_course.world.scenes import render, sample_scenes

    rng = random.Random(5)
    worst = [S.degrade(render(s, seed=i), kind, 1.0, rng)
             for i, s in enumerate(sample_scenes(8, seed=998)) for kind in ("burnt", "wrong_colours")]
    assert scorer.score(worst).mean < 6.0 < scorer.score([c for c, _, _, _ in pairs]).mean


def test_a_short_training_run_is_reproducible_and_loads(tmp_path):
    from aesthetics_predictor import AestheticsPredictorV2Linear

    kw = dict(steps=6, n_train=16, n_held_out=8, batch_pairs=4, log=lambda *_: None)
    a = S.train(tmp_path / "a", seed=1, **kw)
    b = S.train(tmp_path / "b", seed=1, **kw)
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())["sha256"]
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())["sha256"]
    assert ma["model.safetensors"] == mb["model.safetensors"], "the same seed trains the same weights"
    assert AestheticsPredictorV2Linear.from_pretrained(str(tmp_path / "a")) is not None
    assert S.check_shipped(tmp_path / "a") == tmp_path / "a"
