"""The tiny profile's stand-in for the challenge's aesthetic predictor, trained to mean something.

The real score is LAION's aesthetic predictor v2: an MLP head on a CLIP ViT-L/14 image embedding,
1.2 GB, trained on human ratings.  On the tiny profile the kit runs the same classes
(``AestheticsPredictorV2Linear``: a CLIP vision tower and the MLP head) at a tiny size, so the code
path of notebook 04 is the real one.  Untrained, it gave 5.51 to every picture, which taught nothing
about the challenge's gate (a mean score of at least 6).

Here it is trained on what the tiny world can supply: clean pictures of the world (its renders,
lightly jittered, as a generator would make them) against the same pictures damaged the ways a
generator fails: blurred, noisy, burnt by too high a ``cfg_scale`` (contrast and saturation pushed
until colours clip) and wrong, off-palette colours.  Each step compares a picture with its own
damaged copy (a ranking loss: clean above damaged, by a margin that grows with the damage), so the
tower learns what damage looks like rather than which scene it is; a regression term puts clean
pictures near 7 and damaged ones between 3 and 5, so the gate at 6 separates them.  The accuracy on
held-out pictures is in ``manifest.json``.

It is a stand-in: it knows the tiny world's look, not human taste.  Its number says whether a tiny
picture is clean, not whether a real one is beautiful.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

CLEAN_SCORE = 7.0
DEGRADED_RANGE = (3.0, 5.0)          # from the worst damage to the mildest
DEGRADATIONS = ("blur", "noise", "burnt", "wrong_colours")
IMAGE_SIZE = 128                    # the world's own size: a smaller input would average the noise and blur away
GATE = 6.0


def shipped_folder() -> Path:
    return Path(__file__).with_name("stand_in_scorer_weights")


# --- the pictures ----------------------------------------------------------------------------
def degrade(img, kind: str, severity: float, rng: random.Random):
    """``img`` damaged by ``kind`` at ``severity`` (0: mildly, 1: badly)."""
    from PIL import Image, ImageEnhance, ImageFilter

    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(2.0 + 4.0 * severity))
    if kind == "noise":
        arr = np.asarray(img, np.float32)
        noise = np.random.default_rng(rng.randrange(2**31)).normal(0, 30 + 60 * severity, arr.shape)
        return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    if kind == "burnt":
        out = ImageEnhance.Contrast(img).enhance(2.5 + 3.0 * severity)
        out = ImageEnhance.Color(out).enhance(2.5 + 3.0 * severity)
        return ImageEnhance.Sharpness(out).enhance(5.0 + 5.0 * severity)
    if kind == "wrong_colours":
        hsv = np.asarray(img.convert("HSV"), np.int16).copy()
        hsv[..., 0] = (hsv[..., 0] + int(50 + 90 * severity)) % 256
        hsv[..., 1] = (hsv[..., 1] * (0.5 - 0.3 * severity)).astype(np.int16)
        out = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), np.float32)
        muddy = out * 0.6 + out.mean(axis=2, keepdims=True) * 0.4 + 20
        return Image.fromarray(np.clip(muddy, 0, 255).astype(np.uint8))
    raise ValueError(f"unknown degradation {kind!r}: one of {DEGRADATIONS}")


def jitter(img, rng: random.Random):
    """A clean picture as a generator might make it: a touch soft, a touch off."""
    from PIL import Image, ImageEnhance, ImageFilter

    out = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.7)))
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.96, 1.04))
    arr = np.asarray(out, np.float32) + np.random.default_rng(rng.randrange(2**31)).normal(0, 3, (1, 1, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def pairs(n: int, seed: int):
    """``n`` (clean picture, damaged copy, damage kind, severity) from the world's scenes."""
    from kolors_course.world.scenes import render, sample_scenes

    rng = random.Random(f"stand-in:{seed}")
    out = []
    for i, scene in enumerate(sample_scenes(n, seed=seed + 7)):
        base = render(scene, size=128, seed=seed * 100_003 + i)
        kind = DEGRADATIONS[i % len(DEGRADATIONS)]
        severity = rng.random()
        out.append((jitter(base, rng), degrade(base, kind, severity, rng), kind, severity))
    return out


def target(severity: float) -> float:
    low, high = DEGRADED_RANGE
    return high - (high - low) * severity


# --- the model -------------------------------------------------------------------------------
def new_model(seed: int):
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers.models.clip.configuration_clip import CLIPVisionConfig

    from kolors_course.core.state import torch_global_seed

    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=16, projection_dim=64)
    with torch_global_seed(seed):
        return AestheticsPredictorV2Linear(cfg)


def processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _pixels(proc, images):
    return proc(images=list(images), return_tensors="pt")["pixel_values"]


def _predict(model, pixel_values):
    """The predictor's own computation written out for training: its ``forward`` normalises the
    embedding in place, which autograd cannot differentiate through.  The same numbers."""
    from transformers import CLIPVisionModelWithProjection

    embeds = CLIPVisionModelWithProjection.forward(model, pixel_values=pixel_values)[0]
    return model.layers(embeds / embeds.norm(dim=-1, keepdim=True)).flatten()


