"""The kit's object for a loaded pipeline: ``KitPipeline``.

DiffSynth's ``SDXLImagePipeline`` runs the models; what the kit knows about them
(the profile they were loaded for, the model manager that holds them, the memory
mode, the LoRA fused into the UNet and the base weights it replaced, prompt
embeddings computed once) lives here, in the kit's own object, and nowhere on
DiffSynth's.  Notebooks still read ``pipe = kc.load_pipeline(prof)`` and
``kc.generate(pipe, ...)``; ``pipe.unet``, ``pipe.device`` and the other models and
settings of the DiffSynth pipeline read through (``pipe.diffsynth`` is the pipeline
itself).

Prompt embeddings: DiffSynth encodes the prompt and the negative prompt on every call
(two ChatGLM3 passes: most of an image's time on a CPU, and in the offload memory
mode a 12 GB move of the text encoder to the GPU).  The kit's pipeline class asks
``PromptCache`` first; the cache holds the last few prompts and any the kit pinned
(training pins its validation prompts, so validation images need no text encoder).
An embedding is a pure function of the text and the frozen text encoder, so a cached
one is the same tensor the encoder would give: images stay identical bit for bit.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_kolors")


class PromptCache:
    """Encoded prompts keyed by ``(text, positive)``, kept on the CPU.

    ``pinned`` entries stay until ``unpin``; the others are the ``size`` most recent.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self.pinned: dict[tuple[str, bool], dict] = {}
        self.recent: OrderedDict[tuple[str, bool], dict] = OrderedDict()

    def get(self, text: str, positive: bool):
        key = (text, positive)
        if key in self.pinned:
            return self.pinned[key]
        if key in self.recent:
            self.recent.move_to_end(key)
            return self.recent[key]
        return None

    def put(self, text: str, positive: bool, embedding: dict, pin: bool = False) -> None:
        value = {k: v.detach().to("cpu") for k, v in embedding.items()}
        if pin:
            self.pinned[(text, positive)] = value
            return
        self.recent[(text, positive)] = value
        self.recent.move_to_end((text, positive))
        while len(self.recent) > self.size:
            self.recent.popitem(last=False)

    def unpin(self) -> None:
        self.pinned.clear()

    def __contains__(self, key) -> bool:
        return key in self.pinned or key in self.recent

    def __len__(self) -> int:
        return len(self.pinned) + len(self.recent)


@lru_cache(maxsize=1)
def kit_pipeline_class():
    """DiffSynth's ``SDXLImagePipeline`` with a prompt cache (built on first use: DiffSynth's
    import is heavy)."""
    from diffsynth import SDXLImagePipeline

    class CachingSDXLImagePipeline(SDXLImagePipeline):
        """Encodes a prompt only when ``prompt_cache`` does not have it, and in the offload
        mode leaves the text encoders where they are when every prompt of a call is cached."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prompt_cache = PromptCache()
            self.serve_prompts_from_cache = False

        def encode_prompt(self, prompt, clip_skip=1, clip_skip_2=2, positive=True):
            cached = self.prompt_cache.get(prompt, positive)
            if cached is not None:
                return {k: v.to(self.device) for k, v in cached.items()}
            emb = super().encode_prompt(prompt, clip_skip=clip_skip, clip_skip_2=clip_skip_2, positive=positive)
            self.prompt_cache.put(prompt, positive, emb)
            return emb

        def load_models_to_device(self, loadmodel_names=()):
            if self.serve_prompts_from_cache:
                loadmodel_names = [n for n in loadmodel_names if n not in TEXT_ENCODERS]
            return super().load_models_to_device(list(loadmodel_names))

    return CachingSDXLImagePipeline


KOLORS_TEXT_TOKENS = 256      # what KolorsPrompter.encode_prompt pads every prompt to


@lru_cache(maxsize=1)
def kit_prompter_class():
    """DiffSynth's ``KolorsPrompter`` with the padded token length as a setting (built on first use)."""
    from diffsynth.prompters import KolorsPrompter

    class LengthKolorsPrompter(KolorsPrompter):
        """``KolorsPrompter``, padding to ``max_length`` tokens instead of its fixed 256.

        Kolors keeps 256.  The tiny profile pads to fewer (``Profile.text_tokens``): its captions
        are at most 36 tokens, and with 48 its UNet follows the colour words more often and
        trains faster (README "The tiny world").
        """

        def __init__(self, max_length: int = KOLORS_TEXT_TOKENS, like=None):
            if like is None:
                super().__init__()
            else:       # another prompter's tokenizer (slow to load again), refiners and extenders
                self.__dict__.update(like.__dict__)
            self.max_length = int(max_length)

        def encode_prompt(self, prompt, clip_skip=1, clip_skip_2=2, positive=True, device="cuda"):
            prompt = self.process_prompt(prompt, positive=positive)
            prompt_emb, pooled_prompt_emb = self.encode_prompt_using_ChatGLM(
                prompt, self.text_encoder, self.tokenizer, self.max_length, clip_skip_2, device)
            return pooled_prompt_emb, prompt_emb

    return LengthKolorsPrompter


