"""Loading the Kolors text-to-image pipeline of DiffSynth 1.1.9, for any profile.

One function, ``load_pipeline``, for both profiles: it finds (or, for the tiny
profile, builds) the model files, loads each one through DiffSynth's
``ModelManager`` with an explicit model class, checks that every part really
loaded (DiffSynth itself only prints when it does not recognise a file), fuses
an optional LoRA at the scale it was trained with, and leaves room for
ControlNets, which a later part of the course adds.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kolors_course.core.hub import hub_unreachable
from kolors_course.core.profiles import Profile
from kolors_course.models.pipeline import KOLORS_TEXT_TOKENS, FusedLoRA, KitPipeline, build_diffsynth_pipeline
import kolors_course.models.tiny as tiny_models

# what the kolors profile needs from ModelScope, per model id
KOLORS_FILES = {
    "Kwai-Kolors/Kolors": ["unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                           "text_encoder/*"],
    "AI-ModelScope/sdxl-vae-fp16-fix": ["diffusion_pytorch_model.safetensors", "config.json"],
}
#: download sizes, for the disk-space check (GB, rounded up)
KOLORS_DOWNLOAD_GB = {"Kwai-Kolors/Kolors": 18.0, "AI-ModelScope/sdxl-vae-fp16-fix": 0.4}


class MissingWeightsError(RuntimeError):
    """The model files for a profile are not on disk (and could not be fetched)."""


class ModelLoadError(RuntimeError):
    """DiffSynth did not load a file as the model it should be."""


@dataclass(frozen=True)
class ModelFiles:
    unet: Path
    text_encoder: Path
    vae: Path

    def missing(self) -> list[Path]:
        out = []
        for p in (self.unet, self.vae):
            if not p.is_file():
                out.append(p)
        if not (self.text_encoder / "config.json").is_file():
            out.append(self.text_encoder / "config.json")
        return out


def model_files(profile: Profile) -> ModelFiles:
    """Where the profile's weights live (same relative layout for both profiles)."""
    root = profile.cache_path
    return ModelFiles(unet=root / tiny_models.UNET_REL,
                      text_encoder=root / tiny_models.TEXT_ENCODER_REL,
                      vae=root / tiny_models.VAE_REL)


def fetch_command(profile: Profile) -> str:
    """The shell command a learner can paste to fetch the kolors weights."""
    return f"kolors-course fetch --profile {profile.name} --cache {profile.cache_path}"


def ensure_weights(profile: Profile, download: bool = True) -> ModelFiles:
    """Make sure the profile's model files exist; build (tiny) or download (kolors) them."""
    files = model_files(profile)
    if profile.model_source == "tiny":
        tiny_models.build_tiny_models(profile.cache_path, weights=profile.tiny_weights)
        return files
    if profile.model_source == "rehearsal":
        # random Kolors-sized weights, written by `kolors-course rehearsal` (about 18 GB): never downloaded
        from kolors_course.models.rehearsal import MARKER, cache_complete

        if not cache_complete(profile.cache_path):
            raise MissingWeightsError(
                f"the {profile.name} profile's random weights are not (completely) in {profile.cache_path} "
                f"({MARKER} missing): write them with `kolors-course rehearsal --weights-only`")
        return files
    if not files.missing():
        return files
    if not download:
        raise MissingWeightsError(_missing_message(profile, files))
    download_kolors_weights(profile)
    if files.missing():
        raise MissingWeightsError(_missing_message(profile, files))
    return files


def _missing_message(profile: Profile, files: ModelFiles, cause: str = "") -> str:
    lines = [f"The {profile.name} profile needs the Kolors weights, and these files are missing:"]
    lines += [f"  - {p}" for p in files.missing()]
    if cause:
        lines.append(f"Downloading them failed: {cause}")
    lines.append(f"Fetch them (about {sum(KOLORS_DOWNLOAD_GB.values()):.0f} GB) with:")
    lines.append(f"  {fetch_command(profile)}")
    lines.append("or run on the tiny profile (profile='tiny'), which needs no download.")
    return "\n".join(lines)


