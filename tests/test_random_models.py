"""Random-weight pipelines: the same code measures a learner's GPU needs (Kolors sizes)
and runs here (tiny sizes)."""

import numpy as np
import pytest

from kolors_course.lora.config import TrainConfig
from kolors_course.lora.train import train_lora
from kolors_course.models.random_weights import random_pipeline
from kolors_course.generation.text2image import generate


def test_random_tiny_pipeline_generates_and_trains(tiny, tmp_path):
    from kolors_course.data.recipe import Recipe
    from kolors_course.data.build import build_training_set
    ds = tmp_path / "ds"
    build_training_set("synthetic", ds, recipe=Recipe(min_width=48, min_height=48), limit=4)
    pipe = random_pipeline(tiny, "tiny", "cpu", folder=tmp_path / "m")
    img = generate(pipe, "一只猫", seed=0)
    assert img.size == (64, 64) and np.asarray(img).std() > 0
    res = train_lora(tiny, ds, tmp_path / "run", TrainConfig.for_profile(tiny, max_steps=3, validate_every=None),
                     pipe=pipe)
    assert res.steps == 3 and res.files["lora"].exists()


def test_validation_uses_cached_prompt_embeddings(tiny, tmp_path):
    """Validation images must not need the text encoder (it leaves the GPU after caching)."""
    from kolors_course.data.recipe import Recipe
    from kolors_course.data.build import build_training_set
    ds = tmp_path / "ds"
    build_training_set("synthetic", ds, recipe=Recipe(min_width=48, min_height=48), limit=4)
    pipe = random_pipeline(tiny, "tiny", "cpu", folder=tmp_path / "m")
    calls = []
    te = pipe.text_encoder_kolors
    hook = te.register_forward_hook(lambda *a: calls.append(1))
    train_lora(tiny, ds, tmp_path / "run", TrainConfig.for_profile(tiny, max_steps=2, validate_every=1),
               pipe=pipe)
    hook.remove()
    n_captions = len({t for _, t in __import__("kolors_course").read_training_set(ds)})
    assert len(calls) == n_captions + 2     # captions once, plus validation prompt and negative, once


def _plain_training_set(folder, n=4, size=1024):
    """The trainer's folder layout written directly (no data-juicer: the GPU machine may lack it)."""
    import csv

    from PIL import Image
    train = folder / "train"
    train.mkdir(parents=True)
    with (train / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for i in range(n):
            Image.new("RGB", (size, size), (60 * i, 120, 200)).save(train / f"{i}.jpg")
            w.writerow([f"{i}.jpg", f"二次元，第{i}张"])
    return folder


@pytest.mark.gpu
def test_kolors_sized_training_fits_a_16_gb_card(tmp_path):
    """On a CUDA GPU: Kolors-sized random models, the kolors defaults at 1024 px, in the offload
    memory mode that auto picks for 16 GB cards, on a card limited to 16 GB; the peak counts the load."""
    import torch

    from kolors_course.core.profiles import choose_profile
    prof = choose_profile("kolors", memory_mode="offload")
    # random weights are drawn on the GPU (fast) and then parked on the CPU, which a real
    # offload load never does; the 16 GB limit and the peak start once they are parked
    pipe = random_pipeline(prof, "kolors", "cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 16e9 / total))
    try:
        res = train_lora(prof, _plain_training_set(tmp_path / "ds"), tmp_path / "run",
                         TrainConfig.for_profile(prof, max_steps=3, validate_every=None), pipe=pipe)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert res.peak_memory_gb <= 16.0, res.summary()
    assert res.files["lora_kohya"].exists()
