"""Training the tiny VAE (a KL autoencoder of DiffSynth's SDXL classes) on the world's pictures.

The loop follows the usual recipe for a latent-diffusion autoencoder, shrunk: encode to a
diagonal Gaussian (mean and log-variance, the 8 channels of ``quant_conv``), decode a sample
of it, and minimise the pixel error plus a small KL term that keeps the latents smooth and
near the origin.  No adversarial or perceptual loss: the world's pictures are flat colours
and sharp edges, and the pixel loss alone reproduces them.

DiffSynth multiplies encoder outputs by a fixed ``scaling_factor`` (0.13025, SDXL's value)
and divides decoder inputs by it.  A freshly trained VAE's latents have their own mean and
scale, so ``fold_latent_scale`` measures them on the data and folds the standardisation and
that factor into ``quant_conv`` / ``post_quant_conv``: through DiffSynth's unchanged forward,
the encoder then returns latents of mean 0 and standard deviation 1 per channel, which is
what the diffusion noise schedule expects.

Training uses random crops (``crop`` pixels) of the 128-pixel pictures: the networks are
convolutional, so a crop teaches the same edges and colours at a quarter of the cost.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class VAEConfig:
    steps: int = 900
    batch_size: int = 16
    crop: int = 128                  # training crop side in pixels (128: whole pictures, see build.py)
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    kl_weight: float = 1e-4          # on the per-element mean KL; keeps latents smooth and bounded
    l1_weight: float = 0.5           # L1 besides MSE: sharper edges on flat colours
    init_logvar: float = -8.0        # start the posterior nearly deterministic (see train_vae)
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 50


def encode_moments(encoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) of the latent Gaussian, before DiffSynth's scaling.

    The same layers as ``SDXLVAEEncoder.forward``, which keeps only the mean channels.
    """
    h = encoder.conv_in(pixels)
    t = txt = stack = None
    for block in encoder.blocks:
        h, t, txt, stack = block(h, t, txt, stack)
    h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h)))
    moments = encoder.quant_conv(h)
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30.0, 20.0)
    return mean, logvar


def decode(decoder, latents: torch.Tensor) -> torch.Tensor:
    """Pixels from unscaled latents, through DiffSynth's own decoder forward."""
    return decoder(latents * decoder.scaling_factor)


def _lr(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to zero (as diffusers' ``get_cosine_schedule_with_warmup``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / max(cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> uint8 tensor N x 3 x H x W (kept as bytes: 50 KB a picture)."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [-1, 1], as DiffSynth's ``preprocess_image``."""
    return x.float() * (2 / 255) - 1


def train_vae(encoder, decoder, pixels: torch.Tensor, cfg: VAEConfig, log=print) -> dict:
    """Train ``encoder`` and ``decoder`` in place on ``pixels`` (uint8, N x 3 x H x W)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    # A fresh encoder's means are small (about 0.1) while its log-variance starts near 0, so the
    # decoder would first see latents that are almost all sampling noise and learn nothing for
    # hundreds of steps.  Starting the variance small lets reconstruction start at once; the KL
    # term then lets it grow where the decoder tolerates it.
    with torch.no_grad():
        encoder.quant_conv.bias[4:] = cfg.init_logvar
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, cfg))
    encoder.train(), decoder.train()
    n, _, h, w = pixels.shape
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        ys = torch.randint(0, h - cfg.crop + 1, (cfg.batch_size,), generator=gen)
        xs = torch.randint(0, w - cfg.crop + 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([pixels[i, :, y:y + cfg.crop, x:x + cfg.crop] for i, y, x in zip(idx, ys, xs)])
        x = to_unit(batch)
        mean, logvar = encode_moments(encoder, x)
        eps = torch.randn(mean.shape, generator=gen)
        z = mean + torch.exp(0.5 * logvar) * eps
        rec = decode(decoder, z)
        mse = torch.nn.functional.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = mse + cfg.l1_weight * l1 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(mse.item())
        if log and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            log(f"vae step {step:5d}/{cfg.steps}  mse {mse.item():.5f} (PSNR {psnr:.1f} dB)  kl {kl.item():.3f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.0f} s")
    encoder.eval(), decoder.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0, "config": asdict(cfg)}


@torch.no_grad()
def latent_stats(encoder, pixels: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the (unscaled) latent means over ``pixels``."""
    means = torch.cat([encode_moments(encoder, to_unit(pixels[i:i + batch]))[0] for i in range(0, len(pixels), batch)])
    return means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3))


@torch.no_grad()
def fold_latent_scale(encoder, decoder, mu: torch.Tensor, std: torch.Tensor) -> None:
    """Make DiffSynth's fixed-factor forward give standardised latents (see the module notes).

    Encoder: DiffSynth returns ``k * quant_conv(h)[:4]``; we want ``(m - mu) / std`` where
    ``m`` is the old mean, so the mean rows of ``quant_conv`` are scaled by ``1 / (k std)`` and
    shifted; the log-variance rows move by ``-2 log(k std)`` so the Gaussian stays consistent.
    Decoder: DiffSynth feeds ``x / k`` to ``post_quant_conv``; the old decoder wants
    ``m = x * std + mu``, so ``post_quant_conv`` absorbs ``k std`` and ``mu``.
    """
    k = encoder.scaling_factor
    s = k * std
    qc = encoder.quant_conv
    qc.weight[:4] /= s.view(4, 1, 1, 1)
    qc.bias[:4] = (qc.bias[:4] - mu) / s
    qc.bias[4:] -= 2 * torch.log(s)
    pq = decoder.post_quant_conv
    w = pq.weight.clone()                              # out x in x 1 x 1
    pq.bias += (w[:, :, 0, 0] @ mu)
    pq.weight.copy_(w * s.view(1, 4, 1, 1))


@torch.no_grad()
def psnr(encoder, decoder, pixels: torch.Tensor, batch: int = 32) -> float:
    """Reconstruction PSNR (dB, on [-1, 1] pixels) through DiffSynth's own forwards."""
    errs = []
    for i in range(0, len(pixels), batch):
        x = to_unit(pixels[i:i + batch])
        errs.append(((decoder(encoder(x)) - x) ** 2).mean(dim=(1, 2, 3)))
    mse = float(torch.cat(errs).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-10))
