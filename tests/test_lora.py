"""LoRA training on the tiny profile: learning, exact resume, export layouts, bad input."""
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kolors_course.lora.files as lora_files
import kolors_course.models.loading as models
from kolors_course.core.profiles import KOLORS
from kolors_course.data.training_set import DatasetError
from kolors_course.lora.config import TrainConfig, TrainingError
from kolors_course.lora.lessons import lora_demo, lora_parameter_counts
from kolors_course.lora.memory import preflight
from kolors_course.lora.train import train_lora
from kolors_course.generation.text2image import generate


@pytest.fixture(scope="module")
def trained(tiny, dataset_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    # on every attention projection, as the kolors profile trains (tiny's own LoRA sits on the
    # cross-attention's keys and values only): the files then hold to_out, whose names differ
    # between the layouts (to_out -> to_out.0), and self-attention's layers
    cfg = TrainConfig.for_profile(tiny, max_steps=40, learning_rate=1e-2, rank=4, alpha=8.0,
                                  target_modules=KOLORS.lora_target_modules,
                                  validate_every=20, checkpoint_every=16, trigger_words=["几何风"],
                                  preserve_weight=0.0)
    # the set was built without a trigger word, so the kit warns that this one cannot be learned
    # (with preservation on it is an error: test_trigger_and_submission)
    with pytest.warns(UserWarning, match="is in none of the .* training captions"):
        return train_lora(tiny, dataset_dir, run, cfg)


def test_loss_on_fixed_set_falls(trained):
    assert trained.fixed_loss_after < 0.9 * trained.fixed_loss_before, trained.summary()
    assert len(trained.losses) == 40 and all(np.isfinite(trained.losses))
    # the loss curve's steady line: before training, then at every checkpoint (every 16 steps and
    # the last), the same fixed set each time
    steps, values = zip(*trained.fixed_losses)
    assert steps == (0, 16, 32, 40)
    assert values[0] == trained.fixed_loss_before and values[-1] == trained.fixed_loss_after
    assert min(values[1:]) < values[0]


def test_run_folder_contents(trained):
    run = trained.run_dir
    for name in ("lora.safetensors", "lora_kohya.safetensors", "loss.csv", "loss.png", "summary.json",
                 "train_config.json"):
        assert (run / name).exists(), name
    # step 0 is the base model: the grid starts with what the LoRA changes
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-000000.png", "step-000020.png", "step-000040.png"]
    assert [s for s, _ in trained.samples] == [0, 20, 40]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[-1] == "step-000040"      # keep_last=2
    assert not list(run.rglob("*.tmp"))


def test_metadata_travels_with_both_files(trained):
    from safetensors import safe_open
    for key in ("lora", "lora_kohya"):
        with safe_open(str(trained.files[key]), "pt") as f:
            meta = f.metadata()
        assert meta["lora_rank"] == "4" and float(meta["lora_alpha"]) == 8.0
        assert float(meta["lora_scale"]) == 2.0
        assert "几何风" in meta["trigger_words"] and "learning_rate" in meta["training"]


def test_resumed_run_matches_uninterrupted(tiny, dataset_dir, tmp_path):
    # validation images between checkpoints: they must not disturb training or its resume
    cfg = TrainConfig.for_profile(tiny, max_steps=12, checkpoint_every=4, validate_every=3,
                                  learning_rate=5e-3)
    full = train_lora(tiny, dataset_dir, tmp_path / "full", cfg)

    class Stop(Exception):
        pass

    def interrupt(step, loss):
        if step == 7:
            raise Stop()
    with pytest.raises(Stop):
        train_lora(tiny, dataset_dir, tmp_path / "cut", cfg, callback=interrupt)
    assert not (tmp_path / "cut" / "lora.safetensors").exists()
    resumed = train_lora(tiny, dataset_dir, tmp_path / "cut", cfg, resume=True)
    assert resumed.resumed_from == 4 and resumed.steps == 12
    a = load_file(str(full.files["lora"]))
    b = load_file(str(resumed.files["lora"]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert full.losses == pytest.approx(resumed.losses, rel=1e-5)
    # the loss on the fixed set before training, and at each checkpoint, travels with the checkpoint
    assert resumed.fixed_loss_before == pytest.approx(full.fixed_loss_before)
    assert [s for s, _ in resumed.fixed_losses] == [s for s, _ in full.fixed_losses] == [0, 4, 8, 12]
    assert [v for _, v in resumed.fixed_losses] == pytest.approx([v for _, v in full.fixed_losses], rel=1e-5)


def _image(pipe, seed=3):
    return np.asarray(generate(pipe, "一个红色的圆形，蓝色背景", seed=seed), dtype=np.int16)


def test_both_layouts_load_back_and_change_the_output(tiny, trained):
    base = _image(models.load_pipeline(tiny))
    with_peft = _image(models.load_pipeline(tiny, lora=trained.files["lora"]))
    with_kohya = _image(models.load_pipeline(tiny, lora=trained.files["lora_kohya"]))
    off = _image(models.load_pipeline(tiny, lora=trained.files["lora"], lora_scale=0.0))
    assert np.abs(with_peft - base).mean() > 1.0
    assert np.abs(with_kohya - with_peft).max() <= 1     # same fused weights, up to rounding
    assert np.array_equal(off, base)


def test_fused_weights_equal_the_trained_peft_layers(tiny, trained):
    """load_lora must add (alpha / rank) * B @ A, the scale training used."""
    state = load_file(str(trained.files["lora"]))
    key = next(k for k in state if k.endswith(".lora_A.weight"))
    module = key[: -len(".lora_A.weight")]
    a, b = state[key], state[f"{module}.lora_B.weight"]
    base = dict(models.load_pipeline(tiny).unet.named_parameters())[f"{module}.weight"].detach()
    fused = dict(models.load_pipeline(tiny, lora=trained.files["lora"]).unet.named_parameters())[f"{module}.weight"]
    torch.testing.assert_close(fused.detach(), base + (8.0 / 4) * b @ a, rtol=1e-5, atol=1e-6)


def test_kohya_file_read_by_diffusers(tiny, trained):
    """Loading code nobody here wrote: diffusers' kohya reader, and its UNet's module names."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    kohya = load_file(str(trained.files["lora_kohya"]))
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(kohya))
    assert converted, "diffusers found no LoRA weights"
    cfg = models.model_files(tiny).unet.with_name("config.json")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(cfg.parent)))
    modules = dict(unet.named_modules())
    n_pairs = 0
    for k in converted:
        assert k.startswith("unet."), k
        mod = k[len("unet."):]
        if ".processor." in mod:        # diffusers' attention-processor naming
            mod = mod.split("_lora")[0].replace(".processor.", ".").replace("to_out", "to_out.0")
        else:
            mod = mod.split(".lora")[0]
        assert mod in modules and isinstance(modules[mod], torch.nn.Linear), k
        n_pairs += ".lora_A." in k or "lora.down" in k or "_lora.down" in k
    assert n_pairs == len([k for k in kohya if k.endswith(".lora_down.weight")])


def test_kohya_file_read_by_diffsynth_civitai_converter(tiny, trained, monkeypatch):
    """DiffSynth's own kohya/civitai renaming (it moves tensors to CUDA: redirected to CPU here)."""
    from diffsynth.models.lora import SDXLLoRAFromCivitai
    real_to = torch.Tensor.to

    def cpu_to(self, *args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        if kwargs.get("dtype") == torch.float16:
            kwargs["dtype"] = torch.float32
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", cpu_to)
    kohya = load_file(str(trained.files["lora_kohya"]))
    conv = SDXLLoRAFromCivitai()
    deltas = conv.convert_state_dict(kohya, lora_prefix="lora_unet_", alpha=1.0)
    unet = models.load_pipeline(tiny).unet
    renamed = unet.__class__.state_dict_converter().from_diffusers(deltas)
    renamed = renamed[0] if isinstance(renamed, tuple) else renamed
    params = dict(unet.named_parameters())
    assert renamed and all(k in params for k in renamed)
    peft = load_file(str(trained.files["lora"]))
    for name, delta in renamed.items():
        module = name[: -len(".weight")]
        expect = peft[f"{module}.lora_B.weight"] @ peft[f"{module}.lora_A.weight"]
        torch.testing.assert_close(delta, expect, rtol=1e-4, atol=1e-6)


def test_kohya_names_follow_comfyui_convention(trained):
    kohya = load_file(str(trained.files["lora_kohya"]))
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    for b in bases:
        assert b.startswith("lora_unet_") and "." not in b
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            assert b + suffix in kohya
    assert any("_attn1_to_out_0" in b for b in bases)


def test_bad_settings_are_refused_with_advice(tiny, dataset_dir, tmp_path):
    with pytest.raises(TrainingError) as err:
        train_lora(tiny, dataset_dir, tmp_path / "x",
                   TrainConfig.for_profile(tiny, rank=0, alpha=-1.0, resolution=100))
    msg = str(err.value)
    assert "rank=0" in msg and "alpha=-1.0" in msg and "multiple of 64" in msg
    with pytest.raises(TypeError, match="unknown training setting"):
        TrainConfig.for_profile(tiny, rnak=4)
    with pytest.raises(DatasetError, match="build the training set"):
        train_lora(tiny, tmp_path / "nothing_here", tmp_path / "x")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(DatasetError, match="empty"):
        train_lora(tiny, tmp_path / "empty", tmp_path / "x")


def test_divergence_stops_and_keeps_the_good_lora(tiny, dataset_dir, trained, tmp_path):
    run = tmp_path / "keep"
    shutil.copytree(trained.run_dir, run)
    shutil.rmtree(run / "checkpoints")
    before = (run / "lora.safetensors").read_bytes()
    cfg = TrainConfig.for_profile(tiny, max_steps=30, learning_rate=1e30, max_grad_norm=0.0,
                                  validate_every=None)
    with pytest.raises(TrainingError, match="diverged"):
        train_lora(tiny, dataset_dir, run, cfg, overwrite=True)
    assert (run / "lora.safetensors").read_bytes() == before


def test_finished_run_and_checkpoints_are_not_overwritten_silently(tiny, dataset_dir, trained, tmp_path):
    with pytest.raises(TrainingError, match="already holds a finished LoRA"):
        train_lora(tiny, dataset_dir, trained.run_dir)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained.run_dir, unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(TrainingError, match="has checkpoints"):
        train_lora(tiny, dataset_dir, unfinished, resume=False)


def test_lora_file_errors(tiny, tmp_path, trained):
    mm = models.load_model_manager(tiny)
    (tmp_path / "x.ckpt").write_bytes(b"pickled data is never opened")
    with pytest.raises(lora_files.LoRAFileError, match="only .safetensors"):
        lora_files.fuse_lora(mm, tmp_path / "x.ckpt")
    with pytest.raises(lora_files.LoRAFileError, match="not found"):
        lora_files.fuse_lora(mm, tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"blocks.999.nothing.lora_A.weight": torch.zeros(4, 8),
               "blocks.999.nothing.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "alien.safetensors"),
              metadata={"lora_alpha": "4"})
    with pytest.raises(lora_files.LoRAFileError, match="alien.safetensors: blocks.999.nothing is no layer of this UNet"):
        lora_files.fuse_lora(mm, tmp_path / "alien.safetensors")
    with pytest.raises(ValueError, match="scale"):
        lora_files.fuse_lora(mm, trained.files["lora"], scale=-1)


def test_the_lora_demo_matches_what_peft_merges():
    """lora_demo's W + (alpha/rank)·B·A, checked against peft's own merge of the same A and B."""
    from peft import LoraConfig, inject_adapter_in_model

    d = lora_demo(d_out=6, d_in=8, rank=2, alpha=4.0)
    layer = torch.nn.Sequential()
    layer.add_module("to_q", torch.nn.Linear(8, 6, bias=False))
    layer.to_q.weight.data = d["W"].clone()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4.0, target_modules=["to_q"]), layer)
    layer.to_q.lora_A.default.weight.data = d["A"].clone()
    layer.to_q.lora_B.default.weight.data = d["B"].clone()
    layer.to_q.merge()
    torch.testing.assert_close(layer.to_q.base_layer.weight.data, d["W_new"])
    assert torch.linalg.matrix_rank(d["W_new"] - d["W"]) == d["rank_of_delta"] == 2


def test_parameter_counts_match_the_adapters_training_creates(tiny, tiny_pipe):
    from kolors_course.lora.adapters import add_lora
    from kolors_course.models.loading import load_pipeline

    total, counts = lora_parameter_counts(tiny_pipe.unet, ranks=(1, 4), target_modules=tiny.lora_target_modules)
    unet = load_pipeline(tiny).unet
    params = add_lora(unet, TrainConfig.for_profile(tiny, rank=4))
    assert sum(p.numel() for p in params) == counts[4]
    assert total == sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)


def test_adapters_off_gives_the_base_models_prediction(tiny):
    """The preservation loss's target is the UNet with its adapters switched off: exactly the base
    model's prediction, with adapters that have moved away from zero; switched on again afterwards,
    on error too."""
    from kolors_course.lora.adapters import adapters_off, add_lora
    from kolors_course.models.loading import load_pipeline

    pipe = load_pipeline(tiny)
    unet = pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(500)
    with torch.no_grad():
        text = pipe.encode_prompt("一个红色的圆形", positive=True)

    def predict():
        with torch.no_grad():
            return unet(x, timestep=t, add_time_id=torch.tensor([64, 64, 0, 0, 64, 64]), **text)

    base = predict()
    params = add_lora(unet, TrainConfig.for_profile(tiny, rank=4))
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    adapted = predict()
    assert (adapted - base).abs().max() > 1e-3
    with adapters_off(unet):
        assert torch.allclose(predict(), base, atol=1e-6)
    with pytest.raises(RuntimeError), adapters_off(unet):
        raise RuntimeError("stop")
    assert torch.allclose(predict(), adapted) and all(p.requires_grad for p in params)
    # what it found is what it leaves: frozen adapters stay frozen
    for p in params:
        p.requires_grad_(False)
    with adapters_off(unet):
        pass
    assert torch.allclose(predict(), adapted) and not any(p.requires_grad for p in params)


def test_preserve_weight_needs_a_trigger_word_and_follows_the_profile(tiny):
    """Preservation keeps the base model for the captions without the trigger word, so it needs one:
    the profile's weight applies with a trigger word, none without, and an explicit weight without
    one is refused with a message.  Changing the trigger words changes its loss: no resume then."""
    from kolors_course.lora.config import changed_settings, config_record

    assert tiny.lora_preserve_weight > 0
    assert TrainConfig.for_profile(tiny).preserve_weight == 0
    cfg = TrainConfig.for_profile(tiny, trigger_words="几何风")
    assert cfg.preserve_weight == tiny.lora_preserve_weight
    with pytest.raises(TrainingError, match="needs trigger_words"):
        TrainConfig.for_profile(tiny, preserve_weight=1.0).validate()
    with pytest.raises(TrainingError, match="preserve_weight"):
        TrainConfig.for_profile(tiny, trigger_words="几何风", preserve_weight=-1).validate()
    saved = config_record(cfg)
    other = TrainConfig.for_profile(tiny, trigger_words="别的风")
    assert any(c.startswith("trigger_words") for c in changed_settings(saved, other))
    plain_saved = config_record(TrainConfig.for_profile(tiny))
    assert not changed_settings(plain_saved, TrainConfig.for_profile(tiny, validation_seeds=(3,)))
    # a checkpoint from before the setting existed counts as preserve_weight=0
    old = {k: v for k, v in plain_saved.items() if k != "preserve_weight"}
    assert not changed_settings(old, TrainConfig.for_profile(tiny))
    assert changed_settings(old, cfg)


def test_target_modules_name_layers_as_peft_does(tiny):
    """A target is matched by the end of a layer's dotted name, as peft matches it: "attn2.to_k"
    puts adapters on the cross-attention's key projections only, the counts of notebook 03 agree,
    and a name that is no layer is refused before anything trains."""
    from kolors_course.lora.adapters import add_lora
    from kolors_course.models.loading import load_pipeline

    unet = load_pipeline(tiny).unet
    params = add_lora(unet, TrainConfig.for_profile(tiny, rank=4, target_modules=("attn2.to_k", "attn2.to_v")))
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in unet.named_parameters() if "lora_" in n}
    assert adapted and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in adapted)
    assert any(n.endswith("attn1.to_k") for n, _ in unet.named_modules())      # self-attention left alone
    _, counts = lora_parameter_counts(load_pipeline(tiny).unet, ranks=(4,), target_modules=("attn2.to_k", "attn2.to_v"))
    assert sum(p.numel() for p in params) == counts[4]
    with pytest.raises(TrainingError, match="attn3.to_k"):
        add_lora(load_pipeline(tiny).unet, TrainConfig.for_profile(tiny, target_modules=("attn3.to_k",)))


