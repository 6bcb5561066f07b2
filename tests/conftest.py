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


@pytest.fixture(scope="session")
def tiny():
    from kolors_course.core.profiles import choose_profile
    return choose_profile("tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny):
    from kolors_course.models.loading import load_pipeline
    return load_pipeline(tiny)