def _check_disk(root: Path, need_gb: float) -> None:
    """Refuse a download that would not fit in ``root`` (made if missing), before it starts."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free / 2**30
    if free < need_gb:
        raise MissingWeightsError(
            f"Not enough disk space in {root}: {free:.1f} GB free, about {need_gb:.1f} GB needed. "
            "Free some space or point KOLORS_COURSE_CACHE at a bigger disk.")


def download_kolors_weights(profile: Profile, check_network: bool = True) -> Path:
    """Download the Kolors UNet, text encoder and fp16-fix VAE from ModelScope.

    ModelScope's ``snapshot_download`` resumes partial files and shows progress
    bars; we check the network and the free disk space first, so that an
    offline machine fails in seconds with a useful message instead of retrying.
    """
    files = model_files(profile)
    root = profile.cache_path
    if check_network:
        why = hub_unreachable()
        if why:
            raise MissingWeightsError(_missing_message(profile, files, why))
    _check_disk(root, sum(KOLORS_DOWNLOAD_GB.values()))
    from modelscope import snapshot_download

    for model_id, patterns in KOLORS_FILES.items():
        snapshot_download(model_id, local_dir=str(root / model_id), allow_patterns=patterns)
    return root


@contextlib.contextmanager
def _quiet(verbose: bool):
    """DiffSynth prints a line per model; keep it for debugging, hide it otherwise."""
    if verbose:
        yield io.StringIO()
        return
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


#: what transformers 4.56+ logs (twice per load) when DiffSynth 1.1.9 passes ``torch_dtype=``
#: to ``from_pretrained``; DiffSynth's call, not ours, and the dtype is still honoured
TORCH_DTYPE_NOTICE = "`torch_dtype` is deprecated! Use `dtype` instead!"


class _DropMessage(logging.Filter):
    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


@contextlib.contextmanager
def _no_torch_dtype_notice():
    """Drop exactly transformers' ``torch_dtype`` notice while DiffSynth loads a model;
    every other record of those loggers (missing weights, errors) still shows."""
    loggers = [logging.getLogger(f"transformers.{m}") for m in ("configuration_utils", "modeling_utils")]
    drop = _DropMessage(TORCH_DTYPE_NOTICE)
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def _model_classes(profile: Profile) -> dict:
    if profile.model_source == "tiny":
        return tiny_models.diffsynth_classes()
    from diffsynth.models.sdxl_controlnet import SDXLControlNetUnion
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder

    return {"sdxl_unet": SDXLUNet, "sdxl_vae_encoder": SDXLVAEEncoder,
            "sdxl_vae_decoder": SDXLVAEDecoder, "sdxl_controlnet": SDXLControlNetUnion}


def load_model_manager(profile: Profile, device: str | None = None, dtype=None,
                       download: bool = True, verbose: bool = False, storage_only: bool = False):
    """A DiffSynth ``ModelManager`` holding the profile's UNet, VAE and text encoder.

    ``storage_only``: the models are loaded to ``device`` only to wait there (the
    offload memory mode keeps them in CPU memory and runs them on the GPU), so
    they keep the profile's dtype.
    """
    import torch
    from diffsynth import ModelManager
    from diffsynth.models.kolors_text_encoder import ChatGLMModel

    files = ensure_weights(profile, download=download)
    device = device or _default_device(profile)
    dtype = dtype or profile.torch_dtype
    if device == "cpu" and dtype == torch.float16 and not storage_only:
        dtype = torch.float32   # fp16 convolutions are not implemented on every CPU
    classes = _model_classes(profile)
    with _quiet(verbose):
        mm = ModelManager(torch_dtype=dtype, device=device)
        # explicit classes: DiffSynth's own detection only prints when it fails
        with _load_errors(files.unet, "UNet"):
            mm.load_model_from_single_file(str(files.unet), model_names=["sdxl_unet"],
                                           model_classes=[classes["sdxl_unet"]], model_resource="diffusers")
        with _load_errors(files.vae, "VAE"):
            mm.load_model_from_single_file(str(files.vae),
                                           model_names=["sdxl_vae_encoder", "sdxl_vae_decoder"],
                                           model_classes=[classes["sdxl_vae_encoder"], classes["sdxl_vae_decoder"]],
                                           model_resource="diffusers")
        with _load_errors(files.text_encoder, "text encoder"), _no_torch_dtype_notice():
            mm.load_model_from_huggingface_folder(str(files.text_encoder), model_names=["kolors_text_encoder"],
                                                  model_classes=[ChatGLMModel])
    check_loaded(mm, ["sdxl_unet", "sdxl_vae_encoder", "sdxl_vae_decoder", "kolors_text_encoder"])
    check_text_encoder_complete(files.text_encoder, mm.model[mm.model_name.index("kolors_text_encoder")])
    return mm


def text_encoder_file_keys(folder: Path) -> set[str] | None:
    """Tensor names stored in a Hugging Face model folder (from its index or safetensors header)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return set(json.loads((folder / index).read_text())["weight_map"])
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return set(f.keys())
    return None


