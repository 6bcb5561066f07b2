"""A LoRA on the UNet's convolutions too (LoCon): trained by the kit's own ``train_lora``, exported
in both layouts, fused by the kit (DiffSynth 1.1.9 fuses 1x1 convolutions only) and read by code
nobody here wrote (peft's adapters, diffusers' kohya reader and LoRA fusing)."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kolors_course.lora.files as lora_files
import kolors_course.models.loading as models
from kolors_course.lora.adapters import add_lora, load_lora_state
from kolors_course.lora.config import TrainConfig, TrainingError
from kolors_course.lora.lessons import lora_parameter_counts
from kolors_course.lora.strength import set_lora_scale
from kolors_course.lora.train import train_lora

TARGETS = ("conv1", "conv2", "attn2.to_k", "attn2.to_v")
RANK, ALPHA = 4, 8.0


def _cfg(tiny, **kw):
    return TrainConfig.for_profile(tiny, **{"rank": RANK, "alpha": ALPHA, "target_modules": TARGETS, **kw})


@pytest.fixture(scope="module")
def locon(tiny, dataset_dir, tmp_path_factory):
    cfg = _cfg(tiny, max_steps=12, learning_rate=2e-2, validate_every=0, checkpoint_every=12,
               trigger_words=[], preserve_weight=0.0)
    return train_lora(tiny, dataset_dir, tmp_path_factory.mktemp("run") / "r", cfg)


def _convolutions(path):
    state = load_file(str(path))
    return sorted(k.split(".lora_A.")[0] for k, v in state.items() if ".lora_A." in k and v.ndim == 4)


def _prediction(unet, pipe):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(400)
    with torch.no_grad():
        text = pipe.encode_prompt("一个红色的圆形，蓝色背景", positive=True)
        return unet.eval()(x, timestep=t, add_time_id=torch.tensor([64, 64, 0, 0, 64, 64]), **text)


def test_the_file_holds_3x3_convolutions_and_attention(locon):
    state = load_file(str(locon.files["lora"]))
    convs = _convolutions(locon.files["lora"])
    assert convs and all(m.endswith(("conv1", "conv2")) for m in convs)
    assert all(state[f"{m}.lora_A.weight"].shape[2:] == (3, 3) and state[f"{m}.lora_B.weight"].shape[2:] == (1, 1)
               for m in convs)
    assert any(k.endswith("attn2.to_k.lora_A.weight") for k in state)
    assert all(state[f"{m}.lora_B.weight"].abs().max() > 0 for m in convs)      # trained away from zero


def test_fused_locon_predicts_what_the_trained_adapters_predict(tiny, locon):
    """The kit's fused weights (its own for the 3x3 convolutions, DiffSynth's for the rest) give the
    UNet the prediction peft's unmerged adapters give, loaded with the file's weights."""
    pipe = models.load_pipeline(tiny)
    base = _prediction(pipe.unet, pipe)
    add_lora(pipe.unet, _cfg(tiny))
    load_lora_state(pipe.unet, load_file(str(locon.files["lora"])))
    adapted = _prediction(pipe.unet, pipe)
    assert (adapted - base).abs().max() > 1e-3
    for layout in ("lora", "lora_kohya"):
        fused = models.load_pipeline(tiny, lora=locon.files[layout])
        torch.testing.assert_close(_prediction(fused.unet, fused), adapted, rtol=1e-4, atol=1e-5)


def test_the_strength_dial_scales_the_convolutions_and_comes_back(tiny, locon):
    pipe = models.load_pipeline(tiny)
    conv = _convolutions(locon.files["lora"])[0] + ".weight"
    w = lambda: dict(pipe.unet.named_parameters())[conv].detach().clone()     # noqa: E731
    base = w()
    set_lora_scale(pipe, locon.files["lora"], 1.0)
    full = w() - base
    assert full.abs().max() > 0
    set_lora_scale(pipe, locon.files["lora"], 0.5)
    torch.testing.assert_close(w() - base, 0.5 * full, rtol=1e-4, atol=1e-7)
    set_lora_scale(pipe, locon.files["lora"], 0.0)
    assert torch.equal(w(), base)


def test_diffusers_reads_and_fuses_the_kohya_locon_to_the_same_change(tiny, locon):
    """diffusers' kohya reader and its own LoRA fusing on a diffusers UNet: every layer changes by
    what the kit adds to the same layer (named through the kit's DiffSynth-to-diffusers map)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    kohya = load_file(str(locon.files["lora_kohya"]))
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(kohya))
    config = models.model_files(tiny).unet.with_name("config.json")
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config.parent)))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name="locon")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    after = unet.state_dict()
    modules, _ = lora_files.read_lora(locon.files["lora"])
    to_diffusers = lora_files.diffusers_module_map(config)
    assert any(a.ndim == 4 for a, _, _ in modules.values())
    for module, (a, b, scale) in modules.items():
        name = to_diffusers[module] + ".weight"
        torch.testing.assert_close(after[name] - before[name], scale * lora_files.lora_delta(a, b),
                                   rtol=1e-3, atol=1e-6)


