"""LoRA fine-tuning of the Kolors UNet with peft and accelerate.

One explicit function per step, in the style of the diffusers training
examples: ``prepare_data`` (captions -> text embeddings, images -> latents,
computed once with the frozen text encoder and VAE), ``add_lora`` (peft
adapters on the UNet's attention projections), ``train_lora`` (the loop,
checkpoints, validation images, export).  The same loop runs the tiny profile
on a CPU and the kolors profile on a GPU.

What the original course trainer got wrong, and what this one does instead:
the run folder is named by you (no ``version_N`` guessing); checkpoints are
written atomically and resumed exactly; files are safetensors, in a layout
DiffSynth reads and in the kohya layout ComfyUI and diffusers read, with alpha
stored so inference uses the training scale; the text encoder and VAE are used
once up front and then leave the GPU, which is what brings memory down.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .bars import progress
from .paths import project_path, relative_to_root
from .profiles import Profile


class TrainingError(RuntimeError):
    """Training cannot start or cannot go on; the message says what to change."""


@dataclass
class TrainConfig:
    """Every knob of a run.  ``for_profile`` fills the profile's defaults."""
    rank: int = 16
    alpha: float = 4.0
    target_modules: tuple = ("to_q", "to_k", "to_v", "to_out")
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"          # constant, constant_with_warmup, linear, cosine
    warmup_steps: int = 0
    max_steps: int = 500
    batch_size: int = 1
    grad_accum: int = 1
    resolution: int = 1024
    center_crop: bool = True
    random_flip: bool = True
    precision: str = "auto"                 # auto, fp32, fp16, bf16
    gradient_checkpointing: bool = True
    cache_latents: bool = True
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    seed: int = 0
    checkpoint_every: int = 100
    keep_last: int = 2
    validate_every: int | None = None       # None: only at the end
    validation_prompts: tuple = ("一个红色的圆形，蓝色背景",)   # each gets the trigger words first
    validation_seeds: tuple = (0,)
    trigger_words: tuple = ()               # in the captions; recorded in the LoRA files and model card

    @classmethod
    def coerce(cls, name: str, value):
        """``value`` as the type of field ``name``: "1e-4" for a float, "1e3" for an int, "yes" for a bool.

        Settings arrive as text from the command line and from papermill parameters;
        YAML reads ``1e-4`` as a string, so numbers in any common notation are converted
        here, and a value of the wrong kind gets a message instead of a TypeError later.
        """
        kinds = {f.name: str(f.type) for f in fields(cls)}
        if name not in kinds:
            raise TypeError(f"unknown training setting {name!r}; known: {sorted(kinds)}")
        kind = kinds[name]
        if value is None and "None" in kind:
            return None
        base = kind.split("|")[0].strip()
        try:
            if base == "bool":
                if isinstance(value, bool):
                    return value
                text = str(value).strip().lower()
                if text in ("true", "yes", "on", "1"):
                    return True
                if text in ("false", "no", "off", "0"):
                    return False
                raise ValueError
            if base in ("int", "float"):
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError
                number = float(value)
                if base == "float":
                    return number
                if not number.is_integer():
                    raise ValueError
                return int(number)
            if base == "str":
                if not isinstance(value, str):
                    raise ValueError
                return value
            if base == "tuple":
                return tuple(value) if isinstance(value, (list, tuple)) else (value,)
        except (TypeError, ValueError, OverflowError):
            pass
        else:
            return value
        expected = {"bool": "true or false", "int": "a whole number such as 500",
                    "float": "a number such as 1e-4 or 0.0001", "str": "text"}.get(base, base)
        raise TrainingError(f"{name}={value!r}: expected {expected}")

    @classmethod
    def for_profile(cls, profile: Profile, **overrides) -> "TrainConfig":
        base = dict(rank=profile.lora_rank, alpha=profile.lora_alpha, learning_rate=profile.learning_rate,
                    max_steps=profile.train_steps, batch_size=profile.batch_size,
                    resolution=profile.train_resolution,
                    gradient_checkpointing=profile.gradient_checkpointing,
                    checkpoint_every=max(1, profile.train_steps // 5),
                    validate_every=max(1, profile.train_steps // 3) if profile.name == "tiny" else None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        base.update({k: cls.coerce(k, v) for k, v in overrides.items()})
        cfg = cls(**base)
        cfg.validation_prompts = cfg.prompts_for_validation()
        return cfg

    def prompts_for_validation(self) -> tuple:
        """The validation prompts, each with the trigger words first: they show what the LoRA
        does when it is called up the way the story will call it."""
        from .trigger import with_trigger

        return tuple(with_trigger(p, self.trigger_words) for p in self.validation_prompts)

    def validate(self) -> None:
        for f in fields(self):          # a TrainConfig built directly gets the same type checks
            setattr(self, f.name, self.coerce(f.name, getattr(self, f.name)))
        from .trigger import words

        self.trigger_words = tuple(words(self.trigger_words))
        self.validation_prompts = self.prompts_for_validation()
        problems = []
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank={self.rank!r}: use a positive integer (4-64; the course uses 16)")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            problems.append(f"alpha={self.alpha!r}: use a positive number (the course uses 4.0)")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"learning_rate={self.learning_rate!r}: use a small positive number such as 1e-4")
        if self.resolution % 64 or self.resolution < 64:
            problems.append(f"resolution={self.resolution}: Kolors needs a multiple of 64 (1024 on kolors)")
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_last"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: use at least 1")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            problems.append(f"precision={self.precision!r}: choose auto, fp32, fp16 or bf16")
        if self.lr_scheduler not in ("constant", "constant_with_warmup", "linear", "cosine"):
            problems.append(f"lr_scheduler={self.lr_scheduler!r}: choose constant, "
                            "constant_with_warmup, linear or cosine")
        if problems:
            raise TrainingError("Cannot train with these settings:\n  - " + "\n  - ".join(problems))


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list
    files: dict = field(default_factory=dict)
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    peak_memory_gb: float = 0.0
    resumed_from: int | None = None
    samples: list = field(default_factory=list)
    fixed_loss_before: float | None = None
    fixed_loss_after: float | None = None
    peak_training_gb: float = 0.0

    def summary(self) -> str:
        first = sum(self.losses[:5]) / max(len(self.losses[:5]), 1)
        last = sum(self.losses[-5:]) / max(len(self.losses[-5:]), 1)
        lines = [f"trained {self.steps} steps in {self.seconds:.1f} s ({self.seconds_per_step:.3f} s/step)"
                 + (f", resumed from step {self.resumed_from}" if self.resumed_from else ""),
                 f"training loss (noisy): first steps {first:.4f} -> last steps {last:.4f}",
                 (f"loss on a fixed set: {self.fixed_loss_before:.4f} before -> {self.fixed_loss_after:.4f} after"
                  if self.fixed_loss_before is not None else
                  f"loss on a fixed set after training: {self.fixed_loss_after:.4f} (before: not measured, "
                  "the run resumed from a checkpoint that did not record it)"),
                 f"peak memory: {self.peak_memory_gb:.2f} GB (training loop alone: {self.peak_training_gb:.2f} GB)"]
        lines += [f"{k}: {relative_to_root(v)}" for k, v in self.files.items()]
        return "\n".join(lines)


# --- precision, memory ------------------------------------------------------------
def resolve_precision(precision: str, device: str) -> str:
    """auto: fp32 on a CPU, bf16 where the GPU supports it, else fp16."""
    if precision != "auto":
        if device == "cpu" and precision == "fp16":
            raise TrainingError("fp16 mixed precision needs a GPU; use precision='fp32' on a CPU")
        return precision
    if device == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def estimate_gpu_memory_gb(cfg: TrainConfig, unet_params: float = 2.58e9) -> float:
    """A rough estimate of training memory for the Kolors UNet (text encoder offloaded).

    fp16 UNet weights, LoRA weights with AdamW state, and activations that grow
    with batch x resolution^2 (about 4x smaller with gradient checkpointing).
    Measured figures are in the README; this is for the pre-flight check only.
    """
    weights = unet_params * 2 / 1e9
    act_per_image_1024 = 3.0 if cfg.gradient_checkpointing else 14.0
    acts = act_per_image_1024 * cfg.batch_size * (cfg.resolution / 1024) ** 2
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
    if cfg.resolution > 768:
        advice.append("Lower the resolution (768 needs about 0.56x the activation memory of 1024).")
    if not cfg.use_8bit_adam:
        advice.append("use_8bit_adam=True (needs bitsandbytes) shrinks the optimizer state.")
    advice.append("Restart the kernel to free memory held by earlier cells (pipelines from notebook 01).")
    return advice


# --- data --------------------------------------------------------------------------
def load_image_tensor(path: Path, resolution: int, center_crop: bool, rng: random.Random):
    """Resize the short side to ``resolution``, crop a square, scale to [-1, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = im.size
        if center_crop:
            left, top = (w - resolution) // 2, (h - resolution) // 2
        else:
            left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@torch.no_grad()
def prepare_data(pipe, rows, cfg: TrainConfig, device: str, dtype) -> list[dict]:
    """Text embeddings and (optionally) latents for every training pair, computed once."""
    from .models import models_to_device

    models_to_device(pipe, ["text_encoder_kolors", "vae_encoder"])   # the offload mode parks them on the CPU
    rng = random.Random(cfg.seed)
    cache = {}
    out = []
    for path, text in progress(rows, desc="encoding captions and images"):
        if text not in cache:
            emb = pipe.encode_prompt(text, positive=True)
            cache[text] = {k: v.to("cpu") for k, v in emb.items()}
        item = {"text": text, "path": path, **cache[text]}
        pixels = load_image_tensor(path, cfg.resolution, cfg.center_crop, rng)
        if cfg.cache_latents:
            lat = pipe.vae_encoder(pixels[None].to(device=device, dtype=dtype))
            item["latents"] = lat.to("cpu", torch.float32)
        else:
            item["pixels"] = pixels
        out.append(item)
    # validation prompts too, so validation images never need the text encoder back on the GPU
    pipe.kit_prompt_cache = {(p, True): {k: v.to("cpu") for k, v in pipe.encode_prompt(p, positive=True).items()}
                             for p in cfg.validation_prompts}
    pipe.kit_prompt_cache[("", False)] = {k: v.to("cpu") for k, v in pipe.encode_prompt("", positive=False).items()}
    return out


@contextmanager
def cached_prompts(pipe):
    """Serve embeddings computed by ``prepare_data`` instead of running the text encoder."""
    cache = getattr(pipe, "kit_prompt_cache", {})
    original = pipe.encode_prompt

    def encode(prompt, clip_skip=1, clip_skip_2=2, positive=True):
        hit = cache.get((prompt, positive))
        if hit is not None:
            return {k: v.to(pipe.device) for k, v in hit.items()}
        return original(prompt, clip_skip=clip_skip, clip_skip_2=clip_skip_2, positive=positive)

    pipe.encode_prompt = encode
    try:
        yield
    finally:
        del pipe.encode_prompt      # back to the class's method


class SampleStream:
    """An endless, seeded stream of sample indices: a fresh permutation each epoch.

    Its position is one integer, so a resumed run continues with exactly the
    samples the interrupted one would have seen.  With several processes every
    process walks the same stream and takes its slice of each global batch.
    """

    def __init__(self, n: int, seed: int, cursor: int = 0):
        self.n, self.seed, self.cursor = n, seed, cursor
        self._epoch, self._perm = -1, []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).tolist()
        return self._perm

    def next(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, pos = divmod(self.cursor, self.n)
            out.append(self._permutation(epoch)[pos])
            self.cursor += 1
        return out


# --- model -------------------------------------------------------------------------
def add_lora(unet, cfg: TrainConfig):
    """Freeze the UNet and add peft LoRA adapters to its attention projections."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    names = {n.split(".")[-1] for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise TrainingError(f"target_modules {missing} are not layers of this UNet "
                            "(its attention layers are to_q, to_k, to_v, to_out)")
    torch.manual_seed(cfg.seed)        # the adapters' initial A matrices
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                      init_lora_weights=True, lora_dropout=0.0)
    inject_adapter_in_model(lcfg, unet)
    params = []
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()     # LoRA weights train in fp32 under mixed precision
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_state(unet) -> dict:
    """The LoRA weights only, as a CPU state dict ({module}.lora_A.weight ...)."""
    out = {}
    for n, p in unet.named_parameters():
        if "lora_" in n:
            out[n.replace(".default", "")] = p.detach().to("cpu", torch.float32).clone()
    return out


