"""How diffusion works, shown on the real pipeline's parts (notebook 06).

Each function opens one box of what ``kc.generate`` does in a single call, with the same
models, scheduler and random numbers, so the pictures a learner sees are the model's own:

- ``vae_round_trip``: pixels -> latents -> pixels (the VAE; Kolors denoises 1/8-size latents);
- ``forward_process``: the training-time noising ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``
  at several timesteps;
- ``denoise_by_hand``: the sampling loop written out: at every step the UNet's two noise
  predictions (with the prompt and with the negative prompt), classifier-free guidance
  ``eps = eps_neg + cfg * (eps_pos - eps_neg)``, the DDIM update, and the clean image the
  model predicts at that step ``x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``; its final
  image equals ``kc.generate``'s for the same settings;
- ``train_from_scratch``: a fresh UNet trained for a minute on the tiny world, sampled as it learns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kolors_course.core.state import torch_global_seed
from kolors_course.models.pipeline import kit_pipeline


def _to_tensor(pipe, image):
    """An RGB PIL image as the VAE's input: 1x3xHxW in [-1, 1] on the pipeline's device."""
    return pipe.diffsynth.preprocess_image(image.convert("RGB")).to(device=pipe.device, dtype=pipe.torch_dtype)


@torch.no_grad()
def encode(pipe, image) -> torch.Tensor:
    """The latents of an image (1x4xH/8xW/8), as the UNet sees them (already scaled)."""
    pipe = kit_pipeline(pipe)
    pipe.models_to_device(["vae_encoder"])
    return pipe.diffsynth.encode_image(_to_tensor(pipe, image))


@torch.no_grad()
def decode(pipe, latents: torch.Tensor):
    """The picture of some latents."""
    pipe = kit_pipeline(pipe)
    pipe.models_to_device(["vae_decoder"])
    return pipe.diffsynth.decode_image(latents.to(device=pipe.device, dtype=pipe.torch_dtype))


def vae_round_trip(pipe, image):
    """``(latents, decoded image, PSNR in dB)``: how much of the picture survives the VAE."""
    import numpy as np

    latents = encode(pipe, image)
    back = decode(pipe, latents)
    a = np.asarray(image.convert("RGB").resize(back.size), dtype=np.float64)
    b = np.asarray(back, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return latents, back, (10 * math.log10(255 ** 2 / mse) if mse > 0 else float("inf"))


def latent_channels(latents: torch.Tensor, size: int | None = None):
    """Each of the 4 latent channels as a greyscale picture (min to max), for a grid."""
    from PIL import Image

    out = []
    for c in latents[0].float().cpu():
        span = float(c.max() - c.min()) or 1.0
        arr = ((c - c.min()) / span * 255).round().to(torch.uint8).numpy()
        im = Image.fromarray(arr, mode="L").convert("RGB")
        out.append(im.resize((size, size), Image.NEAREST) if size else im)
    return out


@torch.no_grad()
def forward_process(pipe, image, timesteps=None, seed: int = 0):
    """``[(t, noisy latents, their picture)]``: the noise training adds at each timestep, from one
    seeded noise draw (the same ``eps`` at every ``t``, so only the mix changes).  ``timesteps``:
    default six from 0 to the schedule's last (1099 for Kolors, which trains on 1,100)."""
    pipe = kit_pipeline(pipe)
    if timesteps is None:
        last = pipe.diffsynth.scheduler.num_train_timesteps - 1
        timesteps = [round(last * i / 5) for i in range(6)]
    x0 = encode(pipe, image)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device, x0.dtype)
    out = []
    for t in timesteps:
        xt = pipe.diffsynth.scheduler.add_noise(x0, eps, torch.tensor([t]))
        out.append((t, xt, decode(pipe, xt)))
    return out


def signal_fraction(pipe, t: int) -> float:
    """``sqrt(a_t)``: how much of the clean latents is left at timestep ``t``."""
    return math.sqrt(kit_pipeline(pipe).diffsynth.scheduler.alphas_cumprod[int(t)])


@dataclass
class DenoisingRecord:
    """What ``denoise_by_hand`` saw at every step."""
    timesteps: list = field(default_factory=list)
    latents: list = field(default_factory=list)        # x_t entering each step
    predicted_clean: list = field(default_factory=list)   # the model's x_0 at each step (latents)
    image = None                                        # the final picture