def test_kohya_locon_keys_follow_comfyui_and_its_rule_gives_the_kits_change(tiny, locon):
    """ComfyUI maps ``lora_unet_<diffusers name, dots as underscores>`` to a UNet weight and adds
    ``alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)``
    (comfy/weight_adapter/lora.py): the layout must make that the kit's change."""
    from diffusers import UNet2DConditionModel

    config = models.model_files(tiny).unet.with_name("config.json")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config.parent)))
    weights = {lora_files.kohya_name(k[: -len(".weight")]): v.shape
               for k, v in unet.state_dict().items() if k.endswith(".weight")}
    kohya = load_file(str(locon.files["lora_kohya"]))
    modules, _ = lora_files.read_lora(locon.files["lora_kohya"], config)
    inverse = {lora_files.kohya_name(d): ds for ds, d in lora_files.diffusers_module_map(config).items()}
    convs = [k[: -len(".lora_down.weight")] for k, v in kohya.items() if k.endswith(".lora_down.weight") and v.ndim == 4]
    assert convs
    for base in convs:
        down, up, alpha = kohya[f"{base}.lora_down.weight"], kohya[f"{base}.lora_up.weight"], kohya[f"{base}.alpha"]
        comfy = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(weights[base])
        a, b, scale = modules[inverse[base]]
        torch.testing.assert_close(comfy, scale * lora_files.lora_delta(a, b))


def test_parameter_counts_include_the_convolutions(tiny):
    unet = models.load_pipeline(tiny).unet
    _, counts = lora_parameter_counts(unet, ranks=(RANK,), target_modules=TARGETS)
    _, attention = lora_parameter_counts(unet, ranks=(RANK,), target_modules=TARGETS[2:])
    params = add_lora(unet, _cfg(tiny))
    assert sum(p.numel() for p in params) == counts[RANK] > attention[RANK]


def test_a_name_that_is_no_layer_is_still_refused(tiny):
    with pytest.raises(TrainingError, match="conv1, conv2"):
        add_lora(models.load_pipeline(tiny).unet, _cfg(tiny, target_modules=("conv9",)))


