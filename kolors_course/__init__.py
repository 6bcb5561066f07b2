"""kolors-course: a notebook course kit for Kolors text-to-image, LoRA and picture stories.

``import kolors_course as kc`` is cheap: the heavy libraries (torch, DiffSynth,
data-juicer) load when a function that needs them is first used.
"""
from __future__ import annotations

import importlib
import warnings

__version__ = "0.1.0"

# Two warnings every learner would see, about code that is neither theirs nor
# ours, installed here because this is where the kit is first imported (before
# torch).  Each filter names one exact message and its category; any other
# warning, from these libraries too, still shows.
#  - torch imports ``pynvml``; the ``pynvml`` distribution (required by DiffSynth
#    1.1.9) now only re-exports ``nvidia-ml-py`` (already installed beside it) and
#    warns on every import through a hook of its own, whatever else is installed.
#  - DiffSynth's Kolors text encoder decorates a helper with ``torch.jit.script``
#    at import time; torch 2.10+ warns that ``torch.jit.script`` is deprecated.
_THIRD_PARTY_NOISE = (
    (r"The pynvml package is deprecated\. Please install nvidia-ml-py instead\.", FutureWarning),
    (r"`torch\.jit\.script` is deprecated\. Please switch to `torch\.compile` or `torch\.export`\.",
     FutureWarning),
)
for _message, _category in _THIRD_PARTY_NOISE:
    warnings.filterwarnings("ignore", message=_message, category=_category)
del _message, _category

# public name -> module that defines it
_EXPORTS = {
    "Profile": "profiles", "choose_profile": "profiles", "TINY": "profiles", "KOLORS": "profiles",
    "project_path": "paths", "project_root": "paths", "relative_to_root": "paths",
    "load_pipeline": "models", "ensure_weights": "models", "MissingWeightsError": "models",
    "ControlNetSpec": "models",
    "generate": "text2image", "sweep": "text2image", "PromptParts": "text2image",
    "DEFAULT_NEGATIVE": "text2image",
    "image_grid": "viz", "show_grid": "viz", "save_images": "viz",
    "prompt_playground": "widgets", "caption_editor": "widgets",
    "build_training_set": "dataset", "read_training_set": "dataset", "Captions": "dataset",
    "Recipe": "data_filter", "make_synthetic_source": "data_sources",
    "preview_training_set": "data_report",
    "TrainConfig": "lora_train", "train_lora": "lora_train", "lora_demo": "lora_train",
    "read_lora": "lora_files", "fuse_lora": "lora_files",
    "load_story": "story", "generate_story": "story", "generation_settings": "story",
    "set_lora_scale": "lora_strength", "strength_sweep": "lora_strength", "AestheticScorer": "scoring",
    "story_grid": "gallery", "write_gallery": "gallery", "write_bundle": "gallery",
    "upload_text": "gallery", "post_title": "gallery",
    "choose_trigger_word": "trigger", "story_trigger_words": "trigger", "with_trigger": "trigger",
    "recorded_trigger_word": "trigger",
    "environment_report": "envinfo", "print_environment_report": "envinfo",
    "needs_restart": "envinfo", "restart_kernel": "envinfo",
    "progress": "bars", "is_headless": "bars",
    "step_dir": "steps", "StepSummary": "steps",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kolors_course' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