def load_lora_state(unet, state: dict) -> None:
    params = {n.replace(".default", ""): p for n, p in unet.named_parameters() if "lora_" in n}
    if set(params) != set(state):
        raise TrainingError("the checkpoint's LoRA layers do not match this run's settings "
                            "(rank or target_modules changed?); start a new run_name")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


# --- checkpoints -------------------------------------------------------------------
#: settings a resumed run may change: none of them alters what the finished steps computed
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "keep_last", "validate_every",
                     "validation_prompts", "validation_seeds", "trigger_words")


def config_record(cfg: TrainConfig) -> dict:
    """The settings as plain JSON values (tuples as lists), as stored in files."""
    return json.loads(json.dumps(asdict(cfg), ensure_ascii=False))


def changed_settings(saved: dict, cfg: TrainConfig) -> list[str]:
    """Settings of ``cfg`` that differ from a checkpoint's and would make a resume inexact."""
    now = config_record(cfg)
    out = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
           for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if saved.get("max_steps") != now["max_steps"] and cfg.lr_scheduler in ("linear", "cosine"):
        out.append(f"max_steps: {saved.get('max_steps')} in the checkpoint, {now['max_steps']} now "
                   f"(the {cfg.lr_scheduler} learning-rate schedule is laid out over max_steps)")
    return out


