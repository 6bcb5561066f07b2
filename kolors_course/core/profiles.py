"""One configuration object per profile.

``tiny``   tiny Kolors-architecture models built by the kit, a synthetic data set,
           64x64 images: the whole course runs on a CPU in minutes.
``kolors`` the real Kolors weights from ModelScope and the course's data set,
           1024x1024, 50 steps: needs a CUDA GPU.

Both go through the same functions; only the numbers and sources differ.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from kolors_course.core.paths import project_path

#: GPU memory (GB, 10^9 bytes, as the card reports its total) below which the kolors
#: profile cannot run: the "offload" mode peaked at 12.8 GB reserved for a 1024 px,
#: 50-step image (bench/gpu.py, Kolors-sized weights on an H100 limited to 16 GB),
#: plus the CUDA context.
KOLORS_MIN_GPU_GB = 14.0
#: below this the models take turns on the GPU ("offload"); from it up they all stay
#: there ("full", which peaked at 23.8 GB reserved on the same image when limited to 24 GB).
FULL_MODE_MIN_GPU_GB = 25.0
#: how the models share the GPU, see ``choose_memory_mode``
MEMORY_MODES = ("auto", "full", "offload")


#: where a profile's models come from, for its summary
MODEL_SOURCES = {"tiny": "the kit (tiny, built locally)", "modelscope": "ModelScope",
                 "rehearsal": "random Kolors-sized weights (the dress rehearsal)"}


#: every attention projection of the UNet, where DiffSynth's Kolors LoRA trainer puts its LoRA
#: (self- and cross-attention alike): TrainConfig's and the kolors profile's LoRA layers
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


@dataclass(frozen=True)
class Profile:
    name: str
    # -- models ------------------------------------------------------------
    model_source: str                     # "tiny" (built by the kit) or "modelscope"
    kolors_model_id: str = "Kwai-Kolors/Kolors"
    vae_model_id: str = "AI-ModelScope/sdxl-vae-fp16-fix"
    cache_dir: str = "models"             # relative to the project root
    tiny_weights: str | None = None       # tiny only: a `kolors-course build-tiny` folder (None: the shipped one)
    dtype: str = "float32"                # UNet/text-encoder dtype for inference
    device: str = "cpu"
    memory_mode: str = "full"             # "full", "offload", or "auto" (chosen from the GPU's memory)
    text_tokens: int = 256                # every prompt is padded to this many tokens (Kolors: 256)
    # -- generation ----------------------------------------------------------
    height: int = 64
    width: int = 64
    steps: int = 2
    cfg_scale: float = 4.0
    story_sizes: bool = False             # a story file's own size and steps apply (real models only)
    show_size: int | None = None          # notebooks show small images enlarged to this width (None: as made)
    # -- data ----------------------------------------------------------------
    dataset: str = "synthetic"            # "synthetic", a ModelScope id, or a folder
    dataset_limit: int | None = None
    min_side: int = 48                    # data-juicer image_shape_filter minimum
    min_file_size: str | None = "1KB"     # data-juicer image_size_filter minimum
    trigger_word: str = "几何风"          # first in every caption; calls up the LoRA in a prompt
    # -- training --------------------------------------------------------------
    train_resolution: int = 64
    train_offset_noise: float = 0.0       # TrainConfig.offset_noise (tiny: what its base UNet was trained with)
    train_steps: int = 60
    lora_rank: int = 4
    lora_alpha: float = 4.0
    #: the UNet layers the LoRA adapts (TrainConfig.target_modules); "attn2.*" names the
    #: cross-attention's only
    lora_target_modules: tuple = ATTENTION_PROJECTIONS
    learning_rate: float = 5e-3
    batch_size: int = 2
    # TrainConfig.preserve_weight when a trigger word is set: keeps the base model's pictures for
    # prompts without the word (tiny: the pastel look otherwise came just as strongly without it)
    lora_preserve_weight: float = 0.0
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    validations: int = 0                  # validation-image rounds during training, besides step 0 and the last step
    base_model: str = "Kwai-Kolors/Kolors"  # what a LoRA file records as the model it was trained on
    # -- the lessons' examples: words this profile's model knows -------------------------
    #: notebook 01's prompt, built up part by part (subject, details, modifiers, style, artist)
    prompt_parts: dict = field(default_factory=lambda: dict(
        subject="一只在草地上奔跑的狗", details="棕色的毛，阳光明媚", modifiers="可爱，欢快，翠绿的草地",
        style="水彩画", artist="梵高"))
    #: notebook 01's negative-prompt lesson: a prompt (None: the anatomy prompt) and a negative
    #: prompt (None: the course's shared one, kc.DEFAULT_NEGATIVE)
    negative_lesson: dict = field(default_factory=lambda: {"prompt": None, "negative": None})
    story: str = "ink_fox"                # notebooks 04 and 05's story (assets/stories/<name>.yaml)
    #: notebook 05's default reference picture (None: the story's scene 1, generated)
    reference: str | None = None
    # -- scoring ----------------------------------------------------------------
    scorer: str = "tiny"                  # "tiny" or the ModelScope id of the real predictor
    extra: dict = field(default_factory=dict)

    def with_(self, **changes) -> "Profile":
        """A copy with some fields changed; unknown names are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown profile field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    @property
    def cache_path(self) -> Path:
        env = os.environ.get("KOLORS_COURSE_CACHE")
        return project_path(env) if env else project_path(self.cache_dir)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def recipe(self, **changes):
        """The data-juicer filter recipe for this profile's image sizes."""
        from kolors_course.data.recipe import Recipe

        r = Recipe(min_width=self.min_side, min_height=self.min_side, min_size=self.min_file_size)
        return dataclasses.replace(r, **changes) if changes else r

    def summary(self) -> str:
        return (f"profile {self.name}: {self.width}x{self.height}, {self.steps} steps, "
                f"cfg {self.cfg_scale}, {self.dtype} on {self.device} (memory mode {self.memory_mode}), models from "
                f"{MODEL_SOURCES.get(self.model_source, self.model_source)}"
                f", cache {self.cache_path}")


