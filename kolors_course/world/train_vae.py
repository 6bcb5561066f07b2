"""Training the tiny VAE (DiffSynth's SDXL encoder and decoder classes) on the world's pictures.

A real SDXL VAE learns its latent space; its latents end up looking like a small, blurred copy
of the picture.  Here the latent space is *chosen* to be that, and the two halves are trained
to it, which is what makes the build fit a CPU hour:

- each latent cell stands for an 8x8 block of pixels, with 4 channels: the block's mean red,
  green and blue, and the spread (standard deviation) of its brightness, which is high where an
  edge or a stripe crosses the block (``cell_features``), standardised over the training
  pictures (``CellStats``);
- the **encoder** is trained to compute exactly those features (a regression, fast);
- the **decoder** is trained to paint the picture back from them, with a little noise added to
  its input so that slightly-off latents (the encoder's small error, a sampler's) still decode
  cleanly.

Because the target latents are a fixed function of the pixels, the UNet can be trained on them
while (or before) the VAE trains, and notebook 06 can show a learner latents that are readable:
channels 1-3 *are* a 16x16 picture.  The price is honesty about what is lost: the latent keeps
per-block colours and "something sharp here", so the decoder has to learn where inside a block
an edge runs from the neighbouring blocks (it does: see ``psnr`` in the build's manifest).

DiffSynth multiplies encoder outputs by a fixed ``scaling_factor`` (0.13025, SDXL's value) and
divides decoder inputs by it; ``fold_latent_scale`` folds that factor (and any remaining mean and
scale) into ``quant_conv`` / ``post_quant_conv``, so through DiffSynth's unchanged forward the
encoder returns the standardised features and the decoder takes them.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

CELL = 8          # pixels per latent cell, as SDXL's VAE


@dataclass
class VAEConfig:
    steps: int = 1500
    batch_size: int = 8
    crop: int = 128                  # whole pictures: on crops the GroupNorms see other statistics
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    l1_weight: float = 0.5           # L1 besides MSE: sharper edges on flat colours
    encoder_weight: float = 1.0      # the encoder's regression loss, beside the decoder's pixel loss
    latent_noise: float = 0.15       # the largest noise (in latent standard deviations) added to decoder inputs
    edge_weight: float = 0.0         # pixel loss x (1 + edge_weight x edge map): outlines, not flat areas, decide shapes
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 50


@dataclass
class CellStats:
    """Per-channel mean and standard deviation of ``cell_features`` over the training pictures."""
    mean: list
    std: list

    @classmethod
    def of(cls, pixels: torch.Tensor, batch: int = 256) -> "CellStats":
        feats = torch.cat([cell_features(to_unit(pixels[i:i + batch])) for i in range(0, len(pixels), batch)])
        return cls(feats.mean(dim=(0, 2, 3)).tolist(), feats.std(dim=(0, 2, 3)).tolist())

    def standardise(self, feats: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return (feats - m) / s


def cell_features(x: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W pixels in [-1, 1] -> N x 4 x H/8 x W/8: mean R, G, B and brightness spread per cell."""
    pool = torch.nn.functional.avg_pool2d
    mean = pool(x, CELL)
    luma = x.mean(dim=1, keepdim=True)
    spread = (pool(luma ** 2, CELL) - pool(luma, CELL) ** 2).clamp(min=0).sqrt()
    return torch.cat([mean, spread], dim=1)


def target_latents(pixels: torch.Tensor, stats: CellStats, batch: int = 256) -> torch.Tensor:
    """The latents the encoder is trained to give (and the UNet is trained on): uint8 pixels in."""
    return torch.cat([stats.standardise(cell_features(to_unit(pixels[i:i + batch])))
                      for i in range(0, len(pixels), batch)])


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W in [0, 1]: where the picture ``x`` (in [-1, 1]) has an edge, widened by a pixel.

    The largest colour difference to the right and downward neighbours, dilated 3 x 3: a shape's
    outline, a stripe's border.  Flat areas are 0, so a weighted loss spends its effort where the
    decoder has to work out from neighbouring cells where inside a block the outline runs.
    """
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=1, keepdim=True)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(dim=1, keepdim=True)
    grad = torch.nn.functional.pad(dx, (0, 1, 0, 0)).maximum(torch.nn.functional.pad(dy, (0, 0, 0, 1)))
    grad = (grad / 0.5).clamp(max=1.0)        # a difference of a quarter of the range counts as a full edge
    return torch.nn.functional.max_pool2d(grad, 3, stride=1, padding=1)


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


def train_vae(encoder, decoder, pixels: torch.Tensor, cfg: VAEConfig, stats: CellStats | None = None,
              log=print) -> dict:
    """Train ``encoder`` and ``decoder`` in place on ``pixels`` (uint8, N x 3 x H x W).

    Returns the loss history and the ``CellStats`` the latents are standardised with.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    stats = stats or CellStats.of(pixels)
    # The log-variance half of quant_conv is not used by DiffSynth's forward; it is pinned to a
    # tiny constant variance (zero weights get no gradient from any loss here, so they stay zero),
    # which keeps the files a valid, nearly deterministic KL autoencoder.
    with torch.no_grad():
        encoder.quant_conv.weight[4:] = 0.0
        encoder.quant_conv.bias[4:] = -12.0
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, cfg))
    encoder.train(), decoder.train()
    n, _, h, w = pixels.shape
    losses, enc_losses, t0 = [], [], time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        # crops on the cell grid, so a crop's target is the picture's target cropped
        ys = torch.randint(0, (h - cfg.crop) // CELL + 1, (cfg.batch_size,), generator=gen) * CELL
        xs = torch.randint(0, (w - cfg.crop) // CELL + 1, (cfg.batch_size,), generator=gen) * CELL
        batch = torch.stack([pixels[i, :, y:y + cfg.crop, x:x + cfg.crop] for i, y, x in zip(idx, ys, xs)])
        x = to_unit(batch)
        target = stats.standardise(cell_features(x))
        mean, _ = encode_moments(encoder, x)
        enc_mse = torch.nn.functional.mse_loss(mean, target)
        sigma = torch.rand(cfg.batch_size, 1, 1, 1, generator=gen) * cfg.latent_noise
        z = target + sigma * torch.randn(target.shape, generator=gen)
        rec = decode(decoder, z)
        mse = torch.nn.functional.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        loss = mse + cfg.l1_weight * l1 + cfg.encoder_weight * enc_mse
        if cfg.edge_weight:
            err = rec - x
            edges = cfg.edge_weight * edge_map(x)
            loss = loss + (edges * (err ** 2 + cfg.l1_weight * err.abs())).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(mse.item())
        enc_losses.append(enc_mse.item())
        if log and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            psnr_db = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            log(f"vae step {step:5d}/{cfg.steps}  decoder mse {mse.item():.5f} (PSNR {psnr_db:.1f} dB)  "
                f"encoder mse {enc_mse.item():.5f}  lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.0f} s")
    encoder.eval(), decoder.eval()
    return {"losses": losses, "encoder_losses": enc_losses, "stats": stats,
            "seconds": time.perf_counter() - t0, "config": asdict(cfg)}


@torch.no_grad()
def encoder_error(encoder, pixels: torch.Tensor, stats: CellStats, batch: int = 32) -> float:
    """Mean squared error of the encoder's latents (through DiffSynth's forward, after
    ``fold_latent_scale``) against ``target_latents``, in latent units."""
    errs = [((encoder(to_unit(pixels[i:i + batch]))
              - target_latents(pixels[i:i + batch], stats)) ** 2).mean().item() for i in range(0, len(pixels), batch)]
    return float(sum(errs) / len(errs))


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