def train(out_dir, seed: int = 0, steps: int = 800, n_train: int = 1600, n_held_out: int = 200,
          batch_pairs: int = 16, learning_rate: float = 1e-3, threads: int | None = None, log=print) -> dict:
    """Train the stand-in from scratch and write it (safetensors, its processor, ``manifest.json``
    with the command, seed, steps, time and held-out accuracy) to ``out_dir``."""
    import torch

    from kolors_course.core.state import torch_global_seed

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        proc, model = processor(), new_model(seed)
        train_pairs, held_out = pairs(n_train, seed), pairs(n_held_out, seed + 1)
        clean = _pixels(proc, [c for c, _, _, _ in train_pairs])
        bad = _pixels(proc, [d for _, d, _, _ in train_pairs])
        bad_target = torch.tensor([target(s) for _, _, _, s in train_pairs])
        opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(train_pairs), (batch_pairs,), generator=gen)
            flip = (torch.rand(batch_pairs, generator=gen) < 0.5)[:, None, None, None]   # a mirror is as clean
            c = torch.where(flip, clean[idx].flip(-1), clean[idx])
            d = torch.where(flip, bad[idx].flip(-1), bad[idx])
            with torch_global_seed(seed + step):        # the head's dropout draws from torch's generator
                sc, sd = _predict(model, c), _predict(model, d)
            margin = CLEAN_SCORE - bad_target[idx]
            rank = torch.relu(margin - (sc - sd)).mean()
            fit = ((sc - CLEAN_SCORE) ** 2).mean() + ((sd - bad_target[idx]) ** 2).mean()
            loss = rank + 0.5 * fit
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == steps:
                log(f"stand-in scorer step {step}/{steps}: loss {loss.item():.4f}")
        model.eval()
        shift = calibrate(model, clean, bad)
        report = held_out_report(model, proc, held_out)
        report["calibration_shift"] = round(shift, 4)
        report.update(seed=seed, steps=steps, n_train_pairs=n_train, n_held_out_pairs=n_held_out,
                      seconds=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads(),
                      torch=torch.__version__,
                      command=f"kolors-course build-scorer --out {out_dir} --seed {seed} --steps {steps}")
        write(model, proc, Path(out_dir), report)
        return report
    finally:
        torch.set_num_threads(threads_before)


def calibrate(model, clean, bad) -> float:
    """Move the head's last bias so that the gate (6) best separates the training set's clean
    pictures from their damaged copies (the threshold with the highest balanced accuracy);
    returns the shift.  Ranking is untouched: every score moves by the same amount."""
    import torch

    with torch.no_grad():
        sc = torch.cat([model(pixel_values=clean[i:i + 64]).logits.flatten() for i in range(0, len(clean), 64)])
        sd = torch.cat([model(pixel_values=bad[i:i + 64]).logits.flatten() for i in range(0, len(bad), 64)])
        candidates = torch.sort(torch.cat([sc, sd])).values
        best, best_t = -1.0, GATE
        for t in candidates.tolist():
            acc = 0.5 * (float((sc >= t).float().mean()) + float((sd < t).float().mean()))
            if acc > best:
                best, best_t = acc, t
        shift = GATE - best_t
        model.layers[-1].bias += shift
    return float(shift)


def held_out_report(model, proc, held_out) -> dict:
    """Through the predictor's own ``forward``: how often the gate puts a held-out picture on the
    right side, and how often a clean picture outscores its damaged copy."""
    import torch

    with torch.no_grad():
        sc = model(pixel_values=_pixels(proc, [c for c, _, _, _ in held_out])).logits.flatten().tolist()
        sd = model(pixel_values=_pixels(proc, [d for _, d, _, _ in held_out])).logits.flatten().tolist()
    kinds = [k for _, _, k, _ in held_out]
    return {"gate": GATE,
            "clean_at_or_above_gate": round(float(np.mean([s >= GATE for s in sc])), 4),
            "damaged_below_gate": {k: round(float(np.mean([s < GATE for s, kk in zip(sd, kinds) if kk == k])), 4)
                                   for k in DEGRADATIONS},
            "clean_above_its_damaged_copy": round(float(np.mean([a > b for a, b in zip(sc, sd)])), 4),
            "mean_clean": round(float(np.mean(sc)), 3), "mean_damaged": round(float(np.mean(sd)), 3)}


def write(model, proc, out_dir: Path, report: dict) -> None:
    """The stand-in's files, written beside ``out_dir`` and swapped in when complete."""
    import hashlib

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    proc.save_pretrained(str(tmp))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(dict(report, sha256=files), indent=2, ensure_ascii=False))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def check_shipped(folder: Path | None = None) -> Path:
    """The shipped stand-in, its files checked against its manifest."""
    import hashlib

    folder = folder or shipped_folder()
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"the stand-in scorer is missing ({manifest}): reinstall the kit, or rebuild "
                                "it with `kolors-course build-scorer`")
    info = json.loads(manifest.read_text(encoding="utf-8"))
    for name, digest in info["sha256"].items():
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
            raise ValueError(f"{folder / name} does not match its manifest: reinstall the kit or rebuild it")
    return folder


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="kolors-course build-scorer", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(shipped_folder()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    report = train(args.out, seed=args.seed, steps=args.steps, threads=args.threads)
    print(json.dumps({k: v for k, v in report.items() if k != "command"}, indent=2, ensure_ascii=False))
    return 0
