"""Which words does a trained tiny UNet read?  A check one level below the judge's pictures.

``word_reliance(unet)`` takes held-out scenes, noises their latents at a few timesteps, and
compares the UNet's predicted clean latent under the right caption ``一个{colour}的{shape}，
{background}背景`` with three wrong ones: the shape's colour replaced, the background replaced,
and the two colours trading roles.  It reports, for the shape's cells and the background's cells
apart, the error under the wrong caption divided by the error under the right one: about 1 means
the UNet ignores that word there; well above 1 means it reads it.  "Roles" above 1 on the shape's
cells means the UNet knows *which* of the two colours is the shape's (binding), not only which
colours the prompt names.

The UNet hears a caption by two paths: cross-attention reads the text encoder's token states,
and the pooled embedding (the last token's state) is added to its time embedding.  ``path``
sends the wrong caption down one of them only (``"tokens"`` or ``"pooled"``, the other path
keeping the right caption), to show which one the UNet reads a word from.  A LoRA on the
attention layers (the course's) can only change what comes through cross-attention.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from kolors_course.world import scenes as W

TIMESTEPS = (300, 600, 900)


def _captions(scene_list, seed: int) -> list[dict]:
    rng = random.Random(f"diagnose:{seed}")

    def other(*avoid):
        return rng.choice([c for c in W.COLOURS if c not in avoid])

    out = []
    for s in scene_list:
        out.append({"right": f"一个{s.colour}的{s.shape}，{s.background}背景",
                    "shape_colour": f"一个{other(s.colour, s.background)}的{s.shape}，{s.background}背景",
                    "background": f"一个{s.colour}的{s.shape}，{other(s.colour, s.background)}背景",
                    "roles": f"一个{s.background}的{s.shape}，{s.colour}背景"})
    return out


@torch.no_grad()
def word_reliance(unet, stats, n: int = 48, seed: int = 777, timesteps=TIMESTEPS, weights=None,
                  path: str = "both") -> dict:
    """``{timestep: {"shape_cells": {wrong: ratio}, "background_cells": {wrong: ratio}}}`` for a
    DiffSynth tiny UNet (eval mode) and the build's latent ``CellStats``; the captions go through
    the text encoder of build folder ``weights`` (its trained layers, where it has them: the UNet
    was trained beside that one), else the seeded one.  ``path``: where the wrong caption goes,
    ``"both"`` (as a prompt would), ``"tokens"`` (cross-attention only) or ``"pooled"`` (only the
    pooled embedding)."""
    if path not in ("both", "tokens", "pooled"):
        raise ValueError(f"path={path!r}: expected 'both', 'tokens' or 'pooled'")
    import kolors_course.models.tiny as T
    from diffsynth.prompters import KolorsPrompter

    from kolors_course.world.train_unet import encode_captions, kolors_scheduler
    from kolors_course.world.train_vae import images_to_tensor, target_latents

    scene_list = W.sample_scenes(n, seed=seed)
    x0 = target_latents(images_to_tensor([W.render(s, seed=seed * 1000 + i) for i, s in enumerate(scene_list)]),
                        stats)
    shape = torch.from_numpy(np.stack(
        [W.shape_coverage(s, seed=seed * 1000 + i) for i, s in enumerate(scene_list)])).unsqueeze(1)
    caps = _captions(scene_list, seed)
    prompter = KolorsPrompter()
    prompter.fetch_models(T.text_encoder_module(weights))
    index, hidden, pooled = encode_captions(prompter, [c for cs in caps for c in cs.values()], log=None)
    alphas = torch.tensor(kolors_scheduler().alphas_cumprod)
    side = x0.shape[-1] * 8
    time_ids = torch.tensor([side, side, 0, 0, side, side]).repeat(n)
    out = {}
    for t in timesteps:
        a = alphas[t]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t))
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        err = {}
        for kind in caps[0]:
            rows = [index[cs[kind]] for cs in caps]
            right = [index[cs["right"]] for cs in caps]
            eps = unet(noisy, timestep=torch.full((n,), t),
                       encoder_hidden_states=hidden[right if path == "pooled" else rows].float(),
                       add_text_embeds=pooled[right if path == "tokens" else rows], add_time_id=time_ids)
            e = (((noisy - (1 - a).sqrt() * eps) / a.sqrt() - x0)[:, :3] ** 2).mean(dim=1, keepdim=True)
            err[kind] = (float((e * shape).sum() / shape.sum()), float((e * (1 - shape)).sum() / (1 - shape).sum()))
        out[t] = {cells: {k: round(err[k][j] / err["right"][j], 3) for k in err if k != "right"}
                  for j, cells in enumerate(("shape_cells", "background_cells"))}
    return out