def kolors_prompter(text_encoder=None, max_length: int = KOLORS_TEXT_TOKENS, like=None):
    """A Kolors prompter over ``text_encoder`` that pads prompts to ``max_length`` tokens
    (``like``: a prompter whose tokenizer, refiners and extenders it takes over)."""
    if max_length < 8:
        raise ValueError(f"text_tokens={max_length} leaves no room for a prompt: use at least 8 (Kolors: 256)")
    prompter = kit_prompter_class()(max_length, like)
    prompter.fetch_models(text_encoder)
    return prompter


def padded_length(prompter) -> int:
    """How many tokens ``prompter`` pads a prompt to (DiffSynth's own KolorsPrompter: Kolors' 256)."""
    return getattr(prompter, "max_length", KOLORS_TEXT_TOKENS)


def build_diffsynth_pipeline(model_manager, controlnet_units=(), device: str | None = None,
                             text_tokens: int = KOLORS_TEXT_TOKENS):
    """What ``SDXLImagePipeline.from_model_manager`` does, with the kit's pipeline class, and a
    Kolors prompter that pads to ``text_tokens`` (the profile's)."""
    cls = kit_pipeline_class()
    pipe = cls(device=model_manager.device if device is None else device, torch_dtype=model_manager.torch_dtype)
    pipe.fetch_models(model_manager, list(controlnet_units), [])
    if pipe.text_encoder_kolors is not None:
        pipe.prompter = kolors_prompter(pipe.text_encoder_kolors, text_tokens, like=pipe.prompter)
    return pipe


def kit_pipeline(pipe) -> "KitPipeline":
    """``pipe`` if it is the kit's pipeline; otherwise a clear error (a DiffSynth pipeline
    made by hand has no profile for the defaults, nor the kit's LoRA bookkeeping)."""
    if not isinstance(pipe, KitPipeline):
        raise TypeError(f"expected the pipeline kc.load_pipeline returns, got {type(pipe).__name__}; "
                        "load it with pipe = kc.load_pipeline(prof)")
    return pipe


@dataclass
class LoadedControlNet:
    """The ControlNet-Union loaded with the pipeline (``load_pipeline(controlnet=...)``): its
    model and file.  ``kc.generate`` gives it to DiffSynth for one call at a time, with that
    call's condition and strength, so a pipeline without a control image runs as before."""
    model: object
    path: str
    conditions: tuple | None = None     # the conditions it was trained for (tiny); None: all


@dataclass
class FusedLoRA:
    """The LoRA the UNet holds now: its file, its strength (1.0 = as trained), and
    whether it was fused by ``load_pipeline(lora=...)`` (then for good)."""
    path: str
    scale: float
    at_load: bool


