"""Building the tiny profile's trained UNet and VAE from scratch, reproducibly.

``build_tiny(out_dir)`` draws the world (pictures and captions), trains the VAE, folds its
latent scale into DiffSynth's fixed factor, encodes every picture and every distinct
caption once, trains the UNet, and writes the files in the real layout (``UNET_REL`` and
``VAE_REL`` of ``kolors_course.models.tiny``, each with its config.json) plus
``manifest.json``: each file's SHA-256, the command, seed, steps, wall time, torch version,
final losses and the judge's numbers on the result.  The folder it writes is what ships in
``kolors_course/world/weights/``.

``quick=True`` runs the same code with a few steps on a few pictures (under a minute), so
the test suite keeps the path honest.  Same seed, same thread count, same torch: same bytes.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kolors_course.world import scenes as W
from kolors_course.world.train_unet import UNetConfig, encode_captions, kolors_scheduler, train_unet
from kolors_course.world.train_vae import VAEConfig, fold_latent_scale, images_to_tensor, latent_stats, psnr, \
    to_unit, train_vae

#: the settings of the shipped build (its manifest.json records the timings they took)
#: VAE on whole pictures: trained on crops it drew colour casts and border artefacts on whole
#: 128-pixel pictures (its GroupNorms see other statistics); the UNet learns fast, the VAE slowly.
DEFAULTS = dict(n_scenes=2500, captions_per_scene=3, vae_images=2500, vae_steps=1100, vae_crop=128,
                unet_steps=1800, unet_batch=32, vae_batch=4)
QUICK = dict(n_scenes=48, captions_per_scene=2, vae_images=48, vae_steps=30, vae_crop=32, unet_steps=20,
             unet_batch=8, vae_batch=4)


def _logger(path: Path | None):
    fh = open(path, "a", encoding="utf-8") if path else None

    def log(*parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if fh:
            fh.write(line + "\n")
            fh.flush()
    return log


def build_tiny(out_dir, seed: int = 0, vae_steps: int | None = None, unet_steps: int | None = None,
               threads: int = 1, quick: bool = False, n_scenes: int | None = None,
               captions_per_scene: int | None = None, vae_images: int | None = None,
               unet_batch: int | None = None, vae_batch: int | None = None,
               unet_lr: float = 1e-3, vae_lr: float = 1e-3, dtype: str = "float16",
               eval_seeds: int = 12, evaluate_result: bool = True, log_file: str | None = None,
               command: str | None = None) -> dict:
    """Train and write the tiny UNet and VAE under ``out_dir``; returns the manifest."""
    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    knobs = dict(QUICK if quick else DEFAULTS)
    for k, v in dict(n_scenes=n_scenes, captions_per_scene=captions_per_scene, vae_images=vae_images,
                     vae_steps=vae_steps, unet_steps=unet_steps, unet_batch=unet_batch, vae_batch=vae_batch).items():
        if v is not None:
            knobs[k] = v
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _logger(Path(log_file) if log_file else None)
    log(f"build_tiny: seed {seed}, threads {threads}, {knobs}")
    import kolors_course.models.tiny as T

    size = T.IMAGE_SIZE
    # 1. the world: pictures and captions
    t0 = time.perf_counter()
    scene_list = W.sample_scenes(knobs["n_scenes"], seed=seed)
    images = [W.render(s, size=size, seed=seed * 1_000_003 + i) for i, s in enumerate(scene_list)]
    rng = random.Random(f"captions:{seed}")
    captions = [[W.caption(s, rng) for _ in range(knobs["captions_per_scene"])] for s in scene_list]
    pixels = images_to_tensor(images)
    held_out = W.sample_scenes(64 if not quick else 8, seed=seed + 7919)
    held_pixels = images_to_tensor([W.render(s, size=size, seed=10 ** 6 + i) for i, s in enumerate(held_out)])
    log(f"world: {len(images)} pictures, {sum(map(len, captions))} captions ({time.perf_counter() - t0:.0f} s)")

    # 2. the VAE
    classes = T.diffsynth_classes()
    torch.manual_seed(seed)
    encoder, decoder = classes["sdxl_vae_encoder"](), classes["sdxl_vae_decoder"]()
    vae_cfg = VAEConfig(steps=knobs["vae_steps"], batch_size=knobs["vae_batch"], learning_rate=vae_lr, seed=seed,
                        crop=knobs["vae_crop"], log_every=25 if not quick else 5,
                        warmup_steps=50 if not quick else 2)
    vae_run = train_vae(encoder, decoder, pixels[:knobs["vae_images"]], vae_cfg, log=log)
    mu, std = latent_stats(encoder, pixels[:knobs["vae_images"]])
    fold_latent_scale(encoder, decoder, mu, std)
    vae_psnr = psnr(encoder, decoder, held_pixels)
    log(f"vae: {vae_run['seconds']:.0f} s, latent mean {mu.tolist()} std {std.tolist()}, "
        f"held-out PSNR {vae_psnr:.1f} dB")

    # 3. cached inputs for the UNet: latents of every picture, embeddings of every distinct caption
    t0 = time.perf_counter()
    with torch.no_grad():
        latents = torch.cat([encoder(to_unit(pixels[i:i + 64])) for i in range(0, len(pixels), 64)]).float()
    log(f"latents {tuple(latents.shape)}: mean {latents.mean():.3f}, std {latents.std():.3f} "
        f"({time.perf_counter() - t0:.0f} s)")
    from diffsynth.prompters import KolorsPrompter

    prompter = KolorsPrompter()
    prompter.fetch_models(T.text_encoder_module())
    t0 = time.perf_counter()
    index, hidden, pooled = encode_captions(prompter, [c for cs in captions for c in cs], log=log)
    rows = [[index[c] for c in cs] for cs in captions]
    log(f"captions: {len(index)} distinct, encoded in {time.perf_counter() - t0:.0f} s")

    # 4. the UNet
    torch.manual_seed(seed + 1)
    unet = classes["sdxl_unet"]()
    unet_cfg = UNetConfig(steps=knobs["unet_steps"], batch_size=knobs["unet_batch"], learning_rate=unet_lr,
                          seed=seed, log_every=100 if not quick else 5,
                          warmup_steps=100 if not quick else 2, ema_decay=0.999 if not quick else 0.9)
    unet_run = train_unet(unet, latents, rows, hidden, pooled, unet_cfg, scheduler=kolors_scheduler(), log=log)

    # 5. the files, in the real layout
    torch_dtype = getattr(torch, dtype)
    for rel in (T.UNET_REL, T.VAE_REL):
        if (out_dir / rel).parent.exists():
            shutil.rmtree((out_dir / rel).parent)
    T.write_unet(unet_run["ema"].state_dict(), out_dir, dtype=torch_dtype)
    T.write_vae(encoder.state_dict(), decoder.state_dict(), out_dir, dtype=torch_dtype)
    files = {}
    for rel in (T.UNET_REL, T.VAE_REL):
        for p in (out_dir / rel, (out_dir / rel).with_name("config.json")):
            files[str(p.relative_to(out_dir))] = {"sha256": T.sha256(p), "bytes": p.stat().st_size}

    def head(xs, k):
        xs = xs[:max(1, min(k, len(xs) // 4))]
        return float(sum(xs) / len(xs))

    def tail(xs, k):
        xs = xs[-max(1, min(k, len(xs) // 4)):]
        return float(sum(xs) / len(xs))

    manifest = {
        "what": "tiny Kolors-architecture UNet and VAE trained on kolors_course.world (text encoder: random, "
                "rebuilt from its seed by kolors_course.models.tiny)",
        "command": command or "kolors_course.world.build.build_tiny(" + repr(str(out_dir)) + ", ...)",
        "seed": seed, "threads": threads, "quick": quick, "dtype": dtype,
        "settings": {**knobs, "unet_lr": unet_lr, "vae_lr": vae_lr, "image_size": size,
                     "unet_channels": list(T.CH), "vae_channels": list(T.VAE_CH),
                     "unet_parameters": sum(p.numel() for p in unet.parameters()),
                     "vae_parameters": sum(p.numel() for p in list(encoder.parameters()) + list(decoder.parameters())),
                     "vae": asdict(vae_cfg), "unet": {**asdict(unet_cfg), "adam_betas": list(unet_cfg.adam_betas)}},
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "diffsynth": _version("diffsynth"), "numpy": _version("numpy"), "pillow": _version("pillow")},
        # means over the first 20 and the last 50 (VAE) / 100 (UNet) steps; a quarter of a short run
        "losses": {"vae_mse_first": head(vae_run["losses"], 20), "vae_mse_final": tail(vae_run["losses"], 50),
                   "vae_heldout_psnr_db": vae_psnr,
                   "unet_first": head(unet_run["losses"], 20), "unet_final": tail(unet_run["losses"], 100)},
        "seconds": {"vae": vae_run["seconds"], "unet": unet_run["seconds"]},
        "files": files,
    }
    manifest["wall_seconds_training"] = time.perf_counter() - t_start
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))

    # 6. the result through the kit's own loading path, graded by the judge
    if evaluate_result:
        manifest["judge"] = judge_numbers(out_dir, eval_seeds=eval_seeds, quick=quick, log=log)
    manifest["wall_seconds"] = time.perf_counter() - t_start
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    log(f"build_tiny: done in {manifest['wall_seconds']:.0f} s; manifest {out_dir / 'manifest.json'}")
    return manifest


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def pipeline_from(weights_dir, cache_dir=None):
    """A ``kc.load_pipeline`` pipeline of the tiny profile over the weights in ``weights_dir``."""
    import kolors_course.models.tiny as T
    from kolors_course.core.profiles import TINY
    from kolors_course.models.loading import load_pipeline

    cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="tiny-eval-"))
    T.install_trained_models(cache_dir, Path(weights_dir), force=True)
    saved = os.environ.pop("KOLORS_COURSE_CACHE", None)      # it would override the profile's folder
    try:
        return load_pipeline(TINY.with_(cache_dir=str(cache_dir.resolve()), height=T.IMAGE_SIZE,
                                        width=T.IMAGE_SIZE, steps=20))
    finally:
        if saved is not None:
            os.environ["KOLORS_COURSE_CACHE"] = saved


def judge_numbers(weights_dir, eval_seeds: int = 16, quick: bool = False, log=print) -> dict:
    """The judge on clean renders and on VAE round trips, and a short ``evaluate`` of the models."""
    from kolors_course.world import judge as J
    from kolors_course.world.evaluate import evaluate, summary_lines

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tiny-eval-") as tmp:
        pipe = pipeline_from(weights_dir, Path(tmp) / "cache")
        n = 40 if quick else 400
        ss = W.sample_scenes(n, seed=424242)
        renders = [W.render(s, seed=i) for i, s in enumerate(ss)]
        out = {"on_renders": J.accuracy(renders, ss), "n_renders": n}
        trips = [vae_round_trip(pipe, im) for im in renders[: n // 2]]
        out["on_vae_round_trips"] = J.accuracy(trips, ss[: n // 2])
        out["n_round_trips"] = n // 2
        log(f"judge on renders: {out['on_renders']}")
        log(f"judge on VAE round trips: {out['on_vae_round_trips']}")
        seeds = range(2 if quick else eval_seeds)
        # the full set of targets (with the prompt parts) is evaluate() on more seeds, run apart
        out["evaluate"] = evaluate(pipe, seeds=seeds, steps=2 if quick else 20,
                                   negative_colours=("红色",) if quick else ("红色", "蓝色"), parts=False)
        for line in summary_lines(out["evaluate"]):
            log(line)
    out["seconds"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def vae_round_trip(pipe, image):
    """``image`` through the pipeline's VAE encoder and decoder (as img2img would see it)."""
    x = pipe.preprocess_image(image).to(device=pipe.device, dtype=pipe.torch_dtype)
    return pipe.decode_image(pipe.encode_image(x))


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="train the tiny profile's UNet and VAE on the synthetic world")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int)
    ap.add_argument("--unet-steps", type=int)
    ap.add_argument("--log-file")
    a = ap.parse_args(argv)
    build_tiny(a.out, seed=a.seed, vae_steps=a.vae_steps, unet_steps=a.unet_steps, threads=a.threads,
               quick=a.quick, log_file=a.log_file, command=" ".join(["python -m kolors_course.world.build"] + sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
