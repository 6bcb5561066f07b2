"""The teaching plots and numbers of notebook 03: LoRA's parameter counts at several ranks,
the low-rank update on a small matrix, the loss curve, validation samples over time."""
from __future__ import annotations

from pathlib import Path

import torch

from kolors_course.core.profiles import ATTENTION_PROJECTIONS
from kolors_course.lora.adapters import is_lora_target


def plot_loss(losses: list, path: Path, smooth: int = 5, fixed=()):
    """The training loss step by step, its running mean, and ``fixed`` ((step, loss) pairs: the
    loss on a fixed set of noisy latents, the same every time, so it moves only with the weights)."""
    from kolors_course.core.images import new_figure

    fig = new_figure((6, 3))            # saved during training, never shown
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.4, label="loss")
    if len(losses) >= smooth:
        avg = [sum(losses[max(0, i - smooth + 1):i + 1]) / len(losses[max(0, i - smooth + 1):i + 1])
               for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), avg, label=f"mean of {smooth}")
    if fixed:
        steps, values = zip(*fixed)
        ax.plot(steps, values, "o-", color="black", label="fixed set")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def lora_parameter_counts(unet, ranks=(1, 4, 16, 64), target_modules=ATTENTION_PROJECTIONS):
    """Trainable parameters a LoRA of each rank adds, against the UNet's own size."""
    total = sum(p.numel() for p in unet.parameters())
    per_rank = 0
    for n, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and is_lora_target(n, target_modules):
            per_rank += m.in_features + m.out_features
        elif isinstance(m, torch.nn.Conv2d) and is_lora_target(n, target_modules):
            # a LoCon: a k x k down convolution to `rank` channels and a 1 x 1 up convolution back
            # (plain convolutions only: add_lora refuses grouped ones)
            kh, kw = m.kernel_size
            per_rank += m.in_channels * kh * kw + m.out_channels
    return total, {r: r * per_rank for r in ranks}


def lora_demo(d_out: int = 6, d_in: int = 8, rank: int = 2, alpha: float = 4.0, seed: int = 0) -> dict:
    """A small numeric LoRA: W' = W + (alpha / rank) * B @ A, with the sizes that make it cheap."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    A = torch.randn(rank, d_in, generator=g) * 0.1
    B = torch.randn(d_out, rank, generator=g) * 0.1
    delta = (alpha / rank) * B @ A
    return {"W": W, "A": A, "B": B, "delta": delta, "W_new": W + delta,
            "full_params": W.numel(), "lora_params": A.numel() + B.numel(),
            "rank_of_delta": int(torch.linalg.matrix_rank(delta))}


def plot_parameter_counts(total: int, counts: dict, path=None, title: str = ""):
    from kolors_course.core.images import new_figure

    fig = new_figure((6, 3), shown=True)
    ax = fig.subplots()
    ranks = list(counts)
    ax.bar([str(r) for r in ranks], [counts[r] for r in ranks], label="LoRA (trainable)")
    ax.axhline(total, color="red", linestyle="--", label=f"whole UNet: {total:,}")
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("parameters (log scale)")
    for i, r in enumerate(ranks):
        ax.text(i, counts[r], f"{100 * counts[r] / total:.2f}%", ha="center", va="bottom", fontsize=8)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def kolors_unet_parameter_counts(ranks=(1, 4, 16, 64)):
    """The real Kolors UNet's sizes, built on the meta device (no weights, no memory)."""
    from diffsynth.models.sdxl_unet import SDXLUNet

    with torch.device("meta"):
        unet = SDXLUNet(is_kolors=True)
    return lora_parameter_counts(unet, ranks)


def sample_grid_over_time(samples: list, path=None):
    """Validation images per checkpoint, one row per step."""
    from kolors_course.core.images import show_grid

    items = []
    cols = max(len(imgs) for _, imgs in samples)
    for step, imgs in samples:
        for j, im in enumerate(imgs):
            items.append((f"step {step}" + (" (base)" if step == 0 else "") + (f" #{j}" if cols > 1 else ""), im))
    return show_grid(items, cols=cols if cols > 1 else min(len(items), 6), title="validation images over training",
                     save_to=path)
