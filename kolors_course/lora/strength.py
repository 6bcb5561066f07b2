"""Changing a LoRA's strength on a loaded pipeline without reloading the model.

The original weights of the layers a LoRA touches are kept aside (in the kit's
pipeline object) the first time, so any scale (0 = off) is applied to the same base
weights, and switching to another LoRA first puts the base weights back.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from kolors_course.lora.files import check_fits, fuse_modules, read_lora
from kolors_course.models.pipeline import FusedLoRA, kit_pipeline


def set_lora_scale(pipe, lora_path, scale: float) -> None:
    """Make the UNet hold ``lora_path`` at ``scale`` (1.0 = as trained, 0 = off)."""
    pipe = kit_pipeline(pipe)
    if pipe.lora is not None and pipe.lora.at_load:
        raise RuntimeError("this pipeline already has a LoRA fused at load time; load it without "
                           "`lora=` and let set_lora_scale apply the LoRA")
    params = dict(pipe.unet.named_parameters())
    if pipe.base_weights is not None and pipe.base_weights_for != str(lora_path):
        _restore(params, pipe.base_weights)         # another LoRA: put the base weights back first
        pipe.base_weights, pipe.base_weights_for, pipe.lora_modules = None, None, None
    if pipe.base_weights is None:
        modules, meta = read_lora(lora_path, pipe.unet_config_path)
        # a file that does not fit is refused here, before any weight is set aside or changed
        check_fits(Path(lora_path), modules, meta, pipe.unet, Path(pipe.unet_config_path))
        pipe.base_weights = {f"{m}.weight": params[f"{m}.weight"].detach().clone() for m in modules}
        pipe.base_weights_for, pipe.lora_modules = str(lora_path), modules     # read once per LoRA
    _restore(params, pipe.base_weights)
    if scale:
        fuse_modules(pipe.model_manager, lora_path, pipe.lora_modules, scale)
    pipe.lora = FusedLoRA(str(lora_path), scale, at_load=False) if scale else None


@contextlib.contextmanager
def lora_at(pipe, lora_path, scale: float):
    """``with kc.lora_at(pipe, path, 0.8): ...``: the UNet holds that LoRA at that strength inside
    the block, and the LoRA it held before (or none) again after it, on error too."""
    before = kit_pipeline(pipe).lora
    set_lora_scale(pipe, lora_path, scale)
    try:
        yield pipe
    finally:
        if before is None:
            set_lora_scale(pipe, lora_path, 0.0)
        else:
            set_lora_scale(pipe, before.path, before.scale)


def _restore(params: dict, saved: dict) -> None:
    with torch.no_grad():
        for name, w in saved.items():
            params[name].copy_(w)


def strength_sweep(pipe, lora_path, story, scene: int, settings: dict, values=(0.0, 0.5, 1.0, 1.5),
                   without_trigger: bool = False):
    """One scene (1-based) at several LoRA strengths: ``[(label, image), ...]``.  The pipeline holds
    the LoRA it held before (or none) afterwards, as after ``lora_at``.

    ``without_trigger=True`` (and a story with a trigger word) adds, after them, the same scene at
    the same strengths with its prompt *without* the trigger word: what the LoRA does to a prompt
    that does not call it (ideally nothing: the look should belong to the word)."""
    from dataclasses import replace

    from kolors_course.generation.text2image import generate

    values = list(values)
    if not values:
        raise ValueError("strength_sweep needs at least one strength, e.g. [0.0, 0.5, 1.0, 1.5]")
    sc = story.scenes[scene - 1]
    rows = [("strength {}", story)]
    if without_trigger and story.trigger:
        rows.append(("no trigger, {}", replace(story, trigger="")))
    out = []
    # one block around the loop: the previous LoRA is put back once, not after every strength
    # (on Kolors each change rewrites the UNet's attention weights)
    with lora_at(pipe, lora_path, values[0]):
        for label, tale in rows:
            for s in values:
                set_lora_scale(pipe, lora_path, s)
                out.append((label.format(s), generate(pipe, tale.prompt(scene - 1), tale.negative, seed=sc.seed,
                                                      cfg_scale=settings["cfg_scale"], steps=settings["steps"],
                                                      height=settings["height"], width=settings["width"])))
    return out
