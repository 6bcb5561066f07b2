"""The tiny profile's trained weights: the build path (short mode) and the shipped files."""
import json
import re
import shutil

import pytest
import torch

import kolors_course.models.tiny as T
from kolors_course.world.build import build_tiny, pipeline_from


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick-build")
    manifest = build_tiny(out, quick=True, seed=0)          # on one thread (it sets and restores it)
    return out, manifest


def test_quick_build_writes_the_real_layout(quick_build):
    out, manifest = quick_build
    for rel in (T.UNET_REL, T.VAE_REL, T.CONTROLNET_REL):
        assert (out / rel).is_file() and (out / rel).with_name("config.json").is_file()
        assert str(rel) in manifest["files"]
    assert manifest["controlnet"]["unet_sha256"] == T.sha256(out / T.UNET_REL)
    assert set(manifest["judge"]["control"]["canny"]) == {"0", "1"}
    from safetensors import safe_open

    with safe_open(str(out / T.UNET_REL), "pt") as f:
        keys = set(f.keys())
    assert "encoder_hid_proj.weight" in keys and "add_embedding.linear_1.weight" in keys
    cfg = json.loads((out / T.UNET_REL).with_name("config.json").read_text())
    assert cfg["sample_size"] == T.IMAGE_SIZE // 8 and cfg["encoder_hid_dim_type"] == "text_proj"
    # the manifest lists every file with its hash, and says how it was made
    for rel, info in manifest["files"].items():
        assert T.sha256(out / rel) == info["sha256"]
    for key in ("command", "seed", "seconds", "versions", "losses", "judge", "cell_stats"):
        assert key in manifest
    assert manifest["versions"]["torch"] == torch.__version__
    # the recipe's layout curriculum keeps its share of a shorter run (1,500 of 8,000 steps)
    unet = manifest["settings"]["unet"]
    assert 0 < unet["layout_first_steps"] < unet["steps"] < 100


def test_quick_build_loss_falls(quick_build):
    _, manifest = quick_build
    losses = manifest["losses"]
    assert losses["unet_final"] < losses["unet_first"]
    assert losses["vae_mse_final"] < losses["vae_mse_first"]


def test_quick_build_loads_through_the_kit(quick_build, tmp_path):
    from kolors_course.generation.text2image import generate

    out, _ = quick_build
    pipe = pipeline_from(out, tmp_path / "cache")
    img = generate(pipe, "一个红色的圆形，蓝色背景", seed=0, steps=2, cfg_scale=4.0, height=128, width=128)
    assert img.size == (128, 128)
    # the build's caption embeddings are the ones the pipeline computes at generation time, padded
    # to the length the build records and the profile pads to
    from kolors_course.core.profiles import TINY
    from kolors_course.world.build import tiny_prompter

    assert quick_build[1]["text_tokens"] == TINY.text_tokens == pipe.prompter.max_length
    a_pooled, a = tiny_prompter(out).encode_prompt("一个红色的圆形，蓝色背景", clip_skip=1, clip_skip_2=2, device="cpu")
    b = pipe.encode_prompt("一个红色的圆形，蓝色背景", positive=True)
    assert a.shape[1] == TINY.text_tokens
    assert torch.allclose(a, b["encoder_hidden_states"].cpu(), atol=1e-6)
    assert torch.allclose(a_pooled, b["add_text_embeds"].cpu(), atol=1e-6)


def test_the_prompter_pads_to_the_profiles_length_and_kolors_keeps_its_own(tmp_path):
    """The kit's prompter at Kolors' 256 tokens is DiffSynth's own, bit for bit (the kolors path is
    unchanged); at the tiny profile's length it is the same call, padded shorter."""
    from diffsynth.prompters import KolorsPrompter

    from kolors_course.core.profiles import KOLORS, TINY
    from kolors_course.models.pipeline import kolors_prompter

    encoder = T.text_encoder_module()
    theirs = KolorsPrompter()
    theirs.fetch_models(encoder)
    prompt = "蓝色背景上的一个大的红色圆形，在左边"
    want_pooled, want = theirs.encode_prompt(prompt, device="cpu")
    got_pooled, got = kolors_prompter(encoder, KOLORS.text_tokens).encode_prompt(prompt, device="cpu")
    assert got.shape[1] == 256 and torch.equal(got, want) and torch.equal(got_pooled, want_pooled)
    short_pooled, short = kolors_prompter(encoder, TINY.text_tokens).encode_prompt(prompt, device="cpu")
    assert short.shape[1] == TINY.text_tokens < 256
    # left padding: the caption's own tokens end both sequences; causal attention over masked
    # padding, so the last token (the pooled embedding) reads the same words either way
    assert torch.allclose(short_pooled, want_pooled, atol=1e-4)
    with pytest.raises(ValueError, match="text_tokens"):
        kolors_prompter(encoder, 4)