def test_preflight_advises_on_a_small_gpu(monkeypatch):
    cfg = TrainConfig(gradient_checkpointing=False, batch_size=2, resolution=1024)
    assert preflight(cfg, "cpu") == []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (8 * 2**30, 24 * 2**30))
    advice = " ".join(preflight(cfg, "cuda"))
    assert "gradient_checkpointing=True" in advice and "batch_size=1" in advice
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (23 * 2**30, 24 * 2**30))
    assert preflight(TrainConfig(), "cuda") == [], "the defaults must fit a 24 GB GPU"
    # preservation trains on twice the batch: the estimate and the advice count it
    from kolors_course.lora.memory import estimate_gpu_memory_gb
    one = estimate_gpu_memory_gb(TrainConfig(batch_size=1))
    two = estimate_gpu_memory_gb(TrainConfig(batch_size=2))
    assert estimate_gpu_memory_gb(TrainConfig(batch_size=1, preserve_weight=2.0)) == pytest.approx(two)
    assert two > one
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (8 * 2**30, 24 * 2**30))
    assert "preserve_weight=0" in " ".join(preflight(TrainConfig(batch_size=1, preserve_weight=2.0, resolution=1024), "cuda"))


# --- settings the other tests leave at their defaults ---------------------------------------
def _checkpoint_state(run, step):
    return torch.load(run / "checkpoints" / f"step-{step:06d}" / "state.pt", weights_only=True)