def check_text_encoder_complete(folder: Path, model) -> None:
    """transformers fills missing weights with random values and only logs it: refuse that."""
    stored = text_encoder_file_keys(Path(folder))
    if stored is None:
        return
    # the published shards name ChatGLMModel's weights with its base_model_prefix ("transformer.");
    # transformers strips it when it loads them into the bare model
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and stored and all(k.startswith(prefix) for k in stored):
        stored = {k[len(prefix):] for k in stored}
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - stored if not k.endswith("inv_freq"))
    if missing:
        raise ModelLoadError(f"the text encoder in {folder} lacks {len(missing)} weights "
                             f"(e.g. {missing[:3]}); the download is incomplete: fetch it again")


@contextlib.contextmanager
def _load_errors(path: Path, what: str):
    """Turn a failed load (truncated file, wrong model, wrong shapes) into one clear error."""
    try:
        yield
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the {what} from {path}: {type(exc).__name__}: {str(exc)[:300]}\n"
            "The file is incomplete or is not the model this profile expects. Delete it and "
            "fetch it again (tiny profile: delete the cache folder; it is rebuilt).") from exc


def check_loaded(mm, names) -> None:
    missing = [n for n in names if n not in mm.model_name]
    if missing:
        raise ModelLoadError(f"DiffSynth did not load {missing}; loaded: {mm.model_name}. "
                             "The files may be incomplete or of another model: fetch them again.")


def _default_device(profile: Profile) -> str:
    import torch

    if profile.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"the {profile.name} profile needs a CUDA GPU and none is visible; "
                           "use profile='tiny' on this machine")
    return profile.device


#: the ControlNet-Union file the kolors profile downloads for ``load_pipeline(controlnet=True)``
CONTROLNET_REPO, CONTROLNET_FILE = "AI-ModelScope/controlnet-union-sdxl-1.0", "diffusion_pytorch_model_promax.safetensors"
CONTROLNET_DOWNLOAD_GB = 2.6


def controlnet_file(profile: Profile) -> Path:
    """Where the profile's SDXL ControlNet-Union file lives (same relative layout for both)."""
    return profile.cache_path / tiny_models.CONTROLNET_REL


