"""LoRA fine-tuning of the Kolors UNet with peft and accelerate: ``train_lora``.

The loop reads top to bottom in the shape of the diffusers training examples; each step
is a function of its own module: settings (``config``), data preparation (``data``), the
adapters (``adapters``), the loss (``losses``), checkpoints and resume
(``checkpoints``), validation and export (``validation``), memory (``memory``), the
teaching plots (``lessons``).  The same loop trains the tiny profile on a CPU and the
kolors profile on a GPU.

What the original course trainer got wrong, and what this one does instead: the run
folder is named by you (no ``version_N`` guessing); checkpoints are written atomically
and resumed exactly; files are safetensors, in a layout DiffSynth reads and in the kohya
layout ComfyUI and diffusers read, with alpha stored so inference uses the training
scale; the text encoder and VAE are used once up front and then leave the GPU, which is
what brings memory down.
"""
from __future__ import annotations

import copy
import math
import os
import time

import torch

from kolors_course.core.progress import progress
from kolors_course.core.paths import project_path, relative_to_root
from kolors_course.core.profiles import Profile
from kolors_course.lora.adapters import add_lora, all_finite, check_targets, make_optimizer, remove_lora
from kolors_course.lora.checkpoints import (FRESH_RUN, RunState, check_resumable, close_run, load_checkpoint, open_run,
                                            read_checkpoint, save_checkpoint, write_json)
from kolors_course.lora.config import TrainConfig, TrainingError, TrainResult, config_record, resolve_precision
from kolors_course.lora.data import SampleStream, check_data, dataset_fingerprint, prepare_data
from kolors_course.lora.losses import batch_loss, fixed_set_loss
from kolors_course.lora.memory import PeakMemory, is_cuda, preflight, training_placement, undo_training_placement
from kolors_course.lora.validation import finish_run, lora_file_metadata, validation_images


