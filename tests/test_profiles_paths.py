import os

import pytest

import kolors_course.core.paths as paths
from kolors_course.core.profiles import KOLORS, TINY, choose_profile


def test_a_profiles_training_defaults_reach_the_training_config():
    from kolors_course.lora.config import TrainConfig

    for prof in (TINY, KOLORS, TINY.with_(lora_rank=8, train_steps=30, validations=0,
                                          lora_target_modules=["to_q", "attn2.to_out"])):
        cfg = TrainConfig.for_profile(prof)
        assert (cfg.rank, cfg.alpha, cfg.max_steps, cfg.resolution, cfg.batch_size) == (
            prof.lora_rank, prof.lora_alpha, prof.train_steps, prof.train_resolution, prof.batch_size)
        assert cfg.target_modules == tuple(prof.lora_target_modules)
        assert (cfg.validate_every is None) == (prof.validations == 0)
    # the kolors profile trains where DiffSynth's Kolors trainer does; tiny, only what reads the words
    assert TrainConfig.for_profile(KOLORS).target_modules == TrainConfig().target_modules


def test_an_unknown_profile_field_is_an_error():
    with pytest.raises(TypeError, match="unknown profile field"):
        choose_profile("tiny", stpes=4)


def test_auto_picks_tiny_without_gpu_and_says_why(capsys, monkeypatch):
    import kolors_course.core.profiles as P
    monkeypatch.setattr(P, "_gpu_memory_gb", lambda: None)
    assert choose_profile("auto").name == "tiny"
    assert "no CUDA GPU" in capsys.readouterr().out
    monkeypatch.setattr(P, "_gpu_memory_gb", lambda: ("RTX 3060", 12.9))
    assert choose_profile("auto").name == "tiny"
    assert "less than" in capsys.readouterr().out


def test_auto_picks_a_memory_mode_from_the_gpu_and_says_why(capsys, monkeypatch):
    """Totals as the cards report them in 10^9 bytes: a T4 has 15 GiB, a 3090 24 GiB."""
    import kolors_course.core.profiles as P
    monkeypatch.setattr(P, "_gpu_memory_gb", lambda: ("Tesla T4", 15.8))
    prof = choose_profile("auto")
    assert (prof.name, prof.memory_mode) == ("kolors", "offload")
    assert "take turns" in capsys.readouterr().out
    monkeypatch.setattr(P, "_gpu_memory_gb", lambda: ("RTX 3090", 25.4))
    prof = choose_profile("auto")
    assert (prof.name, prof.memory_mode) == ("kolors", "full")
    assert "holds every model" in capsys.readouterr().out
    # an explicit choice wins, and a wrong one is refused
    assert choose_profile("auto", memory_mode="offload").memory_mode == "offload"
    with pytest.raises(ValueError, match="memory_mode='tiny'"):
        P.choose_memory_mode(KOLORS.with_(memory_mode="tiny"))
    # the kolors profile chosen by name settles its mode when the pipeline loads
    assert P.choose_memory_mode(KOLORS, ("A100", 85.0))[0] == "full"
    assert P.choose_memory_mode(KOLORS, ("V100-16G", 17.1))[0] == "offload"


def test_unknown_profile_and_field_are_errors():
    with pytest.raises(ValueError, match="unknown profile"):
        choose_profile("huge")
    with pytest.raises(TypeError, match="unknown profile field"):
        choose_profile("tiny", stpes=3)
    assert choose_profile("tiny", steps=3).steps == 3


def test_cache_path_is_under_project_and_overridable(monkeypatch, tmp_path):
    monkeypatch.delenv("KOLORS_COURSE_CACHE", raising=False)
    assert TINY.cache_path == paths.project_root() / "cache" / "tiny"
    monkeypatch.setenv("KOLORS_COURSE_CACHE", str(tmp_path))
    assert TINY.cache_path == tmp_path


def test_project_root_found_from_notebooks_folder(monkeypatch):
    root = paths.project_root()
    monkeypatch.delenv("KOLORS_COURSE_HOME")
    monkeypatch.chdir(root / "notebooks")
    assert paths.project_root() == root
    assert paths.project_path("runs/x") == root / "runs" / "x"


def test_inside_refuses_escapes(tmp_path):
    base = tmp_path / "data"
    base.mkdir()
    (base / "a.jpg").write_bytes(b"x")
    assert paths.inside(base, "a.jpg") == (base / "a.jpg").resolve()
    with pytest.raises(ValueError, match="outside"):
        paths.inside(base, "../secret.txt")
    with pytest.raises(ValueError, match="outside"):
        paths.inside(base, "/etc/passwd")
    os.symlink("/etc", base / "link")
    with pytest.raises(ValueError, match="outside"):
        paths.inside(base, "link/passwd")
