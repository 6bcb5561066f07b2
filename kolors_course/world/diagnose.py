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

from kolors_course.models.pipeline import padded_length
from kolors_course.world import scenes as W

TIMESTEPS = (300, 600, 900)


def _held_out_latents(scene_list, stats, seed: int) -> torch.Tensor:
    """The target latents of held-out scenes (drawn with ``render`` seeds ``seed * 1000 + i``)."""
    from kolors_course.world.train_vae import images_to_tensor, target_latents

    return target_latents(images_to_tensor([W.render(s, seed=seed * 1000 + i) for i, s in enumerate(scene_list)]),
                          stats)


def _encoded(captions, weights=None, prompter=None):
    """``encode_captions`` through ``prompter``, or through the text encoder of build folder
    ``weights`` (its trained layers, where it has them), else the seeded one."""
    from kolors_course.world.train_unet import encode_captions

    if prompter is None:
        from kolors_course.world.build import tiny_prompter

        prompter = tiny_prompter(weights)
    return encode_captions(prompter, captions, log=None)


def _noised(x0: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy latents at timestep t, alpha-bar at t)`` on the Kolors pipeline's schedule, seeded."""
    from kolors_course.world.train_unet import kolors_scheduler

    a = torch.tensor(kolors_scheduler().alphas_cumprod)[t]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, a


def _clean_prediction(unet, noisy: torch.Tensor, a: torch.Tensor, t: int, hidden: torch.Tensor,
                      pooled: torch.Tensor) -> torch.Tensor:
    """The UNet's predicted clean latent (float32) for ``noisy`` at timestep ``t`` under the given
    token states and pooled embeddings (one row per latent)."""
    n, side = len(noisy), noisy.shape[-1] * 8
    dtype = next(unet.parameters()).dtype
    eps = unet(noisy.to(dtype), timestep=torch.full((n,), t), encoder_hidden_states=hidden.to(dtype),
               add_text_embeds=pooled.to(dtype), add_time_id=torch.tensor([side, side, 0, 0, side, side]).repeat(n))
    return (noisy - (1 - a).sqrt() * eps.float()) / a.sqrt()


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
    scene_list = W.sample_scenes(n, seed=seed)
    x0 = _held_out_latents(scene_list, stats, seed)
    shape = torch.from_numpy(np.stack(
        [W.shape_coverage(s, seed=seed * 1000 + i) for i, s in enumerate(scene_list)])).unsqueeze(1)
    caps = _captions(scene_list, seed)
    index, hidden, pooled = _encoded([c for cs in caps for c in cs.values()], weights)
    out = {}
    for t in timesteps:
        noisy, a = _noised(x0, t, seed + t)
        err = {}
        for kind in caps[0]:
            rows = [index[cs[kind]] for cs in caps]
            right = [index[cs["right"]] for cs in caps]
            pred = _clean_prediction(unet, noisy, a, t, hidden[right if path == "pooled" else rows],
                                     pooled[right if path == "tokens" else rows])
            e = ((pred - x0)[:, :3] ** 2).mean(dim=1, keepdim=True)
            err[kind] = (float((e * shape).sum() / shape.sum()), float((e * (1 - shape)).sum() / (1 - shape).sum()))
        out[t] = {cells: {k: round(err[k][j] / err["right"][j], 3) for k in err if k != "right"}
                  for j, cells in enumerate(("shape_cells", "background_cells"))}
    return out


def _centroid_x(latents: torch.Tensor) -> torch.Tensor:
    """Horizontal centre (in latent cells) of what differs from the border's colour, per picture:
    where the shape is, read from the colour channels of a (predicted) clean latent."""
    border = torch.cat([latents[:, :3, 0], latents[:, :3, -1]], dim=2).mean(dim=2)[..., None, None]
    far = ((latents[:, :3] - border) ** 2).sum(dim=1)
    far = far / far.sum(dim=(1, 2), keepdim=True).clamp(min=1e-8)
    return (far.sum(dim=1) * torch.arange(latents.shape[-1], dtype=latents.dtype)).sum(dim=1)


@torch.no_grad()
def position_reliance(unet, stats, n: int = 32, seed: int = 5, timesteps=(950, 800, 600, 400), weights=None) -> dict:
    """Does the UNet hear 左边 / 右边?  ``{timestep: {...}}`` in latent cells, for held-out scenes
    on the left or the right, noised at each timestep:

    - ``"word_shift"``: how far right the predicted clean latent's shape moves when the caption says
      右边 instead of 左边 (same noisy latent): about 0 means the position word is ignored;
    - ``"latent_shift"``: how far right it is for pictures whose shape *is* on the right than for those
      on the left (the caption naming no position): what the noisy latent itself gives away.

    The true pictures' shapes are ``"true_shift"`` apart (about 6 cells)."""
    scene_list = [s for s in W.sample_scenes(8 * n, seed=seed) if s.position != "中间"][:n]
    x0 = _held_out_latents(scene_list, stats, seed)
    right = torch.tensor([s.position == "右边" for s in scene_list])
    base = [f"{s.background}背景上的一个{s.size}{s.colour}{s.shape}" for s in scene_list]
    caps = {"none": base, "左边": [b + "，在左边" for b in base], "右边": [b + "，在右边" for b in base]}
    index, hidden, pooled = _encoded([c for cs in caps.values() for c in cs], weights)
    true_x = _centroid_x(x0)
    out = {"true_shift": round(float(true_x[right].mean() - true_x[~right].mean()), 2)}
    for t in timesteps:
        noisy, a = _noised(x0, t, seed + t)
        xs = {}
        for kind, cs in caps.items():
            rows = [index[c] for c in cs]
            xs[kind] = _centroid_x(_clean_prediction(unet, noisy, a, t, hidden[rows], pooled[rows]))
        out[t] = {"word_shift": round(float((xs["右边"] - xs["左边"]).mean()), 2),
                  "latent_shift": round(float(xs["none"][right].mean() - xs["none"][~right].mean()), 2)}
    return out


