"""The settings of a LoRA run (``TrainConfig``: every knob a named field with the profile's
default), what a run returns (``TrainResult``), and which settings a resume may change."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from kolors_course.core.paths import relative_to_root
from kolors_course.core.profiles import ATTENTION_PROJECTIONS, Profile


class TrainingError(RuntimeError):
    """Training cannot start or cannot go on; the message says what to change."""


@dataclass
class TrainConfig:
    """Every knob of a run.  ``for_profile`` fills the profile's defaults."""
    rank: int = 16
    alpha: float = 4.0
    target_modules: tuple = ATTENTION_PROJECTIONS
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"          # constant, constant_with_warmup, linear, cosine
    warmup_steps: int = 0
    max_steps: int = 500
    batch_size: int = 1
    grad_accum: int = 1
    resolution: int = 1024
    center_crop: bool = True
    random_flip: bool = True
    # Offset noise: a per-channel constant of this standard deviation added to each sample's
    # noise, so the overall colour of a picture must come from the prompt (see
    # kolors_course.world.train_unet.UNetConfig.offset_noise).  The tiny profile's base UNet was
    # trained with it and its LoRA is too; 0 (plain noise) is the usual choice for Kolors.
    offset_noise: float = 0.0
    # Differential output preservation (ai-toolkit's "DOP"): every step also shows the UNet the
    # batch's captions with the trigger words taken out, on the same noisy latents, and pays at
    # this weight for any difference from what the base model (adapters off) predicts there.
    # Every training caption holds the trigger word, so without it nothing tells the LoRA that its
    # look belongs to the word, and the look comes without the word too (docs/tiny_world_log.md,
    # "What did tie the look to the word").
    # Costs one more forward pass with gradients and one without per step; 0: off.
    preserve_weight: float = 0.0
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
    def from_choices(cls, profile: Profile, trigger_word: str | None = None, **choices) -> "TrainConfig":
        """``for_profile`` from a notebook's parameters: a choice left at None takes the profile's
        value (so None cannot switch a setting off here: use ``for_profile`` for that)."""
        chosen = {k: v for k, v in choices.items() if v is not None}
        return cls.for_profile(profile, trigger_words=[trigger_word] if trigger_word else [], **chosen)

    @classmethod
    def for_profile(cls, profile: Profile, **overrides) -> "TrainConfig":
        from kolors_course.core.trigger import words as trigger_words

        base = dict(rank=profile.lora_rank, alpha=profile.lora_alpha, learning_rate=profile.learning_rate,
                    target_modules=tuple(profile.lora_target_modules),
                    max_steps=profile.train_steps, batch_size=profile.batch_size,
                    resolution=profile.train_resolution, offset_noise=profile.train_offset_noise,
                    # the preservation keeps the base model for captions without the trigger word:
                    # with no trigger word there are none, so the profile's weight applies only with one
                    preserve_weight=profile.lora_preserve_weight if trigger_words(overrides.get("trigger_words")) else 0.0,
                    gradient_checkpointing=profile.gradient_checkpointing,
                    checkpoint_every=max(1, profile.train_steps // 5),
                    # evenly spaced rounds, the last one a round's length before the end (the
                    # final images come at the last step anyway)
                    validate_every=max(1, round(profile.train_steps / (profile.validations + 1)))
                    if profile.validations else None)
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
        from kolors_course.core.trigger import with_trigger

        return tuple(with_trigger(p, self.trigger_words) for p in self.validation_prompts)

    def validate(self) -> None:
        for f in fields(self):          # a TrainConfig built directly gets the same type checks
            setattr(self, f.name, self.coerce(f.name, getattr(self, f.name)))
        from kolors_course.core.trigger import words

        self.trigger_words = tuple(words(self.trigger_words))
        self.validation_prompts = self.prompts_for_validation()
        problems = []
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank={self.rank!r}: use a positive integer (4-64; the course uses 16)")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            problems.append(f"alpha={self.alpha!r}: use a positive number (the course uses 4.0)")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"learning_rate={self.learning_rate!r}: use a small positive number such as 1e-4")
        if not (isinstance(self.preserve_weight, (int, float)) and 0 <= self.preserve_weight < math.inf):
            problems.append(f"preserve_weight={self.preserve_weight!r}: use 0 (off) or a positive number such as 1")
        elif self.preserve_weight and not self.trigger_words:
            problems.append(f"preserve_weight={self.preserve_weight}: it keeps the base model's pictures for the "
                            "captions without the trigger word, so it needs trigger_words (or preserve_weight=0)")
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
    fixed_losses: list = field(default_factory=list)   # (step, loss on the fixed set): 0 and each checkpoint

    def summary(self) -> str:
        first = sum(self.losses[:5]) / max(len(self.losses[:5]), 1)
        last = sum(self.losses[-5:]) / max(len(self.losses[-5:]), 1)
        lines = [(f"trained steps {self.resumed_from + 1}-{self.steps} in {self.seconds:.1f} s, resumed from the "
                  f"checkpoint at step {self.resumed_from}" if self.resumed_from else
                  f"trained {self.steps} steps in {self.seconds:.1f} s") + f" ({self.seconds_per_step:.3f} s/step)",
                 f"training loss (noisy): first steps {first:.4f} -> last steps {last:.4f}",
                 (f"loss on a fixed set: {self.fixed_loss_before:.4f} before -> {self.fixed_loss_after:.4f} after"
                  if self.fixed_loss_before is not None else
                  f"loss on a fixed set after training: {self.fixed_loss_after:.4f} (before: not measured, "
                  "the run resumed from a checkpoint that did not record it)"),
                 f"peak memory: {self.peak_memory_gb:.2f} GB (training loop alone: {self.peak_training_gb:.2f} GB)"]
        lines += [f"{k}: {relative_to_root(v)}" for k, v in self.files.items()]
        return "\n".join(lines)


def resolve_precision(precision: str, device: str) -> str:
    """auto: fp32 on a CPU, bf16 where the GPU supports it, else fp16."""
    if precision != "auto":
        if device == "cpu" and precision == "fp16":
            raise TrainingError("fp16 mixed precision needs a GPU; use precision='fp32' on a CPU")
        return precision
    if device == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


#: settings a resumed run may change: none of them alters what the finished steps computed
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "keep_last", "validate_every",
                     "validation_prompts", "validation_seeds", "trigger_words")


def config_record(cfg: TrainConfig) -> dict:
    """The settings as plain JSON values (tuples as lists), as stored in files."""
    return json.loads(json.dumps(asdict(cfg), ensure_ascii=False))


def changed_settings(saved: dict, cfg: TrainConfig) -> list[str]:
    """Settings of ``cfg`` that differ from a checkpoint's and would make a resume inexact.
    A setting a checkpoint does not record (it is older than the setting) counts as its default."""
    now = config_record(cfg)
    saved = {**config_record(TrainConfig()), **saved}
    # with preserve_weight the trigger words decide the captions the preservation loss reads
    free = [k for k in RESUMABLE_CHANGES if not (k == "trigger_words" and cfg.preserve_weight)]
    out = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
           for k in sorted(set(saved) | set(now)) if k not in free and saved.get(k) != now.get(k)]
    if saved.get("max_steps") != now["max_steps"] and cfg.lr_scheduler in ("linear", "cosine"):
        out.append(f"max_steps: {saved.get('max_steps')} in the checkpoint, {now['max_steps']} now "
                   f"(the {cfg.lr_scheduler} learning-rate schedule is laid out over max_steps)")
    return out
