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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kolors_course.models.pipeline import KOLORS_TEXT_TOKENS
from kolors_course.world import scenes as W
from kolors_course.world.train_unet import CaptionEncoder, Primer, UNetConfig, encode_captions, kolors_scheduler, train_unet
from kolors_course.world.train_vae import CellStats, VAEConfig, encoder_error, fold_latent_scale, images_to_tensor, \
    psnr, target_latents, train_vae

#: the settings of the shipped build (its manifest.json records the timings they took)
#: VAE on whole pictures: trained on crops it drew colour casts and border artefacts on whole
#: 128-pixel pictures (its GroupNorms see other statistics); the UNet learns fast, the VAE slowly.
DEFAULTS = dict(n_scenes=2500, captions_per_scene=3, vae_images=2500, vae_steps=1200, vae_crop=128,
                unet_steps=8000, unet_batch=32, vae_batch=8, controlnet_steps=3000, controlnet_batch=16)
#: the UNet's training recipe beyond the loop's defaults (see UNetConfig for why each is there).
#: docs/tiny_world_log.md ("How the recipe was found") has each one's measured effect: the text
#: encoder's layers trained with the UNet bind each colour word to its noun, the shape weight makes the shape count in the loss,
#: and the pooled dropout keeps the words in the token states that cross-attention (and so the
#: course's LoRA) reads; without it the UNet read every word from the pooled embedding alone.
UNET_RECIPE = dict(offset_noise=0.3, high_t_fraction=0.3, high_t_start=0.6, x0_weight_cap=100.0,
                   train_text_encoder=True, shape_weight=12.0, pooled_dropout=0.5, layout_first_steps=1500)
#: the VAE's training recipe beyond ``VAEConfig``'s defaults: the edge-weighted pixel loss makes the
#: decoder spend its effort on outlines (README "The tiny world": the shapes the judge reads back
#: through its round trip).
VAE_RECIPE = dict(edge_weight=8.0)
#: pictures in the shape primer (``UNetConfig.shape_first_steps``): a probe drew the four shapes
#: after 1,500 steps on 400
PRIMER_PICTURES = 400
QUICK = dict(n_scenes=48, captions_per_scene=2, vae_images=48, vae_steps=30, vae_crop=32, unet_steps=20,
             unet_batch=8, vae_batch=4, controlnet_steps=6, controlnet_batch=4)


