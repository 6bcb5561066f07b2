"""Training the tiny Kolors-variant UNet from scratch on the world's latents and captions.

The loop of diffusers' ``train_text_to_image.py``, on a CPU and with everything cached:
- latents: every picture encoded once by the (frozen, trained) VAE encoder;
- text: every distinct caption encoded once by the frozen tiny ChatGLM through the
  pipeline's own ``KolorsPrompter`` (the same call the pipeline makes at generation time);
  or, with ``CaptionEncoder``, tokenised once and encoded at every step by a text encoder whose
  transformer layers train with the UNet (``UNetConfig.train_text_encoder``);
- noise and timesteps from the pipeline's own scheduler (DiffSynth's ``EnhancedDDIMScheduler``
  as the Kolors pipeline builds it, 1,100 training timesteps), epsilon target;
- min-SNR loss weighting (Hang et al. 2023): easy, low-noise timesteps stop dominating;
- AdamW with warm-up and cosine decay, gradient clipping, and an EMA of the weights,
  which is what gets shipped (it samples more cleanly than the last raw weights).

Each sample of a batch draws its own timestep (the training loop of ``kolors_course.lora``
draws one per batch; per-sample is what the diffusers examples do and trains faster).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from kolors_course.models.pipeline import padded_length


@dataclass
class UNetConfig:
    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    adam_betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0
    snr_gamma: float | None = 5.0     # min-SNR weighting; None: plain MSE
    # Up-weight the noisiest timesteps (SNR < 1) by min(1/SNR, cap), i.e. the loss on the
    # predicted clean latent there.  In this simple world the noisy latent gives the picture
    # away at all but the very first sampling steps (SNR < 0.01), so with a plain epsilon loss
    # the text changes the loss by ~0.1% and the UNet learns to ignore it; None: off.
    x0_weight_cap: float | None = None
    # Draw this share of each batch's timesteps from the top of the schedule (t >= high_t_start x
    # 1,100), where the text decides the picture; the rest uniformly, as usual.
    high_t_fraction: float = 0.0
    high_t_start: float = 0.6
    # The noisy-step weighting above (``x0_weight_cap`` and ``high_t_fraction``) only for the steps from
    # ``noisy_weight_from`` up to (not including) ``noisy_weight_until`` (None: to the end), plain
    # min-SNR for the others.  The weighting teaches the colours, which are chosen at the noisiest
    # steps, but drowns the shape word, which is read further down the schedule (docs/tiny_world_log.md, "The shape
    # word, probed"); a window lets one phase learn each.  Measured ("The weighting in a window of
    # steps"): the first 2,000 of 4,000 steps gave the best colours yet, not the shapes; not in the recipe.
    noisy_weight_from: int = 0
    noisy_weight_until: int | None = None
    # Offset noise (Guttenberg 2023): each sample's noise gets a per-channel constant of this
    # standard deviation added.  The world's pictures are mostly flat colour, so the mean of a
    # noisy latent gives the colours away down to the noisiest timesteps and a UNet trained on
    # plain noise learns to read them from there and ignore the text; with the offset, the mean
    # is unreliable and the colours must come from the caption.  Training only: the pipeline
    # samples from plain Gaussian noise as ever.
    offset_noise: float = 0.0
    # Weight of the shape's latent cells in the loss: a cell's squared error counts
    # 1 + shape_weight x (the share of the cell the shape covers), normalised per picture.  A shape
    # covers 4-11% of a picture, so with a plain mean the background decides the loss and the
    # UNet learns backgrounds, leaving the shape a faint smudge whose colour does not follow the
    # words; needs ``cell_weights`` (0: plain mean).
    shape_weight: float = 0.0
    # Train the text encoder's transformer layers with the UNet (its word embeddings stay frozen).
    # A random causal layer leaves the token "圆形" knowing little of the colour word before it,
    # so the UNet cannot tell the shape's colour from the background's (it learns backgrounds,
    # which have their own word "背景", and smears the shape colour); a trained layer can carry
    # each colour to its noun.  Needs a ``CaptionEncoder``; the learning rate of these layers is
    # ``text_encoder_lr`` (None: the UNet's).
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    # With ``train_text_encoder``: a caption holding words from outside the world trains the UNet but
    # sends no gradient into the text encoder (its states are detached), so the encoder is never
    # taught to flatten unknown words and the UNet alone learns to ignore them.  A LoRA's trigger word
    # is such a word, and the course's LoRA trains the UNet's attention only: it needs the word's
    # token states distinct.  Measured (docs/tiny_world_log.md, "Is the text encoder taught to flatten the trigger
    # word?"): the encoder flattened the word further without them, so not in the recipe.  Needs
    # ``outside_rows``.
    text_encoder_world_only: bool = False
    # Share of samples whose pooled embedding (the last token's state, which the UNet adds to its
    # time embedding) is the empty caption's, their token states kept.  A text encoder that trains
    # with the UNet learns to sum the whole caption up in that one vector, and the UNet then reads
    # colours and backgrounds from it and not through cross-attention: a LoRA on the attention
    # layers (the course's) can then hardly change the picture, and a word's place in the prompt
    # cannot steer where things go.  Dropping it makes the token states carry the caption too.
    # Needs ``empty_row``; 0: off.
    pooled_dropout: float = 0.0
    # A curriculum: the first this many steps train on captions naming only the shape and its place
    # (``scenes.layout_caption``), the rest on the world's captions.  A UNet learns the place word
    # in about 1,500 steps when the place is all there is to learn, and not in 4,000 when the
    # colours compete for it (docs/tiny_world_log.md, "The UNet learns the place word slowly");
    # needs ``first_rows``; 0: off.
    layout_first_steps: int = 0
    # A shape primer: the first this many steps train on pictures of one colour pair (big, in the
    # middle, flat) whose captions name the shape, the rest on the world.  With one colour pair a
    # fresh UNet draws the four shapes after 1,500 steps; measured (docs/tiny_world_log.md, "The shape word,
    # probed"): 1,000 primer steps and 2,000 on the world left no trace, even the primer's own
    # captions drew circles.  Kept so that row can be rerun; not in the recipe.  Needs ``primer``; 0: off.
    shape_first_steps: int = 0
    ema_decay: float = 0.999
    ema_start: int = 0                # step from which the EMA follows the weights
    seed: int = 0
    log_every: int = 100

    def __post_init__(self):
        # refused where the settings are made, not minutes later when the loop starts
        if self.noisy_weight_until is not None and self.noisy_weight_until <= self.noisy_weight_from:
            raise ValueError(f"UNetConfig: the noisy-step weighting's window [{self.noisy_weight_from}, "
                             f"{self.noisy_weight_until}) holds no step: noisy_weight_until must be above "
                             "noisy_weight_from (or none, to the end)")
        if self.layout_first_steps and self.shape_first_steps:
            raise ValueError("UNetConfig: choose one first phase, layout_first_steps or shape_first_steps")
        if self.shape_first_steps >= self.steps > 0:
            raise ValueError(f"UNetConfig.shape_first_steps ({self.shape_first_steps}) leaves none of the "
                             f"{self.steps} steps for the world's own pictures: make it fewer "
                             "(--unet-option shape_first_steps=N, 0 turns it off)")
        if self.layout_first_steps >= self.steps > 0:
            raise ValueError(f"UNetConfig.layout_first_steps ({self.layout_first_steps}) leaves none of the "
                             f"{self.steps} steps for the world's own captions: make it fewer (the shipped "
                             "recipe: 1,500 of 8,000; --unet-option layout_first_steps=N, 0 turns it off)")


def kolors_scheduler():
    """The noise schedule the Kolors pipeline samples with, in training mode (all 1,100 steps)."""
    from diffsynth.schedulers import EnhancedDDIMScheduler

    sched = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)   # as SDXLImagePipeline for Kolors
    sched.set_timesteps(sched.num_train_timesteps, training=True)
    return sched


@torch.no_grad()
def encode_captions(prompter, captions, log=print) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Every distinct caption through the pipeline's prompter, once, and always the empty caption
    (every recipe needs it: caption dropout, pooled dropout, the ControlNet's unconditional rows).

    Returns ``(index, hidden, pooled)``: ``index[text]`` is the row of that caption in
    ``hidden`` (float16, N x tokens x dim: half the memory, and the UNet sees float32 again)
    and ``pooled`` (float32, N x dim); ``index[""]`` is the empty caption's.
    """
    distinct = sorted(set(captions) | {""})
    hidden, pooled = [], []
    t0 = time.perf_counter()
    for i, text in enumerate(distinct):
        add_emb, emb = prompter.encode_prompt(text, clip_skip=1, clip_skip_2=2, positive=True, device="cpu")
        hidden.append(emb[0].to(torch.float16))
        pooled.append(add_emb[0].float())
        if log and i and i % 2000 == 0:
            log(f"encoded {i}/{len(distinct)} captions ({time.perf_counter() - t0:.0f} s)")
    return {t: i for i, t in enumerate(distinct)}, torch.stack(hidden), torch.stack(pooled)