TINY = Profile(
    name="tiny",
    model_source="tiny",
    cache_dir="cache/tiny",
    # the size the shipped tiny models were trained at (16x16x4 latents: enough for shapes), and
    # enough steps for clean pictures (the lessons' sweeps show fewer)
    height=128,
    width=128,
    steps=20,
    # the world's captions are at most 36 tokens; padded to Kolors' 256 instead, three quarters of
    # the UNet's attention went to the padding, and its colours followed the words less often (README)
    text_tokens=48,
    train_resolution=128,
    train_offset_noise=0.3,
    # the LoRA of notebooks 02-04: differential output preservation ties the pastel look to the
    # trigger word (without it the look rose 0.82-0.96 times as much without the word as with it:
    # docs/tiny_world_log.md, "What did tie the look to the word").  On the cross-attention's keys
    # and values only (what reads the words; Custom Diffusion's choice).  160 steps at 3e-2 on the
    # wide UNet (docs/tiny_world_log.md): over 4
    # training seeds the look rose 0.34-0.47 with the word and leaked at most 0.01 without it on the
    # tests' prompts.  80 steps at 1e-2, right for the narrow UNet before it, barely moved this one
    # (a rise of 0.01), and 80 at 3e-2 failed on 3 of 4 seeds (a rise of 0.13, or a dial that fell)
    lora_target_modules=("attn2.to_k", "attn2.to_v"),
    train_steps=160,
    learning_rate=3e-2,
    batch_size=4,
    lora_preserve_weight=2.0,
    show_size=256,
    # the tiny world's words (kolors_course.world): shape, colours, size and place, rendering
    # style, and an invented painter whose palette is warm
    prompt_parts=dict(subject="一个星形", details="红色的，蓝色背景", modifiers="大的，在左边",
                      style="条纹", artist="林一舟"),
    # no colour asked for the shape, and red forbidden: across seeds, no red shape is left
    negative_lesson={"prompt": "一个圆形，蓝色背景", "negative": "红色"},
    story="little_star",
    reference="assets/reference_star.png",   # a clean picture of the tiny world
    validations=3,
    base_model="kolors-course/tiny-kolors",
)