@torch.no_grad()
def attention_by_token(unet, prompter, caption: str, timestep: int = 900, seed: int = 0, size: int = 16) -> dict:
    """Where the UNet's cross-attention looks while it reads ``caption``: the attention mass on each
    of the caption's tokens, averaged over every cross-attention layer, head and latent cell, for a
    pure-noise latent at ``timestep`` (where the layout is still to be decided).

    Returns ``{"tokens": [(token, mass), ...], "padding": mass, "padded": n}``, ``n`` the number of
    padding tokens: the Kolors prompter pads every
    caption to ``prompter.max_length`` tokens (Kolors 256, tiny 48), and the padding's states are
    the same whatever the caption says, so attention spent there reads nothing.  Uniform
    attention would give each token ``1 / max_length`` (0.004 of 256, 0.02 of 48).
    """
    caught = {}

    def keep(name):
        def hook(module, args, out):
            caught[name] = out
        return hook

    layers = {n[: -len(".attn2")]: m for n, m in unet.named_modules() if n.endswith("attn2")}
    handles = [m.to_q.register_forward_hook(keep((n, "q"))) for n, m in layers.items()]
    handles += [m.to_k.register_forward_hook(keep((n, "k"))) for n, m in layers.items()]
    try:
        tok = prompter.tokenizer(prompter.process_prompt(caption, positive=True), padding="max_length",
                                 max_length=padded_length(prompter), truncation=True)
        add_emb, emb = prompter.encode_prompt(caption, clip_skip=1, clip_skip_2=2, positive=True, device="cpu")
        noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
        side = size * 8
        dtype = next(unet.parameters()).dtype
        unet(noise.to(dtype), timestep=torch.tensor([timestep]), encoder_hidden_states=emb.to(dtype),
             add_text_embeds=add_emb.to(dtype), add_time_id=torch.tensor([side, side, 0, 0, side, side]))
    finally:
        for h in handles:
            h.remove()
    mass = torch.zeros(len(tok["input_ids"]))
    for name, layer in layers.items():
        heads, dim = layer.num_heads, layer.head_dim
        q = caught[(name, "q")].float().view(1, -1, heads, dim).transpose(1, 2)
        k = caught[(name, "k")].float().view(1, -1, heads, dim).transpose(1, 2)
        mass += torch.softmax(q @ k.transpose(-1, -2) / dim ** 0.5, dim=-1).mean(dim=(0, 1, 2))
    mass /= len(layers)
    words = prompter.tokenizer.convert_ids_to_tokens(tok["input_ids"])
    real = [i for i, m in enumerate(tok["attention_mask"]) if m]
    return {"tokens": [(words[i], round(float(mass[i]), 4)) for i in real],
            "padding": round(float(mass.sum() - mass[real].sum()), 4), "padded": len(words) - len(real)}


@torch.no_grad()
def shape_recovery(pipe, stats, n: int = 48, seed: int = 9, timesteps=(200, 400)) -> dict:
    """Can the UNet keep a shape it can see?  Big shapes of held-out scenes, noised at each timestep;
    the pipeline's UNet predicts the clean latent (under the scene's own prompt, through the
    pipeline's prompter), the pipeline decodes it and the judge reads the shape back.
    ``"round_trip"`` is the same for the target latents themselves (what the latent space and the
    VAE's decoder keep: the ceiling).  Shares of ``n`` scenes, in [0, 1]."""
    from kolors_course.generation.diffusion import decode
    from kolors_course.world import judge as J

    scene_list = [s for s in W.sample_scenes(10 * n, seed=seed) if s.size == "大的"][:n]
    x0 = _held_out_latents(scene_list, stats, seed)
    captions = [W.prompt_for(s) for s in scene_list]
    index, hidden, pooled = _encoded(captions, prompter=pipe.prompter)
    rows = [index[c] for c in captions]

    def shapes_kept(latents):
        return sum(J.judge(decode(pipe, latents[i:i + 1]), with_style=False).shape == s.shape
                   for i, s in enumerate(scene_list)) / len(scene_list)

    out = {"round_trip": round(shapes_kept(x0), 3)}
    for t in timesteps:
        noisy, a = _noised(x0, t, seed + t)
        out[t] = round(shapes_kept(_clean_prediction(pipe.unet, noisy, a, t, hidden[rows], pooled[rows])), 3)
    return out
