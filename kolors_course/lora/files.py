"""LoRA files: export in two layouts, and fuse into a pipeline at the trained scale.

Layouts written by ``export_lora``:

``<name>.safetensors``
    peft names on DiffSynth's UNet (``blocks.7.transformer_blocks.0.attn1.to_q.lora_A.weight``),
    the layout DiffSynth's ``ModelManager.load_lora`` reads (all but a LoCon's 3 x 3 layers).
``<name>_kohya.safetensors``
    the kohya/SDXL layout that ComfyUI (``LoraLoaderModelOnly``) and diffusers read:
    ``lora_unet_<diffusers module, dots as underscores>.lora_down.weight`` / ``.lora_up.weight``
    and ``.alpha``.

Both carry the rank, alpha, base model, trigger words and training settings in
their safetensors metadata.  DiffSynth's ``load_lora(path, lora_alpha=x)`` adds
``x * B @ A`` with ``x`` exactly as given, so ``fuse_lora`` passes
``x = scale * alpha / rank``: the training scale travels with the file and
``scale=1`` reproduces what training saw.

A LoRA on convolutions too (a LoCon: a k x k ``lora_down`` / ``lora_A`` and a
1 x 1 ``lora_up`` / ``lora_B``, as peft trains it and ComfyUI reads it) is read and
fused like the rest; DiffSynth 1.1.9 fuses Linear and 1 x 1 layers only, so the
kit adds the k x k convolutions' changes itself, with the same scale.

Reading refuses a file it cannot use as it is with a ``LoRAFileError`` that names
the file, what is wrong and what to do: half a pair, two halves of different
ranks, LyCORIS kinds other than LoRA and LoCon (LoHa, LoKr, Tucker LoCon, DoRA),
a layer this UNet does not have, or a change whose shape is not that of the UNet
weight it is added to (checked before anything is fused).  A file that does not say its alpha (no
``.alpha`` keys and no ``lora_alpha`` metadata, in either layout) is read at
scale 1.0 with a warning naming it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

FORMAT = "kolors-course-lora-v1"


class LoRAFileError(RuntimeError):
    """A LoRA file that cannot be used as asked."""


# --- names ---------------------------------------------------------------------
def diffusers_module_map(unet_config_path: str | os.PathLike) -> dict[str, str]:
    """DiffSynth module name -> diffusers module name, for the UNet described by a config.json.

    Built by running DiffSynth's own diffusers converter over a meta-device
    diffusers UNet, so it holds for the tiny and the real Kolors UNet alike.
    """
    return dict(_module_map(str(Path(unet_config_path).resolve())))


@lru_cache(maxsize=4)
def _module_map(config_path: str) -> tuple:
    from diffusers import UNet2DConditionModel
    from diffsynth.models.sdxl_unet import SDXLUNetStateDictConverter

    cfg = json.loads(Path(config_path).read_text())
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(cfg)
    sd = model.state_dict()
    by_id = {id(v): k for k, v in sd.items()}
    converted = SDXLUNetStateDictConverter().from_diffusers(sd)
    if isinstance(converted, tuple):
        converted = converted[0]
    pairs = []
    for new, t in converted.items():
        old = by_id.get(id(t))
        if old is not None and new.endswith(".weight") and old.endswith(".weight"):
            pairs.append((new[: -len(".weight")], old[: -len(".weight")]))
    return tuple(pairs)


def kohya_path(path) -> Path:
    """Where the kohya-layout copy of the LoRA file ``path`` is written: ``<name>_kohya.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}_kohya.safetensors")


def kohya_name(diffusers_module: str) -> str:
    return "lora_unet_" + diffusers_module.replace(".", "_")


# --- export ---------------------------------------------------------------------
def lora_pairs_from_peft(state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} from a peft state dict (with or without the adapter name)."""
    pairs: dict[str, list] = {}
    for key, t in state.items():
        for part, idx in ((".lora_A.", 0), (".lora_B.", 1)):
            if part in key:
                module = key.split(part)[0]
                pairs.setdefault(module, [None, None])[idx] = t
    bad = [m for m, (a, b) in pairs.items() if a is None or b is None]
    if bad:
        raise LoRAFileError(f"incomplete LoRA pairs for {bad[:3]}")
    return {m: (a, b) for m, (a, b) in pairs.items()}


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
              str(tmp), metadata=metadata)
    os.replace(tmp, path)


def lora_metadata(rank: int, alpha: float, base_model: str = "Kwai-Kolors/Kolors",
                  trigger_words: list[str] | None = None, training: dict | None = None) -> dict[str, str]:
    """What every LoRA file of the kit carries: rank, alpha (so the training scale travels), origin."""
    return {"format": "pt", "kolors_course.format": FORMAT, "lora_rank": str(rank),
            "lora_alpha": str(float(alpha)), "lora_scale": str(float(alpha) / rank),
            "base_model": base_model, "trigger_words": json.dumps(trigger_words or [], ensure_ascii=False),
            "training": json.dumps(training or {}, ensure_ascii=False),
            "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_network_module": "networks.lora", "ss_base_model_version": "kolors"}


def save_diffsynth_lora(pairs: dict, path: str | os.PathLike, metadata: dict) -> Path:
    """The peft-named layout DiffSynth's ``load_lora`` reads (also used for checkpoints)."""
    peft = {}
    for module, (a, b) in pairs.items():
        peft[f"{module}.lora_A.weight"] = a
        peft[f"{module}.lora_B.weight"] = b
    _atomic_save(peft, Path(path), dict(metadata, layout="diffsynth-peft"))
    return Path(path)


