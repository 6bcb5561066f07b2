"""Tiny, deterministic models of the Kolors architecture, for CPU runs.

The UNet and VAE can be trained (``kolors_course.world.build``, ``kolors-course build-tiny``) on
a small synthetic world of coloured shapes with Chinese captions; the kit ships such a build in
``kolors_course/world/weights/`` and ``build_tiny_models`` puts it into the tiny profile's cache
after checking it against its manifest's SHA-256 (``build_random_tiny_models`` gives the same
files with seeded random weights, the "before training" baseline).  The 2-layer ChatGLM text
encoder is rebuilt from its seed, bit for bit; a build that trained its two transformer layers
with the UNet ships those (``TEXT_ENCODER_TRAINED_REL``, 0.3 MB) and they are laid over it.

The files are written once, in the same on-disk layout and format as the real
weights on ModelScope (diffusers-format UNet and VAE, a Hugging Face folder for
the ChatGLM text encoder), so that ``models.load_pipeline`` reads both profiles
through the same DiffSynth converters.  The real Kolors tokenizer that ships
inside the diffsynth wheel is used unchanged, so Chinese prompts are tokenised
exactly as on the real model.

The DiffSynth classes below reuse DiffSynth's own building blocks (ResnetBlock,
AttentionBlock, Push/Pop blocks) in the SDXL block order that DiffSynth's
state-dict converters expect; only the channel counts are small.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# --- tiny sizes -------------------------------------------------------------
#: UNet channels per level (SDXL: 320, 640, 1280).  48/96/96 rather than 32/64/64: with the layout
#: curriculum the wider UNet draws the asked shape and follows left/right (README, "The tiny world");
#: it costs no more time per training step on 2 cores.
CH = (48, 96, 96)
IMAGE_SIZE = 128            # the side the tiny models are trained at: 16x16x4 latents, enough for shapes
HEADS, HEAD_DIM = 4, 16     # attention heads per block (SDXL: 10/20 heads of 64)
TEXT_DIM = 64               # ChatGLM hidden size (Kolors: 4096)
CROSS_DIM = 32              # UNet cross-attention width (Kolors: 2048)
ADD_TIME_DIM = 8            # size-conditioning embedding (SDXL: 256)
VAE_CH = (32, 32, 64, 64)   # VAE channels per level (SDXL: 128, 256, 512, 512)
#: GroupNorm groups (SDXL: 32 groups of 10-40 channels).  With 32 groups of the tiny widths every
#: group would be a single channel: an instance norm, which throws away each feature map's mean,
#: i.e. the absolute colour of flat regions; 8 groups keep 4-8 channels a group.
NORM_GROUPS = 8
VOCAB = 65024               # the real tokenizer's padded vocabulary
SEED = 20240801
FORMAT_VERSION = 2          # a cache of trained weights (install_trained_models), 128 px
RANDOM_FORMAT_VERSION = 1   # a cache of the seeded random weights (build_tiny_models)

UNET_REL = Path("Kwai-Kolors/Kolors/unet/diffusion_pytorch_model.safetensors")
TEXT_ENCODER_REL = Path("Kwai-Kolors/Kolors/text_encoder")
#: in a build folder only: the text encoder's trained layers (the cache gets the whole model.safetensors)
TEXT_ENCODER_TRAINED_REL = TEXT_ENCODER_REL / "trained_layers.safetensors"
VAE_REL = Path("AI-ModelScope/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors")
#: the SDXL ControlNet-Union ("promax") file, where DiffSynth's own model list puts it on ModelScope
CONTROLNET_REL = Path("AI-ModelScope/controlnet-union-sdxl-1.0/diffusion_pytorch_model_promax.safetensors")
#: ControlNetConditioningLayer widths (SDXL union: 3, 16, 32, 96, 256, 320): three stride-2 convs
#: take the 128-pixel condition to the 16x16 latent grid
COND_CH = (3, 8, 16, 32, 32)


# --- DiffSynth classes of tiny size --------------------------------------------
def _unet_classes():
    from diffsynth.models.sd_unet import (AttentionBlock, DownSampler, PopBlock, PushBlock,
                                          Timesteps, UpSampler)
    from diffsynth.models.sd_unet import ResnetBlock as _Res
    from diffsynth.models.sdxl_unet import SDXLUNet

    class TinyKolorsUNet(SDXLUNet):
        """SDXLUNet(is_kolors=True) with every width divided by about twenty."""

        def __init__(self, is_kolors: bool = True):
            torch.nn.Module.__init__(self)
            c0, c1, c2 = CH
            temb = c0 * 4

            def attn(ch):
                return AttentionBlock(HEADS, ch // HEADS, ch, 1, CROSS_DIM, norm_num_groups=NORM_GROUPS)

            def ResnetBlock(i, o, t=None, eps=1e-5):      # noqa: N802 - DiffSynth's block, our group count
                return _Res(i, o, t, groups=NORM_GROUPS, eps=eps)

            self.time_proj = Timesteps(c0)
            self.time_embedding = torch.nn.Sequential(
                torch.nn.Linear(c0, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
            self.add_time_proj = Timesteps(ADD_TIME_DIM)
            self.add_time_embedding = torch.nn.Sequential(
                torch.nn.Linear(TEXT_DIM + 6 * ADD_TIME_DIM, temb), torch.nn.SiLU(),
                torch.nn.Linear(temb, temb))
            self.conv_in = torch.nn.Conv2d(4, c0, kernel_size=3, padding=1)
            self.text_intermediate_proj = torch.nn.Linear(TEXT_DIM, CROSS_DIM)
            self.blocks = torch.nn.ModuleList([
                ResnetBlock(c0, c0, temb), PushBlock(),
                ResnetBlock(c0, c0, temb), PushBlock(),
                DownSampler(c0), PushBlock(),
                ResnetBlock(c0, c1, temb), attn(c1), PushBlock(),
                ResnetBlock(c1, c1, temb), attn(c1), PushBlock(),
                DownSampler(c1), PushBlock(),
                ResnetBlock(c1, c2, temb), attn(c2), PushBlock(),
                ResnetBlock(c2, c2, temb), attn(c2), PushBlock(),
                ResnetBlock(c2, c2, temb), attn(c2), ResnetBlock(c2, c2, temb),
                PopBlock(), ResnetBlock(c2 + c2, c2, temb), attn(c2),
                PopBlock(), ResnetBlock(c2 + c2, c2, temb), attn(c2),
                PopBlock(), ResnetBlock(c2 + c1, c2, temb), attn(c2), UpSampler(c2),
                PopBlock(), ResnetBlock(c2 + c1, c1, temb), attn(c1),
                PopBlock(), ResnetBlock(c1 + c1, c1, temb), attn(c1),
                PopBlock(), ResnetBlock(c1 + c0, c1, temb), attn(c1), UpSampler(c1),
                PopBlock(), ResnetBlock(c1 + c0, c0, temb),
                PopBlock(), ResnetBlock(c0 + c0, c0, temb),
                PopBlock(), ResnetBlock(c0 + c0, c0, temb),
            ])
            self.conv_norm_out = torch.nn.GroupNorm(num_channels=c0, num_groups=NORM_GROUPS, eps=1e-5)
            self.conv_act = torch.nn.SiLU()
            self.conv_out = torch.nn.Conv2d(c0, 4, kernel_size=3, padding=1)
            self.is_kolors = True

    return TinyKolorsUNet


def _vae_classes():
    from diffsynth.models.sd_unet import DownSampler, UpSampler
    from diffsynth.models.sd_unet import ResnetBlock as _Res
    from diffsynth.models.sd_vae_decoder import VAEAttentionBlock as _Attn

    def ResnetBlock(i, o, eps=1e-6):                     # noqa: N802 - DiffSynth's block, our group count
        return _Res(i, o, None, groups=NORM_GROUPS, eps=eps)

    def VAEAttentionBlock(heads, dim, ch, layers, eps=1e-6):  # noqa: N802
        return _Attn(heads, dim, ch, layers, norm_num_groups=NORM_GROUPS, eps=eps)
    from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder

    a, b, c, d = VAE_CH

    class TinySDXLVAEEncoder(SDXLVAEEncoder):
        def __init__(self, upcast_to_float32: bool = True):
            torch.nn.Module.__init__(self)
            self.scaling_factor = 0.13025
            self.quant_conv = torch.nn.Conv2d(8, 8, kernel_size=1)
            self.conv_in = torch.nn.Conv2d(3, a, kernel_size=3, padding=1)
            self.blocks = torch.nn.ModuleList([
                ResnetBlock(a, a, eps=1e-6), ResnetBlock(a, a, eps=1e-6),
                DownSampler(a, padding=0, extra_padding=True),
                ResnetBlock(a, b, eps=1e-6), ResnetBlock(b, b, eps=1e-6),
                DownSampler(b, padding=0, extra_padding=True),
                ResnetBlock(b, c, eps=1e-6), ResnetBlock(c, c, eps=1e-6),
                DownSampler(c, padding=0, extra_padding=True),
                ResnetBlock(c, d, eps=1e-6), ResnetBlock(d, d, eps=1e-6),
                ResnetBlock(d, d, eps=1e-6), VAEAttentionBlock(1, d, d, 1, eps=1e-6),
                ResnetBlock(d, d, eps=1e-6),
            ])
            self.conv_norm_out = torch.nn.GroupNorm(num_channels=d, num_groups=NORM_GROUPS, eps=1e-6)
            self.conv_act = torch.nn.SiLU()
            self.conv_out = torch.nn.Conv2d(d, 8, kernel_size=3, padding=1)

    class TinySDXLVAEDecoder(SDXLVAEDecoder):
        def __init__(self, upcast_to_float32: bool = True):
            torch.nn.Module.__init__(self)
            self.scaling_factor = 0.13025
            self.post_quant_conv = torch.nn.Conv2d(4, 4, kernel_size=1)
            self.conv_in = torch.nn.Conv2d(4, d, kernel_size=3, padding=1)
            self.blocks = torch.nn.ModuleList([
                ResnetBlock(d, d, eps=1e-6), VAEAttentionBlock(1, d, d, 1, eps=1e-6),
                ResnetBlock(d, d, eps=1e-6),
                ResnetBlock(d, d, eps=1e-6), ResnetBlock(d, d, eps=1e-6),
                ResnetBlock(d, d, eps=1e-6), UpSampler(d),
                ResnetBlock(d, c, eps=1e-6), ResnetBlock(c, c, eps=1e-6),
                ResnetBlock(c, c, eps=1e-6), UpSampler(c),
                ResnetBlock(c, b, eps=1e-6), ResnetBlock(b, b, eps=1e-6),
                ResnetBlock(b, b, eps=1e-6), UpSampler(b),
                ResnetBlock(b, a, eps=1e-6), ResnetBlock(a, a, eps=1e-6),
                ResnetBlock(a, a, eps=1e-6),
            ])
            self.conv_norm_out = torch.nn.GroupNorm(num_channels=a, num_groups=NORM_GROUPS, eps=1e-5)
            self.conv_act = torch.nn.SiLU()
            self.conv_out = torch.nn.Conv2d(a, 3, kernel_size=3, padding=1)

    return TinySDXLVAEEncoder, TinySDXLVAEDecoder


def _controlnet_class():
    from diffsynth.models.sd_controlnet import ControlNetConditioningLayer
    from diffsynth.models.sd_unet import AttentionBlock, DownSampler, PushBlock, Timesteps
    from diffsynth.models.sd_unet import ResnetBlock as _Res
    from diffsynth.models.sdxl_controlnet import ResidualAttentionBlock, SDXLControlNetUnion

    class TinySDXLControlNetUnion(SDXLControlNetUnion):
        """SDXLControlNetUnion with the tiny UNet's widths: the same forward (DiffSynth's own, with
        its Kolors branches), the same eight control types, the UNet's down and mid blocks.

        The down and mid blocks repeat TinyKolorsUNet's on purpose: each class creates its layers in
        its own order, and that order fixes the random draws of their initial weights, so that
        `kolors-course build-tiny` with the same seed gives the shipped files again (a shared
        builder, tried, reordered them)."""

        def __init__(self, global_pool: bool = False):
            torch.nn.Module.__init__(self)
            c0, c1, c2 = CH
            temb = c0 * 4

            def attn(ch):
                return AttentionBlock(HEADS, ch // HEADS, ch, 1, CROSS_DIM, norm_num_groups=NORM_GROUPS)

            def ResnetBlock(i, o, t=None, eps=1e-5):      # noqa: N802 - DiffSynth's block, our group count
                return _Res(i, o, t, groups=NORM_GROUPS, eps=eps)

            self.time_proj = Timesteps(c0)
            self.time_embedding = torch.nn.Sequential(
                torch.nn.Linear(c0, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
            self.add_time_proj = Timesteps(ADD_TIME_DIM)
            # unused with Kolors (the forward borrows the Kolors UNet's), present as in the real file
            self.add_time_embedding = torch.nn.Sequential(
                torch.nn.Linear(TEXT_DIM + 6 * ADD_TIME_DIM, temb), torch.nn.SiLU(),
                torch.nn.Linear(temb, temb))
            self.control_type_proj = Timesteps(ADD_TIME_DIM)
            self.control_type_embedding = torch.nn.Sequential(
                torch.nn.Linear(ADD_TIME_DIM * 8, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
            self.conv_in = torch.nn.Conv2d(4, c0, kernel_size=3, padding=1)
            self.controlnet_conv_in = ControlNetConditioningLayer(channels=COND_CH + (c0,))
            self.controlnet_transformer = ResidualAttentionBlock(c0, HEADS)
            self.task_embedding = torch.nn.Parameter(torch.randn(8, c0))
            self.spatial_ch_projs = torch.nn.Linear(c0, c0)
            self.blocks = torch.nn.ModuleList([
                ResnetBlock(c0, c0, temb), PushBlock(),
                ResnetBlock(c0, c0, temb), PushBlock(),
                DownSampler(c0), PushBlock(),
                ResnetBlock(c0, c1, temb), attn(c1), PushBlock(),
                ResnetBlock(c1, c1, temb), attn(c1), PushBlock(),
                DownSampler(c1), PushBlock(),
                ResnetBlock(c1, c2, temb), attn(c2), PushBlock(),
                ResnetBlock(c2, c2, temb), attn(c2), PushBlock(),
                ResnetBlock(c2, c2, temb), attn(c2), ResnetBlock(c2, c2, temb), PushBlock(),
            ])
            widths = (c0, c0, c0, c0, c1, c1, c1, c2, c2, c2)
            self.controlnet_blocks = torch.nn.ModuleList([torch.nn.Conv2d(w, w, kernel_size=(1, 1)) for w in widths])
            self.global_pool = global_pool
            # the union's control types, as SDXLControlNetUnion numbers them (its __init__ sets them)
            self.task_id = {"openpose": 0, "depth": 1, "softedge": 2, "canny": 3, "lineart": 3,
                            "lineart_anime": 3, "tile": 6, "inpaint": 7}

    return TinySDXLControlNetUnion


def diffsynth_classes() -> dict:
    """Model classes for the tiny profile, keyed by DiffSynth's model names."""
    unet = _unet_classes()
    enc, dec = _vae_classes()
    return {"sdxl_unet": unet, "sdxl_vae_encoder": enc, "sdxl_vae_decoder": dec,
            "sdxl_controlnet": _controlnet_class()}


