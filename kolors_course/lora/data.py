"""The training data: images to tensors, captions and latents encoded once, the seeded sample
stream that makes a resume exact, and the data set's fingerprint and checks."""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch

from kolors_course.core.progress import progress
from kolors_course.core.trigger import without_trigger
from kolors_course.lora.config import TrainConfig, TrainingError


def load_image_tensor(path: Path, resolution: int, center_crop: bool, rng: random.Random):
    """Resize the short side to ``resolution``, crop a square, scale to [-1, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = im.size
        if center_crop:
            left, top = (w - resolution) // 2, (h - resolution) // 2
        else:
            left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@torch.no_grad()
def prepare_data(pipe, rows, cfg: TrainConfig, device: str, dtype) -> list[dict]:
    """Text embeddings and (optionally) latents for every training pair, computed once."""
    pipe.models_to_device(["text_encoder_kolors", "vae_encoder"])   # the offload mode parks them on the CPU
    rng = random.Random(cfg.seed)
    cache = {}
    out = []
    for path, text in progress(rows, desc="encoding captions and images"):
        if text not in cache:
            cache[text] = encoded(pipe, text)
            plain = without_trigger(text, cfg.trigger_words) if cfg.preserve_weight else text
            if plain != text:   # the same caption without the trigger word (losses.preservation_loss)
                cache[text].update({"plain_" + k: v for k, v in encoded(pipe, plain).items()})
        item = {"text": text, "path": path, **cache[text]}
        pixels = load_image_tensor(path, cfg.resolution, cfg.center_crop, rng)
        if cfg.cache_latents:
            lat = pipe.vae_encoder(pixels[None].to(device=device, dtype=dtype))
            item["latents"] = lat.to("cpu", torch.float32)
        else:
            item["pixels"] = pixels
        out.append(item)
    # validation prompts too, so validation images never need the text encoder back on the GPU
    pipe.pin_prompts(cfg.validation_prompts, negative_prompts=("",))
    return out


def encoded(pipe, text: str) -> dict:
    """The pipeline's own prompt encoding of ``text`` (token states and pooled embedding), on the CPU."""
    return {k: v.to("cpu") for k, v in pipe.encode_prompt(text, positive=True).items()}


class SampleStream:
    """An endless, seeded stream of sample indices: a fresh permutation each epoch.

    Its position is one integer, so a resumed run continues with exactly the
    samples the interrupted one would have seen.  With several processes every
    process walks the same stream and takes its slice of each global batch.
    """

    def __init__(self, n: int, seed: int, cursor: int = 0):
        self.n, self.seed, self.cursor = n, seed, cursor
        self._epoch, self._perm = -1, []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).tolist()
        return self._perm

    def next(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, pos = divmod(self.cursor, self.n)
            out.append(self._permutation(epoch)[pos])
            self.cursor += 1
        return out


def dataset_fingerprint(rows) -> str:
    """Captions, file names and sizes: a resume on a changed training set would not be exact."""
    import hashlib

    h = hashlib.sha256()
    for path, text in rows:
        h.update(f"{Path(path).name}\0{Path(path).stat().st_size}\0{text}\n".encode("utf-8"))
    return h.hexdigest()[:16]


def check_data(data: list, cfg: TrainConfig, processes: int) -> None:
    if cfg.batch_size * processes > len(data):
        raise TrainingError(
            f"batch_size={cfg.batch_size}" + (f" on {processes} processes" if processes > 1 else "") +
            f" is larger than the training set ({len(data)} images): every batch would repeat images. "
            f"Use batch_size <= {max(1, len(data) // processes)}, and grad_accum for a larger effective batch.")
    empty = sum(1 for item in data if not item["text"].strip())
    if empty:
        warnings.warn(f"{empty} of {len(data)} training captions are empty: those images train the model "
                      "without any prompt. Add captions (notebook 02's caption editor) unless that is intended.",
                      stacklevel=3)
    if cfg.preserve_weight:
        kept = sum(1 for item in data if "plain_encoder_hidden_states" in item)
        if kept == 0:
            raise TrainingError(
                f"preserve_weight={cfg.preserve_weight} keeps the base model for the captions with the trigger "
                f"word(s) {list(cfg.trigger_words)} taken out, but none of the {len(data)} captions holds them. "
                "Train with the word the captions use (notebook 02's trigger_word), or set preserve_weight=0.")
        if kept < len(data):
            warnings.warn(f"{len(data) - kept} of {len(data)} training captions do not hold the trigger word: "
                          "preserve_weight leaves those out (keeping the base model there would fight the "
                          "training on them).", stacklevel=3)
    for word in cfg.trigger_words:
        n = sum(1 for item in data if word in item["text"])
        if n == 0:
            warnings.warn(f"the trigger word {word!r} is in none of the {len(data)} training captions: the LoRA "
                          "cannot learn to answer to it. Build the data set with it (notebook 02's trigger_word) "
                          "or train with the word the captions use.", stacklevel=3)