class CaptionEncoder:
    """Captions tokenised once, encoded at each step by ``prompter.text_encoder`` with gradients:
    what ``encode_captions`` returns, but for a text encoder that is training.

    Exactly the prompter's own call (``KolorsPrompter.encode_prompt``: its prompt processing,
    padded on the left to the prompter's ``max_length`` tokens (Kolors: 256), the penultimate
    hidden state and the last token of the last),
    batched; ``index[text]`` is a caption's row, ``index[""]`` the empty caption's (always there,
    as in ``encode_captions``).  ``trainable`` are the parameters that train:
    every one but the two 65,024-row tables (input embeddings, unused output layer).
    """

    def __init__(self, prompter, captions):
        distinct = sorted(set(captions) | {""})
        self.captions = distinct                  # row i's caption
        self.index = {t: i for i, t in enumerate(distinct)}
        self.text_encoder = prompter.text_encoder
        self.max_length = padded_length(prompter)
        tok = prompter.tokenizer([prompter.process_prompt(t, positive=True) for t in distinct], padding="max_length",
                                 max_length=self.max_length, truncation=True, return_tensors="pt")
        self.tokens = {k: tok[k] for k in ("input_ids", "attention_mask", "position_ids")}
        self.trainable = {n: p for n, p in self.text_encoder.named_parameters()
                          if not n.startswith(("embedding.", "output_layer."))}
        for n, p in self.text_encoder.named_parameters():
            p.requires_grad_(n in self.trainable)

    def __call__(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, pooled)`` of caption rows ``rows``: B x max_length x dim and B x dim, float32."""
        rows = torch.as_tensor(rows)
        out = self.text_encoder(**{k: v[rows] for k, v in self.tokens.items()}, output_hidden_states=True)
        return out.hidden_states[-2].permute(1, 0, 2), out.hidden_states[-1][-1]

    def state(self) -> dict:
        """The trainable tensors (what a build writes with ``write_text_encoder_layers``)."""
        return {n: p.detach().clone() for n, p in self.trainable.items()}


def _lr(step: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / max(cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """Exponential moving average of a model's parameters, with diffusers' warm-up of the
    decay (``min(decay, (1 + n) / (10 + n))``) so early averages do not keep the random init."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:               # a frozen one equals its average
                e.mul_(d).add_(p.detach(), alpha=1 - d)


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float | None, x0_cap: float | None = None) -> torch.Tensor:
    """min(SNR, gamma) / SNR for the epsilon target (1 everywhere when gamma is None), and,
    with ``x0_cap``, min(1 / SNR, x0_cap) where SNR < 1 (see ``UNetConfig.x0_weight_cap``)."""
    snr = alpha_bar / (1 - alpha_bar)
    w = torch.ones_like(alpha_bar) if gamma is None else torch.clamp(snr, max=gamma) / snr
    if x0_cap is not None:
        w = torch.where(snr < 1, torch.clamp(1 / snr, max=x0_cap), w)
    return w