# --- the on-disk files, in the real (diffusers / Hugging Face) formats ---------
def unet_diffusers_config() -> dict:
    """The Kolors UNet config (SDXL layout + ChatGLM text projection), shrunk."""
    return dict(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=CH, layers_per_block=2, transformer_layers_per_block=1,
        attention_head_dim=HEADS, use_linear_projection=True,
        cross_attention_dim=CROSS_DIM, encoder_hid_dim=TEXT_DIM, encoder_hid_dim_type="text_proj",
        addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * ADD_TIME_DIM,
        norm_num_groups=NORM_GROUPS,
    )


def vae_diffusers_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CH, norm_num_groups=NORM_GROUPS, sample_size=IMAGE_SIZE, scaling_factor=0.13025,
    )


def controlnet_diffusers_config() -> dict:
    """The ControlNet-Union config (diffusers ``ControlNetUnionModel``, xinsir's "promax" layout),
    shrunk to the tiny UNet's widths."""
    return dict(
        in_channels=4, conditioning_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        block_out_channels=CH, layers_per_block=2, transformer_layers_per_block=1,
        attention_head_dim=HEADS, use_linear_projection=True, cross_attention_dim=CROSS_DIM,
        addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * ADD_TIME_DIM, norm_num_groups=NORM_GROUPS,
        conditioning_embedding_out_channels=COND_CH[1:], num_control_type=8, num_trans_channel=CH[0],
        num_trans_head=HEADS, num_trans_layer=1, num_proj_channel=CH[0],
    )


