"""Memory: the pre-flight estimate and advice, the peak-memory counter, and where each model
sits while the loop runs (only the UNet stays on the GPU)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from kolors_course.lora.config import TrainConfig


def is_cuda(device) -> bool:
    """True for "cuda", "cuda:1" ...; a process of a multi-CPU run has device "cpu:0"."""
    return torch.device(device).type == "cuda"


def device_is_gpu(pipe) -> bool:
    return is_cuda(pipe.device)


def estimate_gpu_memory_gb(cfg: TrainConfig, unet_params: float = 2.58e9) -> float:
    """A rough estimate of training memory for the Kolors UNet (text encoder offloaded).

    fp16 UNet weights, LoRA weights with AdamW state, and activations that grow
    with batch x resolution^2 (about 4x smaller with gradient checkpointing).
    Measured figures are in the README; this is for the pre-flight check only.
    """
    weights = unet_params * 2 / 1e9
    act_per_image_1024 = 3.0 if cfg.gradient_checkpointing else 14.0
    # with preserve_weight the captions without the trigger word ride in the same pass: twice the batch
    rows = cfg.batch_size * (2 if cfg.preserve_weight else 1)
    acts = act_per_image_1024 * rows * (cfg.resolution / 1024) ** 2
    lora = 0.3 * cfg.rank / 16
    return weights + acts + lora + 1.0


def preflight(cfg: TrainConfig, device: str) -> list[str]:
    """Compare free GPU memory with what the settings need; return advice (empty: fits)."""
    if not is_cuda(device):
        return []
    need = estimate_gpu_memory_gb(cfg)
    free = torch.cuda.mem_get_info()[0] / 1e9
    if need <= free * 0.95:
        return []
    advice = [f"These settings need about {need:.1f} GB of GPU memory and {free:.1f} GB is free."]
    if not cfg.gradient_checkpointing:
        advice.append("Set gradient_checkpointing=True (about 4x less activation memory, ~30% slower).")
    if cfg.batch_size > 1:
        advice.append(f"Use batch_size=1 with grad_accum={cfg.batch_size * cfg.grad_accum} (same effective batch).")
    if cfg.preserve_weight:
        advice.append("preserve_weight doubles the batch the UNet trains on each step; preserve_weight=0 halves "
                      "that activation memory (the LoRA's look may then leak into prompts without the trigger word).")
    if cfg.resolution > 768:
        advice.append("Lower the resolution (768 needs about 0.56x the activation memory of 1024).")
    if not cfg.use_8bit_adam:
        advice.append("use_8bit_adam=True (needs bitsandbytes) shrinks the optimizer state.")
    advice.append("Restart the kernel to free memory held by earlier cells (pipelines from notebook 01).")
    return advice


class PeakMemory:
    """Peak memory of the run in GB (10^9 bytes): GPU allocations on CUDA, resident size on a CPU.

    The GPU counter is not reset while models are loaded or prompts encoded, so the
    peak counts everything the card had to hold; ``phase()`` also reports the peak
    of a part (the training loop) on its own.
    """

    def __init__(self, device: str):
        self.cuda = is_cuda(device)
        self.overall = 0.0

    def now_peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 1e9
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9   # ru_maxrss is KiB

    @contextmanager
    def phase(self, out: dict, name: str):
        self.overall = max(self.overall, self.now_peak())
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            out[name] = self.now_peak()
            self.overall = max(self.overall, out[name])


def training_placement(pipe, cfg: TrainConfig) -> None:
    """Only what the loop needs stays on the GPU: the UNet (and the VAE encoder without cached latents)."""
    keep = ["unet"] + ([] if cfg.cache_latents else ["vae_encoder"])
    if pipe.cpu_offload:
        pipe.models_to_device(keep)
        return
    pipe.text_encoder_kolors.to("cpu")
    if cfg.cache_latents:
        pipe.vae_encoder.to("cpu")


def undo_training_placement(pipe, cfg: TrainConfig) -> None:
    """Put back what ``training_placement`` took off the GPU (the offload mode moves its models
    itself at every call, so there is nothing to undo there)."""
    if not pipe.cpu_offload:
        pipe.models_to_device(["text_encoder_kolors"] + (["vae_encoder"] if cfg.cache_latents else []))