def cell_weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean squared error, each latent cell counted by ``weights`` (N x 1 x h x w, the
    weights of a picture summing to its number of cells, so the loss keeps the plain mean's scale)."""
    err = (pred - target) ** 2
    if weights is None:
        return err.mean(dim=(1, 2, 3))
    weights = weights * (weights[0].numel() / weights.sum(dim=(1, 2, 3), keepdim=True))
    return (err * weights).mean(dim=(1, 2, 3))


def noisy_batch(x0: torch.Tensor, cfg, scheduler, gen: torch.Generator):
    """Noise, timesteps, noisy latents and the epsilon target for one batch, by the recipe in
    ``cfg`` (offset noise, the share of timesteps from the top of the schedule); shared by the
    UNet's and the ControlNet's loops.  Returns ``(noisy, target, t)``."""
    b = x0.shape[0]
    timesteps = scheduler.timesteps
    noise = torch.randn(x0.shape, generator=gen)
    if cfg.offset_noise:
        noise = noise + cfg.offset_noise * torch.randn(b, x0.shape[1], 1, 1, generator=gen)
    pick = torch.randint(0, len(timesteps), (b,), generator=gen)
    if cfg.high_t_fraction:
        # scheduler.timesteps runs from the noisiest down, so the top of the schedule is its head
        high = torch.randint(0, max(1, int(len(timesteps) * (1 - cfg.high_t_start))), (b,), generator=gen)
        pick = torch.where(torch.rand(b, generator=gen) < cfg.high_t_fraction, high, pick)
    t = timesteps[pick]
    # the scheduler's own add_noise / training_target, one sample (one timestep) at a time
    noisy = torch.cat([scheduler.add_noise(x0[i:i + 1], noise[i:i + 1], t[i]) for i in range(b)])
    target = torch.cat([scheduler.training_target(x0[i:i + 1], noise[i:i + 1], t[i]) for i in range(b)])
    return noisy, target, t


@dataclass
class Primer:
    """The pictures of ``UNetConfig.shape_first_steps``: N x 4 x h x w latents, each picture's caption
    rows (in the same ``hidden`` / ``pooled`` or ``CaptionEncoder`` as the world's) and its cells'
    shape coverage (for ``shape_weight``; may be None without it)."""
    latents: torch.Tensor
    caption_rows: list
    cell_weights: torch.Tensor | None = None


def train_unet(unet, latents: torch.Tensor, caption_rows: list[list[int]], hidden: torch.Tensor,
               pooled: torch.Tensor, cfg: UNetConfig, scheduler=None, log=print, callback=None,
               cell_weights: torch.Tensor | None = None, text: CaptionEncoder | None = None,
               empty_row: int | None = None, first_rows: list[list[int]] | None = None,
               primer: Primer | None = None, outside_rows: torch.Tensor | None = None) -> dict:
    """Train ``unet`` in place; returns the EMA model and the loss history.

    ``callback(steps_done, unet)``, if given, runs after every step (notebook 06 samples from it);
    the UNet is put back in training mode after it.

    ``latents``: N x 4 x h x w (standardised); ``caption_rows[i]``: the rows of ``hidden`` /
    ``pooled`` holding the captions of picture ``i`` (one is drawn per step); ``cell_weights``:
    N x 1 x h x w, the share of each latent cell the picture's shape covers (``cfg.shape_weight``).
    With ``cfg.train_text_encoder``, ``text`` (a ``CaptionEncoder``) encodes the rows at every step and
    its layers train too (``hidden`` and ``pooled`` are then unused, and may be None); the result
    then also holds ``"text_encoder"``, the EMA of its trained tensors.  ``empty_row``: the row of the
    empty caption (for ``cfg.pooled_dropout``).  ``first_rows[i]``: the rows of picture ``i``'s
    layout captions, drawn from instead of ``caption_rows`` for the first ``cfg.layout_first_steps``.
    ``primer``: the pictures (latents, caption rows, cell weights) the first ``cfg.shape_first_steps``
    draw from instead of the world's.  ``outside_rows``: one flag per caption row of ``text``, set where
    the caption holds a word from outside the world (for ``cfg.text_encoder_world_only``).
    """
    if cfg.layout_first_steps and first_rows is None:
        raise ValueError("UNetConfig.layout_first_steps needs first_rows: the rows of each picture's layout captions")
    if cfg.shape_first_steps and primer is None:
        raise ValueError("UNetConfig.shape_first_steps needs primer: the primer's latents, caption rows and cell weights")
    if cfg.text_encoder_world_only and (text is None or outside_rows is None):
        raise ValueError("UNetConfig.text_encoder_world_only needs train_text_encoder, a CaptionEncoder and "
                         "outside_rows: a flag per caption row, set where it holds a word from outside the world")
    if cfg.pooled_dropout and empty_row is None:
        raise ValueError("UNetConfig.pooled_dropout needs empty_row: the row of the empty caption")
    if cfg.shape_weight and cell_weights is None:
        raise ValueError("UNetConfig.shape_weight needs cell_weights: the shape's share of each latent cell")
    if cfg.train_text_encoder and text is None:
        raise ValueError("UNetConfig.train_text_encoder needs text=CaptionEncoder(prompter, captions)")
    if text is not None and not cfg.train_text_encoder:
        raise ValueError("a CaptionEncoder was given but UNetConfig.train_text_encoder is off: pass the cached "
                         "hidden and pooled embeddings instead (encode_captions)")
    scheduler = scheduler or kolors_scheduler()
    gen = torch.Generator().manual_seed(cfg.seed)
    groups = [{"params": list(unet.parameters())}]
    if text is not None:
        groups.append({"params": list(text.trainable.values()), "lr": cfg.text_encoder_lr or cfg.learning_rate})
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, cfg))
    trained = [p for g in groups for p in g["params"]]
    ema = EMA(unet, cfg.ema_decay)
    ema_text = EMA(text.text_encoder, cfg.ema_decay) if text is not None else None
    alphas = torch.tensor(scheduler.alphas_cumprod)
    _, _, h, w = latents.shape
    side = h * 8
    add_time_id = torch.tensor([side, w * 8, 0, 0, side, w * 8]).repeat(cfg.batch_size)
    plain = replace(cfg, x0_weight_cap=None, high_t_fraction=0.0)    # outside the noisy-weight window
    outside_rows = None if outside_rows is None else torch.as_tensor(outside_rows)
    unet.train()
    if text is not None:
        text.text_encoder.train()
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        in_window = cfg.noisy_weight_from <= step and (cfg.noisy_weight_until is None or step < cfg.noisy_weight_until)
        weighting = cfg if in_window else plain
        pictures, source, weights = latents, caption_rows, cell_weights
        if step < cfg.layout_first_steps:
            source = first_rows
        elif step < cfg.shape_first_steps:
            pictures, source, weights = primer.latents, primer.caption_rows, primer.cell_weights
        idx = torch.randint(0, len(pictures), (cfg.batch_size,), generator=gen)
        rows = [source[i][int(torch.randint(0, len(source[i]), (1,), generator=gen))] for i in idx.tolist()]
        x0 = pictures[idx]
        noisy, target, t = noisy_batch(x0, weighting, scheduler, gen)
        if text is not None:
            # the empty caption rides along in the same call, so its pooled vector is this step's
            enc_hidden, enc_pooled = text(rows + [empty_row] if cfg.pooled_dropout else rows)
            batch_hidden, batch_pooled, empty_pooled = enc_hidden[:len(rows)], enc_pooled[:len(rows)], \
                enc_pooled[len(rows):]
            if cfg.text_encoder_world_only:
                # the same values; only the gradient into the encoder is cut for those captions
                outside = outside_rows[torch.as_tensor(rows)]
                batch_hidden = torch.where(outside[:, None, None], batch_hidden.detach(), batch_hidden)
                batch_pooled = torch.where(outside[:, None], batch_pooled.detach(), batch_pooled)
        else:
            batch_hidden, batch_pooled = hidden[rows].float(), pooled[rows]
            empty_pooled = pooled[empty_row:empty_row + 1] if cfg.pooled_dropout else None
        if cfg.pooled_dropout:
            drop = torch.rand(len(rows), 1, generator=gen) < cfg.pooled_dropout
            batch_pooled = torch.where(drop, empty_pooled.expand_as(batch_pooled), batch_pooled)
        pred = unet(noisy, timestep=t, encoder_hidden_states=batch_hidden,
                    add_text_embeds=batch_pooled, add_time_id=add_time_id)
        per_sample = cell_weighted_mse(pred.float(), target, None if not cfg.shape_weight else
                                       1.0 + cfg.shape_weight * weights[idx])
        weight = min_snr_weight(alphas[t.long()], cfg.snr_gamma, weighting.x0_weight_cap)
        loss = (per_sample * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
        opt.step()
        sched.step()
        if step >= cfg.ema_start:
            ema.update(unet)
            if ema_text is not None:
                ema_text.update(text.text_encoder)
        losses.append(per_sample.mean().item())
        if callback is not None:
            callback(step + 1, unet)
            unet.train()
        if log and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            log(f"unet step {step:5d}/{cfg.steps}  loss {recent:.4f} (mean of last {min(len(losses), cfg.log_every)})  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.0f} s")
    unet.eval()
    out = {"ema": ema.model, "losses": losses, "seconds": time.perf_counter() - t0, "config": asdict(cfg)}
    if text is not None:
        text.text_encoder.eval()
        out["text_encoder"] = {n: p.detach().clone() for n, p in ema_text.model.named_parameters() if n in text.trainable}
    return out