def export_lora(pairs: dict, rank: int, alpha: float, out_dir: str | os.PathLike, name: str,
                unet_config_path: str | os.PathLike, base_model: str = "Kwai-Kolors/Kolors",
                trigger_words: list[str] | None = None, training: dict | None = None) -> dict[str, Path]:
    """Write both layouts; returns {"diffsynth": path, "kohya": path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = lora_metadata(rank, alpha, base_model, trigger_words, training)
    wide = sum(_is_wide_convolution(a) for a, _ in pairs.values())
    if wide:
        # the model card says how to load it (DiffSynth's own load_lora cannot), and kohya's
        # metadata says the network has convolution layers, as its LoRA with conv_dim does
        meta["kolors_course.wide_convolutions"] = str(wide)
        meta["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": str(float(alpha))})
    bad = unexportable(pairs, unet_config_path)
    if bad:
        raise LoRAFileError(f"no kohya name for UNet module {bad[0]} ({len(bad)} modules): the kit's map to "
                            "diffusers names has none; train without those target_modules")
    mapping = diffusers_module_map(unet_config_path)
    kohya = {}
    for module, (a, b) in pairs.items():
        k = kohya_name(mapping[module])
        kohya[f"{k}.lora_down.weight"] = a
        kohya[f"{k}.lora_up.weight"] = b
        kohya[f"{k}.alpha"] = torch.tensor(float(alpha))
    paths = {"diffsynth": out_dir / f"{name}.safetensors"}
    paths["kohya"] = kohya_path(paths["diffsynth"])
    save_diffsynth_lora(pairs, paths["diffsynth"], meta)
    _atomic_save(kohya, paths["kohya"], dict(meta, layout="kohya"))
    return paths


def unexportable(modules, unet_config_path: str | os.PathLike) -> list[str]:
    """The modules among ``modules`` (DiffSynth names) the kohya layout has no name for: a LoRA
    on them could be trained but not exported, so training refuses them before it starts."""
    mapping = diffusers_module_map(unet_config_path)
    return sorted(m for m in modules if m not in mapping)


# --- reading ---------------------------------------------------------------------
REDO = "the file is incomplete or damaged: export it again, or download it again"


def _no_alpha_warning(path: Path) -> None:
    """Said the same way for every layout: the file does not say how strong it was trained."""
    import warnings

    warnings.warn(f"{path.name} does not say its alpha; assuming alpha = rank (scale 1.0). "
                  "If it looks too strong or too weak, pass another lora_scale", stacklevel=3)


def _check_pair(path: Path, name: str, a: torch.Tensor, b: torch.Tensor, down: str, up: str) -> None:
    """A pair whose two halves fit together: two matrices, or a convolution's k x k down and
    1 x 1 up halves (a LoCon), with one rank."""
    if a.ndim not in (2, 4) or a.ndim != b.ndim:
        raise LoRAFileError(f"{path.name}: {name}: {down} is {tuple(a.shape)} and {up} {tuple(b.shape)}; "
                            f"a LoRA pair is two matrices (or two convolutions). {REDO}")
    if a.ndim == 4 and tuple(b.shape[2:]) != (1, 1):
        raise LoRAFileError(f"{path.name}: {name}: {up} is a {tuple(b.shape[2:])} convolution; {KINDS_ADVICE}")
    if a.shape[0] != b.shape[1]:
        raise LoRAFileError(f"{path.name}: {name}: {down} has rank {a.shape[0]} but {up} rank {b.shape[1]} "
                            f"({tuple(a.shape)} and {tuple(b.shape)}); {REDO}")


def lora_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The change ``B A`` a pair makes to its layer's weight: a matrix product, or for a convolution
    the 1 x 1 up half applied to each tap of the k x k down half (the same weight whatever the
    layer's stride or padding, which the down half shares)."""
    if a.ndim == 2:
        return b @ a
    return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)


