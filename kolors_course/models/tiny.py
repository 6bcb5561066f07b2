"""Tiny, deterministic models of the Kolors architecture, for CPU runs.

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
CH = (32, 64, 64)          # UNet channels per level (SDXL: 320, 640, 1280)
HEADS, HEAD_DIM = 4, 16     # attention heads per block (SDXL: 10/20 heads of 64)
TEXT_DIM = 64               # ChatGLM hidden size (Kolors: 4096)
CROSS_DIM = 32              # UNet cross-attention width (Kolors: 2048)
ADD_TIME_DIM = 8            # size-conditioning embedding (SDXL: 256)
VAE_CH = (32, 32, 64, 64)   # VAE channels per level (SDXL: 128, 256, 512, 512)
VOCAB = 65024               # the real tokenizer's padded vocabulary
SEED = 20240801
FORMAT_VERSION = 1

UNET_REL = Path("Kwai-Kolors/Kolors/unet/diffusion_pytorch_model.safetensors")
TEXT_ENCODER_REL = Path("Kwai-Kolors/Kolors/text_encoder")
VAE_REL = Path("AI-ModelScope/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors")


# --- DiffSynth classes of tiny size --------------------------------------------
def _unet_classes():
    from diffsynth.models.sd_unet import (AttentionBlock, DownSampler, PopBlock, PushBlock,
                                          ResnetBlock, Timesteps, UpSampler)
    from diffsynth.models.sdxl_unet import SDXLUNet

    class TinyKolorsUNet(SDXLUNet):
        """SDXLUNet(is_kolors=True) with every width divided by about twenty."""

        def __init__(self, is_kolors: bool = True):
            torch.nn.Module.__init__(self)
            c0, c1, c2 = CH
            temb = c0 * 4

            def attn(ch):
                return AttentionBlock(HEADS, ch // HEADS, ch, 1, CROSS_DIM)

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
            self.conv_norm_out = torch.nn.GroupNorm(num_channels=c0, num_groups=32, eps=1e-5)
            self.conv_act = torch.nn.SiLU()
            self.conv_out = torch.nn.Conv2d(c0, 4, kernel_size=3, padding=1)
            self.is_kolors = True

    return TinyKolorsUNet


def _vae_classes():
    from diffsynth.models.sd_unet import DownSampler, ResnetBlock, UpSampler
    from diffsynth.models.sd_vae_decoder import VAEAttentionBlock
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
            self.conv_norm_out = torch.nn.GroupNorm(num_channels=d, num_groups=32, eps=1e-6)
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
            self.conv_norm_out = torch.nn.GroupNorm(num_channels=a, num_groups=32, eps=1e-5)
            self.conv_act = torch.nn.SiLU()
            self.conv_out = torch.nn.Conv2d(a, 3, kernel_size=3, padding=1)

    return TinySDXLVAEEncoder, TinySDXLVAEDecoder


def diffsynth_classes() -> dict:
    """Model classes for the tiny profile, keyed by DiffSynth's model names."""
    unet = _unet_classes()
    enc, dec = _vae_classes()
    return {"sdxl_unet": unet, "sdxl_vae_encoder": enc, "sdxl_vae_decoder": dec}


# --- the on-disk files, in the real (diffusers / Hugging Face) formats ---------
def unet_diffusers_config() -> dict:
    """The Kolors UNet config (SDXL layout + ChatGLM text projection), shrunk."""
    return dict(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=CH, layers_per_block=2, transformer_layers_per_block=1,
        attention_head_dim=HEADS, use_linear_projection=True,
        cross_attention_dim=CROSS_DIM, encoder_hid_dim=TEXT_DIM, encoder_hid_dim_type="text_proj",
        addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * ADD_TIME_DIM,
        norm_num_groups=32,
    )


def vae_diffusers_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CH, norm_num_groups=32, sample_size=64, scaling_factor=0.13025,
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


def build_tiny_models(cache_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write the tiny model files under ``cache_dir`` (once) and return that folder.

    The folder is built beside the target and renamed into place, so an
    interrupted build never leaves half a model behind.
    """
    cache_dir = Path(cache_dir)
    marker = cache_dir / "tiny_models.json"
    if marker.exists() and not force:
        info = json.loads(marker.read_text())
        if info.get("format_version") == FORMAT_VERSION:
            return cache_dir
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=cache_dir.parent))
    try:
        unet = UNet2DConditionModel(**unet_diffusers_config())
        vae = AutoencoderKL(**vae_diffusers_config())
        unet_cfg = dict(unet.config)
        vae_cfg = dict(vae.config)
        unet_state = _seeded_state(unet, SEED)
        vae_state = _seeded_state(vae, SEED + 1)
        _save_safetensors(unet_state, tmp / UNET_REL)
        (tmp / UNET_REL).with_name("config.json").write_text(json.dumps(_jsonable(unet_cfg), indent=2))
        _save_safetensors(vae_state, tmp / VAE_REL)
        (tmp / VAE_REL).with_name("config.json").write_text(json.dumps(_jsonable(vae_cfg), indent=2))

        cfg = text_encoder_config()
        te_cfg = ChatGLMConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        te_state = _seeded_state(ChatGLMModel(te_cfg), SEED + 2)
        te_dir = tmp / TEXT_ENCODER_REL
        _save_safetensors(te_state, te_dir / "model.safetensors")
        (te_dir / "config.json").write_text(json.dumps(cfg, indent=2))

        (tmp / "tiny_models.json").write_text(json.dumps({
            "format_version": FORMAT_VERSION, "seed": SEED,
            "note": "tiny random-weight models of the Kolors architecture, built by kolors_course",
        }, indent=2))
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


def _jsonable(cfg: dict) -> dict:
    out = {}
    for k, v in cfg.items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out
