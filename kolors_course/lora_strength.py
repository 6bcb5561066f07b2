"""Changing a fused LoRA's strength on a loaded pipeline without reloading the model.

The original weights of the layers a LoRA touches are kept aside the first
time, so any scale (0 = off) is applied to the same base weights.
"""
from __future__ import annotations

import torch

from .lora_files import fuse_lora, read_lora


def set_lora_scale(pipe, lora_path, scale: float) -> None:
    mm = getattr(pipe, "kit_model_manager", None)
    if mm is None:
        raise RuntimeError("this pipeline was not loaded by kc.load_pipeline")
    if getattr(pipe, "kit_lora_fused", None):
        raise RuntimeError("this pipeline already has a LoRA fused at load time; load it without "
                           "`lora=` and let set_lora_scale apply the LoRA")
    unet = pipe.unet
    params = dict(unet.named_parameters())
    saved = getattr(pipe, "kit_base_weights", None)
    if saved is not None and getattr(pipe, "kit_lora_path", None) != str(lora_path):
        with torch.no_grad():      # another LoRA: put the base weights back first
            for name, w in saved.items():
                params[name].copy_(w)
        saved = None
    if saved is None:
        from pathlib import Path

        cfg = Path(mm.model_path[mm.model_name.index("sdxl_unet")]).with_name("config.json")
        modules, _ = read_lora(lora_path, cfg)
        saved = {f"{m}.weight": params[f"{m}.weight"].detach().clone() for m in modules}
        pipe.kit_base_weights = saved
        pipe.kit_lora_path = str(lora_path)
    with torch.no_grad():
        for name, w in saved.items():
            params[name].copy_(w)
    if scale:
        fuse_lora(mm, lora_path, scale=scale)
    pipe.kit_lora_scale = scale


def strength_sweep(pipe, lora_path, story, scene: int, settings: dict, values=(0.0, 0.5, 1.0, 1.5)):
    """One scene (1-based) at several LoRA strengths: ``[(label, image), ...]``."""
    from .text2image import generate

    sc = story.scenes[scene - 1]
    out = []
    for s in values:
        set_lora_scale(pipe, lora_path, s)
        out.append((f"strength {s}", generate(pipe, story.prompt(scene - 1), story.negative, seed=sc.seed,
                                              cfg_scale=settings["cfg_scale"], steps=settings["steps"],
                                              height=settings["height"], width=settings["width"])))
    return out