def test_weights_trained_at_another_token_length_are_refused_with_the_fix(tmp_path):
    """A build whose UNet learned prompts padded to another length than the profile's is refused
    with the override that loads it; with that override it loads."""
    from kolors_course.core.profiles import TINY
    from kolors_course.models.loading import ModelLoadError, load_pipeline

    weights = tmp_path / "weights"
    shutil.copytree(T.shipped_weights_dir(), weights)
    manifest = json.loads((weights / "manifest.json").read_text())
    other = 256 if manifest["text_tokens"] != 256 else 48
    (weights / "manifest.json").write_text(json.dumps({**manifest, "text_tokens": other}))
    prof = TINY.with_(tiny_weights=str(weights), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=f"text_tokens={other}"):
        load_pipeline(prof)
    assert load_pipeline(prof.with_(text_tokens=other)).prompter.max_length == other


def test_a_build_installs_into_a_cache_and_damaged_files_are_refused(quick_build, tmp_path):
    """What the tiny profile will do with shipped weights: copy a build's files after checking
    them against its manifest, and refuse a damaged or unlisted build without leaving a cache."""
    out, _ = quick_build
    cache = T.install_trained_models(tmp_path / "cache", out)
    for rel in (T.UNET_REL, T.VAE_REL):
        assert (cache / rel).read_bytes() == (out / rel).read_bytes()
    assert (cache / T.TEXT_ENCODER_REL / "model.safetensors").is_file()
    assert json.loads((cache / "tiny_models.json").read_text())["format_version"] == T.FORMAT_VERSION
    weights = tmp_path / "weights"
    shutil.copytree(out, weights)
    path = weights / T.VAE_REL
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(T.ShippedWeightsError, match="does not match its manifest"):
        T.install_trained_models(tmp_path / "cache2", weights)
    assert not (tmp_path / "cache2").exists()
    (weights / "manifest.json").unlink()
    with pytest.raises(T.ShippedWeightsError, match="missing"):
        T.install_trained_models(tmp_path / "cache2", weights)


def test_the_shipped_weights_match_their_manifest_and_are_what_the_profile_loads(tmp_path):
    """The files in kolors_course/world/weights are the ones their manifest lists (SHA-256), within
    the issue's 20 MB, and the tiny profile's cache is filled from them."""
    manifest = T.check_shipped()
    total = sum(info["bytes"] for info in manifest["files"].values())
    assert total <= 20 * 2 ** 20, total
    assert manifest["settings"]["image_size"] == T.IMAGE_SIZE
    cache = T.build_tiny_models(tmp_path / "cache")
    for rel in (T.UNET_REL, T.VAE_REL):
        assert (cache / rel).read_bytes() == (T.shipped_weights_dir() / rel).read_bytes()


