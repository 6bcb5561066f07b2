"""Clean outputs (issue 10, part 7): each silencer drops exactly one known message
of someone else's code, and nothing else.  The executed notebooks themselves are
checked in tests/test_notebooks.py (test_executed_notebook_outputs_are_clean)."""
import importlib
import logging
import subprocess
import sys
import warnings

import numpy as np
from PIL import Image

import kolors_course
import kolors_course.data.clean as data_clean
import kolors_course.data.recipe as data_filter
import kolors_course.models.loading as models
import kolors_course.runner as runner


def _shown(message: str, category) -> list:
    with warnings.catch_warnings(record=True) as seen:
        # the kit's filters as they stand after import, then everything else shown
        warnings.resetwarnings()
        warnings.simplefilter("always")
        for msg, cat in kolors_course._THIRD_PARTY_NOISE:
            warnings.filterwarnings("ignore", message=msg, category=cat)
        warnings.warn(message, category)
    return seen


def test_third_party_filters_are_exact():
    assert not _shown("`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.",
                      FutureWarning)
    assert not _shown("The pynvml package is deprecated. Please install nvidia-ml-py instead. If you did "
                      "not install pynvml directly, please report this ...", FutureWarning)
    # another message, or the same message as another category, still shows
    assert _shown("`torch.jit.trace` is deprecated.", FutureWarning)
    assert _shown("`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.",
                  UserWarning)
    assert _shown("something is deprecated", DeprecationWarning)


def test_importing_torch_and_diffsynth_after_the_kit_warns_nothing():
    code = ("import warnings; warnings.simplefilter('default'); import kolors_course; import torch; "
            "from diffsynth.models.kolors_text_encoder import ChatGLMModel")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


def test_torch_dtype_notice_dropped_only_while_loading(caplog):
    lg = logging.getLogger("transformers.modeling_utils")
    with caplog.at_level(logging.WARNING, logger="transformers"):
        with models._no_torch_dtype_notice():
            lg.warning(models.TORCH_DTYPE_NOTICE)
            lg.warning("Some weights of ChatGLMModel were not initialized")
        lg.warning(models.TORCH_DTYPE_NOTICE)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Some weights of ChatGLMModel were not initialized", models.TORCH_DTYPE_NOTICE]
    assert not lg.filters


def test_datasets_bars_off_during_the_run_and_restored():
    ds_tqdm = importlib.import_module("datasets.utils.tqdm")
    assert not ds_tqdm.are_progress_bars_disabled()
    with data_filter._library_bars_off():
        assert ds_tqdm.are_progress_bars_disabled()
    assert not ds_tqdm.are_progress_bars_disabled()
    ds_tqdm.disable_progress_bars()
    try:
        with data_filter._library_bars_off():
            pass
        assert ds_tqdm.are_progress_bars_disabled(), "a learner's own setting is kept"
    finally:
        ds_tqdm.enable_progress_bars()


def test_kernels_use_ipc_transport(tmp_path):
    km = runner.kernel_manager_class()()
    assert km.transport == "ipc"


def test_image_facts_without_getdata():
    img = Image.fromarray(np.full((40, 80, 3), (40, 80, 220), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        facts = data_clean.image_facts(img)
    assert facts == {"orientation": "横构图", "color": "蓝色调"}
    assert data_clean.image_facts(img.convert("L"))["orientation"] == "横构图"