@torch.no_grad()
def denoise_by_hand(pipe, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int | None = None,
                    cfg_scale: float | None = None, height: int | None = None, width: int | None = None):
    """The sampling loop of ``SDXLImagePipeline.__call__``, one visible step at a time."""
    pipe = kit_pipeline(pipe)
    prof, ds = pipe.profile, pipe.diffsynth
    steps = steps or prof.steps
    cfg_scale = prof.cfg_scale if cfg_scale is None else cfg_scale
    height, width = height or prof.height, width or prof.width
    ds.scheduler.set_timesteps(steps)
    # 1. the starting noise: the same seeded draw the pipeline makes
    latents = ds.generate_noise((1, 4, height // 8, width // 8), seed=seed, device=ds.device, dtype=ds.torch_dtype)
    # 2. the two prompts as the UNet reads them (ChatGLM3 hidden states and a pooled vector)
    pipe.models_to_device(["text_encoder_kolors"])
    pos = ds.encode_prompt(prompt, positive=True)
    neg = ds.encode_prompt(negative_prompt, positive=False)
    add_time_id = ds.prepare_extra_input(latents)["add_time_id"]
    pipe.models_to_device(["unet"])
    rec = DenoisingRecord()
    for t in ds.scheduler.timesteps:
        t = t.unsqueeze(0).to(ds.device)
        # 3. two noise predictions, then classifier-free guidance
        eps_pos = ds.unet(latents, t, pos["encoder_hidden_states"], add_time_id=add_time_id,
                          add_text_embeds=pos["add_text_embeds"])
        if cfg_scale != 1.0:
            eps_neg = ds.unet(latents, t, neg["encoder_hidden_states"], add_time_id=add_time_id,
                              add_text_embeds=neg["add_text_embeds"])
            eps = eps_neg + cfg_scale * (eps_pos - eps_neg)
        else:
            eps = eps_pos
        # 4. what the model thinks the clean latents are, and the DDIM step towards them
        a_t = ds.scheduler.alphas_cumprod[int(t.item())]
        rec.timesteps.append(int(t.item()))
        rec.latents.append(latents)
        rec.predicted_clean.append((latents - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t))
        latents = ds.scheduler.step(eps, t, latents)
    rec.image = decode(pipe, latents)
    return rec


def predicted_clean_images(pipe, rec: DenoisingRecord, every: int = 1):
    """``[(label, picture)]`` of the model's clean-image guess at every ``every``-th step."""
    return [(f"t={t}", decode(pipe, x0)) for i, (t, x0) in enumerate(zip(rec.timesteps, rec.predicted_clean))
            if i % every == 0 or i == len(rec.timesteps) - 1]


# --- training from scratch ---------------------------------------------------------------
@dataclass
class ScratchRun:
    """What ``train_from_scratch`` saw: samples of one prompt as training went on, and the losses."""
    prompt: str
    samples: list = field(default_factory=list)      # (step, PIL image)
    losses: list = field(default_factory=list)
    seconds: float = 0.0


def train_from_scratch(profile, prompt: str = "一个红色的圆形，蓝色背景", steps: int = 60, sample_every: int = 20,
                       batch_size: int = 16, n_scenes: int = 400, seed: int = 0, sample_seed: int = 0,
                       sample_steps: int | None = None, cfg_scale: float = 4.0) -> ScratchRun:
    """Train a fresh UNet (random weights) on the tiny world for ``steps`` steps, sampling ``prompt``
    every ``sample_every`` steps with the same seed: the lesson's "samples visibly improve".

    A second pipeline of ``profile`` is loaded and only its UNet is reinitialised, so the trained
    VAE and text encoder stay as shipped (training a UNet is what this shows) and the learner's
    own pipeline is untouched.  The loop is the tiny build's own (``kolors_course.world``), on the
    build's latent space: ``steps`` of 60 take about half a minute on a CPU, the shipped UNet had
    4,000.  Only profiles built from the tiny world can do this.
    """
    import json
    import random
    import time

    from kolors_course.generation.text2image import generate
    from kolors_course.models import tiny
    from kolors_course.models.loading import load_pipeline
    from kolors_course.world import scenes as W
    from kolors_course.world.build import UNET_RECIPE
    from kolors_course.world.train_unet import UNetConfig, encode_captions, train_unet
    from kolors_course.world.train_vae import CellStats, images_to_tensor, target_latents

    if profile.model_source != "tiny":
        raise ValueError(f"train_from_scratch trains the tiny world's UNet; the {profile.name!r} profile's UNet "
                         "is Kolors itself (2.6 B parameters, weeks on many GPUs). Use profile='tiny'.")
    if steps < 1 or sample_every < 1:
        raise ValueError(f"steps ({steps}) and sample_every ({sample_every}) must be at least 1")
    t0 = time.perf_counter()
    pipe = load_pipeline(profile)
    with torch_global_seed(seed):                 # a fresh UNet, the same one every run
        for module in pipe.unet.modules():
            if hasattr(module, "reset_parameters") and module is not pipe.unet:
                module.reset_parameters()
    # the latent space of the build the profile loads (its own, or the shipped one)
    stats = CellStats(**json.loads((tiny.weights_folder(profile.tiny_weights) / "manifest.json").read_text())["cell_stats"])
    scene_list = W.sample_scenes(n_scenes, seed=seed + 99)
    size = tiny.IMAGE_SIZE
    latents = target_latents(images_to_tensor([W.render(s, size=size, seed=i) for i, s in enumerate(scene_list)]),
                             stats)
    rng = random.Random(f"scratch:{seed}")
    captions = [W.caption(s, rng) for s in scene_list]
    index, hidden, pooled = encode_captions(pipe.prompter, captions, log=None)
    rows = [[index[c]] for c in captions]
    run = ScratchRun(prompt)
    n_steps = sample_steps or profile.steps

    def sample(step):
        pipe.unet.eval()
        run.samples.append((step, generate(pipe, prompt, seed=sample_seed, steps=n_steps, cfg_scale=cfg_scale)))

    sample(0)
    # The build's recipe, but the text encoder the profile loads stays as it is (where the build
    # trained its layers with the UNet, they are kept): this lesson trains the UNet alone, on the
    # world's own captions (the build's layout curriculum fills its first 1,500 steps, more than
    # this lesson runs, with captions drawn for it).
    recipe = {**UNET_RECIPE, "train_text_encoder": False, "layout_first_steps": 0}
    cfg = UNetConfig(steps=steps, batch_size=batch_size, learning_rate=1e-3, warmup_steps=min(10, steps),
                     seed=seed, log_every=10 ** 9, ema_decay=0.0, **recipe)
    coverage = W.shape_coverage_batch(scene_list, size, range(len(scene_list))) if cfg.shape_weight else None
    out = train_unet(pipe.unet, latents, rows, hidden, pooled, cfg, log=None, cell_weights=coverage,
                     empty_row=index[""],
                     callback=lambda done, _: sample(done) if done % sample_every == 0 or done == steps else None)
    run.losses = out["losses"]
    run.seconds = time.perf_counter() - t0
    return run