class KitPipeline:
    """A loaded Kolors pipeline and what the kit knows about it.

    ``diffsynth``      the DiffSynth pipeline that runs the models
    ``profile``        the profile it was loaded for (generate's defaults)
    ``model_manager``  DiffSynth's ModelManager holding the models and their file paths
    ``memory_mode``    "full" or "offload" (see ``profiles.choose_memory_mode``)
    ``load_seconds``   how long ``load_pipeline`` took, imports included
    ``lora``           the fused LoRA (a ``FusedLoRA``) or None
    ``base_weights``   the UNet weights a LoRA replaced, kept by ``set_lora_scale``
    ``lora_modules``   that LoRA's pairs as read from ``base_weights_for`` (read once, fused at each strength)
    ``controlnet_model`` the ControlNet-Union loaded with it (a ``LoadedControlNet``) or None
    """

    _OWN = ("diffsynth", "profile", "model_manager", "memory_mode", "load_seconds", "lora", "base_weights",
            "base_weights_for", "lora_modules", "controlnet_model")

    def __init__(self, diffsynth, profile, model_manager, memory_mode: str = "full"):
        self.diffsynth = diffsynth
        self.profile = profile
        self.model_manager = model_manager
        self.memory_mode = memory_mode
        self.load_seconds = 0.0
        self.lora: FusedLoRA | None = None
        self.base_weights: dict | None = None
        self.base_weights_for: str | None = None
        self.lora_modules: dict | None = None
        self.controlnet_model: LoadedControlNet | None = None

    # -- running -------------------------------------------------------------------
    def __call__(self, **kwargs):
        """One DiffSynth pipeline call (``kc.generate`` fills in the profile's settings)."""
        cache = self.diffsynth.prompt_cache
        prompts = [(kwargs.get("prompt", ""), True), (kwargs.get("negative_prompt", ""), False)]
        prompts += [(p, True) for p in kwargs.get("local_prompts", ())]
        self.diffsynth.serve_prompts_from_cache = all(k in cache for k in prompts)
        try:
            return self.diffsynth(**kwargs)
        finally:
            self.diffsynth.serve_prompts_from_cache = False

    @property
    def prompt_cache(self) -> PromptCache:
        return self.diffsynth.prompt_cache

    def pin_prompts(self, prompts, negative_prompts=("",)) -> None:
        """Encode ``prompts`` (positive) and ``negative_prompts`` now and keep them until
        ``unpin_prompts``: later calls with them need no text encoder."""
        self.models_to_device(list(TEXT_ENCODERS))
        for text in prompts:
            self.prompt_cache.put(text, True, self.diffsynth.encode_prompt(text, positive=True), pin=True)
        for text in negative_prompts:
            self.prompt_cache.put(text, False, self.diffsynth.encode_prompt(text, positive=False), pin=True)

    def unpin_prompts(self) -> None:
        self.prompt_cache.unpin()

    # -- the models ------------------------------------------------------------------
    def models_to_device(self, names: list[str]) -> None:
        """Put ``names`` on the pipeline's device and, in the offload mode, everything else on
        the CPU.  Training calls it around its phases (encoding, then the UNet alone); in the
        full mode it only moves what is asked, so nothing else leaves the GPU."""
        pipe = self.diffsynth
        if pipe.cpu_offload:
            pipe.load_models_to_device(names)
            return
        for name in names:
            model = getattr(pipe, name, None)
            if model is not None:
                model.to(pipe.device)

    def model_path(self, name: str) -> Path:
        """The file DiffSynth loaded the model ``name`` (``"sdxl_unet"``, ...) from."""
        mm = self.model_manager
        return Path(mm.model_path[mm.model_name.index(name)])

    @property
    def unet_config_path(self) -> Path:
        """The diffusers ``config.json`` beside the UNet file this pipeline was loaded from
        (not the profile's cache: a pipeline loaded from elsewhere, random weights or a
        rehearsal cache, exports LoRA names for the UNet it really has)."""
        return self.model_path("sdxl_unet").with_name("config.json")

    # -- reading through to DiffSynth ---------------------------------------------------
    def __getattr__(self, name):
        # only called for names this object lacks: the DiffSynth pipeline's models and settings
        if name.startswith("__") or name in KitPipeline._OWN:
            raise AttributeError(name)
        return getattr(self.diffsynth, name)

    def __setattr__(self, name, value):
        if name not in KitPipeline._OWN:
            raise AttributeError(f"KitPipeline has no setting {name!r}; the DiffSynth pipeline is "
                                 f"pipe.diffsynth (set {name!r} there if you mean to change DiffSynth's)")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        lora = f", LoRA {os.path.basename(self.lora.path)} at {self.lora.scale}" if self.lora else ""
        cn = ", ControlNet-Union" if self.controlnet_model else ""
        return (f"KitPipeline(profile {self.profile.name}, {self.memory_mode} memory mode, "
                f"device {self.diffsynth.device}{lora}{cn})")
