"""Controlled generation (notebook 05, issue 13 parts 2-3): the ControlNet-Union through
``kc.generate(control_image=, control=, control_strength=)``, on the tiny profile's trained
ControlNet and, at full size on the meta device, on the kolors classes and file layout."""
import numpy as np
import pytest
import torch

import kolors_course.models.loading as models
import kolors_course.models.tiny as T
from kolors_course.control.conditions import ReferenceImageError, canny, colour
from kolors_course.control.measure import colour_layout_error, edge_overlap
from kolors_course.generation.text2image import generate
from kolors_course.world import scenes as W

PROMPT = "一个红色的圆形，蓝色背景"


@pytest.fixture(scope="module")
def cpipe(tiny):
    return models.load_pipeline(tiny, controlnet=True)


@pytest.fixture(scope="module")
def reference():
    return W.render(W.Scene("星形", "黄色", "紫色", size="大的", position="左边"), size=64, seed=3)


def test_the_tiny_controlnet_is_a_controlnet_union_file_diffusers_loads(tmp_path):
    """The shipped file is a diffusers ControlNetUnionModel (xinsir's promax layout), complete."""
    from diffusers import ControlNetUnionModel
    from safetensors.torch import load_file

    path = T.shipped_weights_dir() / T.CONTROLNET_REL
    model = ControlNetUnionModel.from_config(ControlNetUnionModel.load_config(str(path.parent)))
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    assert not missing and not unexpected


def test_control_follows_the_condition_reproducibly_and_strength_zero_is_the_plain_picture(cpipe, reference):
    edges = canny(reference)
    plain = np.asarray(generate(cpipe, PROMPT, seed=4))
    a = np.asarray(generate(cpipe, PROMPT, seed=4, control_image=edges, control="canny"))
    b = np.asarray(generate(cpipe, PROMPT, seed=4, control_image=edges, control="canny"))
    assert (a == b).all()                                   # same seed, same picture
    assert np.abs(a.astype(int) - plain).mean() > 0.5       # the ControlNet changed it (2 steps: a little)
    zero = np.asarray(generate(cpipe, PROMPT, seed=4, control_image=edges, control="canny", control_strength=0))
    assert (zero == plain).all()
    # the strength scales the ControlNet's residuals: a whisper of it is nearly the plain picture
    faint = np.asarray(generate(cpipe, PROMPT, seed=4, control_image=edges, control="canny", control_strength=0.01))
    assert np.abs(faint.astype(int) - plain).mean() < 0.2 * np.abs(a.astype(int) - plain).mean()
    # the pipeline's own (empty) ControlNet manager is back: a plain call is unchanged afterwards
    assert (np.asarray(generate(cpipe, PROMPT, seed=4)) == plain).all()
    assert not cpipe.diffsynth.controlnet.models


def test_a_condition_of_another_size_is_fitted_not_refused(cpipe):
    ref = W.render(W.Scene("圆形", "红色", "蓝色"), size=128, seed=0)
    img = generate(cpipe, PROMPT, seed=1, control_image=colour(ref, 8), control="colour")
    assert img.size == (64, 64)


def test_a_fitted_condition_keeps_what_makes_it_a_condition():
    """What the ControlNet sees after fitting a condition to the output size (here 96 -> 128 px):
    a colour grid only its own colours, in hard cells; an edge map only white on black."""
    from PIL import Image

    from kolors_course.control.steer import _condition_image

    ref = W.render(W.Scene("星形", "黄色", "紫色", size="大的", position="右边"), size=96, seed=2)
    grid = colour(ref, 8)
    fitted = np.asarray(_condition_image(grid, "colour", 128, 128)).reshape(-1, 3)
    assert {tuple(c) for c in np.unique(fitted, axis=0)} <= {tuple(c) for c in np.asarray(grid).reshape(-1, 3)}
    edges = _condition_image(canny(ref), "canny", 128, 128)
    assert edges.size == (128, 128) and set(np.unique(np.asarray(edges))) <= {0, 255}
    assert isinstance(edges, Image.Image)


def test_bad_control_input_gets_a_clear_message(tiny, cpipe, reference, tiny_pipe):
    edges = canny(reference)
    with pytest.raises(ValueError, match="controlnet=True"):
        generate(tiny_pipe, PROMPT, control_image=edges)
    with pytest.raises(ValueError, match="unknown condition"):
        generate(cpipe, PROMPT, control_image=edges, control="edges")
    for bad in (-0.5, 3, "1", True):
        with pytest.raises(ValueError, match="control_strength"):
            generate(cpipe, PROMPT, control_image=edges, control_strength=bad)
    with pytest.raises(ReferenceImageError, match="looks like the reference"):
        generate(cpipe, PROMPT, control_image=reference, control="canny")
    with pytest.raises(ReferenceImageError, match="extract_condition"):
        generate(cpipe, PROMPT, control_image=np.zeros((64, 64, 3)), control="canny")
    with pytest.raises(TypeError, match="control_image="):
        generate(cpipe, PROMPT, controlnet_image=edges)
    with pytest.raises(ValueError, match="pass control_image"):
        generate(cpipe, PROMPT, control_strength=0.5)
    # the tiny ControlNet learned canny and colour only; the others are refused, not made up
    with pytest.raises(ValueError, match="trained for canny, colour only"):
        generate(cpipe, PROMPT, control_image=edges, control="depth")