def text_encoder_config() -> dict:
    return dict(
        architectures=["ChatGLMModel"], model_type="chatglm",
        num_layers=2, padded_vocab_size=VOCAB, hidden_size=TEXT_DIM, ffn_hidden_size=128,
        kv_channels=16, num_attention_heads=4, seq_length=256, multi_query_attention=True,
        multi_query_group_num=2, add_qkv_bias=True, rmsnorm=True, post_layer_norm=True,
        original_rope=True, use_cache=False, torch_dtype="float32",
    )


def _seeded_state(module: torch.nn.Module, seed: int) -> dict:
    """Re-draw every parameter from one seeded generator, in name order.

    Independent of how a library initialises by default, so the files are the
    same bytes on every machine and version.  Buffers (such as rotary
    frequencies) are computed values and are kept as the module made them.
    """
    gen = torch.Generator().manual_seed(seed)
    params = {n for n, _ in module.named_parameters()}
    out = {}
    for name, t in sorted(module.state_dict().items()):
        if name not in params:
            out[name] = t.detach().clone().contiguous()
        elif t.dtype.is_floating_point:
            if name.endswith("weight") and t.ndim >= 2:
                fan_in = t[0].numel()
                v = torch.randn(t.shape, generator=gen) / max(fan_in, 1) ** 0.5
            elif "norm" in name and name.endswith("weight"):
                v = torch.ones(t.shape)
            else:
                v = torch.zeros(t.shape)
            out[name] = v.contiguous()
        else:
            out[name] = t.clone()
    return out


