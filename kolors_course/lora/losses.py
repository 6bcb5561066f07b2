"""The losses: one global batch's denoising loss (every process draws the same random numbers
and keeps its slice), and the loss on a fixed set that shows what was learned."""
from __future__ import annotations


import torch

from kolors_course.lora.adapters import adapters_off
from kolors_course.lora.config import TrainConfig


def batch_loss(unet_t, data, global_idx, cfg, pipe, scheduler, gen, accelerator):
    """The loss of this process's share of one global batch.

    Every process draws the random numbers of the whole global batch from the same
    generator and keeps its slice, so N processes with batch_size b train exactly
    as one process with batch_size N*b (the gradients are averaged across them).
    """
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    share = len(global_idx) // world
    flips = [bool(cfg.random_flip and torch.rand((), generator=gen) < 0.5) for _ in global_idx]
    side = cfg.resolution // 8
    noise_all = torch.randn((len(global_idx), 4, side, side), generator=gen)
    if cfg.offset_noise:        # drawn only when asked, so runs without it keep their random stream
        noise_all = noise_all + cfg.offset_noise * torch.randn((len(global_idx), 4, 1, 1), generator=gen)
    tid = int(torch.randint(0, len(scheduler.timesteps), (1,), generator=gen))
    mine = slice(rank * share, (rank + 1) * share)
    latents, emb, pooled = [], [], []
    for i, flip in zip(global_idx[mine], flips[mine]):
        item = data[i]
        if "latents" in item:
            lat = item["latents"]
        else:
            with torch.no_grad():
                lat = pipe.vae_encoder(item["pixels"][None].to(device=device, dtype=pipe.torch_dtype)).float().cpu()
        latents.append(torch.flip(lat, dims=[3]) if flip else lat)
        emb.append(item["encoder_hidden_states"])
        pooled.append(item["add_text_embeds"])
    latents = torch.cat(latents).to(device)
    noise = noise_all[mine].to(device)
    timestep = scheduler.timesteps[tid].to(device)
    noisy = scheduler.add_noise(latents, noise, timestep)
    target = scheduler.training_target(latents, noise, timestep)
    emb, pooled = torch.cat(emb).to(device, pipe.torch_dtype), torch.cat(pooled).to(device, pipe.torch_dtype)
    b = latents.shape[0]
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    noisy = noisy.to(pipe.torch_dtype)
    # the samples whose caption held the trigger word (data.prepare_data encoded them without it)
    keep = [j for j, i in enumerate(global_idx[mine]) if "plain_encoder_hidden_states" in data[i]] \
        if cfg.preserve_weight else []
    if keep:
        # the captions without the trigger word ride in the same forward pass (one pass with
        # gradients: what DistributedDataParallel allows), and the base model's answer to them is
        # the UNet's own with the adapters off
        rows = [global_idx[mine][j] for j in keep]
        plain_emb = torch.cat([data[i]["plain_encoder_hidden_states"] for i in rows]).to(device, pipe.torch_dtype)
        plain_pooled = torch.cat([data[i]["plain_add_text_embeds"] for i in rows]).to(device, pipe.torch_dtype)
        again = noisy[keep]
        base = base_prediction(accelerator, unet_t, again, timestep, plain_emb, plain_pooled, h, w)
        noisy, emb, pooled = (torch.cat([noisy, again]), torch.cat([emb, plain_emb]),
                              torch.cat([pooled, plain_pooled]))
    add_time_id = torch.tensor([h, w, 0, 0, h, w], device=device).repeat(noisy.shape[0])
    with accelerator.autocast():
        pred = unet_t(noisy, timestep=timestep, encoder_hidden_states=emb, add_text_embeds=pooled,
                      add_time_id=add_time_id, use_gradient_checkpointing=cfg.gradient_checkpointing)
    loss = torch.nn.functional.mse_loss(pred[:b].float(), target.float())
    if keep:
        loss = loss + cfg.preserve_weight * preservation_loss(pred[b:], base)
    return loss * scheduler.training_weight(timestep)


@torch.no_grad()
def base_prediction(accelerator, unet_t, noisy, timestep, emb, pooled, h: int, w: int) -> torch.Tensor:
    """What the base model (the UNet with its LoRA adapters off) predicts for these captions."""
    unet = accelerator.unwrap_model(unet_t)
    add_time_id = torch.tensor([h, w, 0, 0, h, w], device=noisy.device).repeat(noisy.shape[0])
    with adapters_off(unet), accelerator.autocast():
        return unet(noisy, timestep=timestep, encoder_hidden_states=emb, add_text_embeds=pooled,
                    add_time_id=add_time_id).float()


def preservation_loss(pred: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """How far the LoRA moves the prediction for a caption without its trigger word: the look it
    brings there is a leak (``TrainConfig.preserve_weight``)."""
    return torch.nn.functional.mse_loss(pred.float(), base)


@torch.no_grad()
def fixed_set_loss(unet, data, pipe, scheduler, cfg: TrainConfig, n_items: int = 8, per_item: int = 4) -> float:
    """Mean loss on a fixed set of (latents, noise, timestep) triples.

    The training loss jumps around because every step draws new noise and a new
    timestep; this one does not, so before/after numbers show what was learned.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    device = str(pipe.device)
    was_training = unet.training
    unet.eval()
    total, count = 0.0, 0
    for item in data[:n_items]:
        lat = item["latents"] if "latents" in item else pipe.vae_encoder(
            item["pixels"][None].to(device=device, dtype=pipe.torch_dtype)).float().cpu()
        lat = lat.to(device)
        for _ in range(per_item):
            noise = torch.randn(lat.shape, generator=gen).to(device)
            tid = int(torch.randint(0, len(scheduler.timesteps), (1,), generator=gen))
            t = scheduler.timesteps[tid].to(device)
            h, w = lat.shape[2] * 8, lat.shape[3] * 8
            pred = unet(scheduler.add_noise(lat, noise, t).to(pipe.torch_dtype), timestep=t,
                        encoder_hidden_states=item["encoder_hidden_states"].to(device, pipe.torch_dtype),
                        add_text_embeds=item["add_text_embeds"].to(device, pipe.torch_dtype),
                        add_time_id=torch.tensor([h, w, 0, 0, h, w], device=device))
            total += float(torch.nn.functional.mse_loss(pred.float(), scheduler.training_target(lat, noise, t).float()))
            count += 1
    if was_training:
        unet.train()
    return total / count