def test_gradient_accumulation_and_a_linear_schedule_step_once_per_step(tiny, dataset_dir, tmp_path):
    """grad_accum=2: two micro-batches per optimizer step, so a linear schedule over 4 steps
    reaches zero after 4 steps (not 2), and the weights differ from a run without accumulation."""
    cfg = dict(max_steps=4, checkpoint_every=2, validate_every=None, learning_rate=1e-2,
               lr_scheduler="linear", batch_size=1)
    acc = train_lora(tiny, dataset_dir, tmp_path / "acc", TrainConfig.for_profile(tiny, grad_accum=2, **cfg))
    one = train_lora(tiny, dataset_dir, tmp_path / "one", TrainConfig.for_profile(tiny, grad_accum=1, **cfg))
    half = _checkpoint_state(acc.run_dir, 2)["scheduler"]["_last_lr"][0]
    end = _checkpoint_state(acc.run_dir, 4)["scheduler"]["_last_lr"][0]
    assert half == pytest.approx(0.5e-2) and end == pytest.approx(0.0)
    assert len(acc.losses) == 4
    a, b = load_file(str(acc.files["lora"])), load_file(str(one.files["lora"]))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_cosine_schedule_with_warm_up_follows_its_curve(tiny, dataset_dir, tmp_path):
    import math

    cfg = TrainConfig.for_profile(tiny, max_steps=6, checkpoint_every=1, keep_last=6, validate_every=None,
                                  learning_rate=1e-2, lr_scheduler="cosine", warmup_steps=2)
    res = train_lora(tiny, dataset_dir, tmp_path / "cos", cfg)
    lrs = [_checkpoint_state(res.run_dir, s)["scheduler"]["_last_lr"][0] for s in range(1, 7)]
    expected = [1e-2 * s / 2 if s < 2 else 1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(1, 7)]
    assert lrs == pytest.approx(expected)