def test_weights_of_another_width_are_refused_before_loading(tmp_path):
    """A build folder whose UNet (or VAE) was made at other channel widths than the kit's tiny classes
    is refused with a message naming both widths, before any state dict is loaded."""
    weights = tmp_path / "weights"
    shutil.copytree(T.shipped_weights_dir(), weights)
    manifest = json.loads((weights / "manifest.json").read_text())
    wider = [c * 3 // 2 for c in T.CH]
    (weights / "manifest.json").write_text(json.dumps({**manifest, "settings": {**manifest["settings"],
                                                                                "unet_channels": wider}}))
    with pytest.raises(T.ShippedWeightsError, match=re.escape(f"UNet of channels {wider}") + ".*build-tiny"):
        T.build_tiny_models(tmp_path / "cache", weights=weights)
    assert not (tmp_path / "cache" / T.UNET_REL).exists()


def test_the_build_defaults_are_the_shipped_recipe():
    """``kolors-course build-tiny`` with no options rebuilds what ships: the shipped manifest's VAE
    and UNet settings are the defaults' and the recipes' (a recipe changed without a rebuild, or a
    rebuild shipped without changing the defaults, fails here)."""
    from kolors_course.world.build import DEFAULTS, UNET_RECIPE, VAE_RECIPE

    settings = T.check_shipped()["settings"]
    for key in ("n_scenes", "captions_per_scene", "vae_images", "vae_steps", "vae_crop", "vae_batch", "unet_steps",
                "unet_batch"):
        assert settings[key] == DEFAULTS[key], key
    assert settings["vae"]["steps"] == DEFAULTS["vae_steps"] and settings["unet"]["steps"] == DEFAULTS["unet_steps"]
    for key, value in VAE_RECIPE.items():
        assert settings["vae"][key] == value, key
    for key, value in UNET_RECIPE.items():
        assert settings["unet"][key] == value, key
    from kolors_course.core.profiles import TINY

    assert T.check_shipped()["text_tokens"] == TINY.text_tokens


def test_a_cache_of_other_weights_is_refreshed(tmp_path):
    """A cache made from another build (an older kit, a rebuild) is replaced, not reused."""
    cache = T.build_random_tiny_models(tmp_path / "cache")
    before = (cache / T.UNET_REL).read_bytes()
    T.build_tiny_models(cache)
    assert (cache / T.UNET_REL).read_bytes() != before
    assert (cache / T.UNET_REL).read_bytes() == (T.shipped_weights_dir() / T.UNET_REL).read_bytes()


def test_missing_shipped_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(T.ShippedWeightsError, match="build-tiny"):
        T.install_trained_models(tmp_path / "cache", tmp_path / "no-weights")
    assert not (tmp_path / "cache").exists()


def test_the_stages_can_run_apart_reproducibly_and_must_agree(quick_build, tmp_path):
    """`--stage vae`, `unet` and `controlnet` as separate runs give the same bytes as one run (the
    module's build: same seed, so this is also the reproducibility check); a ControlNet not built
    beside this UNet, or a UNet of another world, is refused at `finish`."""
    out = tmp_path / "apart"
    with pytest.raises(FileNotFoundError, match="'unet' stage"):
        build_tiny(out, quick=True, seed=0, stages=("controlnet",))
    assert build_tiny(out, quick=True, seed=0, stages=("vae",)) is None
    assert build_tiny(out, quick=True, seed=0, stages=("unet",)) is None
    assert build_tiny(out, quick=True, seed=0, stages=("controlnet",)) is None
    m = build_tiny(out, quick=True, seed=0, stages=("finish",), evaluate_result=False)
    one = quick_build[1]
    assert {k: v["sha256"] for k, v in m["files"].items()} == {k: v["sha256"] for k, v in one["files"].items()}
    # a UNet trained again (same world, other steps) leaves the ControlNet beside the old one: refused
    build_tiny(out, quick=True, seed=0, unet_steps=3, stages=("unet",))
    with pytest.raises(ValueError, match="another UNet"):
        build_tiny(out, quick=True, seed=0, stages=("finish",), evaluate_result=False)
    build_tiny(out, quick=True, seed=1, stages=("unet",))
    with pytest.raises(ValueError, match="different settings"):
        build_tiny(out, quick=True, seed=0, stages=("finish",), evaluate_result=False)
    with pytest.raises(FileNotFoundError, match="vae"):
        build_tiny(tmp_path / "empty", quick=True, stages=("finish",))


def test_the_module_entry_point_is_build_tiny_and_records_its_command(tmp_path, capsys):
    """``python -m kolors_course.world.build`` takes build-tiny's options through build-tiny's own
    parser: a bad recipe option is refused before anything is written, and a stage records the
    build-tiny command that remakes it."""
    from kolors_course.world.build import main

    out = tmp_path / "out"
    assert main(["--out", str(out), "--quick", "--stage", "vae", "--vae-option", "edge_weight"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err and not out.exists()
    assert main(["--out", str(out), "--quick", "--stage", "vae"]) == 0
    record = json.loads((out / "parts" / "vae.json").read_text())
    assert record["command"] == f"kolors-course build-tiny --out {out} --quick --stage vae"


def test_the_shape_coverage_is_where_render_draws_the_shape():
    """The UNet's loss weights (``shape_weight``) follow the shape as ``render`` draws it: the
    coverage of each latent cell is the shape's alpha there, read back from the flat-style picture."""
    import numpy as np

    from kolors_course.world import scenes as W

    for i, s in enumerate(W.sample_scenes(12, seed=4)):
        s = W.Scene(**{**s.as_dict(), "style": "扁平"})
        img = np.asarray(W.render(s, seed=i), np.float32)
        fg, bg = (np.asarray(c, np.float32) for c in W.scene_colours(s))
        alpha = ((img - bg) @ (fg - bg)) / float((fg - bg) @ (fg - bg))
        cells = alpha.reshape(16, 8, 16, 8).mean(axis=(1, 3))
        cov = W.shape_coverage(s, seed=i)
        assert cov.shape == (16, 16) and 0.02 < cov.mean() < 0.15
        assert np.abs(cells - cov).max() < 0.03, (s, np.abs(cells - cov).max())
        # another seed jitters the layout, and the coverage moves with it
        assert np.abs(W.shape_coverage(s, seed=i + 100) - cov).max() > 0.1


def test_the_cell_weighted_loss_counts_the_shape_cells_more():
    from kolors_course.world.train_unet import UNetConfig, cell_weighted_mse, train_unet

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 16, 16, generator=gen), torch.zeros(2, 4, 16, 16)
    plain = cell_weighted_mse(pred, target, None)
    assert torch.allclose(plain, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    assert torch.allclose(cell_weighted_mse(pred, target, torch.full((2, 1, 16, 16), 3.0)), plain)
    # an error only in the "shape" cells costs more once those cells are weighted up
    shape = torch.zeros(2, 1, 16, 16)
    shape[:, :, 6:10, 6:10] = 1.0
    err_in_shape = pred * shape
    weighted = cell_weighted_mse(err_in_shape, target, 1.0 + 12.0 * shape)
    assert (weighted > 5 * cell_weighted_mse(err_in_shape, target, None)).all()
    with pytest.raises(ValueError, match="cell_weights"):
        train_unet(None, torch.zeros(1, 4, 16, 16), [[0]], torch.zeros(1, 1, 8), torch.zeros(1, 8),
                   UNetConfig(steps=1, shape_weight=2.0))


def test_a_recipe_override_is_checked_before_anything_trains(tmp_path):
    from kolors_course.world.build import parse_recipe_options

    assert parse_recipe_options(["x0_weight_cap=10", "shape_weight=none", "train_text_encoder=True"]) == {
        "x0_weight_cap": 10.0, "shape_weight": None, "train_text_encoder": True}
    for bad in (["x0_weight_cap"], ["=3"], ["shape_weight=lots"]):
        with pytest.raises(ValueError, match="--unet-option"):
            parse_recipe_options(bad)
    with pytest.raises(ValueError, match="--vae-option edge_weight"):
        parse_recipe_options(["edge_weight=lots"], "--vae-option")
    with pytest.raises(ValueError, match="unknown UNet recipe entries"):
        build_tiny(tmp_path / "out", quick=True, stages=("unet",), unet_recipe={"shape_wieght": 3.0})
    with pytest.raises(ValueError, match="unknown VAE recipe entries"):
        build_tiny(tmp_path / "out", quick=True, stages=("vae",), vae_recipe={"edge_wieght": 3.0})
    assert not (tmp_path / "out" / T.UNET_REL).exists() and not (tmp_path / "out" / T.VAE_REL).exists()


def test_the_edge_map_marks_the_outline_not_flat_colour():
    """``edge_map`` is 1 on a shape's outline and 0 on flat colour, so ``VAEConfig.edge_weight`` makes
    an error on the outline cost more than the same error on a flat area."""
    import numpy as np

    from kolors_course.world import scenes as W
    from kolors_course.world.train_vae import edge_map, images_to_tensor, to_unit

    s = W.Scene(shape="正方形", colour="红色", background="蓝色", style="扁平")
    x = to_unit(images_to_tensor([W.render(s, seed=0)]))
    edges = edge_map(x)[0, 0].numpy()
    cov = W.shape_coverage(s, size=128, seed=0, cell=1)       # per pixel, render's own layout
    t = torch.from_numpy(np.asarray(cov, np.float32))[None, None]
    pool = torch.nn.functional.max_pool2d
    # the outline: where the shape's coverage changes from a pixel to its neighbours
    outline = (pool(t, 3, 1, 1) + pool(-t, 3, 1, 1))[0, 0].numpy() > 0.5
    assert outline.sum() > 100 and edges[outline].mean() > 0.9
    # flat: more than three pixels from the outline, inside the shape or out
    far = pool(torch.from_numpy(outline.astype(np.float32))[None, None], 7, 1, 3)[0, 0].numpy() == 0
    assert far.sum() > 10_000 and edges[far].max() == 0.0


def test_the_encoders_always_index_the_empty_caption():
    """Every recipe needs the empty caption (caption dropout, pooled dropout, the ControlNet's
    unconditional rows): ``encode_captions`` and ``CaptionEncoder`` give it a row whether or not the
    world's captions held one, and it encodes as the prompter encodes ``""``."""
    from kolors_course.world.build import tiny_prompter
    from kolors_course.world.train_unet import CaptionEncoder, encode_captions

    prompter = tiny_prompter()
    caps = ["一个红色的圆形，蓝色背景", "蓝色背景"]
    index, hidden, pooled = encode_captions(prompter, caps, log=None)
    assert set(index) == set(caps) | {""} and len(hidden) == len(pooled) == 3
    _, alone, _ = encode_captions(prompter, [""], log=None)
    assert torch.equal(hidden[index[""]], alone[0])
    assert set(CaptionEncoder(prompter, caps).index) == set(index)


def test_the_build_world_gives_each_stage_the_same_scenes():
    """The shape coverage the UNet's and the ControlNet's losses weight comes from the scenes the
    pictures were drawn from, with their layout seeds (``render``'s own jitter)."""
    import numpy as np

    from kolors_course.world import build as B
    from kolors_course.world import scenes as W

    world = B._world(B.QUICK, seed=3, size=T.IMAGE_SIZE, quick=True)
    cov = world.shape_coverage()
    assert cov.shape == (len(world.scenes), 1, T.IMAGE_SIZE // 8, T.IMAGE_SIZE // 8)
    for i in (0, len(world.scenes) - 1):
        assert np.allclose(cov[i, 0].numpy(), W.shape_coverage(world.scenes[i], seed=world.render_seeds[i]))
        assert world.pixels[i].shape == (3, T.IMAGE_SIZE, T.IMAGE_SIZE)


def test_the_caption_encoder_is_the_prompters_own_call_and_trains_only_the_layers():
    """``CaptionEncoder`` (captions encoded at each step, for a text encoder that trains) gives what
    the pipeline's prompter gives for the same text encoder, and a short joint run moves the
    transformer layers, never the word embeddings."""
    from kolors_course.world.build import tiny_prompter
    from kolors_course.world.train_unet import CaptionEncoder, UNetConfig, encode_captions, train_unet

    prompter = tiny_prompter()
    caps = ["一个红色的圆形，蓝色背景", "蓝色背景上的一个大的红色圆形，在左边", ""]
    index, hidden, pooled = encode_captions(prompter, caps, log=None)
    text = CaptionEncoder(prompter, caps)
    rows = [text.index[c] for c in caps]
    h, p = text(rows)
    assert torch.allclose(h, hidden[[index[c] for c in caps]].float(), atol=2e-3)     # hidden is cached as float16
    assert torch.allclose(p, pooled[[index[c] for c in caps]], atol=1e-5)
    before = {n: t.detach().clone() for n, t in text.text_encoder.named_parameters()}
    torch.manual_seed(0)
    unet = T.diffsynth_classes()["sdxl_unet"]()
    cfg = UNetConfig(steps=3, batch_size=2, warmup_steps=1, train_text_encoder=True, log_every=100)
    run = train_unet(unet, torch.randn(3, 4, 16, 16), [[r] for r in rows], None, None, cfg, log=None, text=text)
    after = dict(text.text_encoder.named_parameters())
    assert set(run["text_encoder"]) == set(text.trainable) and "embedding.word_embeddings.weight" not in text.trainable
    assert torch.equal(after["embedding.word_embeddings.weight"], before["embedding.word_embeddings.weight"])
    moved = [n for n in text.trainable if not torch.equal(after[n], before[n])]
    assert "encoder.layers.0.self_attention.query_key_value.weight" in moved
    with pytest.raises(ValueError, match="CaptionEncoder"):
        train_unet(unet, torch.randn(3, 4, 16, 16), [[r] for r in rows], None, None, cfg, log=None)
    with pytest.raises(ValueError, match="train_text_encoder is off"):
        train_unet(unet, torch.randn(3, 4, 16, 16), [[r] for r in rows], hidden, pooled,
                   UNetConfig(steps=1, batch_size=2), log=None, text=text)


def test_a_build_with_a_trained_text_encoder_ships_its_layers_and_the_pipeline_uses_them(tmp_path):
    """The text encoder's trained layers are written, listed in the manifest, laid over the seeded
    text encoder in the profile's cache (the pipeline encodes with them), and belong to their UNet:
    a UNet retrained beside the frozen text encoder removes them, and stray layers are refused."""
    from kolors_course.models.loading import text_encoder_file_keys

    out = tmp_path / "te"
    m = build_tiny(out, quick=True, seed=0, evaluate_result=False)       # the shipped recipe trains them
    # the ControlNet trains with the loss of the UNet beside it: the same shape weight
    assert m["controlnet"]["config"]["shape_weight"] == m["settings"]["unet"]["shape_weight"] > 0
    from kolors_course.world.build import UNET_RECIPE

    assert m["settings"]["unet"]["pooled_dropout"] == UNET_RECIPE["pooled_dropout"] > 0     # the recipe reached it
    layers = T.trained_text_encoder_layers(out)
    assert str(T.TEXT_ENCODER_TRAINED_REL) in m["files"] and "trained with the UNet" in m["what"]
    assert layers and not any(k.startswith(("embedding.", "output_layer.")) for k in layers)
    seeded = dict(T.text_encoder_module().named_parameters())
    assert any(not torch.equal(v, seeded[k]) for k, v in layers.items())
    cache = T.install_trained_models(tmp_path / "cache", out)
    assert not (cache / T.TEXT_ENCODER_TRAINED_REL).exists()
    assert text_encoder_file_keys(cache / T.TEXT_ENCODER_REL) == set(T.text_encoder_module().state_dict())
    pipe = pipeline_from(out, tmp_path / "cache")
    from kolors_course.world.build import tiny_prompter

    for weights, same in ((out, True), (None, False)):
        _, a = tiny_prompter(weights).encode_prompt("一个红色的圆形，蓝色背景", clip_skip=1, clip_skip_2=2, device="cpu")
        b = pipe.encode_prompt("一个红色的圆形，蓝色背景", positive=True)["encoder_hidden_states"].cpu()
        assert torch.allclose(a, b, atol=1e-6) is same
    # a UNet retrained beside the frozen text encoder takes the layers away ...
    build_tiny(out, quick=True, seed=0, stages=("unet",), unet_recipe={"train_text_encoder": False})
    assert not (out / T.TEXT_ENCODER_TRAINED_REL).exists()
    # ... and layers that no UNet record claims are refused at finish
    (out / "parts" / "controlnet.json").unlink()          # (the old ControlNet is refused too, first)
    T.write_text_encoder_layers(layers, out)
    with pytest.raises(ValueError, match="belongs to another UNet"):
        build_tiny(out, quick=True, seed=0, stages=("finish",), evaluate_result=False)
    bad = tmp_path / "bad"
    T.write_text_encoder_layers({"encoder.layers.9.mlp.dense_4h_to_h.weight": torch.zeros(64, 128)}, bad)
    with pytest.raises(T.ShippedWeightsError, match="another build"):
        T.text_encoder_module(bad)


def test_the_controlnet_loss_weights_the_shape_cells_only_when_told_where_they_are():
    """A shape weight without the shape's coverage is refused before any step; with it, the
    ControlNet's first step moves its weights differently from the plain loss's first step."""
    from kolors_course.world.train_controlnet import ControlNetConfig, controlnet_from_unet, train_controlnet

    classes = T.diffsynth_classes()
    torch.manual_seed(0)
    unet = classes["sdxl_unet"]().eval()
    n, hw = 4, T.IMAGE_SIZE // 8
    latents = torch.randn(n, 4, hw, hw, generator=torch.Generator().manual_seed(1))
    conds = {"canny": torch.zeros(n, 1, T.IMAGE_SIZE, T.IMAGE_SIZE, dtype=torch.uint8),
             "colour": torch.full((n, 3, 16, 16), 128, dtype=torch.uint8)}
    conds["canny"][:, :, 40:60, 40:60] = 255
    hidden = torch.randn(2, 256, T.TEXT_DIM, generator=torch.Generator().manual_seed(2)).half()
    pooled = torch.randn(2, T.TEXT_DIM, generator=torch.Generator().manual_seed(3))
    rows = [[0]] * n
    coverage = torch.zeros(n, 1, hw, hw)
    coverage[:, :, 5:8, 5:8] = 1.0

    def first_step(weight, cells, on=("canny",)):       # the first step trains the canny condition
        cn, _ = controlnet_from_unet(unet, classes["sdxl_controlnet"], seed=0)
        cfg = ControlNetConfig(steps=1, batch_size=2, warmup_steps=1, caption_dropout=0.0, ema_decay=0.0,
                               shape_weight=weight, shape_weighted=on)
        train_controlnet(cn, unet, latents, conds, rows, hidden, pooled, cfg, log=None, cell_weights=cells)
        return torch.cat([p.detach().flatten() for p in cn.controlnet_blocks.parameters()])

    with pytest.raises(ValueError, match="cell_weights"):
        first_step(12.0, None)
    plain = first_step(0.0, None)
    assert not torch.allclose(first_step(12.0, coverage), plain)
    # weighted on the colour condition's steps only: the canny step keeps the plain loss
    assert torch.equal(first_step(12.0, coverage, on=("colour",)), plain)
    with pytest.raises(ValueError, match="shape_weighted"):
        first_step(12.0, coverage, on=("depth",))


def test_pooled_dropout_hides_the_captions_pooled_embedding_and_keeps_its_token_states():
    """With ``pooled_dropout=1`` the UNet trains on the empty caption's pooled embedding for every
    sample: changing the other captions' pooled vectors changes nothing, while changing their token
    states does; without the dropout the pooled vectors count.  No empty caption's row is refused."""
    from kolors_course.world.train_unet import UNetConfig, train_unet

    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(3, 8, T.TEXT_DIM, generator=torch.Generator().manual_seed(2)).half()
    pooled = torch.randn(3, T.TEXT_DIM, generator=torch.Generator().manual_seed(3))
    other_pooled, other_hidden = pooled.clone(), hidden.clone()
    other_pooled[:2] += 5.0                  # rows 0 and 1 are captions; row 2 is the empty one
    other_hidden[:2] += 1.0

    def trained(h, p, dropout):
        torch.manual_seed(0)
        unet = T.diffsynth_classes()["sdxl_unet"]()
        cfg = UNetConfig(steps=2, batch_size=2, warmup_steps=1, ema_decay=0.0, pooled_dropout=dropout)
        run = train_unet(unet, latents, [[0], [1], [0]], h, p, cfg, log=None, empty_row=2)
        return torch.cat([t.flatten() for t in run["ema"].state_dict().values()])

    dropped = trained(hidden, pooled, 1.0)
    assert torch.equal(dropped, trained(hidden, other_pooled, 1.0))
    assert not torch.equal(dropped, trained(other_hidden, pooled, 1.0))
    assert not torch.equal(trained(hidden, pooled, 0.0), trained(hidden, other_pooled, 0.0))
    with pytest.raises(ValueError, match="empty_row"):
        train_unet(None, latents, [[0]], hidden, pooled, UNetConfig(steps=1, pooled_dropout=0.5))


class _RecordingRows:
    """Cached token states for ``train_unet``, recording which caption rows each step reads."""
    def __init__(self):
        self.seen = []

    def __getitem__(self, rows):
        self.seen.append(list(rows))
        return torch.zeros(len(rows), 8, T.TEXT_DIM)


def test_the_layout_curriculum_trains_on_shape_and_place_captions_first():
    """``UNetConfig.layout_first_steps``: the first steps draw each picture's layout captions
    (shape and place only), the rest the world's own; without the layout rows it refuses."""
    import random

    from kolors_course.world import scenes as W
    from kolors_course.world.train_unet import UNetConfig, train_unet

    rng = random.Random(0)
    for scene in W.sample_scenes(20, seed=3):
        cap = W.layout_caption(scene, rng)
        assert scene.shape in cap and (scene.position in cap or scene.position == "中间")
        assert not any(colour in cap for colour in W.COLOURS), cap

    hidden, pooled = _RecordingRows(), torch.zeros(6, T.TEXT_DIM)
    world_rows, layout_rows = [[0], [1], [2]], [[3], [4], [5]]
    torch.manual_seed(0)
    unet = T.diffsynth_classes()["sdxl_unet"]()
    cfg = UNetConfig(steps=5, batch_size=2, warmup_steps=1, layout_first_steps=2, log_every=100)
    train_unet(unet, torch.randn(3, 4, 16, 16), world_rows, hidden, pooled, cfg, log=None, first_rows=layout_rows)
    assert len(hidden.seen) == 5
    assert all(r >= 3 for step in hidden.seen[:2] for r in step), hidden.seen
    assert all(r < 3 for step in hidden.seen[2:] for r in step), hidden.seen
    with pytest.raises(ValueError, match="first_rows"):
        train_unet(unet, torch.randn(3, 4, 16, 16), world_rows, hidden, pooled, cfg, log=None)
    # a curriculum as long as the run would never reach the world's captions: refused, with the fix
    with pytest.raises(ValueError, match="layout_first_steps=N"):
        UNetConfig(steps=2, batch_size=2, layout_first_steps=2)


def test_the_shape_primer_trains_on_its_own_pictures_first():
    """``UNetConfig.shape_first_steps``: the first steps draw the primer's pictures and captions
    (one colour pair, big, in the middle, flat: only the shape differs), the rest the world's."""
    from kolors_course.world import scenes as W
    from kolors_course.world.train_unet import Primer, UNetConfig, train_unet

    primer_list = W.primer_scenes(8)
    assert {s.shape for s in primer_list} == set(W.SHAPES)
    assert len({(s.colour, s.background, s.size, s.position, s.style, s.painter) for s in primer_list}) == 1
    assert all(s.shape in c for s in primer_list for c in W.primer_captions(s))

    class Recorder(torch.nn.Module):
        """The UNet, recording the size of each step's clean-latent batch's source via its noisy input."""
        def __init__(self, unet):
            super().__init__()
            self.unet, self.inputs = unet, []

        def forward(self, noisy, **kw):
            self.inputs.append(noisy.detach().abs().mean().item())
            return self.unet(noisy, **kw)

    hidden, pooled = _RecordingRows(), torch.zeros(8, T.TEXT_DIM)
    torch.manual_seed(0)
    unet = Recorder(T.diffsynth_classes()["sdxl_unet"]())
    # primer latents far larger than the world's: the noisy input says which set a step drew from
    primer = Primer(torch.full((5, 4, 16, 16), 500.0), [[3], [4], [5], [6], [7]], torch.zeros(5, 1, 16, 16))
    cfg = UNetConfig(steps=5, batch_size=2, warmup_steps=1, shape_first_steps=2, log_every=100, shape_weight=1.0)
    train_unet(unet, torch.zeros(3, 4, 16, 16), [[0], [1], [2]], hidden, pooled, cfg, log=None,
               cell_weights=torch.zeros(3, 1, 16, 16), primer=primer)
    assert all(r >= 3 for step in hidden.seen[:2] for r in step) and all(r < 3 for step in hidden.seen[2:] for r in step)
    assert min(unet.inputs[:2]) > 5 > max(unet.inputs[2:]), unet.inputs
    with pytest.raises(ValueError, match="primer"):
        train_unet(unet, torch.zeros(3, 4, 16, 16), [[0], [1], [2]], hidden, pooled, cfg, log=None,
                   cell_weights=torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="shape_first_steps=N"):
        UNetConfig(steps=2, batch_size=2, shape_first_steps=2)
    with pytest.raises(ValueError, match="one first phase"):
        UNetConfig(steps=9, batch_size=2, shape_first_steps=2, layout_first_steps=2)


def test_the_noisy_step_weighting_applies_only_in_its_window_of_steps(monkeypatch):
    """``UNetConfig.noisy_weight_from`` / ``noisy_weight_until``: the share of timesteps from the top of
    the schedule and the noisy-step loss weight apply to the steps of the window only, plain min-SNR
    to the others."""
    import kolors_course.world.train_unet as TU

    class Recorder(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet, self.timesteps = unet, []

        def forward(self, noisy, timestep, **kw):
            self.timesteps.append(timestep.detach().clone())
            return self.unet(noisy, timestep=timestep, **kw)

    caps = []
    real = TU.min_snr_weight
    monkeypatch.setattr(TU, "min_snr_weight", lambda a, gamma, cap=None: caps.append(cap) or real(a, gamma, cap))
    torch.manual_seed(0)
    unet = Recorder(T.diffsynth_classes()["sdxl_unet"]())
    cfg = TU.UNetConfig(steps=5, batch_size=16, warmup_steps=1, log_every=100, x0_weight_cap=100.0,
                        high_t_fraction=1.0, high_t_start=0.9, noisy_weight_from=1, noisy_weight_until=3)
    TU.train_unet(unet, torch.zeros(3, 4, 16, 16), [[0], [1], [2]], torch.zeros(3, 8, T.TEXT_DIM),
                  torch.zeros(3, T.TEXT_DIM), cfg, log=None)
    top = 0.9 * 1100 - 2                  # the schedule's top tenth (its timesteps are not quite integers)
    in_window = [bool((t >= top).all()) for t in unet.timesteps]
    assert in_window == [False, True, True, False, False], unet.timesteps
    assert caps == [None, 100.0, 100.0, None, None]
    with pytest.raises(ValueError, match="holds no step"):
        TU.UNetConfig(noisy_weight_from=3, noisy_weight_until=3)


def test_captions_with_outside_words_train_the_unet_but_not_the_text_encoder():
    """``UNetConfig.text_encoder_world_only``: a caption holding a word from outside the world sends no
    gradient into the text encoder's layers (so they are never taught to flatten an unknown word such
    as a LoRA's trigger word), while the UNet still trains on it; a world caption moves the layers."""
    from kolors_course.world import scenes as W
    from kolors_course.world.build import tiny_prompter
    from kolors_course.world.train_unet import CaptionEncoder, UNetConfig, train_unet

    world = ["一个红色的圆形，蓝色背景", "简单的蓝色背景上的一个大的红色圆形，在左边，干净"]
    outside = ["小猫，一个红色的圆形，蓝色背景", "一个红色的圆形，蓝色背景，最佳质量", "photo"]
    assert not any(W.has_outside_word(c) for c in world) and all(W.has_outside_word(c) for c in outside)

    def moved(caps):
        text = CaptionEncoder(tiny_prompter(), caps)
        flags = torch.tensor([W.has_outside_word(c) for c in text.captions])
        before = {n: t.detach().clone() for n, t in text.trainable.items()}
        torch.manual_seed(0)
        unet = T.diffsynth_classes()["sdxl_unet"]()
        unet_before = {n: t.detach().clone() for n, t in unet.named_parameters()}
        # no weight decay: it would shrink the layers with or without a gradient
        cfg = UNetConfig(steps=2, batch_size=2, warmup_steps=1, train_text_encoder=True, log_every=100,
                         text_encoder_world_only=True, weight_decay=0.0)
        train_unet(unet, torch.randn(len(caps), 4, 16, 16), [[text.index[c]] for c in caps], None, None, cfg,
                   log=None, text=text, outside_rows=flags)
        unet_moved = any(not torch.equal(t, unet_before[n]) for n, t in unet.named_parameters())
        return any(not torch.equal(t, before[n]) for n, t in text.trainable.items()), unet_moved

    assert moved(outside) == (False, True)
    assert moved(world) == (True, True)
    with pytest.raises(ValueError, match="outside_rows"):
        text = CaptionEncoder(tiny_prompter(), world)
        train_unet(T.diffsynth_classes()["sdxl_unet"](), torch.randn(2, 4, 16, 16), [[0], [1]], None, None,
                   UNetConfig(steps=1, batch_size=2, train_text_encoder=True, text_encoder_world_only=True),
                   log=None, text=text)
