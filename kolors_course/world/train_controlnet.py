"""Training the tiny SDXL ControlNet-Union on the world, for the canny and colour conditions.

The ControlNet recipe of the paper (Zhang et al. 2023) and of diffusers' ``train_controlnet_sdxl.py``:
- the ControlNet starts as a copy of the trained UNet's encoder (its input convolution, time
  embedding, down and mid blocks), with every output convolution and the condition encoder's
  last layer at zero, so at the first step it adds nothing and the base model is unchanged;
- the UNet is frozen; the loss is the UNet's own epsilon loss with the ControlNet's residuals
  added, run through DiffSynth's ``lets_dance_xl``, the function the pipeline samples with;
- one model for both conditions, the union's way: each step trains one type (``canny`` as
  processor ``canny``, ``colour`` as ``tile``), alternating, and the union's control-type
  embedding tells them apart;
- half the captions are replaced by the empty one (the paper's 50%), so the ControlNet must read
  the layout from the condition rather than lean on the text;
- the ControlNet sees one sample at a time, as at generation time (``PerSample``): the union's
  condition transformer is a ``MultiheadAttention`` that reads a (batch, 2, channels) input as
  sequence-first, i.e. it attends across the batch; DiffSynth samples one picture per call, so a
  batched ControlNet in training would learn from neighbours it never has when generating;
- the conditions are the kit's own (``kolors_course.control.conditions``) on the world's
  pictures, the functions a learner calls on a reference; the colour grid is drawn at 4, 8 or
  16 cells so any ``colour_cells`` the notebook offers is familiar.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kolors_course.world.train_unet import EMA, _lr, cell_weighted_mse, kolors_scheduler, min_snr_weight, \
    noisy_batch

#: the union's processor id for each condition the tiny ControlNet learns
TRAINED_CONDITIONS = {"canny": "canny", "colour": "tile"}
COLOUR_CELLS = (4, 8, 16)


@dataclass
class ControlNetConfig:
    steps: int = 2000
    batch_size: int = 16          # one ControlNet call per sample (PerSample): half the UNet's batch
    learning_rate: float = 1e-3
    caption_dropout: float = 0.5            # share of captions replaced by the empty caption
    warmup_steps: int = 50
    weight_decay: float = 1e-2
    adam_betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0
    snr_gamma: float | None = 5.0
    x0_weight_cap: float | None = 100.0     # as the UNet's recipe (world/build.py UNET_RECIPE)
    high_t_fraction: float = 0.3
    high_t_start: float = 0.6
    offset_noise: float = 0.3
    # the shape's latent cells weighted as in the UNet's loss (UNetConfig.shape_weight): the build
    # takes the value the UNet beside it was trained with, so the two losses agree; the canny edges
    # sit on the shape's outline, and with a plain mean they are a few per cent of the loss (beside
    # a shape-weighted UNet, such a ControlNet barely followed them: docs/tiny_world_log.md, build A of the first table)
    shape_weight: float = 0.0
    # the conditions whose steps use that weight: the canny edges sit on the shape; the colour grid
    # is mostly background, and with its loss shape-weighted too the ControlNet beside a
    # shape-weighted UNet followed the grid's layout less well than a plain loss (docs/tiny_world_log.md,
    # "Colour-layout control")
    shape_weighted: tuple = ("canny",)
    ema_decay: float = 0.995
    seed: int = 0
    log_every: int = 50


def controlnet_from_unet(unet, controlnet_class, seed: int = 0):
    """A ControlNet-Union whose shared layers are copies of ``unet``'s and whose outputs are zero."""
    torch.manual_seed(seed)
    cn = controlnet_class()
    own = cn.state_dict()
    shared = {k: v for k, v in unet.state_dict().items()
              if k in own and own[k].shape == v.shape and k.split(".")[0] in ("conv_in", "time_embedding", "blocks")}
    cn.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for conv in cn.controlnet_blocks:
            conv.weight.zero_()
            conv.bias.zero_()
        last = cn.controlnet_conv_in.blocks[-1]
        last.weight.zero_()
        last.bias.zero_()
        cn.spatial_ch_projs.weight.zero_()      # diffusers' zero_module
        cn.spatial_ch_projs.bias.zero_()
        cn.task_embedding.mul_(cn.task_embedding.shape[1] ** 0.5 / cn.task_embedding.std())
    return cn, sorted(shared)


def world_conditions(pixels: torch.Tensor) -> dict:
    """The canny maps (N x 1 x H x W, uint8 0/255) and 16x16 colour grids (N x 3 x 16 x 16, uint8)
    of the world's pictures, by the kit's own condition functions."""
    from PIL import Image

    from kolors_course.control.conditions import canny, colour

    edges, grids = [], []
    for px in pixels:
        img = Image.fromarray(px.permute(1, 2, 0).numpy())
        edges.append(np.asarray(canny(img))[..., :1])
        grids.append(np.asarray(colour(img, 16).resize((16, 16), Image.NEAREST)))
    return {"canny": torch.from_numpy(np.stack(edges)).permute(0, 3, 1, 2).contiguous(),
            "colour": torch.from_numpy(np.stack(grids)).permute(0, 3, 1, 2).contiguous()}