def ensure_controlnet(profile: Profile, download: bool = True) -> Path:
    """The profile's ControlNet-Union file: the tiny one installed with the tiny models, the
    kolors one downloaded from ModelScope (about 2.5 GB) when missing."""
    path = controlnet_file(profile)
    if profile.model_source == "tiny":
        ensure_weights(profile)
        if not path.is_file():
            raise MissingWeightsError(
                f"the tiny weights in use ({tiny_models.weights_folder(profile.tiny_weights)}) have no ControlNet: "
                "build a complete set with `kolors-course build-tiny --out DIR` (all stages) and use it with "
                "choose_profile('tiny', tiny_weights=DIR), or leave tiny_weights unset for the shipped ones")
        return path
    if path.is_file():
        return path
    if profile.model_source == "rehearsal":
        raise MissingWeightsError(f"the {profile.name} profile's random ControlNet-Union is not at {path}: "
                                  "write the rehearsal weights again with `kolors-course rehearsal --weights-only`")
    fetch = f"kolors-course fetch --profile {profile.name} --controlnet --cache {profile.cache_path}"
    if not download:
        raise MissingWeightsError(
            f"the {profile.name} profile's ControlNet-Union is not at {path}. Fetch it (about "
            f"{CONTROLNET_DOWNLOAD_GB:.1f} GB) with:\n  {fetch}\nor pass controlnet=<path to the promax file>.")
    why = hub_unreachable()
    if why:
        raise MissingWeightsError(f"the ControlNet-Union is not at {path} and cannot be downloaded: {why}. "
                                  f"When online: {fetch}")
    _check_disk(profile.cache_path, CONTROLNET_DOWNLOAD_GB)
    from modelscope import snapshot_download

    snapshot_download(CONTROLNET_REPO, local_dir=str(profile.cache_path / CONTROLNET_REPO),
                      allow_patterns=[CONTROLNET_FILE])
    if not path.is_file():
        raise MissingWeightsError(f"the download did not leave {path}; fetch it again with {fetch}")
    return path


