"""kolors-course: a notebook course kit for Kolors text-to-image, LoRA and picture stories.

``import kolors_course as kc`` is cheap: the heavy libraries (torch, DiffSynth,
data-juicer) load when a function that needs them is first used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

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
