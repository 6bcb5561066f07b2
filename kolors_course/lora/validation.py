"""Validation images during training, and the export at the end (both LoRA layouts with
their metadata, the loss table and curve)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from kolors_course.core.profiles import Profile
from kolors_course.lora.adapters import lora_state
from kolors_course.lora.config import TrainConfig, config_record
from kolors_course.lora.lessons import plot_loss
from kolors_course.lora.memory import device_is_gpu, training_placement


@torch.no_grad()
def validation_images(pipe, unet, cfg: TrainConfig, run_dir: Path, step: int):
    """Images for the fixed validation prompts and seeds, with the LoRA as it is now."""
    from kolors_course.core.progress import inner_progress
    from kolors_course.core.images import image_grid

    unet.eval()
    prof = pipe.profile
    images = []
    for prompt in cfg.validation_prompts:      # pinned by prepare_data: no text encoder needed
        for seed in cfg.validation_seeds:
            images.append(pipe(prompt=prompt, negative_prompt="", cfg_scale=prof.cfg_scale,
                               num_inference_steps=prof.steps, height=prof.height, width=prof.width,
                               seed=seed, progress_bar_cmd=inner_progress))
    unet.train()
    if pipe.cpu_offload and device_is_gpu(pipe):
        training_placement(pipe, cfg)      # the pipeline call parked every model on the CPU
    if not images:                  # validation_prompts=() or validation_seeds=(): no images asked for
        return images
    folder = run_dir / "samples"
    folder.mkdir(exist_ok=True)
    image_grid(images, rows=1).save(folder / f"step-{step:06d}.png")
    return images


def lora_file_metadata(cfg: TrainConfig, profile: Profile) -> dict:
    from kolors_course.lora.files import lora_metadata

    training = {k: v for k, v in config_record(cfg).items() if k != "validation_prompts"}
    return lora_metadata(cfg.rank, cfg.alpha,
                         base_model=profile.base_model,
                         trigger_words=list(cfg.trigger_words), training=training)


def finish_run(run_dir: Path, unet, cfg: TrainConfig, profile: Profile, losses: list, pipe, meta: dict,
               fixed_losses=()) -> dict:
    """Export both LoRA layouts and the loss curve (with the fixed set's loss at each checkpoint)."""
    from kolors_course.lora.files import export_lora, lora_pairs_from_peft
    pairs = lora_pairs_from_peft(lora_state(unet))
    training = json.loads(meta["training"])
    paths = export_lora(pairs, cfg.rank, cfg.alpha, run_dir, "lora", pipe.unet_config_path,
                        base_model=meta["base_model"], trigger_words=list(cfg.trigger_words), training=training)
    with (run_dir / "loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows(enumerate(losses, 1))
    plot_loss(losses, run_dir / "loss.png", fixed=fixed_losses)
    return {"lora": paths["diffsynth"], "lora_kohya": paths["kohya"], "loss_curve": run_dir / "loss.png"}