def _save_safetensors(state: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata or {"format": "pt"})


def trained_text_encoder_layers(weights=None) -> dict:
    """The text encoder's trained tensors in build folder ``weights`` (``TEXT_ENCODER_TRAINED_REL``:
    its two transformer layers, trained with the UNet), float32; ``{}`` for a build whose text
    encoder stayed random.  The word embeddings and the unused output layer (65,024 x 64 each, 33 MB
    in float32) are never trained: they are rebuilt from the seed, which keeps the shipped files small."""
    if weights is None:
        return {}
    path = Path(weights) / TEXT_ENCODER_TRAINED_REL
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def _new_text_encoder():
    """A tiny ChatGLM of ``text_encoder_config`` with the library's own initial weights."""
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    from kolors_course.models.loading import _no_torch_dtype_notice

    cfg = text_encoder_config()
    # DiffSynth's ChatGLM reads config.torch_dtype, which makes transformers print its
    # "torch_dtype is deprecated" notice: into a learner's first notebook, on a fresh cache
    with _no_torch_dtype_notice():
        return ChatGLMModel(ChatGLMConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))


def _text_encoder_state(weights=None, model=None) -> dict:
    """The seeded state (of ``model``, or a new tiny ChatGLM) with the trained layers of ``weights``."""
    state = _seeded_state(model if model is not None else _new_text_encoder(), SEED + 2)
    trained = trained_text_encoder_layers(weights)
    unknown = sorted(set(trained) - set(state))
    if unknown:
        raise ShippedWeightsError(f"{Path(weights) / TEXT_ENCODER_TRAINED_REL} holds tensors the tiny text encoder "
                                  f"does not have ({unknown[:3]}); it belongs to another build: rebuild it")
    for k, v in trained.items():
        if v.shape != state[k].shape:
            raise ShippedWeightsError(f"{Path(weights) / TEXT_ENCODER_TRAINED_REL}: {k} has shape "
                                      f"{tuple(v.shape)}, the tiny text encoder {tuple(state[k].shape)}")
    state.update(trained)
    return state


