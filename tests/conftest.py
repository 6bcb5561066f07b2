import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Set before any kernel starts (nbval and papermill kernels inherit the environment).
os.environ["KOLORS_COURSE_HEADLESS"] = "1"
os.environ["KOLORS_COURSE_HOME"] = str(ROOT)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; the tiny profile covers the same code path")
    for item in items:
        if "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip_gpu)


#: The mechanics tests run the tiny profile small and short (64 px, 2 steps): the same models and
#: code path, a tenth of the time.  What the lessons show is tested at the profile's own settings
#: (tests/test_tiny_lessons.py, the notebooks).
FAST_TINY = dict(height=64, width=64, steps=2, train_resolution=64)


@pytest.fixture(scope="session")
def tiny():
    from kolors_course.core.profiles import choose_profile
    return choose_profile("tiny", **FAST_TINY)


@pytest.fixture(scope="session")
def tiny_pipe(tiny):
    from kolors_course.models.loading import load_pipeline
    return load_pipeline(tiny)


#: The team name the course run's bundle gets (notebook 04): a Chinese one, as teams register.
COURSE_TEAM = "测试队"


@pytest.fixture(scope="session")
def course_run(tmp_path_factory):
    """The whole course, run once headless on the tiny profile with the CLI (as `make course` does),
    shared by every test that reads what a course run leaves (tests/test_notebooks.py,
    tests/test_story.py): ``(completed process, output folder)``."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("course") / "course"
    proc = subprocess.run([sys.executable, "-m", "kolors_course.cli", "run", "--profile", "tiny",
                           "--out", str(out), "-p", "team_name", COURSE_TEAM],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    return proc, out


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """A small synthetic training set (8 pictures) for the LoRA training tests; read-only: a test
    that changes it copies it first."""
    from kolors_course.data.build import build_training_set
    from kolors_course.data.recipe import Recipe

    out = tmp_path_factory.mktemp("lora_set") / "ds"
    build_training_set("synthetic", out, recipe=Recipe(min_width=48, min_height=48), limit=8)
    return out