def test_an_interrupted_controlled_call_puts_the_pipeline_back(cpipe, reference):
    edges = canny(reference)
    saved = cpipe.diffsynth.controlnet
    with pytest.raises(TypeError):
        generate(cpipe, PROMPT, control_image=edges, not_a_setting=1)     # DiffSynth raises mid-call
    assert cpipe.diffsynth.controlnet is saved and not saved.models


def test_the_offload_memory_mode_gives_the_same_controlled_picture(tiny, cpipe, reference):
    edges = canny(reference)
    off = models.load_pipeline(tiny.with_(memory_mode="offload"), controlnet=True)
    assert off.cpu_offload
    a = np.asarray(generate(off, PROMPT, seed=6, control_image=edges, control_strength=0.7))
    b = np.asarray(generate(cpipe, PROMPT, seed=6, control_image=edges, control_strength=0.7))
    assert (a == b).all()


def test_control_works_with_a_lora_at_any_strength(tiny, cpipe, reference, tmp_path):
    """The LoRA (set_lora_scale) and the ControlNet together: each still changes the picture."""
    from kolors_course.data.build import build_training_set
    from kolors_course.data.recipe import Recipe
    from kolors_course.lora.config import TrainConfig
    from kolors_course.lora.strength import lora_at
    from kolors_course.lora.train import train_lora

    build_training_set("synthetic", tmp_path / "ds", recipe=Recipe(min_width=48, min_height=48), limit=4)
    cfg = TrainConfig.for_profile(tiny, max_steps=4, learning_rate=5e-2, rank=4, alpha=8.0)
    lora = train_lora(tiny, tmp_path / "ds", tmp_path / "run", cfg).files["lora"]
    edges = canny(reference)
    controlled = np.asarray(generate(cpipe, PROMPT, seed=2, control_image=edges)).astype(int)
    with lora_at(cpipe, lora, 1.0):
        both = np.asarray(generate(cpipe, PROMPT, seed=2, control_image=edges)).astype(int)
        lora_only = np.asarray(generate(cpipe, PROMPT, seed=2)).astype(int)
    assert cpipe.lora is None                # lora_at took it out again
    assert np.abs(both - controlled).mean() > 0.5 and np.abs(both - lora_only).mean() > 0.5
    assert (np.asarray(generate(cpipe, PROMPT, seed=2, control_image=edges)).astype(int) == controlled).all()