def text_encoder_module(weights=None):
    """The tiny ChatGLM text encoder: its weights drawn from its seed, with the trained layers of
    build folder ``weights`` laid over them where it has them (``trained_text_encoder_layers``)."""
    model = _new_text_encoder()
    model.load_state_dict(_text_encoder_state(weights, model))
    return model.eval()


def write_text_encoder(root: Path, weights=None) -> Path:
    """The text encoder folder (Hugging Face layout) under ``root``: seeded, with the trained
    layers of build folder ``weights`` where it has them."""
    te_dir = Path(root) / TEXT_ENCODER_REL
    _save_safetensors(_text_encoder_state(weights), te_dir / "model.safetensors")
    (te_dir / "config.json").write_text(json.dumps(text_encoder_config(), indent=2))
    return te_dir


def write_text_encoder_layers(state: dict, root: Path) -> Path:
    """The trained tensors of a text encoder (all but the frozen embeddings) into build folder ``root``."""
    path = Path(root) / TEXT_ENCODER_TRAINED_REL
    _save_safetensors({k: v.detach().float().contiguous() for k, v in sorted(state.items())}, path)
    return path


# --- DiffSynth state dicts <-> the diffusers files --------------------------------------
def _diffusers_model(kind: str):
    from diffusers import AutoencoderKL, ControlNetUnionModel, UNet2DConditionModel

    if kind == "controlnet":
        return ControlNetUnionModel(**controlnet_diffusers_config())
    return UNet2DConditionModel(**unet_diffusers_config()) if kind == "unet" else AutoencoderKL(**vae_diffusers_config())