KOLORS = Profile(
    name="kolors",
    model_source="modelscope",
    dtype="float16",
    device="cuda",
    memory_mode="auto",
    height=1024,
    width=1024,
    steps=50,
    cfg_scale=4.0,
    story_sizes=True,
    dataset="AI-ModelScope/lowres_anime",
    min_side=1024,
    min_file_size=None,
    trigger_word="二次元风",               # fits the anime data set
    train_resolution=1024,
    train_steps=500,
    lora_rank=16,
    lora_alpha=4.0,
    learning_rate=1e-4,
    batch_size=1,
    gradient_checkpointing=True,
    precision="fp16-mixed",
    scorer="AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
)

PROFILES = {"tiny": TINY, "kolors": KOLORS}


def _gpu_memory_gb() -> tuple[str, float] | None:
    """(name, total memory in GB) of the first CUDA GPU, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / 1e9


def choose_memory_mode(profile: Profile, gpu: tuple[str, float] | None = None) -> tuple[str, str]:
    """(mode, why) for ``profile``: how its models share the device.

    ``full``: the UNet, the text encoder and the VAE all stay on the device.
    ``offload``: they wait in CPU memory and DiffSynth moves each one to the GPU
    only while it runs (the 12.4 GB text encoder, then the 5.2 GB UNet), which
    costs time for the moves but fits 16 GB cards.  Training encodes every caption
    first and then keeps only the UNet on the GPU, in both modes.
    """
    if profile.memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode={profile.memory_mode!r}: choose one of {MEMORY_MODES}")
    if profile.memory_mode != "auto":
        return profile.memory_mode, "set in the profile"
    if profile.device == "cpu":
        return "full", "the models run on the CPU"
    gpu = gpu or _gpu_memory_gb()
    if gpu is None:
        return "full", "no CUDA GPU is visible to measure"
    name, gb = gpu
    if gb >= FULL_MODE_MIN_GPU_GB:
        return "full", f"the GPU ({name}, {gb:.1f} GB) holds every model at once (needs {FULL_MODE_MIN_GPU_GB:.0f} GB)"
    return "offload", (f"the GPU ({name}, {gb:.1f} GB) has less than {FULL_MODE_MIN_GPU_GB:.0f} GB: the text "
                       "encoder and the UNet take turns on it")


def choose_profile(name: str = "auto", verbose: bool = True, **overrides) -> Profile:
    """The profile called ``name``; ``auto`` picks kolors on a big enough CUDA GPU, else tiny.

    ``overrides`` change single fields (``choose_profile("tiny", steps=4)``).
    On a GPU, ``auto`` also settles the memory mode and says why.
    """
    name = (name or "auto").lower()
    if name == "auto":
        gpu = _gpu_memory_gb()
        if gpu is None:
            chosen, why = TINY, "no CUDA GPU is visible"
        elif gpu[1] < KOLORS_MIN_GPU_GB:
            chosen, why = TINY, (f"the GPU ({gpu[0]}, {gpu[1]:.1f} GB) has less than "
                                 f"{KOLORS_MIN_GPU_GB:.0f} GB")
        else:
            chosen = KOLORS.with_(**{k: v for k, v in overrides.items() if k == "memory_mode"})
            mode, mode_why = choose_memory_mode(chosen, gpu)
            chosen = chosen.with_(memory_mode=mode)
            why = f"a CUDA GPU is present; memory mode '{mode}' because {mode_why}"
        if verbose:
            print(f"profile 'auto' chose '{chosen.name}' because {why}.")
    elif name in PROFILES:
        chosen = PROFILES[name]
    elif name == "kolors-rehearsal":    # defined beside its weight writer
        from kolors_course.models.rehearsal import REHEARSAL as chosen
    else:
        raise ValueError(f"unknown profile {name!r}: choose one of 'auto', 'tiny', 'kolors' "
                         "(or 'kolors-rehearsal', the kolors profile on a CPU with random weights)")
    return chosen.with_(**overrides) if overrides else chosen