def dataset_fingerprint(rows) -> str:
    """Captions, file names and sizes: a resume on a changed training set would not be exact."""
    import hashlib

    h = hashlib.sha256()
    for path, text in rows:
        h.update(f"{Path(path).name}\0{Path(path).stat().st_size}\0{text}\n".encode("utf-8"))
    return h.hexdigest()[:16]


def _all_finite(tensors) -> bool:
    tensors = list(tensors)
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()
                  and not p.name.endswith(".tmp") and (p / "state.pt").exists())


@dataclass
class RunState:
    """Everything a checkpoint restores besides the model and optimizer: where the run is."""
    step: int = 0
    losses: list = field(default_factory=list)
    fixed_loss_before: float | None = None
    resumed_from: int | None = None


def save_checkpoint(run_dir: Path, state: RunState, unet, optimizer, lr_schedule, gen, stream,
                    cfg: TrainConfig, meta: dict, dataset: str) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, then drop all but the last ``cfg.keep_last``.

    The LoRA inside carries the same metadata as an exported one (rank, alpha), so
    loading a checkpoint to look at an earlier step uses the trained strength.
    """
    from .lora_files import lora_pairs_from_peft, save_diffsynth_lora

    weights = lora_state(unet)
    if not _all_finite(weights.values()):
        # a NaN/inf weight must never become "the last good checkpoint"
        raise TrainingError(f"the LoRA weights became NaN or infinite by step {state.step}: training diverged. "
                            f"Lower learning_rate (now {cfg.learning_rate}), e.g. to {cfg.learning_rate / 10:g}.")
    final = run_dir / "checkpoints" / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_diffsynth_lora(lora_pairs_from_peft(weights), tmp / "lora.safetensors",
                        dict(meta, checkpoint_step=str(state.step)))
    torch.save({"step": state.step, "optimizer": optimizer.state_dict(), "scheduler": lr_schedule.state_dict(),
                "generator": gen.get_state(), "cursor": stream.cursor, "losses": list(state.losses),
                "fixed_loss_before": state.fixed_loss_before, "config": json.dumps(config_record(cfg)),
                "dataset": dataset},
               tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(run_dir)[:-cfg.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(ckpt: Path) -> dict:
    """A checkpoint's state (our own file, loaded without unpickling arbitrary objects)."""
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def check_resumable(ckpt: Path, state: dict, cfg: TrainConfig, dataset: str) -> None:
    """Refuse a resume that would silently train with other settings or data than recorded."""
    problems = []
    if "config" in state:
        problems += changed_settings(json.loads(state["config"]), cfg)
    if state.get("dataset") not in (None, dataset):
        problems.append("the training set changed (captions, files or sizes) since the checkpoint")
    if problems:
        raise TrainingError(
            f"{relative_to_root(ckpt)} was trained with other settings, so resuming would not continue "
            "the same run:\n  - " + "\n  - ".join(problems) +
            "\nUse the checkpoint's settings to resume, or start a fresh run (another run_name, or "
            "overwrite=True).")