def _logger(path: Path | None):
    fh = open(path, "a", encoding="utf-8") if path else None

    def log(*parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if fh:
            fh.write(line + "\n")
            fh.flush()
    return log


STAGES = ("vae", "unet", "controlnet", "finish")
#: the stages ``finish`` needs; the ControlNet (trained beside the finished UNet) is optional
#: what both stages must share: the same world (pictures, captions, latent stats) and file format
WORLD_SETTINGS = ("n_scenes", "captions_per_scene", "seed", "quick", "dtype")


def _knobs(quick: bool, overrides: dict) -> dict:
    knobs = dict(QUICK if quick else DEFAULTS)
    knobs.update({k: v for k, v in overrides.items() if v is not None})
    return knobs


def _render_seed(seed: int, i: int) -> int:
    """The seed training picture ``i`` is drawn with (its layout jitter)."""
    return seed * 1_000_003 + i


@dataclass
class TrainingWorld:
    """What every stage trains on, drawn once per build: the scenes, their pictures (uint8), the
    captions of each, and held-out pictures for the VAE's PSNR."""
    scenes: list
    render_seeds: list
    pixels: torch.Tensor
    captions: list
    held_pixels: torch.Tensor

    def shape_coverage(self) -> torch.Tensor:
        """N x 1 x h x w: the share of each latent cell the shape of training picture i covers."""
        return W.shape_coverage_batch(self.scenes, self.pixels.shape[-1], self.render_seeds)


def _world(knobs: dict, seed: int, size: int, quick: bool) -> TrainingWorld:
    """The world a build trains on: same seed, same bytes."""
    scene_list = W.sample_scenes(knobs["n_scenes"], seed=seed)
    render_seeds = [_render_seed(seed, i) for i in range(len(scene_list))]
    pixels = images_to_tensor([W.render(s, size=size, seed=r) for s, r in zip(scene_list, render_seeds)])
    rng = random.Random(f"captions:{seed}")
    captions = [[W.caption(s, rng) for _ in range(knobs["captions_per_scene"])] for s in scene_list]
    held_out = W.sample_scenes(64 if not quick else 8, seed=seed + 7919)
    held_pixels = images_to_tensor([W.render(s, size=size, seed=10 ** 6 + i) for i, s in enumerate(held_out)])
    return TrainingWorld(scene_list, render_seeds, pixels, captions, held_pixels)


def build_tiny(out_dir, seed: int = 0, vae_steps: int | None = None, unet_steps: int | None = None,
               controlnet_steps: int | None = None,
               threads: int = 1, quick: bool = False, n_scenes: int | None = None,
               captions_per_scene: int | None = None, vae_images: int | None = None,
               unet_batch: int | None = None, vae_batch: int | None = None,
               unet_lr: float = 1e-3, vae_lr: float = 1e-3, dtype: str = "float16",
               eval_seeds: int = 12, evaluate_result: bool = True, log_file: str | None = None,
               command: str | None = None, stages=STAGES, unet_recipe: dict | None = None,
               vae_recipe: dict | None = None) -> dict | None:
    """Train and write the tiny UNet and VAE under ``out_dir``; returns the manifest.

    The stages are independent until ``finish``: the UNet trains on latents that are a fixed
    function of the pictures (``train_vae``), so ``stages=("vae",)`` and ``stages=("unet",)`` can
    run as two processes side by side (one core each), and ``stages=("finish",)`` then writes the
    manifest; each stage leaves its record in ``out_dir/parts/``.  ``controlnet`` trains the
    ControlNet-Union beside the UNet the ``unet`` stage wrote (so after it).  Same seed, settings, thread
    count and torch: same bytes, whichever way it is run.
    """
    t_start = time.perf_counter()
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown build stage(s) {sorted(unknown)}: choose from {STAGES}")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        knobs = _knobs(quick, dict(n_scenes=n_scenes, captions_per_scene=captions_per_scene, vae_images=vae_images,
                                   vae_steps=vae_steps, unet_steps=unet_steps, unet_batch=unet_batch,
                                   vae_batch=vae_batch, controlnet_steps=controlnet_steps))
        recipe = {**UNET_RECIPE, **(unet_recipe or {})}
        if "layout_first_steps" not in (unet_recipe or {}) and knobs["unet_steps"] != DEFAULTS["unet_steps"]:
            # the recipe's curriculum is a share of the run (1,500 of 8,000 steps): a shorter or
            # longer run (--unet-steps, or the tests' quick build) keeps that share, not the count
            share = UNET_RECIPE["layout_first_steps"] / DEFAULTS["unet_steps"]
            steps = knobs["unet_steps"]
            recipe["layout_first_steps"] = min(max(1, round(steps * share)), steps - 1) if steps > 1 else 0
        unknown = set(recipe) - set(UNetConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown UNet recipe entries {sorted(unknown)}: see UNetConfig")
        vae_recipe = {**VAE_RECIPE, **(vae_recipe or {})}
        unknown = set(vae_recipe) - set(VAEConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown VAE recipe entries {sorted(unknown)}: see VAEConfig")
        settings = {**knobs, "seed": seed, "threads": threads, "quick": quick, "unet_lr": unet_lr,
                    "vae_lr": vae_lr, "dtype": dtype}
        out_dir = Path(out_dir)
        parts = out_dir / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        log = _logger(Path(log_file) if log_file else None)
        log(f"build_tiny: stages {list(stages)}, seed {seed}, threads {threads}, {knobs}")
        if "controlnet" in stages and "unet" not in stages:
            _check_unet_for_controlnet(out_dir, settings)      # before the world is drawn, not after
        if {"vae", "unet", "controlnet"} & set(stages):
            import kolors_course.models.tiny as T

            t0 = time.perf_counter()
            world = _world(knobs, seed, T.IMAGE_SIZE, quick)
            stats = CellStats.of(world.pixels)
            log(f"world: {len(world.pixels)} pictures, {sum(map(len, world.captions))} captions "
                f"({time.perf_counter() - t0:.0f} s); latent cell stats {stats}")
            if "vae" in stages:
                _vae_stage(out_dir, world, stats, knobs, settings, seed, quick, vae_lr, dtype,
                           command, log, vae_recipe)
            if "unet" in stages:
                _unet_stage(out_dir, world, stats, knobs, settings, seed, quick, unet_lr, dtype,
                            command, log, recipe)
            if "controlnet" in stages:
                _controlnet_stage(out_dir, world, stats, knobs, settings, seed, quick, dtype, command, log)
        if "finish" not in stages:
            return None
        return _finish(out_dir, settings, command, eval_seeds, evaluate_result, quick, log, t_start)
    finally:
        torch.set_num_threads(saved_threads)


def _vae_stage(out_dir, world, stats, knobs, settings, seed, quick, vae_lr, dtype, command, log,
               recipe=VAE_RECIPE):
    """Train the VAE to the cell latents and write it (with its record in parts/vae.json)."""
    import kolors_course.models.tiny as T

    # The VAE also sees the world in the LoRA lesson's pastel-and-grain look: the base UNet never
    # does, but the VAE must be able to draw what the LoRA teaches.
    vae_pixels = torch.cat([world.pixels[:knobs["vae_images"]], images_to_tensor(
        _pastel_pictures(W.sample_scenes(knobs["vae_images"] // 5, seed=seed + 31), T.IMAGE_SIZE, seed))])
    classes = T.diffsynth_classes()
    torch.manual_seed(seed)
    encoder, decoder = classes["sdxl_vae_encoder"](), classes["sdxl_vae_decoder"]()
    cfg = VAEConfig(steps=knobs["vae_steps"], batch_size=knobs["vae_batch"], learning_rate=vae_lr, seed=seed,
                    crop=knobs["vae_crop"], log_every=50 if not quick else 5, warmup_steps=50 if not quick else 2,
                    **recipe)
    run = train_vae(encoder, decoder, vae_pixels, cfg, stats=stats, log=log)
    fold_latent_scale(encoder, decoder, torch.zeros(4), torch.ones(4))   # only DiffSynth's fixed factor
    held_psnr = psnr(encoder, decoder, world.held_pixels)
    enc_err = encoder_error(encoder, world.held_pixels, stats)
    log(f"vae: {run['seconds']:.0f} s, held-out PSNR {held_psnr:.1f} dB, encoder error {enc_err:.4f} (latent units)")
    if (out_dir / T.VAE_REL).parent.exists():
        shutil.rmtree((out_dir / T.VAE_REL).parent)
    T.write_vae(encoder.state_dict(), decoder.state_dict(), out_dir, dtype=getattr(torch, dtype))
    _write_part(out_dir, "vae", settings, command, {
        "seconds": run["seconds"], "config": asdict(cfg), "cell_stats": asdict(stats), "pictures": len(vae_pixels),
        "parameters": sum(p.numel() for p in list(encoder.parameters()) + list(decoder.parameters())),
        "losses": {"vae_mse_first": _head(run["losses"], 20), "vae_mse_final": _tail(run["losses"], 50),
                   "vae_heldout_psnr_db": held_psnr, "vae_encoder_error": enc_err}})


def _unet_stage(out_dir, world, stats, knobs, settings, seed, quick, unet_lr, dtype, command, log,
                recipe=UNET_RECIPE):
    """Train the UNet on the cell latents and the cached captions and write it (parts/unet.json)."""
    import kolors_course.models.tiny as T

    t0 = time.perf_counter()
    latents = target_latents(world.pixels, stats)
    torch.manual_seed(seed + 1)
    unet = T.diffsynth_classes()["sdxl_unet"]()
    cfg = UNetConfig(steps=knobs["unet_steps"], batch_size=knobs["unet_batch"], learning_rate=unet_lr, seed=seed,
                     log_every=100 if not quick else 5, warmup_steps=100 if not quick else 2,
                     ema_decay=0.999 if not quick else 0.9, **recipe)
    text = outside_rows = None
    n_world = len(world.captions)
    captions = world.captions
    if cfg.layout_first_steps:
        # two captions per picture naming only its shape and place, for the curriculum's first phase
        rng = random.Random(f"layout captions:{seed}")
        captions = captions + [[W.layout_caption(s, rng) for _ in range(2)] for s in world.scenes]
    if cfg.shape_first_steps:
        primer_list = W.primer_scenes(PRIMER_PICTURES if not quick else 8)
        captions = captions + [W.primer_captions(s) for s in primer_list]
    if cfg.train_text_encoder:
        # the captions are encoded at every step by a text encoder whose layers train with the UNet
        text = CaptionEncoder(tiny_prompter(), [c for cs in captions for c in cs])
        all_rows = [[text.index[c] for c in cs] for cs in captions]
        hidden = pooled = None
        n_captions = len(text.index)
        empty_row = text.index[""]
        outside_rows = torch.tensor([W.has_outside_word(c) for c in text.captions])
    else:
        all_rows, hidden, pooled, n_captions, empty_row = _encoded_captions(captions, log)
    rows = all_rows[:n_world]
    first_rows = all_rows[n_world:] if cfg.layout_first_steps else None
    primer = None
    if cfg.shape_first_steps:
        size = world.pixels.shape[-1]
        primer_seeds = [_render_seed(seed + 104729, i) for i in range(len(primer_list))]
        primer_pixels = images_to_tensor([W.render(s, size=size, seed=r) for s, r in zip(primer_list, primer_seeds)])
        primer = Primer(target_latents(primer_pixels, stats), all_rows[n_world:],
                        W.shape_coverage_batch(primer_list, size, primer_seeds))
    log(f"latents {tuple(latents.shape)}; {n_captions} distinct captions "
        f"{'tokenised' if text else 'encoded'} in {time.perf_counter() - t0:.0f} s")
    coverage = world.shape_coverage() if cfg.shape_weight else None
    run = train_unet(unet, latents, rows, hidden, pooled, cfg, scheduler=kolors_scheduler(), log=log,
                     cell_weights=coverage, text=text, empty_row=empty_row, first_rows=first_rows,
                     primer=primer, outside_rows=outside_rows)
    if (out_dir / T.UNET_REL).parent.exists():
        shutil.rmtree((out_dir / T.UNET_REL).parent)
    T.write_unet(run["ema"].state_dict(), out_dir, dtype=getattr(torch, dtype))
    # the text encoder's trained layers belong to this UNet: a UNet trained beside the seeded,
    # frozen one must not find an older build's layers next to it
    (out_dir / T.TEXT_ENCODER_TRAINED_REL).unlink(missing_ok=True)
    if text is not None:
        T.write_text_encoder_layers(run["text_encoder"], out_dir)
    _write_part(out_dir, "unet", settings, command, {
        "seconds": run["seconds"], "config": {**asdict(cfg), "adam_betas": list(cfg.adam_betas)},
        "parameters": sum(p.numel() for p in unet.parameters()), "distinct_captions": n_captions,
        "text_encoder_trained": text is not None, "text_tokens": _text_tokens(),
        "text_encoder_trained_parameters": sum(p.numel() for p in text.trainable.values()) if text else 0,
        "losses": {"unet_first": _head(run["losses"], 20), "unet_final": _tail(run["losses"], 100)}})


def _text_tokens() -> int:
    """The token length the tiny profile pads prompts to: what its UNet trains on."""
    from kolors_course.core.profiles import TINY

    return TINY.text_tokens


def tiny_prompter(weights=None):
    """The pipeline's prompter over the tiny text encoder (with the trained layers of ``weights``)."""
    import kolors_course.models.tiny as T
    from kolors_course.models.pipeline import kolors_prompter

    return kolors_prompter(T.text_encoder_module(weights), _text_tokens())


def _encoded_captions(captions, log, weights=None):
    """Every distinct caption through the frozen tiny ChatGLM (with the trained layers of build folder
    ``weights``, where it has them), as the pipeline's prompter encodes it.  Returns the rows of each
    picture's captions, the embeddings, the number of distinct captions and the empty caption's row."""
    index, hidden, pooled = encode_captions(tiny_prompter(weights), [c for cs in captions for c in cs], log=log)
    return [[index[c] for c in cs] for cs in captions], hidden, pooled, len(index), index[""]


def _check_unet_for_controlnet(out_dir: Path, settings: dict) -> dict:
    """The controlnet stage trains beside the UNet in ``out_dir``: it must be there, of this world.
    Returns that UNet's record (``parts/unet.json``)."""
    import kolors_course.models.tiny as T

    record = out_dir / "parts" / "unet.json"
    if not record.is_file() or not (out_dir / T.UNET_REL).is_file():
        raise FileNotFoundError(f"the controlnet stage trains beside a finished UNet: run the 'unet' stage into "
                                f"{out_dir} first")
    unet_record = json.loads(record.read_text())
    differ = sorted(k for k in WORLD_SETTINGS if unet_record["settings"].get(k) != settings.get(k))
    if differ:
        raise ValueError(f"the UNet in {out_dir} was built with other settings ({differ}); run the controlnet "
                         "stage with the UNet's")
    return unet_record


def _controlnet_stage(out_dir, world, stats, knobs, settings, seed, quick, dtype, command, log):
    """Train the ControlNet-Union beside the UNet in ``out_dir`` and write it (parts/controlnet.json)."""
    import kolors_course.models.tiny as T
    from kolors_course.world.train_controlnet import TRAINED_CONDITIONS, ControlNetConfig, controlnet_from_unet, \
        train_controlnet, world_conditions

    unet_path = out_dir / T.UNET_REL
    unet_record = _check_unet_for_controlnet(out_dir, settings)
    t0 = time.perf_counter()
    classes = T.diffsynth_classes()
    unet = classes["sdxl_unet"]()
    unet.load_state_dict(T.load_diffsynth_state("unet", unet_path)["sdxl_unet"])
    latents = target_latents(world.pixels, stats)
    conds = world_conditions(world.pixels)
    rows, hidden, pooled, n_captions, empty_row = _encoded_captions(world.captions, log, weights=out_dir)
    log(f"controlnet: {len(world.pixels)} pictures with their canny and colour conditions, {n_captions} captions "
        f"({time.perf_counter() - t0:.0f} s)")
    cn, shared = controlnet_from_unet(unet, classes["sdxl_controlnet"], seed=seed + 2)
    # the UNet's own loss: its shape weight, from the record of the UNet this ControlNet trains beside
    shape_weight = unet_record["config"].get("shape_weight") or 0.0
    cfg = ControlNetConfig(steps=knobs["controlnet_steps"], batch_size=knobs["controlnet_batch"], seed=seed,
                           log_every=50 if not quick else 2, warmup_steps=50 if not quick else 1,
                           ema_decay=0.995 if not quick else 0.5, shape_weight=shape_weight)
    coverage = world.shape_coverage() if cfg.shape_weight else None
    run = train_controlnet(cn, unet, latents, conds, rows, hidden, pooled, cfg, empty_row=empty_row,
                           scheduler=kolors_scheduler(), log=log, cell_weights=coverage)
    if (out_dir / T.CONTROLNET_REL).parent.exists():
        shutil.rmtree((out_dir / T.CONTROLNET_REL).parent)
    T.write_controlnet(run["ema"].state_dict(), out_dir, dtype=getattr(torch, dtype))
    _write_part(out_dir, "controlnet", settings, command, {
        "seconds": run["seconds"], "config": run["config"], "unet_sha256": T.sha256(unet_path),
        "conditions": sorted(TRAINED_CONDITIONS), "text_tokens": _text_tokens(),
        "parameters": sum(p.numel() for p in cn.parameters()), "copied_from_unet": len(shared),
        "losses": {f"controlnet_{k}_first": _head(v, 10) for k, v in run["losses"].items()}
        | {f"controlnet_{k}_final": _tail(v, 50) for k, v in run["losses"].items()}})


def _head(xs, k):
    xs = xs[:max(1, min(k, len(xs) // 4))]
    return float(sum(xs) / len(xs))


def _tail(xs, k):
    xs = xs[-max(1, min(k, len(xs) // 4)):]
    return float(sum(xs) / len(xs))


def _write_part(out_dir: Path, name: str, settings: dict, command, record: dict) -> None:
    record = {"stage": name, "settings": settings, "command": command, **record}
    (out_dir / "parts" / f"{name}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))


def _finish(out_dir: Path, settings: dict, command, eval_seeds, evaluate_result, quick, log, t_start) -> dict:
    """Check the two stages were built alike, then write the manifest (and the judge's numbers)."""
    import kolors_course.models.tiny as T

    parts = {}
    for name in ("vae", "unet"):
        path = out_dir / "parts" / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the {name!r} stage of build_tiny into {out_dir} first")
        parts[name] = json.loads(path.read_text())
    a, b = parts["vae"]["settings"], parts["unet"]["settings"]
    differ = sorted(k for k in WORLD_SETTINGS if a.get(k) != b.get(k))
    if differ:
        raise ValueError(f"the VAE and UNet in {out_dir} were built with different settings ({differ}); "
                         "rebuild one of them with the other's")
    rels = [T.UNET_REL, T.VAE_REL]
    cn_path = out_dir / "parts" / "controlnet.json"
    if cn_path.is_file():
        parts["controlnet"] = json.loads(cn_path.read_text())
        c = parts["controlnet"]["settings"]
        differ = sorted(k for k in WORLD_SETTINGS if b.get(k) != c.get(k))
        if parts["controlnet"].get("text_tokens", KOLORS_TEXT_TOKENS) != parts["unet"].get("text_tokens", KOLORS_TEXT_TOKENS):
            differ.append("text_tokens")
        if differ or parts["controlnet"]["unet_sha256"] != T.sha256(out_dir / T.UNET_REL):
            raise ValueError(f"the ControlNet in {out_dir} was trained beside another UNet or world "
                             f"({differ or 'the UNet file changed'}); run the controlnet stage again")
        rels.append(T.CONTROLNET_REL)
    files = {}
    for rel in rels:
        for p in (out_dir / rel, (out_dir / rel).with_name("config.json")):
            files[str(p.relative_to(out_dir))] = {"sha256": T.sha256(p), "bytes": p.stat().st_size}
    te_layers = out_dir / T.TEXT_ENCODER_TRAINED_REL
    if parts["unet"].get("text_encoder_trained"):
        if not te_layers.is_file():
            raise FileNotFoundError(f"{te_layers} is missing: the UNet in {out_dir} was trained with it; run the "
                                    "unet stage again")
        files[str(T.TEXT_ENCODER_TRAINED_REL)] = {"sha256": T.sha256(te_layers), "bytes": te_layers.stat().st_size}
    elif te_layers.is_file():
        raise ValueError(f"{te_layers} belongs to another UNet (this one trained beside the frozen seeded "
                         "text encoder): delete it or run the unet stage again")
    manifest = {
        "what": "tiny Kolors-architecture UNet and VAE (and SDXL ControlNet-Union, canny and colour) trained on "
                "kolors_course.world (text encoder: rebuilt from its seed by kolors_course.models.tiny"
                + (", its two transformer layers trained with the UNet" if parts["unet"].get("text_encoder_trained")
                   else ", random and frozen") + ")",
        "command": parts["unet"]["command"] if len({part["command"] for part in parts.values()}) == 1 else
        {**{name: part["command"] for name, part in parts.items()}, "finish": command},
        "seed": a["seed"], "threads": {"vae": a["threads"], "unet": b["threads"]}, "quick": a["quick"],
        "dtype": a["dtype"],
        # each stage's own knobs from its own record (a stage run apart may have had other ones)
        "settings": {**{k: v for k, v in a.items() if k != "threads" and not k.startswith(("unet", "controlnet"))},
                     **{k: v for k, v in b.items() if k.startswith("unet")},
                     **({k: v for k, v in parts["controlnet"]["settings"].items() if k.startswith("controlnet")}
                        if "controlnet" in parts else {}),
                     "image_size": T.IMAGE_SIZE,
                     "unet_channels": list(T.CH), "vae_channels": list(T.VAE_CH),
                     "unet_parameters": parts["unet"]["parameters"], "vae_parameters": parts["vae"]["parameters"],
                     "vae": parts["vae"]["config"], "unet": parts["unet"]["config"]},
        "cell_stats": parts["vae"]["cell_stats"],
        # the prompts' padded length the UNet (and ControlNet) trained on; load_pipeline checks the
        # profile's against it (records from before it was a setting: Kolors' 256)
        "text_tokens": parts["unet"].get("text_tokens", KOLORS_TEXT_TOKENS),
        "controlnet": None if "controlnet" not in parts else {
            k: parts["controlnet"][k] for k in ("config", "parameters", "copied_from_unet", "unet_sha256",
                                                 "conditions")},
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "diffsynth": _version("diffsynth"), "numpy": _version("numpy"), "pillow": _version("pillow")},
        # means over the first 20 and the last 50 (VAE) / 100 (UNet) steps; a quarter of a short run
        "losses": {k: v for part in parts.values() for k, v in part["losses"].items()},
        "seconds": {name: part["seconds"] for name, part in parts.items()},
        "files": files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    if evaluate_result:
        manifest["judge"] = judge_numbers(out_dir, eval_seeds=eval_seeds, quick=quick, log=log)
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    log(f"build_tiny: finished in {time.perf_counter() - t_start:.0f} s; manifest {out_dir / 'manifest.json'}")
    return manifest


def _pastel_pictures(scene_list, size: int, seed: int):
    """The world in the LoRA lesson's look (pastel colours, a faint grain), as the VAE sees it."""
    import numpy as np
    from PIL import Image

    out = []
    for i, s in enumerate(scene_list):
        im = np.asarray(W.render(s, size=size, seed=seed * 7_717 + i, lora_style=True), np.float32)
        grain = np.random.default_rng(seed * 7_717 + i).normal(0, 4, im.shape[:2] + (1,))
        out.append(Image.fromarray(np.clip(im + grain, 0, 255).astype(np.uint8)))
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def pipeline_from(weights_dir, cache_dir=None, controlnet: bool = False):
    """A ``kc.load_pipeline`` pipeline of the tiny profile over the weights in ``weights_dir``."""
    import kolors_course.models.tiny as T
    from kolors_course.core.profiles import TINY
    from kolors_course.models.loading import load_pipeline

    cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="tiny-eval-"))
    saved = os.environ.pop("KOLORS_COURSE_CACHE", None)      # it would override the profile's folder
    try:
        return load_pipeline(TINY.with_(cache_dir=str(cache_dir.resolve()), tiny_weights=str(Path(weights_dir).resolve()),
                                        height=T.IMAGE_SIZE, width=T.IMAGE_SIZE, steps=20), controlnet=controlnet)
    finally:
        if saved is not None:
            os.environ["KOLORS_COURSE_CACHE"] = saved


def judge_numbers(weights_dir, eval_seeds: int = 16, quick: bool = False, log=print) -> dict:
    """The judge on clean renders and on VAE round trips, and a short ``evaluate`` of the models."""
    import kolors_course.models.tiny as T
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
                                   negative_colours=1 if quick else 2, parts=False)
        for line in summary_lines(out["evaluate"]):
            log(line)
        listed = json.loads((Path(weights_dir) / "manifest.json").read_text())["files"]
        if str(T.CONTROLNET_REL) in listed:
            from kolors_course.world.evaluate import evaluate_control

            cpipe = pipeline_from(weights_dir, Path(tmp) / "cache", controlnet=True)
            out["control"] = evaluate_control(cpipe, seeds=seeds, steps=2 if quick else 20)
            log(f"control: {out['control']}")
    out["seconds"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def vae_round_trip(pipe, image):
    """``image`` through the pipeline's VAE encoder and decoder (as img2img would see it)."""
    x = pipe.preprocess_image(image).to(device=pipe.device, dtype=pipe.torch_dtype)
    return pipe.decode_image(pipe.encode_image(x))


def parse_recipe_options(items, flag: str = "--unet-option") -> dict:
    """``["x0_weight_cap=10", "shape_weight=none"]`` -> ``{"x0_weight_cap": 10.0, "shape_weight": None}``
    (the ``--unet-option`` and ``--vae-option`` flags; ``build_tiny`` checks the keys against
    ``UNetConfig`` and ``VAEConfig``)."""
    recipe = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, not {item!r}")
        if value.lower() in ("true", "false"):
            recipe[key] = value.lower() == "true"
            continue
        try:
            recipe[key] = None if value.lower() == "none" else float(value)
        except ValueError:
            raise ValueError(f"{flag} {key}: {value!r} is not a number, true/false or 'none'") from None
    return recipe


def main(argv=None) -> int:
    """``python -m kolors_course.world.build ...``: the same options as ``kolors-course build-tiny``
    (the CLI parses them, and the manifest records the build-tiny command)."""
    from kolors_course.cli import main as cli_main

    return cli_main(["build-tiny", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