def _tiny_manifest(profile: Profile) -> dict | None:
    """The manifest of the tiny build the profile uses; None on kolors, or where there is none to
    read (random tiny models, or a folder ``check_shipped`` reports on)."""
    if profile.model_source != "tiny":
        return None
    try:
        return json.loads((tiny_models.weights_folder(profile.tiny_weights) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def trained_conditions(profile: Profile) -> tuple | None:
    """The conditions a tiny build's ControlNet learned (its manifest says), None for any other
    (the real union model reads all of them)."""
    cn = (_tiny_manifest(profile) or {}).get("controlnet") or {}
    return tuple(cn["conditions"]) if cn.get("conditions") else None


def text_tokens(profile: Profile) -> int:
    """The token length the profile's prompts are padded to, checked against what a tiny build's
    UNet was trained with (its manifest says; builds before the setting existed used Kolors' 256)."""
    manifest = _tiny_manifest(profile)
    trained = None if manifest is None else manifest.get("text_tokens", KOLORS_TEXT_TOKENS)
    if trained is not None and trained != profile.text_tokens:
        raise ModelLoadError(
            f"the tiny weights in {tiny_models.weights_folder(profile.tiny_weights)} were trained on prompts "
            f"padded to {trained} tokens, but the profile pads to {profile.text_tokens}: use "
            f"choose_profile('tiny', text_tokens={trained}) with these weights")
    return profile.text_tokens


def load_controlnet(mm, profile: Profile, path: Path, verbose: bool = False):
    """Load an SDXL ControlNet-Union file into the model manager as the profile's class (the
    real ``SDXLControlNetUnion`` on kolors, its tiny twin on tiny) and return the model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            stored = set(f.keys())
            width = f.get_slice("conv_in.weight").get_shape()[0] if "conv_in.weight" in stored else None
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                             "download it again") from None
    if "task_embedding" not in stored:
        # a single-task ControlNet: Kwai-Kolors' own Canny/Depth/Pose (diffusers ControlNetModel with
        # a text projection) or an SDXL one; DiffSynth would load it with the union's layers missing
        raise ModelLoadError(
            f"{path} is not an SDXL ControlNet-Union (it has no union task embedding): a single-task "
            "ControlNet such as Kwai-Kolors' own Canny/Depth/Pose. DiffSynth 1.1.9 runs only the union "
            f"model with Kolors: use {CONTROLNET_REPO}/{CONTROLNET_FILE} here (controlnet=True), and "
            "Kolors' own ControlNets in ComfyUI (notebook 05's workflows).")
    expected = mm.model[mm.model_name.index("sdxl_unet")].conv_in.out_channels   # the loaded UNet's first width
    if width is not None and width != expected:
        raise ModelLoadError(
            f"{path} is a ControlNet-Union of another size (first layer {width} channels, the loaded UNet's "
            f"{expected}): the tiny profile's file does not fit Kolors, nor the real one the tiny models")
    classes = _model_classes(profile)
    with _quiet(verbose), _load_errors(path, "ControlNet"):
        mm.load_model_from_single_file(str(path), model_names=["sdxl_controlnet"],
                                       model_classes=[classes["sdxl_controlnet"]], model_resource="diffusers")
    if str(path) not in mm.model_path:
        raise ModelLoadError(f"DiffSynth did not load the ControlNet {path}; it reads the SDXL "
                             "ControlNet-Union (promax) layout only")
    return mm.model[mm.model_path.index(str(path))]


def load_pipeline(profile: Profile, lora: str | os.PathLike | None = None,
                  lora_scale: float | None = None, controlnet: bool | str | os.PathLike | None = None,
                  device: str | None = None, download: bool = True, verbose: bool = False):
    """The Kolors pipeline for ``profile`` (a ``KitPipeline``), optionally with a LoRA fused in.

    ``lora_scale`` multiplies the training scale stored in the LoRA file
    (alpha / rank): 1.0 means "as trained", 0 means "off".
    ``controlnet``: ``True`` loads the profile's SDXL ControlNet-Union (tiny: the kit's trained
    one; kolors: downloaded once, about 2.5 GB), a path loads that union file; then
    ``kc.generate(..., control_image=, control=, control_strength=)`` steers the picture.
    """
    t0 = time.perf_counter()        # before the imports: a learner waits for those too
    from kolors_course.core.profiles import choose_memory_mode

    device = device or _default_device(profile)
    mode, _ = choose_memory_mode(profile)
    storage = "cpu" if mode == "offload" else device
    mm = load_model_manager(profile, device=storage, download=download, verbose=verbose,
                            storage_only=mode == "offload")
    if lora is not None:
        # before the ControlNet joins the model manager: DiffSynth's load_lora tries every model it
        # holds, and the union's down and mid blocks share the UNet's parameter names
        from kolors_course.lora.files import fuse_lora

        scale = 1.0 if lora_scale is None else lora_scale
        fuse_lora(mm, lora, scale=scale)
    cn_model = cn_path = None
    if controlnet is not None and controlnet is not False:
        if controlnet is True:
            cn_path = ensure_controlnet(profile, download=download)
        else:
            from kolors_course.core.paths import project_path

            cn_path = project_path(controlnet)
            if not cn_path.is_file():
                raise MissingWeightsError(f"no ControlNet file at {cn_path}; pass controlnet=True for the "
                                          "profile's own, or the path of an SDXL ControlNet-Union (promax) file")
        cn_model = load_controlnet(mm, profile, cn_path, verbose)
    kit = assemble(mm, profile, device, mode, (), verbose)
    if cn_model is not None:
        from kolors_course.models.pipeline import LoadedControlNet

        kit.controlnet_model = LoadedControlNet(cn_model, str(cn_path), trained_conditions(profile))
    if lora is not None:
        kit.lora = FusedLoRA(str(lora), scale, at_load=True)
    kit.load_seconds = time.perf_counter() - t0
    return kit


def assemble(mm, profile: Profile, device: str, mode: str, units=(), verbose: bool = False) -> KitPipeline:
    """The kit's pipeline over a loaded model manager, set up for the memory mode."""
    with _quiet(verbose):
        pipe = build_diffsynth_pipeline(mm, units, device=device, text_tokens=text_tokens(profile))
    if pipe.text_encoder_kolors is None or pipe.unet is None:
        raise ModelLoadError("the pipeline did not pick up the Kolors text encoder and UNet")
    if mode == "offload":
        # DiffSynth then moves each model to the GPU only while it runs, and back after
        pipe.enable_cpu_offload()
    return KitPipeline(pipe, profile, mm, memory_mode=mode)
