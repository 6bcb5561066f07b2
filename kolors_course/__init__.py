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
    "Profile": "core.profiles", "choose_profile": "core.profiles", "TINY": "core.profiles", "KOLORS": "core.profiles",
    "project_path": "core.paths", "project_root": "core.paths", "relative_to_root": "core.paths",
    "load_pipeline": "models.loading", "ensure_weights": "models.loading", "MissingWeightsError": "models.loading",
    "edge_overlap": "control.measure", "colour_layout_error": "control.measure",
    "control_sweep": "control.steer", "control_grid": "control.steer", "control_report": "control.steer",
    "generate": "generation.text2image", "sweep": "generation.text2image", "PromptParts": "generation.text2image",
    "DEFAULT_NEGATIVE": "generation.text2image",
    "image_grid": "core.images", "show_grid": "core.images", "save_images": "core.images",
    "prompt_playground": "generation.playground", "caption_editor": "data.caption_editor",
    "build_training_set": "data.build", "read_training_set": "data.training_set", "Captions": "data.build",
    "Recipe": "data.recipe", "make_synthetic_source": "data.sources",
    "preview_training_set": "data.report",
    "TrainConfig": "lora.config", "train_lora": "lora.train", "lora_demo": "lora.lessons",
    "read_lora": "lora.files", "fuse_lora": "lora.files",
    "load_story": "story.stories", "generate_story": "story.stories", "generation_settings": "story.stories",
    "set_lora_scale": "lora.strength", "lora_at": "lora.strength", "strength_sweep": "lora.strength", "AestheticScorer": "story.scoring",
    "story_grid": "story.gallery", "write_gallery": "story.gallery", "write_bundle": "story.gallery",
    "upload_text": "story.gallery", "post_title": "story.gallery",
    "choose_trigger_word": "core.trigger", "story_trigger_words": "core.trigger", "with_trigger": "core.trigger",
    "recorded_trigger_word": "core.trigger",
    "environment_report": "setup.envinfo", "print_environment_report": "setup.envinfo",
    "needs_restart": "setup.envinfo", "restart_kernel": "setup.envinfo",
    "progress": "core.progress", "is_headless": "core.progress",
    "load_reference": "control.conditions", "extract_condition": "control.conditions",
    "condition_grid": "control.conditions", "CONDITIONS": "control.conditions",
    "write_workflows": "comfyui.workflows", "scene_workflow": "comfyui.workflows",
    "validate_workflow": "comfyui.validate",
    "step_dir": "core.steps", "StepSummary": "core.steps", "dataset_folder": "core.steps",
    "lora_run_folder": "core.steps", "lora_file": "core.steps", "kohya_lora_file": "core.steps",
    "scene_settings": "story.stories", "reference_picture": "control.steer", "lora_info": "story.gallery",
    "kolors_unet_parameter_counts": "lora.lessons", "plot_parameter_counts": "lora.lessons",
    "sample_grid_over_time": "lora.lessons", "plot_loss": "lora.lessons",
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
