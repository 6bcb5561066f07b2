"""Kolors pipelines with random weights, for measuring memory and speed (``bench/gpu.py``,
the GPU test) and for the dress rehearsal's file layout: memory and speed do not depend
on the weights' values, so these measure what a learner's GPU needs without an 18 GB
download."""
from __future__ import annotations

import json
import os
from pathlib import Path

import kolors_course.models.tiny as tiny_models
from kolors_course.core.state import torch_default_dtype, torch_global_seed
from kolors_course.models.loading import ModelLoadError, assemble


KOLORS_UNET_CONFIG = dict(
    _class_name="UNet2DConditionModel", sample_size=128, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], use_linear_projection=True, cross_attention_dim=2048,
    encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=5632,
)
#: xinsir's SDXL ControlNet-Union "promax" (config_promax.json, as far as the layout goes): the
#: key names and shapes DiffSynth recognises (tests/test_controlled_generation.py checks the hash)
KOLORS_CONTROLNET_CONFIG = dict(
    _class_name="ControlNetUnionModel",
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, use_linear_projection=True,
    conditioning_embedding_out_channels=[16, 32, 96, 256], num_control_type=8,
)
#: ChatGLM3-6B as Kolors uses it
KOLORS_TEXT_ENCODER_CONFIG = dict(
    num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128,
    num_attention_heads=32, seq_length=32768, multi_query_attention=True, multi_query_group_num=2,
    add_qkv_bias=True, rmsnorm=True, post_layer_norm=True, original_rope=True, use_cache=False,
)


def random_pipeline(profile, sizes: str = "kolors", device: str | None = None, dtype=None,
                    folder: str | os.PathLike | None = None, controlnet: bool = False):
    """The Kolors pipeline with random weights: Kolors-sized (``sizes="kolors"``) or tiny.

    Memory and speed do not depend on the weights' values, so this measures what
    a learner's GPU needs without downloading 18 GB.  Images are noise.
    ``controlnet``: also a random SDXL ControlNet-Union (1.26 B parameters at Kolors size), as
    ``load_pipeline(controlnet=True)`` would hold it.
    """
    import tempfile

    import torch
    from diffsynth import ModelManager
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    device = device or profile.device
    dtype = dtype or (torch.float16 if device != "cpu" else torch.float32)
    folder = Path(folder or tempfile.mkdtemp(prefix="random-kolors-"))
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    if sizes == "kolors":
        from diffsynth.models.sdxl_unet import SDXLUNet
        from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
        from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder

        from diffsynth.models.sdxl_controlnet import SDXLControlNetUnion

        classes = {"sdxl_unet": lambda: SDXLUNet(is_kolors=True), "sdxl_vae_encoder": SDXLVAEEncoder,
                   "sdxl_vae_decoder": SDXLVAEDecoder, "sdxl_controlnet": SDXLControlNetUnion}
        unet_cfg, te_cfg = KOLORS_UNET_CONFIG, KOLORS_TEXT_ENCODER_CONFIG
    elif sizes == "tiny":
        tiny = tiny_models.diffsynth_classes()
        classes = {"sdxl_unet": tiny["sdxl_unet"], "sdxl_vae_encoder": tiny["sdxl_vae_encoder"],
                   "sdxl_vae_decoder": tiny["sdxl_vae_decoder"], "sdxl_controlnet": tiny["sdxl_controlnet"]}
        unet_cfg = {"_class_name": "UNet2DConditionModel", **tiny_models.unet_diffusers_config()}
        te_cfg = {k: v for k, v in tiny_models.text_encoder_config().items()
                  if k not in ("architectures", "model_type", "torch_dtype")}
    else:
        raise ValueError("sizes must be 'kolors' or 'tiny'")
    if not controlnet:
        classes.pop("sdxl_controlnet")
    (folder / "unet" / "config.json").write_text(json.dumps(unet_cfg, default=list))
    mm = ModelManager(torch_dtype=dtype, device=device)
    # built directly in the target dtype and device (a 6B text encoder in fp32 would not fit),
    # from a fixed seed; the learner's default dtype and random numbers are left as they were
    build_dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.get_default_dtype()
    with torch_global_seed(0), torch_default_dtype(build_dtype), torch.device(device):
        built = {name: make() for name, make in classes.items()}
        # empty_init=False: ChatGLM otherwise leaves its weights as uninitialised memory
        built["kolors_text_encoder"] = ChatGLMModel(ChatGLMConfig(**te_cfg), empty_init=False)
    with torch.no_grad():   # ChatGLM's RMSNorm allocates its weight with torch.empty and never fills it
        for module in built["kolors_text_encoder"].modules():
            if type(module).__name__ == "RMSNorm":
                module.weight.fill_(1.0)
    for name, model in built.items():
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise ModelLoadError(f"random {name} has non-finite weights")
        if name.startswith("sdxl_vae"):
            model = model.to(dtype=torch.float32)     # DiffSynth upcasts the SDXL VAE too
        # DiffSynth 1.1.9's ModelManager loads only from files and has no call to add a model
        # built in memory; writing 18 GB of random weights to load them back would measure the
        # disk.  Its three parallel lists are what every loader of it appends to.
        mm.model.append(model.eval())
        mm.model_name.append(name)
        mm.model_path.append(str(folder / "unet" / "diffusion_pytorch_model.safetensors")
                             if name == "sdxl_unet" else str(folder / name))
    from kolors_course.core.profiles import choose_memory_mode

    mode, _ = choose_memory_mode(profile)
    if mode == "offload":
        # built on the GPU (fast random init), then parked where the offload mode keeps them
        for model in mm.model:
            model.to("cpu")
        if device != "cpu":
            torch.cuda.empty_cache()
    kit = assemble(mm, profile, device, mode)
    if controlnet:
        from kolors_course.models.pipeline import LoadedControlNet

        kit.controlnet_model = LoadedControlNet(mm.model[mm.model_name.index("sdxl_controlnet")],
                                                str(folder / "sdxl_controlnet"))
    return kit