def _name_map(kind: str, part: str) -> dict:
    """DiffSynth parameter name -> diffusers name, found by running DiffSynth's own
    ``from_diffusers`` converter on tensors that carry their index as their value (the
    converter renames and reshapes, so each converted tensor says where it came from)."""
    classes = diffsynth_classes()
    ref = _diffusers_model(kind).state_dict()
    names = sorted(ref)
    tagged = {n: torch.full(ref[n].shape, float(i), dtype=torch.float64) for i, n in enumerate(names)}
    converted = classes[part].state_dict_converter().from_diffusers(tagged)
    if isinstance(converted, tuple):
        converted = converted[0]
    out = {}
    for k, t in converted.items():
        i = int(t.flatten()[0])
        if not torch.all(t == i) or t.numel() != ref[names[i]].numel():
            raise RuntimeError(f"DiffSynth's converter mixes tensors for {k}; cannot invert it")
        out[k] = names[i]
    return out


def diffusers_state(kind: str, parts: dict) -> dict:
    """The diffusers-format state dict for DiffSynth modules.

    ``kind`` "unet" with ``parts={"sdxl_unet": state}``, or "vae" with
    ``parts={"sdxl_vae_encoder": state, "sdxl_vae_decoder": state}``.
    """
    ref = _diffusers_model(kind).state_dict()
    out = {}
    for part, state in parts.items():
        mapping = _name_map(kind, part)
        for k, v in state.items():
            if k not in mapping:
                continue                    # buffers DiffSynth computes itself
            name = mapping[k]
            out[name] = v.detach().to(torch.float32).reshape(ref[name].shape).contiguous()
    missing = sorted(set(ref) - set(out))
    if missing:
        raise RuntimeError(f"no DiffSynth weight for {len(missing)} diffusers names, e.g. {missing[:3]}")
    return out


def write_unet(state: dict, root: Path, dtype=torch.float32) -> Path:
    """The DiffSynth UNet ``state`` as the real layout's diffusers file plus config.json."""
    path = Path(root) / UNET_REL
    sd = {k: v.to(dtype) for k, v in diffusers_state("unet", {"sdxl_unet": state}).items()}
    _save_safetensors(sd, path)
    cfg = dict(_diffusers_model("unet").config)
    path.with_name("config.json").write_text(json.dumps(_jsonable(cfg), indent=2))
    return path