def test_missing_controlnet_files_say_how_to_get_them(tmp_path):
    from kolors_course.core.profiles import choose_profile

    kolors = choose_profile("kolors", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(models.MissingWeightsError, match="--controlnet"):
        models.ensure_controlnet(kolors, download=False)


def test_the_measures_tell_a_followed_condition_from_an_unrelated_picture():
    a = W.render(W.Scene("正方形", "红色", "蓝色", position="左边"), seed=0)
    b = W.render(W.Scene("圆形", "红色", "蓝色", size="小的", position="右边"), seed=0)
    assert edge_overlap(a, canny(a)) > 0.95
    assert edge_overlap(b, canny(a)) < 0.3
    assert colour_layout_error(a, colour(a, 8)) < 2
    assert colour_layout_error(b, colour(a, 8)) > 20
    with pytest.raises(ValueError, match="one size"):
        edge_overlap(a.resize((64, 64)), canny(a))


# --- the kolors profile's path, at full size on the meta device (no memory, no download) ------------
def test_the_promax_layout_is_the_file_diffsynth_recognises_and_converts_completely():
    """DiffSynth recognises the union file by a hash of its key names and shapes; the layout above
    has that hash, and its keys convert onto SDXLControlNetUnion with nothing missing or left over."""
    from diffsynth.configs.model_config import model_loader_configs
    from diffsynth.models.sdxl_controlnet import SDXLControlNetUnion
    from diffsynth.models.utils import hash_state_dict_keys
    from diffusers import ControlNetUnionModel

    from kolors_course.models.random_weights import KOLORS_CONTROLNET_CONFIG

    with torch.device("meta"):
        sd = ControlNetUnionModel.from_config(KOLORS_CONTROLNET_CONFIG).state_dict()
        known = {c[1]: c[2] for c in model_loader_configs}
        assert known.get(hash_state_dict_keys(sd, with_shape=True)) == ["sdxl_controlnet"]
        converted = SDXLControlNetUnion.state_dict_converter().from_diffusers(sd)
        missing, unexpected = SDXLControlNetUnion().load_state_dict(converted, strict=False, assign=True)
    assert not missing and not unexpected


def test_full_size_kolors_unet_takes_the_kits_control_unit_at_1024():
    """The kit's one-call ControlNet manager, with the real SDXLControlNetUnion beside the real
    Kolors UNet, through the function DiffSynth samples with: the residuals fit at 1024 x 1024."""
    from diffsynth.models.sdxl_controlnet import SDXLControlNetUnion
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffsynth.pipelines.dancer import lets_dance_xl

    from kolors_course.control.steer import control_manager

    with torch.device("meta"):
        unet, cn = SDXLUNet(is_kolors=True), SDXLControlNetUnion()
        for control in ("canny", "colour"):
            out = lets_dance_xl(unet, controlnet=control_manager(cn, control, 0.7), sample=torch.randn(1, 4, 128, 128),
                                add_time_id=torch.tensor([1024, 1024, 0, 0, 1024, 1024]),
                                add_text_embeds=torch.randn(1, 4096), timestep=torch.tensor([500.0]),
                                encoder_hidden_states=torch.randn(1, 256, 4096),
                                controlnet_frames=torch.rand(1, 1, 3, 1024, 1024), device="meta")
            assert out.shape == (1, 4, 128, 128)


def test_random_weight_pipelines_carry_a_controlnet_for_the_gpu_bench(tiny):
    """bench/gpu.py's control cases build this at Kolors size on a GPU; here the same call at tiny size."""
    from kolors_course.models.random_weights import random_pipeline

    pipe = random_pipeline(tiny, "tiny", "cpu", controlnet=True)
    edges = canny(W.render(W.Scene("圆形", "红色", "蓝色"), size=64, seed=0))
    a = np.asarray(generate(pipe, PROMPT, seed=0, control_image=edges, control="canny", control_strength=0.8))
    assert a.shape == (64, 64, 3) and pipe.controlnet_model is not None
    assert random_pipeline(tiny, "tiny", "cpu").controlnet_model is None


def test_a_kolors_single_task_controlnet_is_refused_with_where_it_runs(tiny, tmp_path):
    """Kwai-Kolors' own ControlNets are diffusers ControlNetModel files (with the Kolors text
    projection): DiffSynth 1.1.9 cannot run them, and the kit says to use them in ComfyUI."""
    from diffusers import ControlNetModel

    cfg = {k: v for k, v in T.unet_diffusers_config().items() if k not in ("sample_size", "out_channels", "up_block_types")}
    ControlNetModel(**cfg, conditioning_embedding_out_channels=(8, 16, 32, 32)).save_pretrained(tmp_path)
    with pytest.raises(models.ModelLoadError, match="ComfyUI"):
        models.load_pipeline(tiny, controlnet=str(tmp_path / "diffusion_pytorch_model.safetensors"))


def test_training_sees_the_controlnet_one_sample_at_a_time_as_generation_does():
    """The union's condition transformer attends across its batch; the training loop's PerSample
    manager gives each sample the residuals a one-picture generation call would give it."""
    from kolors_course.control.steer import control_manager
    from kolors_course.world.train_controlnet import PerSample

    torch.manual_seed(0)
    classes = T.diffsynth_classes()
    unet, cn = classes["sdxl_unet"]().eval(), classes["sdxl_controlnet"]().eval()
    b = 3
    # samples that differ as real ones do (the transformer reads their means: with look-alike
    # samples, attending across the batch changes nothing)
    x = torch.randn(b, 4, 16, 16) + torch.arange(b).view(b, 1, 1, 1)
    t = torch.tensor([100.0, 500.0, 900.0])
    hidden, pooled = torch.randn(b, 256, T.TEXT_DIM), torch.randn(b, T.TEXT_DIM)
    time_ids = torch.tensor([128, 128, 0, 0, 128, 128])
    cond = torch.stack([torch.full((3, 128, 128), i / b) for i in range(b)]).unsqueeze(0)
    mgr = control_manager(cn, "canny", 1.0)
    args = dict(add_time_id=time_ids.repeat(b), add_text_embeds=pooled, unet=unet)
    with torch.no_grad():
        batched = PerSample(mgr)(x, t, hidden, cond, **args)
        naive = mgr(x, t, hidden, cond, **args)
        ones = [mgr(x[i:i + 1], t[i:i + 1], hidden[i:i + 1], cond[:, i:i + 1], add_time_id=time_ids,
                    add_text_embeds=pooled[i:i + 1], unet=unet) for i in range(b)]
    for level, res in enumerate(batched):
        assert torch.allclose(res, torch.cat([one[level] for one in ones]), atol=1e-5)
    # a plain batched call mixes the samples, if only a little (the shared task embedding dominates
    # the transformer's tokens): not the exact per-picture residuals
    assert max(float((n - p).abs().max()) for n, p in zip(naive, batched)) > 0


def test_a_controlnet_union_of_the_other_profiles_size_is_named_as_such(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "promax.safetensors"
    save_file({"task_embedding": torch.zeros(8, 320), "conv_in.weight": torch.zeros(320, 4, 3, 3)}, str(path))
    with pytest.raises(models.ModelLoadError, match="another size"):
        models.load_pipeline(tiny, controlnet=str(path))