def test_latents_computed_on_the_fly_train_as_cached_ones(tiny, dataset_dir, tmp_path):
    """cache_latents=False keeps the VAE encoder in the loop; its encoding is deterministic,
    so the run is the same run."""
    cfg = dict(max_steps=3, validate_every=None, learning_rate=1e-2, random_flip=False)
    cached = train_lora(tiny, dataset_dir, tmp_path / "c", TrainConfig.for_profile(tiny, cache_latents=True, **cfg))
    live = train_lora(tiny, dataset_dir, tmp_path / "l", TrainConfig.for_profile(tiny, cache_latents=False, **cfg))
    assert live.losses == pytest.approx(cached.losses, rel=1e-5)


def test_set_lora_scale_switches_between_two_loras_without_accumulating(tiny, dataset_dir, trained, tmp_path):
    from kolors_course.lora.strength import set_lora_scale

    other = train_lora(tiny, dataset_dir, tmp_path / "other",
                       TrainConfig.for_profile(tiny, max_steps=10, learning_rate=1e-2, seed=7, validate_every=None))
    pipe = models.load_pipeline(tiny)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    def now():
        return pipe.unet.state_dict()

    def equal(a, b):
        return all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    expect_a = models.load_pipeline(tiny, lora=trained.files["lora"]).unet.state_dict()
    expect_b = models.load_pipeline(tiny, lora=other.files["lora"]).unet.state_dict()
    set_lora_scale(pipe, trained.files["lora"], 1.0)
    assert equal(now(), expect_a)
    set_lora_scale(pipe, other.files["lora"], 1.0)         # another LoRA: A comes off first
    assert equal(now(), expect_b) and not equal(now(), expect_a)
    set_lora_scale(pipe, trained.files["lora"], 1.0)
    assert equal(now(), expect_a)
    set_lora_scale(pipe, trained.files["lora"], 0.0)
    assert equal(now(), base) and pipe.lora is None
    fused = models.load_pipeline(tiny, lora=trained.files["lora"])
    with pytest.raises(RuntimeError, match="fused at load time"):
        set_lora_scale(fused, other.files["lora"], 1.0)