def train_lora(profile: Profile, dataset_dir: str | os.PathLike, run_dir: str | os.PathLike,
               cfg: TrainConfig | None = None, resume: str | bool = "auto", overwrite: bool = False,
               callback=None, pipe=None, reuse_finished: bool = False) -> TrainResult:
    """Train a LoRA on ``dataset_dir`` (built by notebook 02) into ``run_dir``.

    ``resume``: "auto" continues from the latest checkpoint if there is one,
    True requires one, False refuses to touch a folder with checkpoints.
    ``overwrite=True`` trains afresh beside the old run and replaces it only once
    the new one is complete.  ``reuse_finished=True`` returns a finished run with
    the same settings as it is (a notebook run again from the top does not train
    twice); otherwise a finished run is refused.  ``callback(step, loss)`` is
    called after every step.  ``pipe``: a pipeline loaded already; it is handed back
    as it came (no adapters, no prompt pins, its models where they were, the UNet's
    train/eval mode and trainable flags as before), on error too, so the same pipeline
    can go on to ``kc.lora_at`` or ``kc.generate``.
    """
    from kolors_course.data.training_set import read_training_set
    from kolors_course.models.loading import load_pipeline

    # 1. settings, data and the run folder: refused early, before any model loads
    cfg = cfg or TrainConfig.for_profile(profile)
    cfg.validate()
    rows = read_training_set(dataset_dir)
    dataset = dataset_fingerprint(rows)
    run = open_run(project_path(run_dir), cfg, rows, resume=resume, overwrite=overwrite,
                   reuse_finished=reuse_finished)
    if run.finished is not None:
        return run.finished
    saved = read_checkpoint(run.checkpoint) if run.checkpoint else None
    if saved is not None:
        check_resumable(run.checkpoint, saved, cfg, dataset)
    run.folder.mkdir(parents=True, exist_ok=True)

    # 2. accelerate, then the models (under `accelerate launch` it picks this process's GPU)
    accelerator, precision = make_accelerator(profile, cfg)
    main = accelerator.is_main_process
    if pipe is None and is_cuda(accelerator.device):
        torch.cuda.reset_peak_memory_stats()    # the peak counts the models' load
    handed_back = _PipelineState(pipe) if pipe is not None else None
    pipe = pipe or load_pipeline(profile, device=str(accelerator.device))
    device = str(pipe.device)
    check_targets(pipe.unet, pipe.unet_config_path, cfg)
    memory, peaks = PeakMemory(device), {}
    if main:
        for line in preflight(cfg, device):
            print("memory: " + line)
        # written after the resume check: it records the settings this run really uses
        write_json(run.folder / "train_config.json", dict(
            config_record(cfg), profile=profile.name, dataset=relative_to_root(project_path(dataset_dir)),
            dataset_fingerprint=dataset, precision_used=precision, n_images=len(rows),
            processes=accelerator.num_processes))

    try:
        # 3. captions and images encoded once; then only the UNet stays on the GPU
        data = prepare_data(pipe, rows, cfg, device, pipe.torch_dtype)
        check_data(data, cfg, accelerator.num_processes)
        if is_cuda(device):
            training_placement(pipe, cfg)
            torch.cuda.empty_cache()

        # 4. adapters, optimizer, learning-rate schedule, noise schedule, random numbers
        unet = pipe.unet
        params = add_lora(unet, cfg)
        optimizer = make_optimizer(params, cfg)
        lr_schedule = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                    num_training_steps=cfg.max_steps)
        unet_t, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
        # training draws timesteps from its own copy of the noise schedule: a validation
        # image calls the pipeline, which sets pipe.scheduler to the few inference timesteps
        noise_schedule = copy.deepcopy(pipe.scheduler)
        noise_schedule.set_timesteps(noise_schedule.num_train_timesteps, training=True)
        gen = torch.Generator().manual_seed(cfg.seed)
        stream = SampleStream(len(data), cfg.seed)

        # 5. where the run is: a checkpoint's step, or step 0 with the fixed-set loss before
        if saved is not None:
            state = load_checkpoint(run.checkpoint, saved, unet, optimizer, lr_schedule, gen, stream)
            print(f"resuming from {relative_to_root(run.checkpoint)} (step {state.step} of {cfg.max_steps})")
        else:
            before = fixed_set_loss(unet, data, pipe, noise_schedule, cfg)
            state = RunState(fixed_loss_before=before, fixed_losses=[(0, before)])
        meta = lora_file_metadata(cfg, profile)

        # 6. the loop (a fresh run with validation rounds first shows the base model's pictures:
        # the adapters start at zero, so step 0 is the UNet as it was)
        samples, start_step, t0 = [], state.step, time.perf_counter()
        if main and cfg.validate_every and state.step == 0:
            samples.append((0, validation_images(pipe, unet, cfg, run.folder, 0)))
        bar = progress(total=cfg.max_steps, initial=state.step, desc="training LoRA")
        unet.train()
        try:
            with memory.phase(peaks, "training_loop"):
                while state.step < cfg.max_steps:
                    micro = []
                    for _ in range(cfg.grad_accum):
                        with accelerator.accumulate(unet_t):
                            loss = batch_loss(unet_t, data, stream.next(cfg.batch_size * accelerator.num_processes),
                                              cfg, pipe, noise_schedule, gen, accelerator)
                            accelerator.backward(loss)
                            if accelerator.sync_gradients and cfg.max_grad_norm:
                                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                            optimizer.step()
                            lr_schedule.step()
                            optimizer.zero_grad(set_to_none=True)
                        micro.append(float(accelerator.reduce(loss.detach(), "mean")))   # the global batch's loss
                    state.step += 1
                    value = sum(micro) / len(micro)      # the step's loss: the mean over its micro-batches
                    check_finite(value, params, state.step, cfg)
                    state.losses.append(value)
                    # the loss goes into the bar's next refresh: set_postfix's own refresh would
                    # print a headless bar at every step, past its 30-second interval
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                    bar.update(1)
                    if callback is not None:
                        callback(state.step, value)
                    if main and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps):
                        state.fixed_losses.append((state.step, checked_fixed_loss(
                            unet, data, pipe, noise_schedule, cfg, state.step)))
                        save_checkpoint(run.folder, state, unet, optimizer, lr_schedule, gen, stream, cfg, meta,
                                        dataset)
                    if (main and cfg.validate_every and state.step % cfg.validate_every == 0
                            and state.step < cfg.max_steps):
                        samples.append((state.step, validation_images(pipe, unet, cfg, run.folder, state.step)))
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        accelerator.wait_for_everyone()

        # 7. the fixed-set loss after, the last validation images, the export
        with memory.phase(peaks, "export"):
            # the last checkpoint measured these very weights
            eval_after = (state.fixed_losses[-1][1] if main and state.fixed_losses
                          and state.fixed_losses[-1][0] == state.step
                          else fixed_set_loss(unet, data, pipe, noise_schedule, cfg))
            files = {}
            if main:
                samples.append((state.step, validation_images(pipe, unet, cfg, run.folder, state.step)))
                files = finish_run(run.folder, unet, cfg, profile, state.losses, pipe, meta,
                                   fixed_losses=state.fixed_losses)
    finally:
        pipe.unpin_prompts()
        if handed_back is not None:
            handed_back.restore(accelerator, cfg)
    samples = [(step, images) for step, images in samples if images]
    res = TrainResult(run.final, state.step, state.losses, files, seconds,
                      seconds / max(state.step - start_step, 1), memory.overall, state.resumed_from, samples,
                      state.fixed_loss_before, eval_after, peak_training_gb=peaks["training_loop"],
                      fixed_losses=list(state.fixed_losses))
    if main:
        res.files = close_run(run, res, memory, peaks)
    return res