def load_checkpoint(ckpt: Path, state: dict, unet, optimizer, lr_schedule, gen, stream) -> RunState:
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "lora.safetensors"))
    if not _all_finite(weights.values()):
        raise TrainingError(f"{relative_to_root(ckpt)} holds NaN or infinite weights (written by an older "
                            "version before a divergence): delete it and run again")
    load_lora_state(unet, weights)
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    stream.cursor = state["cursor"]
    return RunState(step=state["step"], losses=list(state["losses"]),
                    fixed_loss_before=state.get("fixed_loss_before"), resumed_from=state["step"])


def run_finished(run_dir: Path) -> bool:
    """Finished means every exported file exists: ``summary.json`` is written last and lists them."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    try:
        files = json.loads(summary.read_text(encoding="utf-8")).get("files", {})
    except (ValueError, OSError):
        return False
    return bool(files) and all(project_path(f).is_file() for f in files.values())


def load_finished_run(run_dir: Path, cfg: TrainConfig, rows) -> TrainResult:
    """A finished run's result read back from its files, if it was trained with ``cfg`` on ``rows``."""
    from PIL import Image

    recorded = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))
    problems = changed_settings({k: v for k, v in recorded.items() if k in config_record(cfg)}, cfg)
    if recorded.get("trigger_words", []) != list(cfg.trigger_words):
        # the files record their trigger words: a run with other words is another LoRA
        problems.append(f"trigger_words: {recorded.get('trigger_words', [])!r} in the files, "
                        f"{list(cfg.trigger_words)!r} now")
    if recorded.get("dataset_fingerprint") not in (None, dataset_fingerprint(rows)):
        problems.append("the training set changed since it was trained")
    if problems:
        raise TrainingError(f"{relative_to_root(run_dir)} holds a finished LoRA trained differently:\n  - "
                            + "\n  - ".join(problems) + "\nChoose another run_name, or overwrite=True to "
                            "train it again with these settings.")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    with (run_dir / "loss.csv").open(encoding="utf-8", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    samples = []
    for png in sorted((run_dir / "samples").glob("step-*.png")):
        with Image.open(png) as im:
            samples.append((int(png.stem.split("-")[1]), [im.convert("RGB")]))
    print(f"{relative_to_root(run_dir)} is already trained with these settings: using it as it is "
          "(overwrite=True trains it again)")
    steps = summary["steps"]
    return TrainResult(run_dir, steps, losses, {k: project_path(v) for k, v in summary["files"].items()},
                       summary["seconds"], summary["seconds_per_step"], summary["peak_memory_gb"],
                       summary.get("resumed_from"), samples, summary.get("fixed_set_loss_before"),
                       summary.get("fixed_set_loss_after"), summary.get("peak_training_loop_gb", 0.0))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _swap_into_place(new: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``new``; the old run is removed only afterwards."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


# --- the loop ----------------------------------------------------------------------
def _optimizer(params, cfg: TrainConfig):
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise TrainingError("use_8bit_adam=True needs `pip install bitsandbytes` (GPU only)") from exc
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


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


def _check_data(data: list, cfg: TrainConfig, processes: int) -> None:
    if cfg.batch_size * processes > len(data):
        raise TrainingError(
            f"batch_size={cfg.batch_size}" + (f" on {processes} processes" if processes > 1 else "") +
            f" is larger than the training set ({len(data)} images): every batch would repeat images. "
            f"Use batch_size <= {max(1, len(data) // processes)}, and grad_accum for a larger effective batch.")
    empty = sum(1 for item in data if not item["text"].strip())
    if empty:
        warnings.warn(f"{empty} of {len(data)} training captions are empty: those images train the model "
                      "without any prompt. Add captions (notebook 02's caption editor) unless that is intended.",
                      stacklevel=3)
    for word in cfg.trigger_words:
        n = sum(1 for item in data if word in item["text"])
        if n == 0:
            warnings.warn(f"the trigger word {word!r} is in none of the {len(data)} training captions: the LoRA "
                          "cannot learn to answer to it. Build the data set with it (notebook 02's trigger_word) "
                          "or train with the word the captions use.", stacklevel=3)


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
    called after every step.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from .dataset import read_training_set
    from .models import load_pipeline

    cfg = cfg or TrainConfig.for_profile(profile)
    cfg.validate()
    rows = read_training_set(dataset_dir)
    final_dir = project_path(run_dir)
    if overwrite:
        if resume is True:
            raise TrainingError("overwrite=True starts a fresh run, resume=True continues one: choose one")
        # a fresh run beside the old one; the old one stays until the new one is complete
        run_dir = final_dir.with_name(f".{final_dir.name}.new")
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        run_dir = final_dir
        if run_finished(run_dir) and reuse_finished:
            return load_finished_run(run_dir, cfg, rows)
        if run_finished(run_dir):
            raise TrainingError(f"{relative_to_root(run_dir)} already holds a finished LoRA; choose another "
                                "run_name, or pass overwrite=True to train it again")
    ckpts = _checkpoints(run_dir)
    if ckpts and resume is False:
        raise TrainingError(f"{relative_to_root(run_dir)} has checkpoints; pass resume=True to continue "
                            "them, overwrite=True to start afresh, or choose another run_name")
    if resume is True and not ckpts:
        raise TrainingError(f"nothing to resume in {relative_to_root(run_dir)}: no checkpoint found")
    dataset = dataset_fingerprint(rows)
    saved = read_checkpoint(ckpts[-1]) if ckpts else None
    if saved is not None:
        check_resumable(ckpts[-1], saved, cfg, dataset)
    run_dir.mkdir(parents=True, exist_ok=True)

    cpu = profile.device == "cpu" or not torch.cuda.is_available()
    precision = resolve_precision(cfg.precision, "cpu" if cpu else "cuda")
    mp = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[precision]
    # created first: under `accelerate launch` it picks this process's GPU
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=cpu)
    main = accelerator.is_main_process
    if pipe is None and not cpu:
        torch.cuda.reset_peak_memory_stats()    # the peak counts the models' load
    pipe = pipe or load_pipeline(profile, device=str(accelerator.device))
    device = str(pipe.device)
    memory, peaks = PeakMemory(device), {}
    if main:
        for line in preflight(cfg, device):
            print("memory: " + line)
        # written after the resume check: it records the settings this run really uses
        _write_json(run_dir / "train_config.json", dict(
            config_record(cfg), profile=profile.name, dataset=relative_to_root(project_path(dataset_dir)),
            dataset_fingerprint=dataset, precision_used=precision, n_images=len(rows),
            processes=accelerator.num_processes))

    data = prepare_data(pipe, rows, cfg, device, pipe.torch_dtype)
    _check_data(data, cfg, accelerator.num_processes)
    if is_cuda(device):        # frozen parts leave the GPU once their work is cached
        _training_placement(pipe, cfg)
        torch.cuda.empty_cache()
    unet = pipe.unet
    params = add_lora(unet, cfg)
    optimizer = _optimizer(params, cfg)
    lr_schedule = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                num_training_steps=cfg.max_steps)
    unet_t, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)

    # Training draws timesteps from its own copy of the noise schedule: a validation
    # image calls the pipeline, which sets pipe.scheduler to the few inference timesteps.
    noise_schedule = copy.deepcopy(pipe.scheduler)
    noise_schedule.set_timesteps(noise_schedule.num_train_timesteps, training=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    stream = SampleStream(len(data), cfg.seed)
    state = RunState()
    if saved is not None and resume in ("auto", True):
        state = load_checkpoint(ckpts[-1], saved, unet, optimizer, lr_schedule, gen, stream)
        print(f"resuming from {relative_to_root(ckpts[-1])} (step {state.step} of {cfg.max_steps})")
    else:
        state.fixed_loss_before = fixed_set_loss(unet, data, pipe, noise_schedule, cfg)
    meta = _lora_file_metadata(cfg, profile)

    samples = []
    t0 = time.perf_counter()
    start_step = state.step
    bar = progress(total=cfg.max_steps, initial=state.step, desc="training LoRA")
    unet.train()
    try:
        with memory.phase(peaks, "training_loop"):
            while state.step < cfg.max_steps:
                micro = []
                for _ in range(cfg.grad_accum):
                    with accelerator.accumulate(unet_t):
                        loss = _micro_step(unet_t, data, stream.next(cfg.batch_size * accelerator.num_processes),
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
                if not math.isfinite(value) or not _all_finite(params):
                    raise TrainingError(
                        f"the loss became {value} at step {state.step} (or the weights NaN/infinite): training "
                        f"diverged. Lower learning_rate (now {cfg.learning_rate}), e.g. to "
                        f"{cfg.learning_rate / 10:g}, and start afresh (overwrite=True or another run_name). "
                        "Nothing was exported; the checkpoints kept hold finite weights from before.")
                state.losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if callback is not None:
                    callback(state.step, value)
                if main and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps):
                    # finite weights can still be blown up (1e30): they count as good only if they
                    # give a finite loss on a fixed probe (its own random numbers, so resume stays exact)
                    probe = fixed_set_loss(unet, data, pipe, noise_schedule, cfg, n_items=2, per_item=1)
                    if not math.isfinite(probe):
                        raise TrainingError(
                            f"the weights after step {state.step} give a loss of {probe} on a fixed probe: "
                            f"training diverged. Lower learning_rate (now {cfg.learning_rate}), e.g. to "
                            f"{cfg.learning_rate / 10:g}, and start afresh (overwrite=True or another run_name). "
                            "Nothing was exported; the checkpoints kept are from before.")
                    save_checkpoint(run_dir, state, unet, optimizer, lr_schedule, gen, stream, cfg, meta, dataset)
                if (main and cfg.validate_every and state.step % cfg.validate_every == 0
                        and state.step < cfg.max_steps):
                    samples.append((state.step, validation_images(pipe, unet, cfg, run_dir, state.step)))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    with memory.phase(peaks, "export"):
        eval_after = fixed_set_loss(unet, data, pipe, noise_schedule, cfg)
        files = {}
        if main:
            samples.append((state.step, validation_images(pipe, unet, cfg, run_dir, state.step)))
            files = finish_run(run_dir, unet, cfg, profile, state.losses, pipe, meta)
    res = TrainResult(final_dir, state.step, state.losses, files, seconds,
                      seconds / max(state.step - start_step, 1), memory.overall, state.resumed_from, samples,
                      state.fixed_loss_before, eval_after, peak_training_gb=peaks["training_loop"])
    if not main:
        return res
    # summary.json is written last: its presence, with every file it lists, marks the run finished
    _write_json(run_dir / "summary.json", {
        "steps": state.step, "seconds": round(seconds, 2), "seconds_per_step": round(res.seconds_per_step, 4),
        "peak_memory_gb": round(memory.overall, 3), "peak_training_loop_gb": round(peaks["training_loop"], 3),
        "memory_measure": "GPU allocations (GB, 10^9 bytes)" if memory.cuda else "process resident size (GB)",
        "resumed_from": state.resumed_from,
        "fixed_set_loss_before": state.fixed_loss_before, "fixed_set_loss_after": eval_after,
        "fixed_set_loss_before_note": None if state.fixed_loss_before is not None else
        "not measured: resumed from a checkpoint written before the kit stored it",
        "first_loss": state.losses[0] if state.losses else None,
        "last_loss": state.losses[-1] if state.losses else None,
        "files": {k: relative_to_root(final_dir / Path(v).relative_to(run_dir)) for k, v in files.items()}})
    if run_dir != final_dir:
        _swap_into_place(run_dir, final_dir)
        res.files = {k: final_dir / Path(v).relative_to(run_dir) for k, v in files.items()}
    return res


def is_cuda(device) -> bool:
    """True for "cuda", "cuda:1" ...; a process of a multi-CPU run has device "cpu:0"."""
    return torch.device(device).type == "cuda"


def device_is_gpu(pipe) -> bool:
    return is_cuda(pipe.device)


def _training_placement(pipe, cfg: TrainConfig) -> None:
    """Only what the loop needs stays on the GPU: the UNet (and the VAE encoder without cached latents)."""
    from .models import models_to_device

    keep = ["unet"] + ([] if cfg.cache_latents else ["vae_encoder"])
    if getattr(pipe, "cpu_offload", False):
        models_to_device(pipe, keep)
        return
    pipe.text_encoder_kolors.to("cpu")
    if cfg.cache_latents:
        pipe.vae_encoder.to("cpu")


def _lora_file_metadata(cfg: TrainConfig, profile: Profile) -> dict:
    from .lora_files import lora_metadata

    training = {k: v for k, v in config_record(cfg).items() if k != "validation_prompts"}
    return lora_metadata(cfg.rank, cfg.alpha,
                         base_model=profile.kolors_model_id if profile.name != "tiny" else "kolors-course/tiny-kolors",
                         trigger_words=list(cfg.trigger_words), training=training)


def _micro_step(unet_t, data, global_idx, cfg, pipe, scheduler, gen, accelerator):
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
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    add_time_id = torch.tensor([h, w, 0, 0, h, w], device=device).repeat(latents.shape[0])
    with accelerator.autocast():
        pred = unet_t(noisy.to(pipe.torch_dtype), timestep=timestep,
                      encoder_hidden_states=torch.cat(emb).to(device, pipe.torch_dtype),
                      add_text_embeds=torch.cat(pooled).to(device, pipe.torch_dtype),
                      add_time_id=add_time_id, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return torch.nn.functional.mse_loss(pred.float(), target.float()) * scheduler.training_weight(timestep)


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


@torch.no_grad()
def validation_images(pipe, unet, cfg: TrainConfig, run_dir: Path, step: int):
    """Images for the fixed validation prompts and seeds, with the LoRA as it is now."""
    from .bars import inner_progress
    from .viz import image_grid

    unet.eval()
    prof = pipe.kit_profile
    images = []
    with cached_prompts(pipe):
        for prompt in cfg.validation_prompts:
            for seed in cfg.validation_seeds:
                images.append(pipe(prompt=prompt, negative_prompt="", cfg_scale=prof.cfg_scale,
                                   num_inference_steps=prof.steps, height=prof.height, width=prof.width,
                                   seed=seed, progress_bar_cmd=inner_progress))
    unet.train()
    if getattr(pipe, "cpu_offload", False) and device_is_gpu(pipe):
        _training_placement(pipe, cfg)      # the pipeline call parked every model on the CPU
    folder = run_dir / "samples"
    folder.mkdir(exist_ok=True)
    image_grid(images, rows=1).save(folder / f"step-{step:06d}.png")
    return images


def finish_run(run_dir: Path, unet, cfg: TrainConfig, profile: Profile, losses: list, pipe, meta: dict) -> dict:
    """Export both LoRA layouts and the loss curve."""
    from .lora_files import export_lora, lora_pairs_from_peft
    from .models import unet_config_path

    pairs = lora_pairs_from_peft(lora_state(unet))
    training = json.loads(meta["training"])
    paths = export_lora(pairs, cfg.rank, cfg.alpha, run_dir, "lora", unet_config_path(pipe),
                        base_model=meta["base_model"], trigger_words=list(cfg.trigger_words), training=training)
    with (run_dir / "loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows(enumerate(losses, 1))
    plot_loss(losses, run_dir / "loss.png")
    return {"lora": paths["diffsynth"], "lora_kohya": paths["kohya"], "loss_curve": run_dir / "loss.png"}


def plot_loss(losses: list, path: Path, smooth: int = 5):
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.4, label="loss")
    if len(losses) >= smooth:
        avg = [sum(losses[max(0, i - smooth + 1):i + 1]) / len(losses[max(0, i - smooth + 1):i + 1])
               for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), avg, label=f"mean of {smooth}")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def lora_parameter_counts(unet, ranks=(1, 4, 16, 64), target_modules=("to_q", "to_k", "to_v", "to_out")):
    """Trainable parameters a LoRA of each rank adds, against the UNet's own size."""
    total = sum(p.numel() for p in unet.parameters())
    per_rank = 0
    for n, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in target_modules:
            per_rank += m.in_features + m.out_features
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
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
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
    from .viz import show_grid

    items = []
    cols = max(len(imgs) for _, imgs in samples)
    for step, imgs in samples:
        for j, im in enumerate(imgs):
            items.append((f"step {step}" + (f" #{j}" if cols > 1 else ""), im))
    return show_grid(items, cols=cols if cols > 1 else min(len(items), 6), title="validation images over training",
                     save_to=path)
