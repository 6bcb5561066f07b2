"""The dress rehearsal's pieces at tiny sizes: the weight writer (same code as the Kolors-sized
run) writes files that ``load_pipeline`` loads, in the published layout; the rehearsal profile
is the kolors profile with only its numbers changed.  The full-size run is ``make rehearsal``."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import kolors_course.models.loading as models
import kolors_course.models.rehearsal as rehearsal
import kolors_course.models.tiny as tiny_models
from kolors_course.core.profiles import KOLORS, choose_profile


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return rehearsal.write_weights(tmp_path_factory.mktemp("rehearsal"), sizes="tiny",
                                   text_encoder_shards=3, quiet=True)


def test_rehearsal_profile_is_kolors_with_cpu_numbers():
    prof = choose_profile("kolors-rehearsal")
    assert prof is rehearsal.REHEARSAL
    changed = {f.name for f in dataclasses.fields(KOLORS) if getattr(KOLORS, f.name) != getattr(prof, f.name)}
    assert changed <= {"name", "model_source", "cache_dir", "device", "dtype", "memory_mode", "height", "width",
                       "steps", "dataset", "dataset_limit", "min_side", "train_resolution", "train_steps",
                       "scorer", "story_sizes"}, changed
    # the training recipe and the model ids are the kolors profile's
    for name in ("lora_rank", "lora_alpha", "learning_rate", "batch_size", "gradient_checkpointing",
                 "cfg_scale", "kolors_model_id", "vae_model_id"):
        assert getattr(prof, name) == getattr(KOLORS, name)
    assert (prof.device, prof.dtype, prof.height, prof.train_resolution) == ("cpu", "bfloat16", 128, 128)
    assert prof.model_source == "rehearsal" and prof.scorer == "tiny"


def test_tiny_weights_have_the_published_layout(tiny_cache):
    prof = rehearsal.REHEARSAL.with_(cache_dir=str(tiny_cache))
    files = models.model_files(prof)
    assert not files.missing()
    assert files.unet.with_name("config.json").is_file() and files.vae.with_name("config.json").is_file()
    te = files.text_encoder
    index = json.loads((te / "pytorch_model.bin.index.json").read_text())
    shards = sorted({v for v in index["weight_map"].values()})
    assert shards == [f"pytorch_model-{i:05d}-of-00003.bin" for i in (1, 2, 3)]
    assert all(k.startswith("transformer.") for k in index["weight_map"])
    assert {"tokenizer.model", "tokenizer_config.json", "vocab.txt"} <= {p.name for p in te.iterdir()}
    cfg = json.loads((te / "config.json").read_text())
    assert cfg["architectures"] == ["ChatGLMModel"] and cfg["model_type"] == "chatglm"
    shard = torch.load(te / shards[0], weights_only=True)      # plain tensor dicts, as transformers reads them
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all() for t in shard.values())
    assert rehearsal.cache_complete(tiny_cache, "tiny") and not rehearsal.cache_complete(tiny_cache, "kolors")


def test_tiny_weights_load_through_load_pipeline(tiny_cache, monkeypatch):
    # the rehearsal profile loads the real DiffSynth classes; tiny sizes need the tiny ones
    monkeypatch.setattr(models, "_model_classes", lambda profile: tiny_models.diffsynth_classes())
    prof = choose_profile("kolors-rehearsal", cache_dir=str(tiny_cache))
    pipe = models.load_pipeline(prof)
    te = pipe.text_encoder_kolors
    norms = [m.weight for m in te.modules() if type(m).__name__ == "RMSNorm"]
    assert norms and all(bool((w == 1).all()) for w in norms)
    assert all(torch.isfinite(p.float()).all() for p in te.parameters())
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    from kolors_course.generation.text2image import generate
    img = generate(pipe, "一只猫", seed=0)
    assert img.size == (128, 128) and np.asarray(img).std() > 0
    # notebook 05's ControlNet-Union is in the rehearsal cache too, in the promax layout
    cpipe = models.load_pipeline(prof, controlnet=True)
    from PIL import Image
    edges = Image.new("RGB", (128, 128))
    assert generate(cpipe, "一只猫", seed=0, control_image=edges, control="canny").size == (128, 128)


def test_published_shard_names_count_as_complete(tiny_cache):
    """The published shards prefix every name with "transformer."; the completeness check strips it."""
    from diffsynth.models.kolors_text_encoder import ChatGLMModel
    te = models.model_files(rehearsal.REHEARSAL.with_(cache_dir=str(tiny_cache))).text_encoder
    model = ChatGLMModel.from_pretrained(str(te), dtype=torch.bfloat16)
    models.check_text_encoder_complete(te, model)


def test_published_shard_names_missing_weight_is_refused(tiny_cache, tmp_path):
    from diffsynth.models.kolors_text_encoder import ChatGLMModel
    te = models.model_files(rehearsal.REHEARSAL.with_(cache_dir=str(tiny_cache))).text_encoder
    model = ChatGLMModel.from_pretrained(str(te), dtype=torch.bfloat16)
    index = json.loads((te / "pytorch_model.bin.index.json").read_text())
    index["weight_map"].pop("transformer.encoder.final_layernorm.weight")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(models.ModelLoadError, match="lacks 1 weights"):
        models.check_text_encoder_complete(tmp_path, model)


def test_an_unfinished_write_is_not_used(tmp_path):
    """The marker is written last: without it the cache counts as incomplete and is not loaded."""
    prof = rehearsal.REHEARSAL.with_(cache_dir=str(tmp_path))
    assert not rehearsal.cache_complete(tmp_path)
    with pytest.raises(models.MissingWeightsError, match="rehearsal --weights-only"):
        models.ensure_weights(prof)


def test_kolors_sized_plan_matches_the_published_sizes():
    """Names and shapes at the real sizes, on the meta device: the UNet's 2.58 billion parameters
    and the text encoder's 6.24 billion in seven shards of about equal size."""
    unet_cfg, vae_cfg, te_cfg = rehearsal.configs("kolors")
    unet = rehearsal._unet_shapes(unet_cfg)
    assert sum(rehearsal._numel(s) for s in unet.values()) == 2_579_458_820
    te = rehearsal._text_encoder_shapes(te_cfg)
    plan = rehearsal._shard_plan(te, 7)
    sizes = [2 * sum(rehearsal._numel(te[n]) for n in names) for names in plan]
    assert len(plan) == 7 and sorted(sum(plan, [])) == sorted(te)
    assert 12.4e9 < sum(sizes) < 12.6e9 and max(sizes) < 2.3e9
    assert te["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (27392, 4096)
    vae = rehearsal._vae_shapes(vae_cfg)
    assert 80e6 < sum(rehearsal._numel(s) for s in vae.values()) < 90e6


def test_random_values_are_small_and_norms_are_one():
    gen = torch.Generator().manual_seed(0)
    w = rehearsal.random_tensor("transformer.encoder.layers.0.mlp.dense_4h_to_h.weight", (64, 1024), gen)
    assert w.dtype == torch.bfloat16 and abs(float(w.float().std()) - 1024 ** -0.5) < 0.005
    assert bool((rehearsal.random_tensor("transformer.encoder.layers.0.input_layernorm.weight", (8,), gen) == 1).all())
    assert bool((rehearsal.random_tensor("conv_in.bias", (8,), gen) == 0).all())