def _is_wide_convolution(a: torch.Tensor) -> bool:
    """A LoCon pair DiffSynth 1.1.9 cannot fuse (its LoRA loader squeezes 1x1 kernels only)."""
    return a.ndim == 4 and tuple(a.shape[2:]) != (1, 1)


#: keys of LyCORIS kinds the kit does not read: LoHa, LoKr, Tucker LoCon's middle, DoRA's magnitudes
OTHER_KINDS = ("hada_", "lokr_", "lora_mid", "dora_scale", "lora_magnitude_vector")
KINDS_ADVICE = ("the kit reads LoRA and LoCon pairs (a down and a 1x1 up half, as kohya's LoRA layout and peft "
                "write them), not LyCORIS' other kinds such as LoHa, LoKr, Tucker-decomposed LoCon or DoRA: use "
                "a LoRA or LoCon trained by this kit (notebook 03)")


def _refuse_other_kinds(path: Path, state: dict) -> None:
    other = sorted(k for k in state if any(part in k for part in OTHER_KINDS))
    if other:
        raise LoRAFileError(f"{path.name}: {other[0]} ({len(other)} such keys): {KINDS_ADVICE}")


def read_lora(path: str | os.PathLike, unet_config_path: str | os.PathLike | None = None):
    """Read either layout as ``({diffsynth module: (A, B, scale)}, metadata)``.

    ``scale`` is alpha / rank for that module: from ``.alpha`` keys (kohya), the
    file's ``lora_alpha`` metadata (kit files), or 1.0 with a warning.  Half a
    pair or two halves of different ranks raise ``LoRAFileError`` naming the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoRAFileError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise LoRAFileError(f"{path.name}: only .safetensors LoRA files are loaded (a pickled .ckpt "
                            "can run code when opened; convert it first)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise LoRAFileError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    meta_alpha = meta.get("lora_alpha")
    out = {}
    _refuse_other_kinds(path, state)
    if any(k.startswith("lora_unet_") for k in state):
        if unet_config_path is None:
            raise LoRAFileError(f"{path.name}: a kohya-layout file needs the UNet config to map its names: "
                                "pass unet_config_path (the config.json beside the UNet's weights)")
        inverse = {kohya_name(d): ds for ds, d in diffusers_module_map(unet_config_path).items()}
        halves = {}
        for key in state:
            for part in (".lora_down.weight", ".lora_up.weight"):
                if key.endswith(part):
                    halves.setdefault(key[: -len(part)], set()).add(part)
        if not halves:
            raise LoRAFileError(f"{path.name} holds no LoRA weights (lora_down/lora_up pairs)")
        half = sorted(base for base, parts in halves.items() if len(parts) == 1)
        if half:
            have = next(iter(halves[half[0]]))
            lacks = ".lora_up.weight" if have == ".lora_down.weight" else ".lora_down.weight"
            raise LoRAFileError(f"{path.name}: {half[0]}{have} has no {half[0]}{lacks} "
                                f"({len(half)} of {len(halves)} pairs are incomplete); {REDO}")
        guessed = False
        for base in halves:
            if base not in inverse:
                raise LoRAFileError(f"{path.name}: {base} names no module of this UNet (kohya names in the "
                                    "diffusers layout, lora_unet_down_blocks_..., are read; a LoRA fits only the "
                                    "model it was trained on)")
            a, b = state[f"{base}.lora_down.weight"], state[f"{base}.lora_up.weight"]
            _check_pair(path, base, a, b, "lora_down", "lora_up")
            if f"{base}.alpha" in state:
                alpha = float(state[f"{base}.alpha"])
            elif meta_alpha is not None:
                alpha = float(meta_alpha)
            else:
                alpha, guessed = float(a.shape[0]), True
            out[inverse[base]] = (a, b, alpha / a.shape[0])
        if guessed:
            _no_alpha_warning(path)
    else:
        try:
            pairs = lora_pairs_from_peft(state)
        except LoRAFileError:
            def other(k):
                return k.replace(".lora_A.", ".lora_B.") if ".lora_A." in k else k.replace(".lora_B.", ".lora_A.")

            lora_keys = [k for k in state if ".lora_A." in k or ".lora_B." in k]
            half = sorted(k for k in lora_keys if other(k) not in state)
            n = len({k.split(".lora_")[0] for k in lora_keys})
            raise LoRAFileError(f"{path.name}: {half[0]} has no {other(half[0])} "
                                f"({len(half)} of {n} pairs are incomplete); {REDO}") from None
        if not pairs:
            raise LoRAFileError(f"{path.name} holds no LoRA weights (lora_A/lora_B or lora_down/lora_up)")
        for module, (a, b) in pairs.items():
            _check_pair(path, module, a, b, "lora_A", "lora_B")
            scale = float(meta_alpha) / a.shape[0] if meta_alpha is not None else 1.0
            out[module] = (a, b, scale)
        if meta_alpha is None:
            _no_alpha_warning(path)
    return out, meta


def check_fits(path: Path, modules: dict, meta: dict, unet, config: Path) -> None:
    """Every module's change ``B @ A`` has the shape of the UNet weight it is added to.

    Checked before anything is fused, so a LoRA for another model changes nothing; a module this
    UNet does not have is refused too.
    """
    from safetensors import safe_open

    shapes = {name: tuple(t.shape) for name, t in unet.state_dict().items()}
    with safe_open(str(path), "pt") as f:
        kohya = any(k.startswith("lora_unet_") for k in f.keys())
    in_file = {ds: f"{kohya_name(d)} = {ds}" for ds, d in diffusers_module_map(config).items()} if kohya else {}
    said = meta.get("base_model") or meta.get("ss_base_model_version")
    said = f" (the file names its base model: {said})" if said else ""
    absent = sorted(m for m in modules if f"{m}.weight" not in shapes)
    if absent:
        raise LoRAFileError(f"{path.name}: {in_file.get(absent[0], absent[0])} is no layer of this UNet ({len(absent)} "
                            f"of the file's {len(modules)} are not); a LoRA fits only the model it was trained on{said}")
    for module, (a, b, _) in modules.items():
        want = shapes[f"{module}.weight"]
        got = (b.shape[0], a.shape[1]) + tuple(a.shape[2:])
        if got != want:
            raise LoRAFileError(f"{path.name}: {in_file.get(module, module)}: the LoRA changes a {got} "
                                f"weight but this UNet's is {want}; a LoRA fits only the model it was trained "
                                f"on{said}: use one trained on this model, or export or download it again if "
                                "it is damaged")


def _check_scale(scale) -> None:
    if not isinstance(scale, (int, float)) or scale < 0:
        raise ValueError(f"lora scale {scale!r}: use a number >= 0 (1.0 = as trained)")


def fuse_lora(mm, path: str | os.PathLike, scale: float = 1.0) -> int:
    """Fuse a LoRA file into the UNet held by a DiffSynth ``ModelManager``.

    ``scale`` multiplies the trained strength (1.0 = as trained).  Returns the
    number of weights changed; raises ``LoRAFileError`` (nothing fused) for a file that does
    not fit this UNet, and if DiffSynth did not apply its part.
    """
    _check_scale(scale)
    unet_index = mm.model_name.index("sdxl_unet")
    unet_path = Path(mm.model_path[unet_index])
    modules, meta = read_lora(path, unet_path.with_name("config.json"))
    check_fits(Path(path), modules, meta, mm.model[unet_index], unet_path.with_name("config.json"))
    return fuse_modules(mm, path, modules, scale)


def fuse_modules(mm, path: str | os.PathLike, modules: dict, scale: float) -> int:
    """``fuse_lora`` for modules already read and checked (``read_lora``, ``check_fits``): the
    strength dial reads a file once and fuses it at each strength from here."""
    _check_scale(scale)
    if scale == 0:
        return 0
    unet_index = mm.model_name.index("sdxl_unet")
    wide = {m: v for m, v in modules.items() if _is_wide_convolution(v[0])}
    # DiffSynth applies one alpha to every module: fold each module's own scale into B
    state = {}
    for module, (a, b, s) in modules.items():
        if module not in wide:
            state[f"{module}.lora_A.weight"] = a.float()
            state[f"{module}.lora_B.weight"] = b.float() * s
    if state:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            mm.load_lora(str(path), state_dict=state, lora_alpha=float(scale))
        text = buf.getvalue()
        if "Cannot load LoRA" in text or f"{len(state) // 2} tensors are updated" not in text:
            raise LoRAFileError(f"DiffSynth did not apply {Path(path).name} to this UNet "
                                f"(its modules do not match this model): {text.strip()[-300:]}")
    # the k x k convolutions DiffSynth cannot fuse: W += scale * (alpha / rank) * B A, as it does
    params = dict(mm.model[unet_index].named_parameters()) if wide else {}
    with torch.no_grad():
        for module, (a, b, s) in wide.items():
            w = params[f"{module}.weight"]
            delta = float(scale) * s * lora_delta(a.float(), b.float()).to(w.device)
            w.copy_((w.float() + delta).to(w.dtype))         # added in fp32, then stored in the UNet's dtype
    return len(modules)
