"""The LoRA adapters: peft on the UNet's attention projections (and, for a LoCon, its residual
blocks' convolutions), their weights read and written through peft's own state-dict calls, and the
optimizer that trains them."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from kolors_course.core.state import torch_global_seed
from kolors_course.lora.config import TrainConfig, TrainingError


def is_lora_target(name: str, target_modules) -> bool:
    """Whether layer ``name`` is one of ``target_modules``, as peft matches them: by the end of its
    dotted name, so "to_k" is every attention's key projection and "attn2.to_k" only the
    cross-attention's (the one that reads the text)."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


# the layers the kit can train, export and fuse: Linear layers (the attention projections) and
# convolutions (a LoCon: peft gives a k x k convolution a k x k down and a 1 x 1 up convolution)
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def add_lora(unet, cfg: TrainConfig):
    """Freeze the UNet and add peft LoRA adapters to ``cfg.target_modules``: attention projections
    (Linear layers) and convolutions, what the kit exports and fuses; a name that is no such layer
    is refused before anything changes."""
    check_layers(unet, cfg)
    return inject_lora(unet, cfg)


def check_layers(unet, cfg: TrainConfig) -> None:
    """``cfg.target_modules`` name layers of this UNet that the kit can adapt (a ``TrainingError``
    saying which are not, and what the layers are called)."""
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, ADAPTABLE)}
    missing = [t for t in cfg.target_modules if not any(is_lora_target(n, (t,)) for n in layers)]
    if missing:
        raise TrainingError(f"target_modules {missing} are not layers of this UNet (its attention layers "
                            "are to_q, to_k, to_v, to_out; attn1.* are self-attention's, attn2.* cross-attention's; "
                            "its residual blocks' convolutions are conv1, conv2)")
    # the fusing and the files treat a convolution's change as B A tap by tap: plain convolutions only
    odd = [n for n in targeted_layers(unet, cfg.target_modules) if isinstance(layers[n], torch.nn.Conv2d)
           and (layers[n].groups != 1 or tuple(layers[n].dilation) != (1, 1))]
    if odd:
        raise TrainingError(f"target_modules name grouped or dilated convolutions ({odd[0]}), which the kit "
                            "cannot fuse or export; name plain ones such as conv1, conv2")


def targeted_layers(unet, target_modules) -> list[str]:
    """The names of the layers ``target_modules`` puts adapters on (as ``add_lora`` would)."""
    return [n for n, m in unet.named_modules() if isinstance(m, ADAPTABLE) and is_lora_target(n, target_modules)]


def check_targets(unet, unet_config_path, cfg: TrainConfig) -> None:
    """Everything ``add_lora`` checks, and that the export can name every targeted layer in the
    kohya layout: run before the training set is encoded, so a wrong name costs seconds, not a
    run that fails at its export."""
    from kolors_course.lora.files import unexportable

    check_layers(unet, cfg)
    bad = unexportable(targeted_layers(unet, cfg.target_modules), unet_config_path)
    if bad:
        targets = [t for t in cfg.target_modules if any(is_lora_target(m, (t,)) for m in bad)]
        raise TrainingError(f"target_modules {targets}: {bad[0]}" + (f" and {len(bad) - 1} more layers" if len(bad) > 1 else "")
                            + " cannot be written in the kohya layout ComfyUI reads (the kit's map to diffusers "
                            "names has no entry for them); leave them out of target_modules")


def inject_lora(unet, cfg: TrainConfig):
    """Freeze the UNet, add peft adapters to ``cfg.target_modules`` (any layer peft adapts, without
    ``add_lora``'s check) and return the adapters' parameters, in fp32 and trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                      init_lora_weights=True, lora_dropout=0.0)
    # peft draws the initial A matrices from torch's global generator: seeded for the run,
    # and the learner's generator put back afterwards
    with torch_global_seed(cfg.seed):
        inject_adapter_in_model(lcfg, unet)
    params = []
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()     # LoRA weights train in fp32 under mixed precision
            p.requires_grad_(True)
            params.append(p)
    return params


def remove_lora(unet) -> int:
    """Take the peft adapters out of the UNet again: each wrapped layer is replaced by the layer it
    wraps, so the UNet has its own weight names back (``...to_k.weight``).  Returns how many layers
    were unwrapped.  The adapters' values are not merged: the LoRA lives in the exported file."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, module.get_base_layer())
    unet.__dict__.pop("peft_config", None)      # peft's record of the adapters: a later run would warn
    return len(wrapped)


@contextmanager
def adapters_off(unet):
    """The UNet as it was before its adapters: peft's own switch on each adapted layer, put back as
    it was afterwards (on error too), with the adapters' trainable flags."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    # peft's switch also sets the adapters' trainable flags: note them and each switch, and put both back
    was_off = [m.disable_adapters for m in layers]
    flags = {p: p.requires_grad for m in layers for n, p in m.named_parameters() if "lora_" in n}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield unet
    finally:
        for m, off in zip(layers, was_off):
            m.enable_adapters(not off)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def lora_state(unet) -> dict:
    """The LoRA weights only, as a float32 CPU state dict (``{module}.lora_A.weight`` ...):
    peft's own view of the adapter, without its adapter-name infix."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state(unet, state: dict) -> None:
    """Put ``state`` (as ``lora_state`` returns it) into the UNet's adapters, all or nothing."""
    from peft import set_peft_model_state_dict

    if set(lora_state(unet)) != set(state):
        raise TrainingError("the checkpoint's LoRA layers do not match this run's settings "
                            "(rank or target_modules changed?); start a new run_name")
    with torch.no_grad():
        result = set_peft_model_state_dict(unet, state)
    if result.unexpected_keys:
        raise TrainingError(f"peft did not place {len(result.unexpected_keys)} checkpoint tensors "
                            f"(e.g. {result.unexpected_keys[:2]}); start a new run_name")


def all_finite(tensors) -> bool:
    tensors = list(tensors)
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def make_optimizer(params, cfg: TrainConfig):
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise TrainingError("use_8bit_adam=True needs `pip install bitsandbytes` (GPU only)") from exc
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