def condition_batch(conds: dict, kind: str, idx: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A batch of condition images as the pipeline gives them to the ControlNet (0..1, N x 3 x H x W)."""
    if kind == "canny":
        return conds["canny"][idx].float().div(255).expand(-1, 3, -1, -1)
    cells = COLOUR_CELLS[int(torch.randint(0, len(COLOUR_CELLS), (1,), generator=gen))]
    grid = conds["colour"][idx].float().div(255)
    grid = torch.nn.functional.avg_pool2d(grid, 16 // cells)
    return torch.nn.functional.interpolate(grid, size=(size, size), mode="nearest")


class PerSample:
    """A DiffSynth ControlNet manager that runs its ControlNet once per sample of the batch and
    stacks the residuals: what generation does (one picture per call), for a batched loss."""

    def __init__(self, manager):
        self.manager = manager

    def __call__(self, sample, timestep, encoder_hidden_states, conditionings, add_time_id=None,
                 add_text_embeds=None, **kwargs):
        b = sample.shape[0]
        per = add_time_id.shape[0] // b
        outs = [self.manager(sample[i:i + 1], timestep[i:i + 1], encoder_hidden_states[i:i + 1],
                             conditionings[:, i:i + 1], add_time_id=add_time_id[i * per:(i + 1) * per],
                             add_text_embeds=add_text_embeds[i:i + 1], **kwargs) for i in range(b)]
        return [torch.cat(parts) for parts in zip(*outs)]


def train_controlnet(controlnet, unet, latents: torch.Tensor, conds: dict, caption_rows, hidden: torch.Tensor,
                     pooled: torch.Tensor, cfg: ControlNetConfig, empty_row: int | None = None, scheduler=None,
                     log=print, cell_weights: torch.Tensor | None = None) -> dict:
    """Train ``controlnet`` in place beside the frozen ``unet``; returns the EMA model and the losses.

    ``empty_row``: the row of ``hidden`` / ``pooled`` holding the empty caption (for the caption
    dropout; required when ``cfg.caption_dropout`` > 0); ``cell_weights``: N x 1 x h x w, the share
    of each latent cell the picture's shape covers (required when ``cfg.shape_weight`` > 0)."""
    if cfg.caption_dropout and empty_row is None:
        raise ValueError("caption_dropout needs the empty caption's row (empty_row)")
    if cfg.shape_weight and cell_weights is None:
        raise ValueError("ControlNetConfig.shape_weight needs cell_weights: the shape's share of each latent cell")
    unknown = sorted(set(cfg.shape_weighted) - set(TRAINED_CONDITIONS))
    if unknown:
        raise ValueError(f"ControlNetConfig.shape_weighted: {unknown} are not conditions it trains "
                         f"({sorted(TRAINED_CONDITIONS)})")
    from diffsynth.controlnets import Annotator, ControlNetUnit, MultiControlNetManager
    from diffsynth.pipelines.dancer import lets_dance_xl

    scheduler = scheduler or kolors_scheduler()
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.eval().requires_grad_(False)
    params = [p for p in controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, cfg))
    ema = EMA(controlnet, cfg.ema_decay)
    managers = {kind: PerSample(MultiControlNetManager([ControlNetUnit(Annotator(pid, skip_processor=True),
                                                                       controlnet, 1.0)]))
                for kind, pid in TRAINED_CONDITIONS.items()}
    kinds = list(TRAINED_CONDITIONS)
    alphas = torch.tensor(scheduler.alphas_cumprod)
    n, _, h, w = latents.shape
    size = h * 8
    add_time_id = torch.tensor([size, w * 8, 0, 0, size, w * 8]).repeat(cfg.batch_size)
    controlnet.train()
    losses = {k: [] for k in kinds}
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        kind = kinds[step % len(kinds)]
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        rows = [caption_rows[i][int(torch.randint(0, len(caption_rows[i]), (1,), generator=gen))] for i in idx.tolist()]
        if cfg.caption_dropout:
            drop = (torch.rand(len(rows), generator=gen) < cfg.caption_dropout).tolist()
            rows = [empty_row if d else r for r, d in zip(rows, drop)]
        noisy, target, t = noisy_batch(latents[idx], cfg, scheduler, gen)
        cond = condition_batch(conds, kind, idx, size, gen)
        pred = lets_dance_xl(unet, controlnet=managers[kind], sample=noisy, add_time_id=add_time_id,
                             add_text_embeds=pooled[rows], timestep=t, encoder_hidden_states=hidden[rows].float(),
                             controlnet_frames=cond.unsqueeze(0), device="cpu",
                             unet_batch_size=cfg.batch_size, controlnet_batch_size=cfg.batch_size)
        weighted = cfg.shape_weight and kind in cfg.shape_weighted
        per_sample = cell_weighted_mse(pred.float(), target, 1.0 + cfg.shape_weight * cell_weights[idx]
                                       if weighted else None)
        loss = (per_sample * min_snr_weight(alphas[t.long()], cfg.snr_gamma, cfg.x0_weight_cap)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        ema.update(controlnet)
        losses[kind].append(per_sample.mean().item())
        if log and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            recent = {k: sum(v[-cfg.log_every:]) / max(1, len(v[-cfg.log_every:])) for k, v in losses.items()}
            log(f"controlnet step {step:5d}/{cfg.steps}  loss " + "  ".join(f"{k} {v:.4f}" for k, v in recent.items())
                + f"  lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.0f} s")
    controlnet.eval()
    return {"ema": ema.model, "losses": losses, "seconds": time.perf_counter() - t0,
            "config": {**asdict(cfg), "adam_betas": list(cfg.adam_betas), "shape_weighted": list(cfg.shape_weighted)}}