def write_vae(encoder_state: dict, decoder_state: dict, root: Path, dtype=torch.float32) -> Path:
    path = Path(root) / VAE_REL
    sd = diffusers_state("vae", {"sdxl_vae_encoder": encoder_state, "sdxl_vae_decoder": decoder_state})
    _save_safetensors({k: v.to(dtype) for k, v in sd.items()}, path)
    cfg = dict(_diffusers_model("vae").config)
    path.with_name("config.json").write_text(json.dumps(_jsonable(cfg), indent=2))
    return path


def write_controlnet(state: dict, root: Path, dtype=torch.float32) -> Path:
    """The DiffSynth ControlNet-Union ``state`` as a diffusers ``ControlNetUnionModel`` file (the
    layout of xinsir's promax file, which DiffSynth's converter reads) plus config.json."""
    path = Path(root) / CONTROLNET_REL
    sd = diffusers_state("controlnet", {"sdxl_controlnet": state})
    _save_safetensors({k: v.to(dtype) for k, v in sd.items()}, path)
    cfg = dict(_diffusers_model("controlnet").config)
    path.with_name("config.json").write_text(json.dumps(_jsonable(cfg), indent=2))
    return path


def load_diffsynth_state(kind: str, path: Path) -> dict:
    """A diffusers file back into DiffSynth modules' state dicts (as ``load_pipeline`` reads it)."""
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    classes = diffsynth_classes()
    parts = {"unet": ["sdxl_unet"], "controlnet": ["sdxl_controlnet"]}.get(kind, ["sdxl_vae_encoder", "sdxl_vae_decoder"])
    out = {}
    for part in parts:
        conv = classes[part].state_dict_converter().from_diffusers(sd)
        out[part] = conv[0] if isinstance(conv, tuple) else conv
    return out


# --- the profile's cache -----------------------------------------------------------------
class ShippedWeightsError(RuntimeError):
    """The trained weights that ship with the kit are missing or do not match their manifest."""


def shipped_weights_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "world" / "weights"


def weights_folder(weights=None) -> Path:
    """The build folder a tiny profile uses: its ``tiny_weights`` if set, else the shipped one."""
    return Path(weights) if weights else shipped_weights_dir()


def sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_shipped(weights: Path | None = None) -> dict:
    """The shipped manifest, after checking every file it lists against its SHA-256."""
    weights = Path(weights or shipped_weights_dir())
    manifest_path = weights / "manifest.json"
    if not manifest_path.is_file():
        raise ShippedWeightsError(
            f"the tiny profile's trained weights are missing: no {manifest_path}. Reinstall the kit, "
            "or rebuild them with `kolors-course build-tiny --out kolors_course/world/weights` (about an hour on a CPU).")
    manifest = json.loads(manifest_path.read_text())
    for rel, info in manifest["files"].items():
        p = weights / rel
        if not p.is_file():
            raise ShippedWeightsError(f"shipped weight file missing: {p} (listed in {manifest_path})")
        got = sha256(p)
        if got != info["sha256"]:
            raise ShippedWeightsError(
                f"{p} does not match its manifest: SHA-256 {got[:16]}..., expected {info['sha256'][:16]}.... "
                "The file is damaged or was replaced; reinstall the kit or rebuild the weights with "
                "`kolors-course build-tiny`.")
    return manifest


def _cache_is(cache_dir: Path, version: int, weights_sha256: dict | None = None) -> bool:
    """Whether ``cache_dir`` already holds a finished cache of ``version`` (and of those weights)."""
    marker = cache_dir / "tiny_models.json"
    if not marker.exists():
        return False
    info = json.loads(marker.read_text())
    return info.get("format_version") == version and (
        weights_sha256 is None or info.get("weights_sha256") == weights_sha256)