class _PipelineState:
    """What training changes on a pipeline it was given, noted before and put back after (the
    guide's "no state left behind"): the adapters peft adds to the UNet, the forward accelerate
    wraps for mixed precision, the UNet's mode and trainable flags, and the models
    ``training_placement`` took off the GPU."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.training = pipe.unet.training
        self.trainable = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}

    def restore(self, accelerator, cfg: TrainConfig) -> None:
        unet = accelerator.unwrap_model(self.pipe.unet, keep_fp32_wrapper=False)
        remove_lora(unet)
        unet.train(self.training)
        for n, p in unet.named_parameters():
            p.requires_grad_(self.trainable.get(n, False))
        if is_cuda(self.pipe.device):
            undo_training_placement(self.pipe, cfg)


def make_accelerator(profile: Profile, cfg: TrainConfig):
    """accelerate's ``Accelerator`` for the run's precision and accumulation, and the precision used."""
    from accelerate import Accelerator

    cpu = profile.device == "cpu" or not torch.cuda.is_available()
    precision = resolve_precision(cfg.precision, "cpu" if cpu else "cuda")
    mp = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[precision]
    return Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=cpu), precision


def get_scheduler(name: str, optimizer, num_warmup_steps: int, num_training_steps: int):
    """The learning-rate schedule (diffusers' schedules, as its training examples use them)."""
    from diffusers.optimization import get_scheduler as diffusers_schedule

    return diffusers_schedule(name, optimizer, num_warmup_steps=num_warmup_steps,
                              num_training_steps=num_training_steps)


def check_finite(value: float, params, step: int, cfg: TrainConfig) -> None:
    """Stop at the first NaN or infinite loss or weight, before it reaches a checkpoint."""
    if not math.isfinite(value) or not all_finite(params):
        raise TrainingError(
            f"the loss became {value} at step {step} (or the weights NaN/infinite): training "
            f"diverged. Lower learning_rate (now {cfg.learning_rate}), e.g. to "
            f"{cfg.learning_rate / 10:g}, and start afresh ({FRESH_RUN}, or another run_name). "
            "Nothing was exported; the checkpoints kept hold finite weights from before.")


def checked_fixed_loss(unet, data, pipe, noise_schedule, cfg: TrainConfig, step: int) -> float:
    """The loss on the fixed set at a checkpoint: the loss curve's steady line, and the check that
    the weights are good (finite weights can still be blown up, 1e30: they count as good only if
    they give a finite loss there).  It has its own random numbers, so a resume stays exact."""
    probe = fixed_set_loss(unet, data, pipe, noise_schedule, cfg)
    if not math.isfinite(probe):
        raise TrainingError(
            f"the weights after step {step} give a loss of {probe} on a fixed probe: "
            f"training diverged. Lower learning_rate (now {cfg.learning_rate}), e.g. to "
            f"{cfg.learning_rate / 10:g}, and start afresh ({FRESH_RUN}, or another run_name). "
            "Nothing was exported; the checkpoints kept are from before.")
    return probe
