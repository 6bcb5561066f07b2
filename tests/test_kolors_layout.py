"""What can be checked of the kolors profile without its weights: the real model's
key names and shapes, built on the meta device (no memory, no download)."""
import json

import pytest
import torch

import kolors_course.lora.files as lora_files
import kolors_course.models.loading as models
import kolors_course.models.random_weights as random_weights
from kolors_course.core.profiles import KOLORS

KOLORS_UNET_CONFIG = random_weights.KOLORS_UNET_CONFIG   # the real Kolors UNet config (diffusers format)


@pytest.fixture(scope="module")
def kolors_unet_config(tmp_path_factory):
    p = tmp_path_factory.mktemp("kolors") / "config.json"
    p.write_text(json.dumps(KOLORS_UNET_CONFIG))
    return p


def test_kolors_files_layout_matches_the_download_list():
    files = models.model_files(KOLORS)
    assert files.unet.relative_to(KOLORS.cache_path).as_posix() == \
        "Kwai-Kolors/Kolors/unet/diffusion_pytorch_model.safetensors"
    assert files.vae.relative_to(KOLORS.cache_path).as_posix() == \
        "AI-ModelScope/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors"
    patterns = models.KOLORS_FILES["Kwai-Kolors/Kolors"]
    assert "unet/diffusion_pytorch_model.safetensors" in patterns and "unet/config.json" in patterns
    assert "text_encoder/*" in patterns


def test_real_kolors_unet_keys_convert_onto_diffsynth_unet(kolors_unet_config):
    """Every tensor of a diffusers-format Kolors UNet lands on a same-shaped SDXLUNet(is_kolors) weight."""
    from diffusers import UNet2DConditionModel
    from diffsynth.models.sdxl_unet import SDXLUNet
    with torch.device("meta"):
        src = UNet2DConditionModel.from_config(KOLORS_UNET_CONFIG)
        dst = SDXLUNet(is_kolors=True)
    assert sum(p.numel() for p in src.parameters()) == sum(p.numel() for p in dst.parameters())
    converted, extra = SDXLUNet.state_dict_converter().from_diffusers(src.state_dict())
    assert extra == {"is_kolors": True}
    target = dst.state_dict()
    assert set(converted) == set(target)
    bad = [k for k, v in converted.items() if tuple(v.shape) != tuple(target[k].shape)]
    assert not bad, bad[:5]


def test_kohya_names_exist_for_every_kolors_lora_layer(kolors_unet_config):
    from diffsynth.models.sdxl_unet import SDXLUNet
    with torch.device("meta"):
        unet = SDXLUNet(is_kolors=True)
    targets = [n for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in ("to_q", "to_k", "to_v", "to_out")]
    mapping = lora_files.diffusers_module_map(kolors_unet_config)
    missing = [t for t in targets if t not in mapping]
    assert not missing, missing[:5]
    assert len(targets) == 4 * 2 * 70   # 70 transformer blocks, self- and cross-attention
    assert mapping["blocks.7.transformer_blocks.0.attn1.to_out"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"


def test_real_text_encoder_index_is_checked_for_missing_weights(tmp_path):
    """The real text encoder ships .bin shards with an index; a shard missing from the
    index would otherwise be filled with random weights by transformers."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2)
            self.b = torch.nn.Linear(2, 2)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "1.bin", "a.bias": "1.bin", "b.weight": "2.bin"}}))
    with pytest.raises(models.ModelLoadError, match="lacks 1 weights"):
        models.check_text_encoder_complete(tmp_path, Model())
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: "1.bin" for k in Model().state_dict()}}))
    models.check_text_encoder_complete(tmp_path, Model())