def _edited(locon, tmp_path, name, edit):
    """The LoCon's DiffSynth file rewritten through ``edit(state, first convolution)``."""
    with safe_open(str(locon.files["lora"]), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(state, _convolutions(locon.files["lora"])[0])
    save_file(state, str(tmp_path / name), metadata=meta)
    return tmp_path / name


def _unet_of(mm):
    return mm.model[mm.model_name.index("sdxl_unet")]


@pytest.mark.parametrize("name, edit, said", [
    # an up half with a 3x3 kernel
    ("up3x3.safetensors", lambda s, c: s.update({f"{c}.lora_B.weight": s[f"{c}.lora_B.weight"].repeat(1, 1, 3, 3) / 9}),
     r"up3x3\.safetensors.*conv.*LoHa"),
    # Tucker LoCon's middle
    ("tucker.safetensors", lambda s, c: s.update({f"{c}.lora_mid.weight": torch.zeros(4, 4, 3, 3)}),
     r"tucker\.safetensors.*lora_mid.*Tucker"),
    # LoHa's Hadamard halves
    ("loha.safetensors", lambda s, c: s.update({f"{c}.hada_w1_a": torch.zeros(4, 4)}), r"loha\.safetensors.*hada_w1_a"),
    # a convolution layer this UNet does not have
    ("absent.safetensors", lambda s, c: s.update({k.replace(c, "blocks.99.conv1"): v.clone() for k, v in list(s.items())
                                                  if k.startswith(c + ".")}), r"blocks\.99\.conv1 is no layer of this UNet"),
])
def test_files_the_kit_cannot_use_are_refused_and_nothing_changes(tiny, locon, tmp_path, name, edit, said):
    """Refused with the file, what is wrong and what to do, before anything is fused: by the loader
    and by the strength dial (which sets base weights aside first)."""
    bad = _edited(locon, tmp_path, name, edit)
    mm = models.load_model_manager(tiny)
    before = {k: v.clone() for k, v in _unet_of(mm).state_dict().items()}
    with pytest.raises(lora_files.LoRAFileError, match=said):
        lora_files.fuse_lora(mm, bad)
    assert all(torch.equal(before[k], v) for k, v in _unet_of(mm).state_dict().items())
    pipe = models.load_pipeline(tiny)
    with pytest.raises(lora_files.LoRAFileError, match=said):
        set_lora_scale(pipe, bad, 1.0)


def test_a_file_of_3x3_convolutions_only_is_fused_by_the_kit_alone(tiny, locon, tmp_path):
    """No Linear or 1x1 pair left for DiffSynth: the kit fuses the convolutions and nothing else."""
    only = _edited(locon, tmp_path, "convs.safetensors",
                   lambda s, c: [s.pop(k) for k in list(s) if s[k].ndim != 4])
    modules, _ = lora_files.read_lora(only)
    assert modules and all(a.ndim == 4 for a, _, _ in modules.values())
    base = dict(models.load_pipeline(tiny).unet.named_parameters())
    fused = dict(models.load_pipeline(tiny, lora=only).unet.named_parameters())
    changed = {n for n in base if not torch.equal(base[n], fused[n])}
    assert changed == {f"{m}.weight" for m in modules}
    for m, (a, b, scale) in modules.items():
        torch.testing.assert_close(fused[f"{m}.weight"] - base[f"{m}.weight"], scale * lora_files.lora_delta(a, b),
                                   rtol=1e-4, atol=1e-6)


def test_grouped_or_dilated_convolutions_are_refused(tiny):
    """The kit's B A per tap holds for plain convolutions; a grouped one is named and refused."""
    from kolors_course.lora.adapters import check_layers

    net = torch.nn.Module()
    net.conv1 = torch.nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(TrainingError, match="grouped or dilated convolutions"):
        check_layers(net, _cfg(tiny, target_modules=("conv1",)))


def test_layers_the_export_cannot_name_are_refused_before_training(tiny, dataset_dir, tmp_path):
    """The transformer's proj_in has no kohya name in the kit's map: refused at the start with the
    target named, not after the last step at the export."""
    cfg = _cfg(tiny, target_modules=("proj_in", "attn2.to_k"), max_steps=50, checkpoint_every=50, trigger_words=[],
               preserve_weight=0.0)
    with pytest.raises(TrainingError, match=r"\['proj_in'\].*kohya.*leave them out of target_modules"):
        train_lora(tiny, dataset_dir, tmp_path / "r", cfg)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_the_model_card_says_how_to_load_a_locon(tiny, locon, tmp_path):
    """DiffSynth's own load_lora cannot fuse 3x3 convolutions: the uploaded card says so."""
    from kolors_course.story.gallery import model_card
    from kolors_course.story.scoring import Scores
    from kolors_course.story.stories import generation_settings, load_story

    tale = load_story(tiny.story)
    scores = Scores(per_image=[6.0] * 8, mean=6.0, threshold=6.0, meaningful=False)
    settings = generation_settings(tale, tiny)
    card = model_card("队", tale, lora_files.read_lora(locon.files["lora"])[1], settings, scores)
    assert "3x3 convolution layers (a LoCon)" in card and "kohya" in card
    assert "LoCon" not in model_card("队", tale, {}, settings, scores)       # an attention LoRA's card