def test_train_lora_hands_a_given_pipeline_back_as_it_came(tiny, dataset_dir, tmp_path):
    """train_lora(pipe=...) once left its peft adapters in that UNet (set_lora_scale on it then failed
    with a bare KeyError on a renamed weight).  The pipeline now comes back as it was, after a
    finished run and after one stopped by an error, and the strength dial works on it."""
    from kolors_course.lora.strength import set_lora_scale

    pipe = models.load_pipeline(tiny)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    mode, grads = pipe.unet.training, {n: p.requires_grad for n, p in pipe.unet.named_parameters()}

    def as_it_came():
        after = pipe.unet.state_dict()
        assert set(after) == set(before)            # no lora_A / base_layer names left
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert pipe.unet.training == mode
        assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == grads

    def stop(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny, dataset_dir, tmp_path / "stopped", TrainConfig.for_profile(tiny, max_steps=3),
                   pipe=pipe, callback=stop)
    as_it_came()
    res = train_lora(tiny, dataset_dir, tmp_path / "r", TrainConfig.for_profile(tiny, max_steps=2), pipe=pipe)
    as_it_came()
    set_lora_scale(pipe, res.files["lora"], 1.0)
    fused = models.load_pipeline(tiny, lora=res.files["lora"]).unet.state_dict()
    assert all(torch.allclose(pipe.unet.state_dict()[k], fused[k], atol=1e-6) for k in fused)
    prompt = "一个红色的圆形"
    fresh = models.load_pipeline(tiny, lora=res.files["lora"])
    assert np.array_equal(np.asarray(generate(pipe, prompt, seed=3, steps=4)),
                          np.asarray(generate(fresh, prompt, seed=3, steps=4)))


def test_preservation_leaves_out_captions_without_the_trigger_word(tiny, dataset_dir, tmp_path):
    """A caption without the trigger word is the same with it taken out: keeping the base model
    there would fight the training on it, so preservation leaves it out, and says how many."""
    from kolors_course.data.training_set import read_training_set

    captions = [text for _, text in read_training_set(dataset_dir)]
    word = "红色"
    holding = sum(word in c for c in captions)
    assert 0 < holding < len(captions), captions           # the fixture's set has both kinds
    cfg = TrainConfig.for_profile(tiny, trigger_words=[word], max_steps=2, batch_size=2, validate_every=None)
    assert cfg.preserve_weight > 0
    with pytest.warns(UserWarning, match=f"{len(captions) - holding} of {len(captions)} training captions do not hold"):
        res = train_lora(tiny, dataset_dir, tmp_path / "run", cfg)
    assert res.steps == 2 and all(np.isfinite(res.losses))