def _write_cache(cache_dir: Path, fill, marker: dict, weights=None) -> Path:
    """Build a cache folder beside ``cache_dir`` with ``fill(folder)``, the text encoder and the
    marker (written last), then rename it into place: an interrupted build leaves no half model."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=cache_dir.parent))
    try:
        fill(tmp)
        write_text_encoder(tmp, weights)
        (tmp / "tiny_models.json").write_text(json.dumps(dict(marker, seed=SEED), indent=2))
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


def build_tiny_models(cache_dir: str | os.PathLike, force: bool = False, weights=None) -> Path:
    """Write the tiny profile's model files under ``cache_dir`` (once) and return that folder.

    The UNet and VAE are the trained ones that ship with the kit (``kolors_course/world/weights/``,
    made by ``kolors-course build-tiny``), or those of another build folder ``weights`` (the
    profile's ``tiny_weights``), checked against their manifest; the text encoder is rebuilt from
    its seed.
    """
    return install_trained_models(cache_dir, weights_folder(weights), force=force)


def build_random_tiny_models(cache_dir: str | os.PathLike, force: bool = False) -> Path:
    """The same files with seeded random UNet and VAE weights (the same bytes on every machine).

    Not what the tiny profile uses: the "before training" baseline, for comparisons and for
    tests that need a cache of other weights."""
    cache_dir = Path(cache_dir)
    if _cache_is(cache_dir, RANDOM_FORMAT_VERSION) and not force:
        return cache_dir

    def fill(folder: Path) -> None:
        for kind, rel, seed in (("unet", UNET_REL, SEED), ("vae", VAE_REL, SEED + 1)):
            model = _diffusers_model(kind)
            _save_safetensors(_seeded_state(model, seed), folder / rel)
            (folder / rel).with_name("config.json").write_text(json.dumps(_jsonable(dict(model.config)), indent=2))

    return _write_cache(cache_dir, fill, {
        "format_version": RANDOM_FORMAT_VERSION,
        "note": "tiny random-weight models of the Kolors architecture, built by kolors_course"})


def install_trained_models(cache_dir: str | os.PathLike, weights: Path, force: bool = False) -> Path:
    """Put trained tiny model files (a ``build_tiny`` output folder, ``weights``) under ``cache_dir``.

    The trained UNet and VAE (and ControlNet-Union, where built) with their config.json are copied
    after their SHA-256 is checked
    against the folder's manifest; the text encoder is rebuilt from its seed.
    """
    cache_dir, weights = Path(cache_dir), Path(weights)
    manifest = check_shipped(weights)
    # the classes are built at this module's widths: a build at other widths would fail deep in a
    # state-dict load with a tensor-shape message, so say it here
    for key, name, ours in (("unet_channels", "UNet", CH), ("vae_channels", "VAE", VAE_CH)):
        theirs = manifest.get("settings", {}).get(key)
        if theirs is not None and list(theirs) != list(ours):
            raise ShippedWeightsError(
                f"{weights} holds a {name} of channels {list(theirs)}, but this kit's tiny "
                f"models are built with {list(ours)} (kolors_course.models.tiny): rebuild the weights with this "
                "kit's `kolors-course build-tiny`, or load them with the kit version that made them.")
    shas = {k: v["sha256"] for k, v in manifest["files"].items()}
    if _cache_is(cache_dir, FORMAT_VERSION, shas) and not force:
        return cache_dir      # a rebuilt or updated kit has other hashes, and refreshes the cache

    def fill(folder: Path) -> None:
        for rel in manifest["files"]:         # UNet, VAE (and ControlNet), each with its config.json
            if Path(rel) == TEXT_ENCODER_TRAINED_REL:
                continue                      # laid over the seeded text encoder by _write_cache
            dst = folder / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights / rel, dst)

    return _write_cache(cache_dir, fill, {
        "format_version": FORMAT_VERSION,
        "weights_sha256": shas,
        "note": "tiny Kolors-architecture models: UNet and VAE trained on the kit's synthetic world "
                "(kolors_course/world), text encoder rebuilt from its seed"
                + (" with its trained layers" if (weights / TEXT_ENCODER_TRAINED_REL).is_file() else "")},
        weights=weights)


def _jsonable(cfg: dict) -> dict:
    out = {}
    for k, v in cfg.items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out
